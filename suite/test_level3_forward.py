"""Level 3, forward: routing equals the reference's; the output equals the reference evaluated at
the backend's effective weights (tight) and stays above the scheme's fidelity floor against float."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from reference import MoEParams

from .cases import routing_gaps
from .checks import ConformanceError, assert_close, assert_sqnr, check_shape, rerun_hint
from .tolerances import FLOAT32_EPS, GATE_RELATIVE, GATE_UNDERFLOW, LOGIT_ERROR_TERMS, tolerance

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
    gates = np.asarray(result.gate_weights, dtype=np.float64)
    check_shape(gates, expected.gate_weights, f"{what}.gate_weights")
    if not np.all(np.isfinite(expected.gate_weights)):
        raise ConformanceError(f"{what}.gate_weights: the reference's are not finite (a reference bug)")
    bound = gate_weight_bound(params, x) * np.abs(expected.gate_weights).max(axis=-1, keepdims=True)
    excess = np.abs(gates - expected.gate_weights) - (bound + GATE_UNDERFLOW)
    if np.any(excess > 0):
        t, k = (int(i) for i in np.argwhere(excess > 0)[0])
        raise ConformanceError(
            f"{what}.gate_weights: {int((excess > 0).sum())} of {gates.size} differ; token {t} slot {k}: got "
            f"{gates[t, k]:.9g}, reference {expected.gate_weights[t, k]:.9g}, allowed {bound[t, 0]:.2e} "
            f"(float32 router: {GATE_RELATIVE:.0e} relative plus the logit rounding error)\n{rerun_hint()}")


def logit_error_bound(params, x) -> np.ndarray:
    """[T, 1] the relative error a token's gate weights inherit from float32 logits.

    A gate is exp (or sigmoid) of a logit (difference), so an absolute logit error e is a relative
    gate error e; float32 logits err by about u * sum_i |x_i r_i| (two of them in a difference).
    Negligible for the fixed cases; generated layers with outliers reach logits of hundreds.
    """
    row_scale = (np.abs(x) @ np.abs(params.router)).max(axis=-1, keepdims=True)
    return LOGIT_ERROR_TERMS * FLOAT32_EPS * row_scale


def gate_weight_bound(params, x) -> np.ndarray:
    """[T, 1] relative error of a float32 router's gate weights: 1e-5 for the softmax/sigmoid and the
    renormalisation themselves, plus `logit_error_bound`."""
    return GATE_RELATIVE + logit_error_bound(params, x)


def output_bound(tight: float, params, x) -> float:
    """The tight bound on y, plus the gates' relative error from the logits (y is linear in them)."""
    return tight + float(logit_error_bound(params, x).max())


def test_forward(backend, target, data, prepared):
    tol = tolerance(target.scheme, target.dtype, "forward")
    result = backend.forward(prepared, data.x)
    eff = effective_as_params(backend, prepared)
    expected = reference.forward(data.spec, eff, data.x, target.scheme, weights_are_effective=True)
    assert_same_routing(data.spec, eff, data.x, result, expected, "forward")
    assert_close(np.asarray(result.y), expected.y, output_bound(tol.tight, eff, data.x), "forward.y",
                 f"{tol.reason}; plus the gates' logit rounding")
    assert abs(float(result.balance_loss) - expected.balance_loss) <= 1e-5 * max(1.0, expected.balance_loss), \
        f"balance_loss {float(result.balance_loss)} vs reference {expected.balance_loss}\n{rerun_hint()}"


def test_forward_fidelity(backend, target, data, prepared):
    floor = tolerance(target.scheme, target.dtype, "forward").floor("y")
    if floor is None:
        pytest.skip(f"scheme {target.scheme} has no fidelity floor: it is compared tightly to float")
    y = np.asarray(backend.forward(prepared, data.x).y)
    assert_sqnr(y, reference.forward(data.spec, data.params, data.x).y, floor, "forward.y vs float")
