"""Level 3, forward: routing equals the reference's; the output equals the reference evaluated at
the backend's effective weights (tight) and stays above the scheme's fidelity floor against float."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from reference import MoEParams

from .cases import routing_gaps
from .checks import ConformanceError, assert_close, assert_sqnr, rerun_hint
from .tolerances import tolerance

pytestmark = pytest.mark.conformance


def effective_as_params(backend, prepared) -> MoEParams:
    """The backend's effective weights as MoEParams (the reference evaluates at them)."""
    weights = backend.effective_weights(prepared)
    return MoEParams(**{k: np.asarray(v, dtype=np.float64) for k, v in weights.items()})


def assert_same_routing(spec, params, x, result, expected, what: str) -> None:
    """Expert ids equal where the reference's choice is unambiguous (a gap of exactly 0 is a tie the
    lower index must win); gate weights to float32 router precision."""
    gaps = routing_gaps(spec, params, x)
    decided = (gaps == 0) | (gaps >= 1e-4)
    ids = np.asarray(result.expert_ids)
    if ids.shape != expected.expert_ids.shape:
        raise ConformanceError(f"{what}.expert_ids: shape {ids.shape}, expected {expected.expert_ids.shape}")
    wrong = (ids != expected.expert_ids) & decided
    if wrong.any():
        t, k = (int(i) for i in np.argwhere(wrong)[0])
        raise ConformanceError(
            f"{what}.expert_ids: {int(wrong.sum())} of {ids.size} differ; token {t} slot {k}: got expert "
            f"{ids[t, k]}, reference {expected.expert_ids[t, k]} (reference row {expected.expert_ids[t].tolist()})"
            f"\n{rerun_hint()}")
    assert_close(np.asarray(result.gate_weights), expected.gate_weights, 1e-5, f"{what}.gate_weights",
                 "router computed in float32: softmax/sigmoid to ~1e-6 relative")


def test_forward(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "forward")
    result = backend.forward(prepared, data.x)
    eff = effective_as_params(backend, prepared)
    expected = reference.forward(data.spec, eff, data.x, target.scheme, weights_are_effective=True)
    assert_same_routing(data.spec, eff, data.x, result, expected, "forward")
    assert_close(np.asarray(result.y), expected.y, tol.tight, "forward.y", tol.reason)
    assert abs(float(result.balance_loss) - expected.balance_loss) <= 1e-5 * max(1.0, expected.balance_loss), \
        f"balance_loss {float(result.balance_loss)} vs reference {expected.balance_loss}\n{rerun_hint()}"


def test_forward_fidelity(backend, target, data, prepared):
    floor = tolerance(target.scheme, target.dtype, "forward").floor("y")
    if floor is None:
        pytest.skip(f"scheme {target.scheme} has no fidelity floor: it is compared tightly to float")
    y = np.asarray(backend.forward(prepared, data.x).y)
    assert_sqnr(y, reference.forward(data.spec, data.params, data.x).y, floor, "forward.y vs float")
