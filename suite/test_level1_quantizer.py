"""Level 1, quantizer: a backend's symmetric int8 codes and scales equal the reference's.

Round half to even is part of every scheme. Where the scale is an exact power of two (amax = 127 * 2^k:
the float32 division amax / 127 is then exactly 2^k), v / scale is exact in any float format (by
division or by a reciprocal multiply), so the codes must equal the reference's exactly, ties included.
Only where the scale is not a power of two may a value whose v / scale lies within a few float32 ulps of
a .5 tie take either neighbouring code (`qmoe.suite.tolerances.QUANTIZER_TIE_WINDOW`); scales agree to
`QUANTIZER_SCALE_RTOL`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qmoe.reference import quantize_symmetric_int8
from qmoe.suite.checks import fail
from qmoe.suite.tolerances import QUANTIZER_SCALE_RTOL, QUANTIZER_TIE_WINDOW, tolerance

pytestmark = pytest.mark.conformance
REQUIRES = ("quantizer",)
#: The rule is the same for every symmetric int8 scheme and runs in float32: the table's entry, for its reason.
RULE = tolerance("int8_routed", "float32", "quantizer")

AXES = {"per_token": -1, "per_output_channel": -2, "per_expert": (-2, -1)}


def power_of_two(scale: np.ndarray) -> np.ndarray:
    """True where ``scale`` is an exact power of two (then v / scale is exact in any float format)."""
    mantissa, _ = np.frexp(np.asarray(scale, dtype=np.float64))
    return mantissa == 0.5


def tie_slack(ratio: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """True where a correct backend may round v / scale = ``ratio`` to either neighbour: within the
    float32 tie window of a .5 tie, and only where ``scale`` (broadcast) is not a power of two."""
    near = np.abs(np.abs(ratio) % 1.0 - 0.5) <= QUANTIZER_TIE_WINDOW * np.maximum(1.0, np.abs(ratio))
    return near & ~np.broadcast_to(power_of_two(scale), ratio.shape)


def _check(backend, values: np.ndarray, axis, what: str) -> None:
    values = values.astype(np.float32).astype(np.float64)
    codes, scale = (np.asarray(a) for a in backend.quantize_int8(values, axis))
    expected = quantize_symmetric_int8(values, axis)
    if codes.shape != values.shape:
        fail(what, f"codes shape {codes.shape}, expected {values.shape}")
    scale = np.broadcast_to(scale.astype(np.float64), expected.scale.shape)
    relative = np.abs(scale - expected.scale) / expected.scale
    if not relative.max(initial=0.0) <= QUANTIZER_SCALE_RTOL:
        worst = np.unravel_index(np.argmax(relative), scale.shape)
        fail(what, f"scale {scale[worst]!r} vs reference {expected.scale[worst]!r} at {worst}: relative error "
                   f"{relative[worst]:.2e} > {QUANTIZER_SCALE_RTOL:.2e} (one float32 division of amax by 127)",
             error=float(relative[worst]), bound=QUANTIZER_SCALE_RTOL)
    ratio = values / expected.scale
    either = tie_slack(ratio, expected.scale)
    off = np.abs(codes.astype(np.int64) - expected.codes.astype(np.int64))
    bad = (off > 1) | ((off == 1) & ~either)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        exact = bool(np.broadcast_to(power_of_two(expected.scale), values.shape)[i])
        why = ("the scale is a power of two, so v/scale is exact: round half to even" if exact
               else "not within float32 rounding of a .5 tie")
        fail(what, f"{int(bad.sum())} code(s) differ; first: code {int(codes[i])} vs reference "
                   f"{int(expected.codes[i])} at {i} (value {values[i]!r}, value/scale {ratio[i]!r}; {why}); "
                   f"tolerance: {RULE.reason}")


#: Half-integer multiples of a power-of-two scale and what round half to even makes of them, with
#: the element that sets amax = 127 * scale first.
TIE_MULTIPLES = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -1.5, 3.5, -125.5, 4.0])
TIE_CODES = np.array([127, 0, 2, 2, 0, -2, 126, -2, 4, -126, 4])
#: Power-of-two scales: 1 (amax 127), 0.5 (amax 63.5), and two far from 1.
TIE_SCALES = (1.0, 0.5, 2.0**-12, 2.0**6)


def _tie_values(layout: str) -> np.ndarray:
    """One slice per scale in TIE_SCALES, laid out so that ``layout`` reduces over each slice."""
    rows = np.stack([TIE_MULTIPLES * s for s in TIE_SCALES])  # [scales, n]
    if layout == "per_token":
        return rows
    if layout == "per_output_channel":
        return rows.T  # [n, scales]: one column per scale
    return rows[:, None, :]  # per_expert: [scales, 1, n]


@pytest.mark.parametrize("layout", list(AXES))
def test_quantizer_fixed_cases(backend, layout):
    """Half-way ties (round half to even), clipping at +-127, an all-zero slice (scale 1, no NaN)."""
    scale = 0.5 / 127
    ties = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 127.0]]) * scale
    values = np.concatenate([ties, np.zeros((1, 6)), np.array([[1e4, -3e-3, 2.0, 0.0, -1e4, 7.0]])])
    if layout == "per_expert":
        values = values[None]
    _check(backend, values, AXES[layout], f"quantize_int8[{layout}, fixed]")


@pytest.mark.parametrize("layout", list(AXES))
def test_quantizer_fixed_cases_exact_ties(backend, layout):
    """amax = 127 * 2^k: the scale is exactly 2^k, and half-integer multiples of it are exact ties that
    round half to even: 0.5 -> 0, 2.5 -> 2, -0.5 -> -0, -2.5 -> -2, 126.5 -> 126. No slack anywhere."""
    values = _tie_values(layout)
    what = f"quantize_int8[{layout}, exact ties]"
    expected = quantize_symmetric_int8(values, AXES[layout])
    want = np.broadcast_to(TIE_CODES, (len(TIE_SCALES), TIE_CODES.size))
    want = want.T if layout == "per_output_channel" else want.reshape(expected.codes.shape)
    assert np.array_equal(expected.codes, want) and power_of_two(expected.scale).all(), \
        "the reference itself must round these ties half to even"
    codes, scale = (np.asarray(a) for a in backend.quantize_int8(values, AXES[layout]))
    if codes.shape != values.shape:
        fail(what, f"codes shape {codes.shape}, expected {values.shape}")
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), expected.scale.shape)
    if not np.array_equal(scale, expected.scale):
        i = tuple(int(v) for v in np.argwhere(scale != expected.scale)[0])
        fail(what, f"scale {scale[i]!r} vs {expected.scale[i]!r} at {i}: amax = 127 * 2^k divided by 127 is "
                   "exactly 2^k in float32 (a reciprocal multiply is not)")
    bad = codes.astype(np.int64) != want
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        ratio = values / expected.scale
        fail(what, f"{int(bad.sum())} code(s) differ at exact ties; first: code {int(codes[i])} vs "
                   f"{int(want[i])} at {i} (value/scale {ratio[i]!r} is exact: round half to even; rounding "
                   "half away from zero gives this)")
    _check(backend, values, AXES[layout], what)


# Magnitudes below 1e-30 are left out: their float32 scale amax/127 is subnormal and cannot carry the
# 4-ulp agreement this level asks; no real activation or weight lives there.
_ELEMENTS = st.floats(-1e4, 1e4, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-30) | st.just(0.0)


@given(values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9),
                         elements=_ELEMENTS),
       layout=st.sampled_from(list(AXES)))
def test_quantizer_generated(backend, values, layout):
    _check(backend, values.astype(np.float64), AXES[layout], f"quantize_int8[{layout}, generated]")


@given(half_codes=hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
                             elements=st.integers(-253, 253)),
       exponent=st.integers(-20, 20), layout=st.sampled_from(list(AXES)))
def test_quantizer_generated_ties(backend, half_codes, exponent, layout):
    """Generated slices on a power-of-two grid: every element a multiple of 2^k / 2 (many exact ties),
    and each reduced slice's amax set to 127 * 2^k, so every scale is exactly 2^k: codes exact."""
    values = half_codes.astype(np.float64) / 2
    axis = AXES[layout]
    # The first element of every reduced slice becomes +-127 (same sign as before, + for 0).
    first = np.zeros(values.shape, dtype=bool)
    first[{"per_token": np.s_[..., 0], "per_output_channel": np.s_[..., 0, :],
           "per_expert": np.s_[..., 0, 0]}[layout]] = True
    values = np.where(first, np.where(values < 0, -127.0, 127.0), values)
    assert (np.max(np.abs(values), axis=axis) == 127).all()
    _check(backend, values * 2.0**exponent, axis, f"quantize_int8[{layout}, generated exact ties]")
