"""Level 4, backward: gradients of sum(y * dy) + c * balance_loss for a seeded random cotangent.

Tight against the reference's gradient at the backend's effective weights (straight-through or the
prequant custom VJP, as the scheme says), above the fidelity floor against the float gradient, and
exactly zero for experts that received no token.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference.flips import gate_cotangent_magnitude
from qmoe.suite.bounds import CaseBounds, effective_as_params, router_vjp_rounding, router_vjp_scale
from qmoe.suite.cases import BALANCE_COEFF
from qmoe.suite.checks import assert_close, assert_exactly_zero, assert_sqnr, fail
from qmoe.suite.tolerances import tolerance

pytestmark = pytest.mark.conformance


def applies_to(caps, test_name: str, params: dict) -> str | None:
    """The fidelity test applies to quantized schemes only: ``none`` is compared tightly to float."""
    scheme = params["target"].scheme
    if test_name.endswith("_fidelity") and not tolerance(scheme, "float32", "forward").sqnr_floor_db:
        return f"scheme {scheme} has no fidelity floor (compared tightly to float)"
    return None
REQUIRES = ("backward",)

def _kind(name: str) -> str:
    return name if name in ("x", "router") else "weights"


def test_backward(backend, target, data, prepared, backend_backward):
    tol = tolerance(target.scheme, target.dtype, "backward")
    grads = backend_backward
    eff = effective_as_params(backend, prepared)
    expected = reference.backward(data.spec, eff, data.x, data.dy, target.scheme, BALANCE_COEFF,
                                  weights_are_effective=True)
    missing = sorted(set(expected) - set(grads))
    if missing:
        fail("backward", f"returned no gradient for {missing}")
    bounds = CaseBounds(tol, data.spec, eff, data.x, target.scheme, target.dtype, dy=data.dy)
    for name, value in expected.items():
        if name in ("w13", "w2"):
            for e in range(data.spec.experts):
                if not np.any(value[e]):
                    assert_exactly_zero(grads[name][e], f"grad.{name}[expert={e}]")
                else:
                    bound = bounds.gradient(name, e)
                    assert_close(grads[name][e], value[e], bound.relative, f"grad.{name}[expert={e}]", bound.reason,
                                 by_row=False, extra=bound.absolute)
        else:
            bound = bounds.gradient(name)
            assert_close(grads[name], value, bound.relative, f"grad.{name}", bound.reason, by_row=(name == "x"),
                         extra=bound.absolute)


def test_backward_fidelity(target, data, backend_backward):
    tol = tolerance(target.scheme, target.dtype, "backward")
    grads = backend_backward
    expected = reference.backward(data.spec, data.params, data.x, data.dy, "none", BALANCE_COEFF)
    terms = gate_cotangent_magnitude(data.spec, data.params, data.x, data.dy, target.scheme)
    scale = router_vjp_scale(target.dtype)
    for name, value in expected.items():
        floor = tol.floor(_kind(name))
        if floor is not None:
            noise = np.linalg.norm(router_vjp_rounding(scale, terms, data.x, data.params.router, name))
            assert_sqnr(grads[name], value, floor, f"grad.{name} vs float", rounding_noise=float(noise))
