"""Generated cases (hypothesis): ragged sizes, T = 1, top_k = experts, zero rows, outlier rows,
skewed and empty routing, capacity drops; forward and backward held to the tight bound.

Generated cases have no fidelity floor (see suite/tolerances.py): per-token int8 of a token with
one outlier feature is lossy by design.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qmoe import reference
from qmoe.reference import SCHEMES
from qmoe.suite.bounds import Bound, CaseBounds, effective_as_params
from qmoe.suite.cases import router_margin, router_saturated
from qmoe.suite.checks import assert_close, assert_same_routing, fail
from qmoe.suite.strategies import case_data
from qmoe.suite.tolerances import FLOAT32_EPS, GATE_UNDERFLOW, ROUTER_MARGIN_FACTOR, tolerance

pytestmark = pytest.mark.conformance


def _usable(backend, spec, scheme: str) -> bool:
    return backend.capabilities.unsupported(spec, scheme) is None


@given(data=st.data())
def test_generated_forward_backward(backend, data):
    caps = backend.capabilities
    dtype = data.draw(st.sampled_from(caps.dtypes), label="dtype")
    scheme = data.draw(st.sampled_from([s for s in caps.schemes if s in SCHEMES]), label="scheme")
    case = data.draw(case_data(dtype, multiple=caps.min_multiple.get(scheme, 1)), label="case")
    assume(_usable(backend, case.spec, scheme))
    tol = tolerance(scheme, dtype, "forward")
    prepared = backend.prepare(case.spec, case.params, scheme, dtype)
    eff = effective_as_params(backend, prepared)
    result = backend.forward(prepared, case.x)
    expected = reference.forward(case.spec, eff, case.x, scheme, weights_are_effective=True)
    # A float32 router flushes gates below its smallest normal number (1.2e-38) to zero, and the
    # token's output with them: the reference's tiny nonzero output is not a contract such a backend
    # can meet (the gate check itself allows the flush; see GATE_UNDERFLOW).
    assume(np.abs(expected.gate_weights).min(initial=1.0) > 1e6 * GATE_UNDERFLOW)
    assert_same_routing(case.spec, eff, case.x, result, expected, "forward")
    if np.any(expected.y):
        bound = CaseBounds(tol, case.spec, eff, case.x, scheme, dtype).output()
        assert_close(np.asarray(result.y), expected.y, bound.relative, "forward.y", bound.reason, extra=bound.absolute)
    elif np.any(np.asarray(result.y)):
        fail("forward.y", "the reference output is all zero, the backend's is not")
    if "backward" not in caps.passes:
        return
    grads = backend.backward(prepared, case.x, case.dy)
    expected_grads = reference.backward(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True)
    btol = tolerance(scheme, dtype, "backward")
    bounds = CaseBounds(btol, case.spec, eff, case.x, scheme, dtype, dy=case.dy)
    saturated = router_saturated(case.spec, eff, case.x)
    for name, value in expected_grads.items():
        got = np.asarray(grads[name], dtype=np.float64)
        bound = bounds.gradient(name)
        if name == "x" and saturated:
            _assert_x_grad_saturated(case, eff, scheme, got, value, bound)
        elif name == "router":
            _assert_router_grad(case, eff, scheme, got, value, bound, bounds)
        elif np.any(value):
            assert_close(got, value, bound.relative, f"grad.{name}", bound.reason, by_row=(name == "x"),
                         extra=bound.absolute)
        elif np.any(got):
            fail(f"grad.{name}", "must be exactly zero like the reference's")


def _assert_x_grad_saturated(case, eff, scheme: str, got: np.ndarray, expected: np.ndarray, bound: Bound) -> None:
    """dx of a saturated router: the share through the logits is rounding noise of up to its own size
    (see `router_saturated`), so each row may differ by that share on top of the tight bound. A
    generated layer may have a reference dx of exactly zero (every token's expert share zero, the router
    flat): then the backend's dx must be within that noise of zero."""
    noise = reference.router_path(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True).x_grad
    extra = np.linalg.norm(noise, axis=1) + bound.absolute
    if np.any(expected):
        assert_close(got, expected, bound.relative, "grad.x", f"{bound.reason}; plus the saturated router's share",
                     extra=extra)
        return
    err = np.linalg.norm(got, axis=1)
    if np.any(err > extra):
        t = int(np.argmax(err - extra))
        fail("grad.x", f"the reference's dx is zero; row {t} of the backend's is {err[t]:.3e}, more than the "
                       f"saturated router's share {np.broadcast_to(extra, err.shape)[t]:.3e}",
             error=float(err[t]), bound=float(np.broadcast_to(extra, err.shape)[t]))


def _assert_router_grad(case, eff, scheme: str, got: np.ndarray, expected: np.ndarray, bound: Bound,
                        bounds: CaseBounds) -> None:
    """dR = x^T d_logits, held to a componentwise bound: (tight + 4u / margin) * || |x|^T |d_logits| ||.

    Generated layers reach what fixed cases avoid: tokens whose d_logits cancel in the sum (dR tiny
    against its terms) and routers near saturation (p (1 - p) in float32 errs by u / margin relative,
    see `router_margin`). Both scale the error a correct float32 backend makes; a wrong one (no
    router gradient, gate ignored) still misses by O(1). A router saturated to the last bit (margin 0)
    is rounding noise of the size of its terms: held to that size.
    """
    d_logits = reference.router_path(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True).d_logits
    margin = router_margin(case.spec, eff, case.x)
    terms = np.linalg.norm(np.abs(case.x).T @ np.abs(d_logits))
    tight = float(np.max(bound.relative))
    relative = tight + (ROUTER_MARGIN_FACTOR * FLOAT32_EPS / margin if margin > 0 else 1.0)
    # Each gate's cotangent dy . out is a dot product whose terms can cancel, and the router VJP subtracts
    # its roundings: it errs by tight x the VJP's terms (computed once, by CaseBounds). This replaces the
    # bound's own VJP term (at the table's tight alone), so only its flips are added.
    cancellation = tight * np.linalg.norm(np.abs(case.x).T @ bounds.router_terms)
    allowed = relative * terms + cancellation + float(np.max(bounds.flip_allowance("router")))
    err = float(np.linalg.norm(got - expected))
    if not err <= allowed:
        fail("grad.router", f"error {err:.3e} (Frobenius) > {allowed:.3e} = ({tight:.0e} + 4u / "
                            f"router margin {margin:.1e}) * || |x|^T |d_logits| || + the gate cotangents' "
                            f"cancellation {cancellation:.2e} + possible flips; reference norm "
                            f"{np.linalg.norm(expected):.3e}", error=err, bound=allowed)
