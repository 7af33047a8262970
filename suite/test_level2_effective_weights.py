"""Level 2, effective weights: the float weights a backend computes with lie on its scheme's grid.

For every parameter the scheme quantizes:

* symmetric int8 with codes fixed by the scheme (``per_expert``, ``per_output_channel``, ``qat_row``):
  the effective weight is the reference's ``codes * scale``, to `EFFECTIVE_CODE_SLACK` codes (float32
  rounding of the scale and of the product). One code of slack only where the given weight sits within
  float32 rounding of a .5 tie and the scale is not a power of two (at a power-of-two scale the tie is
  exact and rounds half to even). In bfloat16 the product may also be stored rounded to bfloat16. A
  wrong scale layout, float weights, scale amax/128 or a second quantizer fail by orders of magnitude.
* affine groups (``affine_group``: MLX ``mx.quantize``, its own scale and bias per group of 64 along the
  contraction axis): each group's values are evenly spaced levels b + q s, integer q in [0, 255] (s and
  b derived from the values themselves, to `AFFINE_LEVEL_SLACK`); each element is the level nearest
  its given weight (round to nearest on the backend's own grid, the end level beyond its ends) and
  within one step s of it (`AFFINE_STEPS_FROM_GIVEN`: MLX's step may be up to 1/256 finer than ours).

Weights the scheme keeps float must be exactly the given weights. Errors and bounds are recorded in
codes (steps), so ``error / bound`` says by how much a check passed or failed.
"""

from __future__ import annotations

import numpy as np
import pytest

from qmoe.reference import get_scheme
from qmoe.reference.quantization import INT8_MAX, Quantized, quantize_weight
from qmoe.suite import checks
from qmoe.suite.cases import round_to_dtype
from qmoe.suite.checks import check_shape, fail
from qmoe.suite.test_level1_quantizer import tie_slack
from qmoe.suite.tolerances import (
    AFFINE_LEVEL_SLACK,
    AFFINE_STEPS_FROM_GIVEN,
    EFFECTIVE_BF16_BOUNDARY,
    EFFECTIVE_CODE_SLACK,
    tolerance,
)

pytestmark = pytest.mark.conformance
CASE_NAMES = ("balanced", "sigmoid", "shared_expert", "wide_g64", "exact_ties")
#: Affine grids are 8-bit in every scheme that uses them (``int8_affine_g64``).
AFFINE_BITS = 8


def _passed(what: str, error: float, bound: float) -> None:
    """Record a passing comparison's figures (the report and the headroom read them)."""
    checks._record(what, {"failed": False, "error": float(error), "bound": float(bound),
                          "ratio": float(error / bound) if bound > 0 else (0.0 if error == 0 else np.inf)})


def _where(index) -> str:
    return str(tuple(int(i) for i in index))


def test_effective_weights(backend, target, data, prepared):
    scheme = get_scheme(target.scheme)
    # The table's entry for this level gives the rule's reason; the bounds are the named constants above.
    reason = tolerance(target.scheme, target.dtype, "effective_weights").reason
    weights = backend.effective_weights(prepared)
    for name, given in data.params.items():
        what = f"effective.{name}"
        if name not in weights:
            fail(what, f"effective_weights has no {name}")
        actual = np.asarray(weights[name], dtype=np.float64)
        check_shape(actual, given, what)
        rule = scheme.weight_quant(name)
        quantized = quantize_weight(given, rule, scheme)
        try:
            if quantized is None:
                _check_float(actual, given, what, scheme.name)
            elif rule == "affine_group":
                _check_affine(actual, given, scheme.group_size, what)
            else:
                _check_symmetric(actual, given, quantized, target.dtype, what, rule)
        except AssertionError as exc:
            raise type(exc)(f"{exc}\ntolerance: {reason}") from None


def _check_float(actual: np.ndarray, given: np.ndarray, what: str, scheme: str) -> None:
    diff = np.abs(actual - given)
    if diff.max(initial=0.0) > 0:
        worst = np.unravel_index(np.argmax(diff), given.shape)
        fail(what, f"scheme {scheme} keeps it float, but it differs from the given weights by up to "
                   f"{diff[worst]:.3e} at {_where(worst)} ({int((diff > 0).sum())} elements differ)",
             error=float(diff[worst]), bound=0.0)


def _check_symmetric(actual: np.ndarray, given: np.ndarray, reference: Quantized, dtype: str, what: str,
                     rule: str) -> None:
    """|actual - codes * scale| / scale <= EFFECTIVE_CODE_SLACK at the reference's codes (or, at a tie
    that float32 may resolve either way, its other neighbour); in bfloat16 also against the bfloat16
    rounding(s) of those grid values."""
    scale = np.broadcast_to(reference.scale, given.shape)
    codes = reference.codes.astype(np.float64)
    ratio = given / scale
    either = tie_slack(ratio, reference.scale)
    other = np.clip(np.where(codes <= ratio, codes + 1, codes - 1), -INT8_MAX, INT8_MAX)
    alternative = np.where(either, other, codes)

    def distance(code: np.ndarray) -> np.ndarray:
        grid = code * scale
        d = np.abs(actual - grid)
        if dtype == "bfloat16":  # the product may be stored in bfloat16: either neighbour near a boundary
            for nudge in (1 - EFFECTIVE_BF16_BOUNDARY, 1 + EFFECTIVE_BF16_BOUNDARY):
                d = np.minimum(d, np.abs(actual - round_to_dtype(grid * nudge, "bfloat16")))
        return d / scale

    error = np.minimum(distance(codes), distance(alternative))
    worst = np.unravel_index(np.argmax(error), given.shape)
    if not error[worst] <= EFFECTIVE_CODE_SLACK:
        i = worst
        ties = "at a .5 tie the float32 quantizer may resolve either way" if either[i] else (
            "an exact tie (power-of-two scale) rounds half to even" if np.abs(np.abs(ratio[i]) % 1 - 0.5) == 0
            else "not at a tie")
        fail(what, f"not on the {rule} grid: {int((error > EFFECTIVE_CODE_SLACK).sum())} of {error.size} elements "
                   f"off; worst at {_where(i)}: {actual[i]!r} is {error[i]:.3g} codes from the reference's "
                   f"{int(codes[i])} x {scale[i]:.6g} = {codes[i] * scale[i]!r} (given {given[i]!r}, "
                   f"given/scale {ratio[i]:.6f}; {ties}); allowed {EFFECTIVE_CODE_SLACK:.2e} codes. Float "
                   f"weights, another scale layout (per tensor, per column), scale amax/128 or a second "
                   f"quantizer look like this",
             error=float(error[i]), bound=EFFECTIVE_CODE_SLACK)
    _passed(what, float(error[worst]), EFFECTIVE_CODE_SLACK)


def _groups(a: np.ndarray, group_size: int) -> np.ndarray:
    """[..., in, out] -> [groups, group_size]: runs of ``group_size`` input rows of one output column
    (the grouping of `qmoe.reference.quantization.quantize_affine_groups`)."""
    n_in = a.shape[-2]
    if n_in % group_size:
        raise ValueError(f"affine groups of {group_size} need the input axis ({n_in}) to be a multiple of it")
    grouped = a.reshape(*a.shape[:-2], n_in // group_size, group_size, a.shape[-1])
    return np.moveaxis(grouped, -2, -1).reshape(-1, group_size)


def _affine_fit(values: np.ndarray, levels: int) -> tuple[float, float, float]:
    """(step s, residual, slack) of one group's values as levels lo + n s, n integer in [0, levels].

    s = span / N for an integer N <= levels; candidates N are the multiples of span / (smallest gap
    between distinct values) up to ``levels`` (one code apart in the grid is one gap or a fraction of
    it), and ``levels`` itself (the finest admissible grid). The residual is the largest distance of
    (v - lo) / s from an integer, in steps; slack is AFFINE_LEVEL_SLACK * max|v| / s. The candidate
    with the smallest residual / slack wins.
    """
    lo, hi = values.min(), values.max()
    span = hi - lo
    distinct = np.unique(values)
    gap = np.diff(distinct).min() if distinct.size > 1 else span
    base = span / gap
    counts = {levels}
    k = 1
    while round(k * base) <= levels:
        counts.add(max(1, round(k * base)))
        k += 1
    best = None
    magnitude = np.abs(values).max()
    for n in sorted(counts):
        step = span / n
        position = (values - lo) / step
        residual = float(np.abs(position - np.rint(position)).max())
        slack = AFFINE_LEVEL_SLACK * magnitude / step
        if best is None or residual / slack < best[1] / best[2]:
            best = (step, residual, slack)
        if residual <= slack:
            break
    return best


def _check_affine(actual: np.ndarray, given: np.ndarray, group_size: int, what: str) -> None:
    """Per group of ``group_size`` along the contraction axis: evenly spaced levels (at most 2^bits), each
    element the level nearest its given weight among the group's levels (rounding to nearest on the
    backend's own grid; beyond the grid's ends, the end), and within one step of the given weight."""
    levels = 2**AFFINE_BITS - 1
    eff, ref = _groups(actual, group_size), _groups(given, group_size)
    # Worst (error, bound, group, step) of each check, by error / bound.
    worst = {"levels": (0.0, 1.0, -1, 0.0), "nearest": (0.0, 1.0, -1, 0.0),
             "one step": (0.0, AFFINE_STEPS_FROM_GIVEN, -1, 0.0)}

    def note(check: str, error: float, bound: float, g: int, step: float) -> None:
        if error / bound > worst[check][0] / worst[check][1]:
            worst[check] = (error, bound, g, step)

    for g, (values, weights) in enumerate(zip(eff, ref)):
        lo, span = values.min(), values.max() - values.min()
        if span == 0:
            # One level: any step fits. Nearness is then judged with the reference's step for this group
            # (its range / 255, or 1 for a constant group).
            w_span = weights.max() - weights.min()
            step, residual, slack = (w_span / levels if w_span > 0 else 1.0), 0.0, AFFINE_LEVEL_SLACK
        else:
            step, residual, slack = _affine_fit(values, levels)
        note("levels", residual, slack, g, step)
        # How much farther each element sits from its given weight than the nearest of the group's levels.
        top = round(span / step)
        nearest = lo + np.clip(np.rint((weights - lo) / step), 0, top) * step
        excess = float(((np.abs(values - weights) - np.abs(nearest - weights)) / step).max())
        note("nearest", max(excess, 0.0), slack, g, step)
        note("one step", float(np.abs(values - weights).max() / step), AFFINE_STEPS_FROM_GIVEN + slack, g, step)

    error, bound, g, step = worst["levels"]
    if error > bound:
        fail(f"{what} levels", f"group {g} (of {len(eff)}, {group_size} along the contraction axis) is not evenly "
                               f"spaced: at its best step {step:.4g} a value sits {error:.3g} steps from a level, "
                               f"allowed {bound:.2e} (float32 rounding of b + q s); float weights look like this",
             error=error, bound=bound)
    error, bound, g, step = worst["nearest"]
    if error > bound:
        fail(f"{what} nearest", f"group {g}: an element is {error:.3g} steps (step {step:.4g}) farther from its "
                                f"given weight than the nearest level of its group, allowed {bound:.2e}: not "
                                f"rounded to nearest (floor/truncation, or codes from another scale than the "
                                f"one dequantized)", error=error, bound=bound)
    error, bound, g, step = worst["one step"]
    if error > bound:
        fail(f"{what} one step", f"group {g}: an element is {error:.3g} steps (step {step:.4g}) from its given "
                                 f"weight, allowed {bound:.4g}: the grid does not cover these weights",
             error=error, bound=bound)
    for check, (error, bound, _, _) in worst.items():
        _passed(f"{what} {check}", error, bound)
