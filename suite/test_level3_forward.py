"""Level 3, forward: routing equals the reference's; the output equals the reference evaluated at
the backend's effective weights (tight) and stays above the scheme's fidelity floor against float."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from .bounds import CaseBounds, effective_as_params
from .checks import assert_close, assert_same_routing, assert_sqnr, fail
from .tolerances import BALANCE_LOSS_RELATIVE, tolerance

pytestmark = pytest.mark.conformance


def test_forward(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "forward")
    result = backend.forward(prepared, data.x)
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


def test_forward_fidelity(backend, target, data, prepared):
    floor = tolerance(target.scheme, target.dtype, "forward").floor("y")
    if floor is None:
        pytest.skip(f"scheme {target.scheme} has no fidelity floor: it is compared tightly to float")
    y = np.asarray(backend.forward(prepared, data.x).y)
    assert_sqnr(y, reference.forward(data.spec, data.params, data.x).y, floor, "forward.y vs float")
