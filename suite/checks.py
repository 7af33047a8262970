"""Comparisons that explain themselves: shape and finiteness first, then error figures against a
bound, and a message naming what differed, by how much, where, against which tolerance, and how to
rerun that one case. Every comparison's figures are recorded for the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from qmoe.reference import sqnr_db

from .bounds import gate_weight_bound
from .cases import routing_gaps
from .tolerances import GATE_RELATIVE, GATE_UNDERFLOW, REQUANTIZED_MIN_MOVE, REQUANTIZED_STEP_RELATIVE, ROUTING_MARGIN

#: Set by the suite's plugin: receives (what, figures as a dict) for the running test.
_recorder: Callable[[str, dict], None] | None = None


def set_recorder(recorder: Callable[[str, dict], None] | None) -> None:
    global _recorder
    _recorder = recorder


def _record(what: str, figures: dict) -> None:
    if _recorder is not None:
        # Plain Python numbers: the figures travel in test reports (JSON, pytest-xdist's serializer).
        _recorder(what, {k: (v.item() if isinstance(v, np.generic) else v) for k, v in figures.items()})


@dataclass(frozen=True)
class ErrorFigures:
    """How far ``actual`` is from ``expected``.

    ``worst_row_rel``: max over rows (tokens; experts for 3-d weights) of ||a - r|| / ||r||; a row
    whose reference is exactly zero must be exactly zero too (else the figure is inf).
    """

    max_abs: float
    worst_row_rel: float
    worst_row: int
    mean_rel: float
    sqnr_db: float
    #: error / allowed error at the row where that is largest (> 1 fails); None where no bound applied
    ratio: float | None = None
    #: the relative bound at that row (allowed error / reference norm)
    bound: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "sqnr_db" else v)
                for k, v in asdict(self).items()}


def error_figures(actual: np.ndarray, expected: np.ndarray, by_row: bool = True) -> ErrorFigures:
    """Figures per row (token) when ``by_row``, else for the tensor as one row.

    Weight and router gradients are sums over tokens whose terms cancel: one small entry can carry a
    large relative error that says nothing about the kernel, so they are compared as whole tensors.
    """
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(expected, dtype=np.float64)
    diff = np.abs(a - r)
    rows_a = a.reshape(a.shape[0], -1) if (a.ndim > 1 and by_row) else a.reshape(1, -1)
    rows_r = r.reshape(rows_a.shape)
    err = np.linalg.norm(rows_a - rows_r, axis=1)
    ref = np.linalg.norm(rows_r, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, err / np.where(ref > 0, ref, 1.0), np.where(err > 0, np.inf, 0.0))
    worst = int(np.argmax(rel)) if rel.size else 0
    scale = np.abs(r).mean() if r.size else 0.0
    mean_rel = float(diff.mean() / scale) if scale > 0 else (0.0 if diff.max(initial=0) == 0 else math.inf)
    return ErrorFigures(float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), worst, mean_rel,
                        sqnr_db(r, a))


def rerun_hint() -> str:
    """The command that reruns the current test alone (from pytest's own env var)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    return f"rerun: pytest '{current}'" if current else ""


class ConformanceError(AssertionError):
    """A backend disagrees with the reference beyond the tolerance table."""


def fail(what: str, detail: str, error: float | None = None, bound: float | None = None) -> None:
    """Raise a ConformanceError naming ``what``; record ``error`` against ``bound`` (same units) so the
    report and the mutant tests can say by how much a check failed. A discrete mismatch (an expert
    id, a missing gradient) records no figures: it fails by any margin."""
    if error is not None and bound is not None:
        ratio = math.inf if bound == 0 else error / bound
        _record(what, {"failed": True, "error": float(error), "bound": float(bound), "ratio": float(ratio)})
    elif error is None and bound is None:
        _record(what, {"failed": True, "error": None, "bound": None, "ratio": math.inf})
    raise ConformanceError(f"{what}: {detail}\n{rerun_hint()}")



def check_shape(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    actual = np.asarray(actual)
    if actual.shape != np.shape(expected):
        fail(what, f"shape {actual.shape}, expected {np.shape(expected)}")
    if actual.dtype.kind not in "fiu":
        fail(what, f"dtype {actual.dtype} is not numeric")
    bad = ~np.isfinite(actual.astype(np.float64))
    if bad.any():
        fail(what, f"{int(bad.sum())} non-finite value(s), first at index "
                    f"{tuple(int(i) for i in np.argwhere(bad)[0])}")


def assert_close(actual: np.ndarray, expected: np.ndarray, tight: float | np.ndarray, what: str,
                 reason: str = "", by_row: bool = True, extra: np.ndarray | float = 0.0) -> ErrorFigures:
    """Each row's error ||a_t - r_t|| <= tight_t ||r_t|| + extra_t; records the figures.

    Rows are tokens (``by_row``) or the whole tensor as one row. ``tight`` is a relative bound (one
    number, or one per row) and ``extra`` an absolute one per row: the effect of the quantizer
    code flips the reference found possible in that row (`qmoe.reference.flip_envelope`). The reference
    must not be all zeros (a backend returning zeros would then pass): that is a case bug and fails too.
    """
    check_shape(actual, expected, what)
    if not np.any(np.asarray(expected)):
        fail(what, "the reference is all zeros, so this comparison could not fail; fix the case")
    figures = error_figures(actual, expected, by_row)
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(expected, dtype=np.float64)
    rows = a.shape[0] if (a.ndim > 1 and by_row) else 1
    err = np.linalg.norm((a - r).reshape(rows, -1), axis=1)
    ref = np.linalg.norm(r.reshape(rows, -1), axis=1)
    allowed = np.broadcast_to(np.asarray(tight, dtype=np.float64), (rows,)) * ref \
        + np.broadcast_to(np.asarray(extra, dtype=np.float64), (rows,))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(allowed > 0, err / np.where(allowed > 0, allowed, 1.0), np.where(err > 0, np.inf, 0.0))
        relative_bound = np.where(ref > 0, allowed / np.where(ref > 0, ref, 1.0), np.inf)
    worst = int(np.argmax(ratios))
    figures = dataclasses.replace(figures, ratio=float(ratios[worst]), bound=float(relative_bound[worst]))
    _record(what, figures.as_dict())
    if not ratios[worst] <= 1.0:
        row = f"row {worst}" if rows > 1 else "the tensor"
        fail(what, f"{row}: error {err[worst]:.3e} > allowed {allowed[worst]:.3e} "
                    f"({ratios[worst]:.3g}x the bound; relative error {err[worst] / max(ref[worst], 1e-300):.3e} "
                    f"against a relative bound of {relative_bound[worst]:.2e}; worst relative row "
                    f"{figures.worst_row} at {figures.worst_row_rel:.3e}, max abs {figures.max_abs:.3e}, "
                    f"SQNR {figures.sqnr_db:.1f} dB)" + (f"; tolerance: {reason}" if reason else ""),
              error=float(err[worst]), bound=float(allowed[worst]))
    return figures


def assert_sqnr(actual: np.ndarray, expected: np.ndarray, floor_db: float, what: str,
                rounding_noise: float = 0.0) -> float:
    """Fidelity: SQNR of ``actual`` against the float reference is at least ``floor_db``.

    ``rounding_noise``: an error norm that float rounding alone may cause in this case (see
    `qmoe.suite.bounds.router_vjp_rounding`); the floor then applies to the error beyond it, so a
    case whose reference is itself a cancellation does not fail a correct backend.
    """
    check_shape(actual, expected, what)
    if not np.any(np.asarray(expected)):
        fail(what, "the float reference is all zeros, so its SQNR says nothing; fix the case")
    figures = error_figures(actual, expected)
    _record(what, figures.as_dict())
    reference_norm = float(np.linalg.norm(np.asarray(expected, dtype=np.float64)))
    allowed = reference_norm * 10 ** (-floor_db / 20) + rounding_noise
    effective_floor = 20 * np.log10(reference_norm / allowed)
    if not figures.sqnr_db >= effective_floor:
        noise = f" (floor {floor_db:.1f} dB less rounding noise {rounding_noise:.2e})" if rounding_noise else ""
        # In noise power: (floor - actual) dB as a ratio of allowed to seen noise.
        fail(what, f"SQNR {figures.sqnr_db:.1f} dB < floor {effective_floor:.1f} dB{noise} against the float "
                   f"reference (max abs {figures.max_abs:.3e})",
             error=10 ** (-figures.sqnr_db / 10), bound=10 ** (-effective_floor / 10))
    return figures.sqnr_db


def assert_exactly_zero(actual: np.ndarray, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    if np.any(actual != 0):
        fail(what, f"must be exactly zero (no token reached it), max |value| {np.abs(actual).max():.3e}")


def assert_requantized_step(actual: np.ndarray, start: np.ndarray, grad: np.ndarray, lr: float,
                            step: np.ndarray, tight: float, what: str) -> None:
    """``actual`` is a valid requantization of the float SGD step ``start - lr * grad``.

    Valid: every element within one quantization ``step`` (its scale, broadcastable) of the float
    step, plus slack for the backend's own gradient error: ``tight`` of each leading-axis slice's
    gradient norm (the backward is held to a worst-row relative error, and an element's error is at
    most its row's). And the weights must move at least half as far as the step asks, so a backend
    that lost the update in requantization fails.
    """
    actual = np.asarray(actual, dtype=np.float64)
    stepped = start - lr * grad
    check_shape(actual, stepped, what)
    step = np.broadcast_to(step, stepped.shape)
    norms = np.linalg.norm(grad.reshape(grad.shape[0], -1), axis=1) if grad.ndim > 1 else np.abs(grad)
    slack = (tight * lr * norms).reshape(-1, *([1] * (stepped.ndim - 1)))
    excess = np.abs(actual - stepped) - (step * (1 + REQUANTIZED_STEP_RELATIVE) + slack)
    if np.any(excess > 0):
        i = tuple(int(v) for v in np.argwhere(excess > 0)[0])
        fail(what, f"{actual[i]:.6g} is more than one step ({step[i]:.3e}, plus gradient slack "
                    f"{np.broadcast_to(slack, stepped.shape)[i]:.2e}) from the reference's float step "
                    f"{stepped[i]:.6g} at {i}")
    moved, wanted = np.linalg.norm(actual - start), np.linalg.norm(stepped - start)
    if wanted > 0 and not moved >= REQUANTIZED_MIN_MOVE * wanted:
        fail(what, f"weights moved {moved:.3e}, the step asks for {wanted:.3e}")


def assert_same_routing(spec, params, x, result, expected, what: str) -> None:
    """Expert ids equal where the reference's choice is unambiguous (a gap of exactly 0 is a tie the
    lower index must win); gate weights to float32 router precision."""
    gaps = routing_gaps(spec, params, x)
    decided = (gaps == 0) | (gaps >= ROUTING_MARGIN)
    ids = np.asarray(result.expert_ids)
    if ids.shape != expected.expert_ids.shape:
        fail(f"{what}.expert_ids", f"shape {ids.shape}, expected {expected.expert_ids.shape}")
    wrong = (ids != expected.expert_ids) & decided
    if wrong.any():
        t, k = (int(i) for i in np.argwhere(wrong)[0])
        fail(f"{what}.expert_ids",
             f"{int(wrong.sum())} of {ids.size} differ; token {t} slot {k}: got expert {ids[t, k]}, reference "
             f"{expected.expert_ids[t, k]} (reference row {expected.expert_ids[t].tolist()})")
    gates = np.asarray(result.gate_weights, dtype=np.float64)
    check_shape(gates, expected.gate_weights, f"{what}.gate_weights")
    if not np.all(np.isfinite(expected.gate_weights)):
        fail(f"{what}.gate_weights", "the reference's are not finite (a reference bug)")
    bound = gate_weight_bound(params, x) * np.abs(expected.gate_weights).max(axis=-1, keepdims=True)
    error = np.abs(gates - expected.gate_weights)
    allowed = np.broadcast_to(bound + GATE_UNDERFLOW, gates.shape)
    if np.any(error > allowed):
        t, k = np.unravel_index(np.argmax(error / allowed), gates.shape)
        fail(f"{what}.gate_weights",
             f"{int((error > allowed).sum())} of {gates.size} differ; worst token {t} slot {k}: got "
             f"{gates[t, k]:.9g}, reference {expected.gate_weights[t, k]:.9g}, allowed {allowed[t, k]:.2e} "
             f"(float32 router: {GATE_RELATIVE:.0e} relative plus the logit rounding error)",
             error=float(error[t, k]), bound=float(allowed[t, k]))
