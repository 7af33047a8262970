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

import reference
from reference import SCHEMES

from .checks import ConformanceError, assert_close, rerun_hint
from .cases import router_margin, router_saturated
from .strategies import case_data
from .test_level3_forward import assert_same_routing, effective_as_params, output_bound
from .tolerances import FLOAT32_EPS, GATE_UNDERFLOW, ROUTER_MARGIN_FACTOR, tolerance

pytestmark = pytest.mark.conformance


def _usable(backend, spec, scheme: str) -> bool:
    return backend.capabilities.unsupported(spec, scheme) is None


@given(data=st.data())
def test_generated_forward_backward(backend, data):
    caps = backend.capabilities
    dtype = caps.dtypes[0]
    scheme = data.draw(st.sampled_from([s for s in caps.schemes if s in SCHEMES]), label="scheme")
    case = data.draw(case_data(dtype), label="case")
    if not _usable(backend, case.spec, scheme):
        return  # capability outside what this backend declares: nothing to check for this draw
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
        assert_close(np.asarray(result.y), expected.y, output_bound(tol.tight, eff, case.x), "forward.y",
                     f"{tol.reason}; plus the gates' logit rounding")
    else:
        assert not np.any(np.asarray(result.y)), "reference output is all zero, backend's is not"
    if "backward" not in caps.passes:
        return
    grads = backend.backward(prepared, case.x, case.dy)
    expected_grads = reference.backward(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True)
    btol = tolerance(scheme, dtype, "backward")
    saturated = router_saturated(case.spec, eff, case.x)
    for name, value in expected_grads.items():
        if name == "router" and saturated:
            continue  # rounding noise on both sides: see router_saturated
        got = np.asarray(grads[name], dtype=np.float64)
        if name == "x" and saturated:
            _assert_x_grad_saturated(case, eff, scheme, got, value, btol)
        elif name == "router" and np.any(value):
            _assert_router_grad(case, eff, scheme, got, value, btol)
        elif np.any(value):
            assert_close(got, value, btol.tight, f"grad.{name}", btol.reason, by_row=(name == "x"))
        else:
            assert not np.any(got), f"grad.{name} must be exactly zero like the reference's"


def _assert_x_grad_saturated(case, eff, scheme: str, got: np.ndarray, expected: np.ndarray, btol) -> None:
    """dx of a saturated router: the share through the logits is rounding noise of up to its own size
    (see `router_saturated`), so each row may differ by that share on top of the tight bound."""
    noise = reference.router_path(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True).x_grad
    err = np.linalg.norm(got - expected, axis=1)
    allowed = btol.tight * np.linalg.norm(expected, axis=1) + np.linalg.norm(noise, axis=1)
    if np.any(err > allowed):
        t = int(np.argmax(err - allowed))
        raise ConformanceError(f"grad.x: token {t} differs by {err[t]:.3e} (norm), more than the tight bound "
                               f"plus the saturated router's share {allowed[t]:.3e}\n{rerun_hint()}")


def _assert_router_grad(case, eff, scheme: str, got: np.ndarray, expected: np.ndarray, btol) -> None:
    """dR = x^T d_logits, held to a componentwise bound: (tight + 4u / margin) * |x|^T |d_logits|.

    Generated layers reach what fixed cases avoid: tokens whose d_logits cancel in the sum (dR tiny
    against its terms) and routers near saturation (p (1 - p) in float32 errs by u / margin relative,
    see `router_margin`). Both scale the error a correct float32 backend makes; a wrong one (no
    router gradient, gate ignored) still misses by O(1).
    """
    d_logits = reference.router_path(case.spec, eff, case.x, case.dy, scheme, weights_are_effective=True).d_logits
    margin = router_margin(case.spec, eff, case.x)
    relative = btol.tight + ROUTER_MARGIN_FACTOR * FLOAT32_EPS / margin
    allowed = relative * np.linalg.norm(np.abs(case.x).T @ np.abs(d_logits))
    err = np.linalg.norm(got - expected)
    if not err <= allowed:
        raise ConformanceError(f"grad.router: error {err:.3e} (Frobenius) > {allowed:.3e} = ({btol.tight:.0e} + 4u / "
                               f"router margin {margin:.1e}) * || |x|^T |d_logits| ||; reference norm "
                               f"{np.linalg.norm(expected):.3e}\n{rerun_hint()}")
