"""Level 3, forward: routing equals the reference's; the output equals the reference evaluated at
the backend's effective weights (tight) and stays above the scheme's fidelity floor against float."""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import reference
from qmoe.suite.bounds import CaseBounds, effective_as_params
from qmoe.suite.checks import assert_close, assert_same_routing, assert_sqnr, fail
from qmoe.suite.tolerances import BALANCE_LOSS_RELATIVE, tolerance

pytestmark = pytest.mark.conformance


def applies_to(caps, test_name: str, params: dict) -> str | None:
    """The fidelity test applies to quantized schemes only: ``none`` is compared tightly to float."""
    scheme = params["target"].scheme
    if test_name.endswith("_fidelity") and not tolerance(scheme, "float32", "forward").sqnr_floor_db:
        return f"scheme {scheme} has no fidelity floor (compared tightly to float)"
    return None


def test_forward(backend, target, data, prepared, backend_forward):
    tol = tolerance(target.scheme, target.dtype, "forward")
    result = backend_forward
    eff = effective_as_params(backend, prepared)
    expected = reference.forward(data.spec, eff, data.x, target.scheme, weights_are_effective=True)
    assert_same_routing(data.spec, eff, data.x, result, expected, "forward")
    bound = CaseBounds(tol, data.spec, eff, data.x, target.scheme, target.dtype).output()
    assert_close(np.asarray(result.y), expected.y, bound.relative, "forward.y", bound.reason, extra=bound.absolute)
    error = abs(float(result.balance_loss) - expected.balance_loss)
    allowed = BALANCE_LOSS_RELATIVE * max(1.0, expected.balance_loss)
    if not error <= allowed:
        fail("forward.balance_loss", f"{float(result.balance_loss)!r} vs reference {expected.balance_loss!r}",
             error=error, bound=allowed)


def test_forward_fidelity(target, data, backend_forward):
    floor = tolerance(target.scheme, target.dtype, "forward").floor("y")
    y = np.asarray(backend_forward.y)
    assert_sqnr(y, reference.forward(data.spec, data.params, data.x).y, floor, "forward.y vs float")
