"""mlx_layerwise specifics that the shared conformance suite does not see.

* the stock `mx.gather_qmm` still has no gradient with respect to quantized weights (this test
  fails, loudly, the day MLX adds one, so the workaround can be reconsidered);
* the trainable gather's straight-through gradients equal autodiff through the dequantized float
  weights, and exist only for experts that received tokens;
* the re-quantizing update leaves experts without tokens bit for bit unchanged;
* expert-only int8 checkpoints round-trip through safetensors bit for bit;
* the group-size sweep measures every G and picks the largest one under the memory target.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from qmoe import reference  # noqa: E402
from qmoe.implementations.mlx_layerwise import MLXLayerwiseBackend, _to_device  # noqa: E402
from qmoe.implementations.mlx_layerwise.checkpoint import (  # noqa: E402
    bit_identical,
    checkpoint_tensors,
    load_expert_int8_checkpoint,
    quantize_expert_layers,
    save_expert_int8_checkpoint,
)
from qmoe.implementations.mlx_layerwise.experts import QuantizedExperts, trainable_gather_qmm  # noqa: E402
from qmoe.implementations.mlx_layerwise.layer import forward_static, peaked_softmax  # noqa: E402
from qmoe.implementations.mlx_layerwise.sweep import SweepRow, choose_group_size, group_size_sweep  # noqa: E402
from qmoe.implementations.mlx_layerwise.training import layer_gradients  # noqa: E402
from qmoe.reference import MoEParams, MoESpec  # noqa: E402

pytestmark = pytest.mark.backend("mlx_layerwise")

STOCK_VJP_ERROR = "[GatherQMM::vjp] no gradient wrt the quantized weights"


def _quantized_stack(experts=4, out=96, inputs=128, seed=0) -> QuantizedExperts:
    weight = mx.array(np.random.default_rng(seed).standard_normal((experts, inputs, out)).astype(np.float32))
    return QuantizedExperts.from_qmoe(weight)


def _rows(count=12, inputs=128, seed=1) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((count, 1, inputs)).astype(np.float32))


def test_stock_gather_qmm_has_no_weight_gradient():
    """The MoE8 report's blocker, pinned: if this starts failing, MLX learned the VJP itself."""
    experts = _quantized_stack()
    rows, ids = _rows(), mx.array(np.repeat(np.arange(4), 3).astype(np.uint32))

    def loss(codes):
        return mx.gather_qmm(rows, codes, experts.scales, experts.biases, rhs_indices=ids, transpose=True,
                             group_size=64, bits=8).sum()

    try:
        mx.eval(mx.grad(loss)(experts.codes))
    except RuntimeError as error:
        assert STOCK_VJP_ERROR in str(error), f"gather_qmm's VJP fails differently now: {error}"
        return
    pytest.fail(f"mlx {mx.__version__} now differentiates gather_qmm with respect to the quantized weights "
                f"(it used to raise {STOCK_VJP_ERROR!r}). Compare its gradient with trainable_gather_qmm's, "
                "decide whether the custom VJP is still needed, and update this test.")


def test_trainable_gather_equals_autodiff_through_dequantized_weights():
    experts = _quantized_stack()
    rows = _rows()
    ids = mx.array(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], dtype=np.uint32))
    cotangent = mx.array(np.random.default_rng(2).standard_normal((12, 1, 96)).astype(np.float32))
    op = trainable_gather_qmm(64, 8)
    dense = experts.dequantized_mlx_layout()
    _, (d_rows, d_codes) = mx.vjp(lambda r, c: [op(r, c, experts.scales, experts.biases, ids)],
                                  [rows, experts.codes], [cotangent])
    _, (ref_rows, ref_weight) = mx.vjp(lambda r, w: [mx.gather_mm(r, mx.swapaxes(w, -1, -2), rhs_indices=ids)],
                                       [rows, dense], [cotangent])
    assert d_codes.shape == dense.shape and d_codes.dtype == mx.float32
    np.testing.assert_allclose(np.array(d_rows), np.array(ref_rows), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(d_codes), np.array(ref_weight), rtol=1e-5, atol=1e-4)


def _layer_with_empty_experts(scheme="int8_affine_g64"):
    spec = MoESpec(hidden=64, ffn=64, experts=8, top_k=2)
    params = MoEParams.random(spec, seed=3)
    params.router[:, [1, 5]] -= 50.0  # column offsets pushed down: experts 1 and 5 never win
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, 64)).astype(np.float32).astype(np.float64)
    x[:, :] = np.abs(x)  # every token's features positive, so the offset always loses
    dy = rng.standard_normal((24, 64)).astype(np.float32).astype(np.float64)
    backend = MLXLayerwiseBackend()
    return spec, params, x, dy, backend, backend.prepare(spec, params, scheme, "float32")


def test_weight_gradients_exist_only_for_experts_with_tokens():
    spec, params, x, dy, backend, prepared = _layer_with_empty_experts()
    _, gradients = layer_gradients(spec, prepared.weights, _to_device(x, "float32"), _to_device(dy, "float32"))
    used = gradients.plan.used
    assert 1 not in used and 5 not in used, f"case construction: experts 1 and 5 should get no token, used {used}"
    assert gradients.grads["w13"].shape == (used.size, spec.hidden, 2 * spec.ffn)
    assert gradients.grads["w2"].shape == (used.size, spec.ffn, spec.hidden)
    dense = backend.backward(prepared, x, dy)
    for expert in (1, 5):
        assert not np.any(dense["w13"][expert]) and not np.any(dense["w2"][expert])


def test_requantizing_update_keeps_untouched_experts_bit_identical():
    spec, params, x, dy, backend, prepared = _layer_with_empty_experts()
    updated = backend.update(prepared, x, dy, lr=0.1)
    for name in ("w13", "w2"):
        old, new = getattr(prepared.weights, name), getattr(updated.weights, name)
        for part in ("codes", "scales", "biases"):
            before, after = np.array(getattr(old, part)), np.array(getattr(new, part))
            for expert in (1, 5):
                assert np.array_equal(before[expert], after[expert]), f"{name}.{part}[{expert}] changed"
        assert not np.array_equal(np.array(old.codes[0]), np.array(new.codes[0])), f"{name} expert 0 did not move"


def test_peaked_softmax_gradient_is_accurate_when_one_probability_rounds_to_one():
    logits = mx.array([[0.0, 45.0, 1.0, -3.0]], dtype=mx.float32)
    cotangent = mx.array([[0.3, -1.2, 2.0, 0.7]], dtype=mx.float32)
    got = np.array(mx.vjp(peaked_softmax, [logits], [cotangent])[1][0], dtype=np.float64)
    p = reference.routing.softmax(np.array(logits, dtype=np.float64))
    g = np.array(cotangent, dtype=np.float64)
    # p_j (g_j - sum_i p_i g_i) = p_j sum_i p_i (g_j - g_i): the second form has no cancellation, in float64 too.
    expected = p * np.sum(p[:, None, :] * (g[:, :, None] - g[:, None, :]), axis=-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = np.array(mx.vjp(lambda z: mx.softmax(z, axis=-1), [logits], [cotangent])[1][0])
    assert plain[0, 1] == 0.0, "the textbook VJP is expected to cancel to exactly 0 here (why this exists)"


def _checkpoint_layers():
    spec = MoESpec(hidden=64, ffn=128, experts=4, top_k=2, router="sigmoid_topk", shared_ffn=64)
    layers = [MoEParams.random(spec, seed=seed) for seed in range(3)]
    return spec, layers


def test_expert_int8_checkpoint_round_trips_bit_identically(tmp_path):
    spec, layers = _checkpoint_layers()
    quantized = quantize_expert_layers(spec, layers)
    path = save_expert_int8_checkpoint(tmp_path / "experts_int8.safetensors", spec, quantized)
    loaded_spec, loaded = load_expert_int8_checkpoint(path)
    assert loaded_spec == spec
    assert bit_identical(checkpoint_tensors(quantized), checkpoint_tensors(loaded)) == []
    x = _to_device(np.random.default_rng(0).standard_normal((9, spec.hidden)), "float32")
    for before, after in zip(quantized, loaded):
        assert np.array_equal(np.array(forward_static(spec, before, x)[0]), np.array(forward_static(spec, after, x)[0]))


def test_checkpoint_quantizes_experts_only(tmp_path):
    spec, layers = _checkpoint_layers()
    tensors = checkpoint_tensors(quantize_expert_layers(spec, layers))
    assert tensors["layers.0.w13.codes"].dtype == mx.uint32  # 8-bit codes packed four to a word
    assert tensors["layers.0.w13.codes"].size * 4 == layers[0].w13.size
    for name in ("router", "router_bias", "shared_w13", "shared_w2"):
        stored = np.array(tensors[f"layers.0.{name}"], dtype=np.float64)
        assert np.array_equal(stored, getattr(layers[0], name).astype(np.float32)), f"{name} is not kept float"


def test_choose_group_size_picks_the_largest_that_fits():
    rows = [SweepRow(1, 100, 4.0, True), SweepRow(2, 120, 2.0, True), SweepRow(4, 150, 1.0, False),
            SweepRow(8, 90, 0.5, True)]
    assert choose_group_size(rows) == 8
    assert choose_group_size([SweepRow(1, 100, 1.0, False)]) is None


def test_group_size_sweep_measures_each_group_size():
    spec = MoESpec(hidden=64, ffn=64, experts=4, top_k=2)
    result = group_size_sweep(spec, n_layers=4, tokens=16, group_sizes=[1, 2, 4, 9], memory_target_bytes=1 << 40,
                              steps=1)
    assert [row.group_size for row in result.rows] == [1, 2, 4]  # 9 > 4 layers is one joint step: G = 4
    assert all(row.peak_memory_bytes > 0 and row.seconds_per_step > 0 for row in result.rows)
    assert result.chosen == 4
    nothing_fits = group_size_sweep(spec, n_layers=4, tokens=16, group_sizes=[1, 2], memory_target_bytes=0, steps=1)
    assert nothing_fits.chosen is None and not any(row.fits for row in nothing_fits.rows)
