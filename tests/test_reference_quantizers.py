"""The reference quantizers against the rules of DESIGN.md, on hand-made values with known codes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import MoEParams, MoESpec
from qmoe.reference.quantization import (
    INT8_MAX,
    dequantized_weight,
    quantize_affine_groups,
    quantize_per_expert,
    quantize_per_output_channel,
    quantize_per_token,
    quantize_qat_rows,
    quantize_symmetric_int8,
    sqnr_db,
)

pytestmark = pytest.mark.conformance

QAT = reference.get_scheme("qat_int8_row")
#: Relative slack for "within half a step": v / scale and codes * scale each round once.
HALF_STEP_SLACK = 1e-12


def varied_values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian values with log-uniform magnitudes over 12 decades, some exact zeros and one outlier."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6, size=shape[:-1] + (1,))
    values[rng.random(shape) < 0.1] = 0.0
    values.reshape(-1)[rng.integers(values.size)] *= 1e3
    return values


def assert_within_half_step(values: np.ndarray, quantized: reference.Quantized, what: str) -> None:
    error = np.abs(quantized.dequantize() - values)
    bound = 0.5 * np.broadcast_to(quantized.scale, values.shape) * (1 + HALF_STEP_SLACK)
    worst = np.unravel_index(np.argmax(error / bound), values.shape)
    assert np.all(error <= bound), (f"{what}: dequantization error {error[worst]:.3e} at {worst} exceeds half a "
                                    f"step {bound[worst]:.3e}")


# -- symmetric int8 ------------------------------------------------------------------------------

def test_round_half_to_even_at_exact_ties() -> None:
    # amax 127 makes the scale exactly 1, so v / scale is exactly the tie written here.
    row = np.array([[127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5]])
    quantized = quantize_per_token(row)
    assert quantized.scale[0, 0] == 1.0
    np.testing.assert_array_equal(quantized.codes, [[127, 0, 2, 2, 4, 0, -2, -2, 126]])


def test_round_half_to_even_with_a_power_of_two_scale() -> None:
    row = np.array([[31.75, 0.125, 0.375, -0.625]])  # scale 0.25: ties at 0.5, 1.5, -2.5
    quantized = quantize_per_token(row)
    assert quantized.scale[0, 0] == 0.25
    np.testing.assert_array_equal(quantized.codes, [[127, 0, 2, -2]])


def test_codes_stay_within_plus_minus_127() -> None:
    values = varied_values((64, 48), seed=1)
    values[3] = -np.abs(values[3])  # a row whose amax is a negative value: -127, never -128
    for axis in (-1, -2, (-2, -1)):
        quantized = quantize_symmetric_int8(values, axis)
        assert quantized.codes.dtype == np.int8
        assert quantized.codes.min() >= -INT8_MAX and quantized.codes.max() <= INT8_MAX
    assert quantize_per_token(values).codes[3].min() == -INT8_MAX


def test_amax_element_gets_code_127_exactly() -> None:
    values = varied_values((32, 16), seed=2)
    quantized = quantize_per_token(values)
    argmax = np.argmax(np.abs(values), axis=-1)
    codes_at_amax = np.take_along_axis(quantized.codes, argmax[:, None], axis=-1)[:, 0]
    np.testing.assert_array_equal(np.abs(codes_at_amax), INT8_MAX)


@pytest.mark.parametrize("quantizer,zero_slice", [
    (quantize_per_token, (1, slice(None))),
    (quantize_per_output_channel, (slice(None), 2)),
], ids=["per_token_zero_row", "per_output_channel_zero_column"])
def test_all_zero_slice_gets_scale_one_and_zero_codes(quantizer, zero_slice) -> None:
    values = varied_values((6, 5), seed=3)
    values[zero_slice] = 0.0
    quantized = quantizer(values)
    scale = np.broadcast_to(quantized.scale, values.shape)
    assert np.all(scale[zero_slice] == 1.0)
    assert np.all(quantized.codes[zero_slice] == 0)
    assert np.all(np.isfinite(quantized.dequantize()))
    assert np.all(quantized.dequantize()[zero_slice] == 0.0)


def test_all_zero_expert_gets_scale_one_and_zero_codes() -> None:
    w = varied_values((3, 4, 6), seed=4)
    w[1] = 0.0
    quantized = quantize_per_expert(w)
    assert quantized.scale[1, 0, 0] == 1.0 and not quantized.codes[1].any()
    assert np.all(np.isfinite(quantized.dequantize()))


def test_scale_axes_per_token_per_channel_per_expert() -> None:
    x = varied_values((5, 7), seed=5)
    w = varied_values((7, 3), seed=6)
    experts = varied_values((4, 7, 3), seed=7)
    cases = [
        ("per_token", quantize_per_token(x), x, np.abs(x).max(axis=1, keepdims=True), (5, 1)),
        ("per_output_channel", quantize_per_output_channel(w), w, np.abs(w).max(axis=0, keepdims=True), (1, 3)),
        ("per_expert", quantize_per_expert(experts), experts, np.abs(experts).max(axis=(1, 2), keepdims=True),
         (4, 1, 1)),
    ]
    for what, quantized, values, amax, shape in cases:
        assert quantized.scale.shape == shape, f"{what} scale shape {quantized.scale.shape} != {shape}"
        np.testing.assert_array_equal(quantized.scale, amax / INT8_MAX, err_msg=f"{what} scale")
        assert_within_half_step(values, quantized, what)


def test_slices_are_quantized_independently() -> None:
    """Each expert's codes depend on that expert only (one scale per expert matrix, not per tensor)."""
    experts = varied_values((4, 7, 3), seed=8)
    together = quantize_per_expert(experts)
    for e in range(4):
        alone = quantize_symmetric_int8(experts[e], axis=(0, 1))
        np.testing.assert_array_equal(together.codes[e], alone.codes)
        np.testing.assert_array_equal(together.scale[e], alone.scale)


@pytest.mark.parametrize("seed", range(4))
def test_symmetric_dequantization_within_half_a_step(seed: int) -> None:
    values = varied_values((40, 24), seed=10 + seed)
    for axis in (-1, -2, (-2, -1)):
        assert_within_half_step(values, quantize_symmetric_int8(values, axis), f"axis {axis}")


# -- affine groups (MLX) -------------------------------------------------------------------------

def test_affine_groups_error_within_half_a_step_and_codes_in_range() -> None:
    w = varied_values((2, 128, 5), seed=20)
    quantized = quantize_affine_groups(w, group_size=64)
    assert quantized.codes.min() >= 0 and quantized.codes.max() <= 255
    assert quantized.scale.shape == w.shape and quantized.bias.shape == w.shape
    assert_within_half_step(w, quantized, "affine g64")
    # One (scale, bias) per run of 64 input rows of one output column.
    grouped_scale = quantized.scale.reshape(2, 2, 64, 5)
    assert np.all(grouped_scale == grouped_scale[:, :, :1, :])
    low = w.reshape(2, 2, 64, 5).min(axis=2)
    np.testing.assert_array_equal(quantized.bias.reshape(2, 2, 64, 5)[:, :, 0, :], low)


def test_affine_constant_group_is_exact() -> None:
    w = np.full((64, 3), 0.7)
    w[:, 1] = 0.0
    quantized = quantize_affine_groups(w, group_size=64)
    assert np.all(quantized.scale == 1.0) and not quantized.codes.any()
    np.testing.assert_array_equal(quantized.dequantize(), w)


def test_affine_groups_need_a_multiple_of_the_group_size() -> None:
    with pytest.raises(ValueError, match="multiple"):
        quantize_affine_groups(np.ones((96, 4)), group_size=64)
    spec = MoESpec(hidden=96, ffn=64, experts=2, top_k=1)
    with pytest.raises(ValueError, match="multiple"):
        reference.forward(spec, MoEParams.random(spec), np.ones((2, 96)), "int8_affine_g64")


# -- QAT per-row rule ----------------------------------------------------------------------------

def test_qat_keep_float_threshold_is_65536_elements() -> None:
    rng = np.random.default_rng(30)
    at_threshold = rng.standard_normal((256, 256))
    assert at_threshold.size == QAT.qat_keep_float_max_numel == 65_536
    assert quantize_qat_rows(at_threshold, QAT) is None
    np.testing.assert_array_equal(dequantized_weight(at_threshold, "qat_row", QAT), at_threshold)
    assert quantize_qat_rows(rng.standard_normal((4, 128, 128)), QAT) is None
    one_more = rng.standard_normal((65_537, 1))
    quantized = quantize_qat_rows(one_more, QAT)
    assert quantized is not None and quantized.scale.shape == (1, 1)
    assert not np.array_equal(dequantized_weight(one_more, "qat_row", QAT), one_more)


def test_qat_scale_floor_and_zero_rows() -> None:
    """scale = max(amax / 127, 1/127): a row of small weights keeps the floor; a zero row gives zeros."""
    rng = np.random.default_rng(31)
    w = rng.standard_normal((257, 256))  # 65,792 elements: quantized
    w /= np.abs(w).max(axis=0, keepdims=True)  # every output channel has amax exactly 1 ...
    w[:, :100] *= 0.25    # ... except these (amax 0.25: the floor 1/127 binds)
    w[:, 100:200] *= 5.0  # ... and these (amax 5: scale 5/127)
    w[:, 7] = 0.0
    quantized = quantize_qat_rows(w, QAT)
    assert quantized.scale.shape == (1, 256)
    np.testing.assert_array_equal(quantized.scale[0, :100], 1.0 / 127.0)
    np.testing.assert_allclose(quantized.scale[0, 100:200], 5.0 / 127.0, rtol=1e-15)
    np.testing.assert_allclose(quantized.scale[0, 200:], 1.0 / 127.0, rtol=1e-15)
    assert not quantized.codes[:, 7].any() and np.all(np.isfinite(quantized.dequantize()))
    assert np.abs(quantized.codes[:, :100]).max() <= 32  # 0.25 * 127 = 31.75: the floor wastes codes
    assert_within_half_step(w, quantized, "qat rows")


def test_qat_clip_quantile_clips_outliers_to_127() -> None:
    clipping = dataclasses.replace(QAT, qat_clip_quantile=0.99)
    rng = np.random.default_rng(32)
    w = rng.standard_normal((300, 256))
    w[5, :] = 1e3  # one outlier per output channel, far above the 99th percentile
    quantized = quantize_qat_rows(w, clipping)
    clip_abs = np.quantile(np.abs(w), 0.99, axis=0, keepdims=True)
    np.testing.assert_allclose(quantized.scale, np.maximum(clip_abs / 127.0, 1.0 / 127.0), rtol=1e-15)
    np.testing.assert_array_equal(quantized.codes[5], INT8_MAX)
    inside = np.abs(w) <= clip_abs
    assert inside.mean() > 0.98
    error = np.abs(quantized.dequantize() - w)
    scale = np.broadcast_to(quantized.scale, w.shape)
    assert np.all(error[inside] <= 0.5 * scale[inside] * (1 + HALF_STEP_SLACK))
    # Without the clip the outlier sets the scale and the bulk loses almost all its codes.
    unclipped = quantize_qat_rows(w, QAT)
    assert np.all(unclipped.scale > 10 * quantized.scale)


# -- effective weights and SQNR ------------------------------------------------------------------

def test_effective_params_quantize_only_what_the_scheme_names() -> None:
    spec = MoESpec(hidden=64, ffn=64, experts=3, top_k=2, shared_ffn=64)
    params = MoEParams.random(spec, seed=33)
    for name, scheme in reference.SCHEMES.items():
        effective = reference.effective_params(spec, params, scheme)
        np.testing.assert_array_equal(effective.router, params.router, err_msg=f"{name} quantized the router")
        for param in ("w13", "w2", "shared_w13", "shared_w2"):
            rule = scheme.weight_quant(param)
            same = np.array_equal(getattr(effective, param), getattr(params, param))
            # qat_row leaves tensors this small (<= 65,536 elements) float.
            assert same == (rule in ("float", "qat_row")), f"{name}: {param} under rule {rule}"


def test_sqnr_db_basic_properties() -> None:
    rng = np.random.default_rng(34)
    ref = rng.standard_normal((16, 8))
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(np.zeros(4), np.ones(4)) == float("-inf")
    assert sqnr_db(np.array([1.0, 0.0]), np.array([0.9, 0.0])) == pytest.approx(20.0, abs=1e-12)
    noise = rng.standard_normal(ref.shape)
    small, large = sqnr_db(ref, ref + 1e-3 * noise), sqnr_db(ref, ref + 1e-2 * noise)
    assert small == pytest.approx(large + 20.0, abs=1e-9), "10x the noise must cost 20 dB"
    assert sqnr_db(7.0 * ref, 7.0 * (ref + 1e-2 * noise)) == pytest.approx(large, abs=1e-9)
    # Per-token int8 of Gaussian data sits near 6.02 * 7 + 1.76 - (crest factor) ~ 38 dB.
    assert 30.0 < sqnr_db(ref, quantize_per_token(ref).dequantize()) < 50.0
