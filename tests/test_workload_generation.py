"""`suite.benchmarks.workload`'s generation: chunk-seeded values that do not depend on the thread count, the
bit-pattern bfloat16 rounding against ml_dtypes, and the shapes and statistics the benchmark relies on."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from qmoe.suite.benchmarks import shapes, workload

SHAPE = shapes.BenchShape("t", tokens=48, hidden=96, ffn=64, experts=6, top_ks=(2,), shared_ffn=32,
                          router="sigmoid_topk")
NAMES = ("router", "w13", "w2", "router_bias", "shared_w13", "shared_w2")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4096 and blocks of 1000 elements, so small tensors span many of both; a block of w13 at
    `SHAPE` (96 * 128 elements per expert) spans an expert boundary now and then."""
    monkeypatch.setattr(workload, "_CHUNK", 4096)
    monkeypatch.setattr(workload, "_BLOCK", 1000)


def _arrays(params):
    return {name: getattr(params, name) for name in NAMES}


def _generate(monkeypatch, threads, dtype="bfloat16", pattern="zipf"):
    monkeypatch.setattr(workload, "THREADS", threads)
    return _arrays(workload.make_params(SHAPE, pattern, dtype)), workload.make_inputs(SHAPE, dtype, 2)


def _assert_same(a, b):
    (pa, ia), (pb, ib) = a, b
    for name in NAMES:
        np.testing.assert_array_equal(pa[name].view(np.uint32), pb[name].view(np.uint32), err_msg=name)
    for one, two in zip(ia, ib):
        np.testing.assert_array_equal(one.x.view(np.uint32), two.x.view(np.uint32))
        np.testing.assert_array_equal(one.dy.view(np.uint32), two.dy.view(np.uint32))


# -- determinism ------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_do_not_depend_on_the_thread_count(monkeypatch, dtype):
    one = _generate(monkeypatch, 1, dtype)
    for threads in (2, 3, 8):
        _assert_same(_generate(monkeypatch, threads, dtype), one)


def test_values_do_not_depend_on_the_thread_count_at_the_real_chunk_size(monkeypatch):
    """4.2M-element tensors: 4 chunks of the real `_CHUNK` on a pool, against one thread."""
    shape = shapes.BenchShape("t", tokens=8, hidden=256, ffn=512, experts=16, top_ks=(2,))
    assert 2 * shape.experts * shape.hidden * shape.ffn >= 4 * workload._CHUNK
    monkeypatch.setattr(workload, "THREADS", 1)
    one = workload.make_params(shape, "balanced", "bfloat16")
    monkeypatch.setattr(workload, "THREADS", 3)
    three = workload.make_params(shape, "balanced", "bfloat16")
    for name in ("router", "w13", "w2"):
        np.testing.assert_array_equal(getattr(one, name), getattr(three, name), err_msg=name)


def test_values_do_not_depend_on_the_block_size(monkeypatch):
    """A chunk's generator runs on from block to block, so the block is a cache size, not part of the seed."""
    monkeypatch.setattr(workload, "_CHUNK", 4096)
    monkeypatch.setattr(workload, "_BLOCK", 4096)
    whole = _generate(monkeypatch, 2)
    monkeypatch.setattr(workload, "_BLOCK", 777)
    _assert_same(_generate(monkeypatch, 2), whole)


@pytest.mark.usefixtures("small_chunks")
def test_seeds_tensors_and_chunks_draw_distinct_values(monkeypatch):
    params = workload.make_params(SHAPE, "balanced", "float32")
    again = workload.make_params(SHAPE, "balanced", "float32")
    other_seed = workload.make_params(SHAPE, "balanced", "float32", seed=1)
    np.testing.assert_array_equal(params.w13, again.w13)
    assert not np.array_equal(params.w13, other_seed.w13)
    # w13 and w2 have the same element count here: distinct tensor ids must give distinct streams.
    plain = workload._normal((0, 1), 1, (3 * 4096,)), workload._normal((0, 1), 2, (3 * 4096,))
    assert not np.array_equal(plain[0], plain[1])
    chunks = plain[0].reshape(3, 4096)
    assert not np.array_equal(chunks[0], chunks[1]) and not np.array_equal(chunks[1], chunks[2])
    inputs = workload.make_inputs(SHAPE, "float32", 2)
    assert not np.array_equal(inputs[0].x, inputs[1].x) and not np.array_equal(inputs[0].x, inputs[0].dy)


# -- bfloat16 rounding ----------------------------------------------------------------------------------------------
def _ml_dtypes(values):
    return values.astype(ml_dtypes.bfloat16).astype(np.float32)


def test_bit_pattern_rounding_is_ml_dtypes_bit_for_bit(monkeypatch):
    """Random bit patterns, ties (low half exactly 0x8000) with bit 16 even and odd, one below and above a tie,
    subnormals, negative values, zeros, the largest finite values (0x7F7F8000 and above round to inf under
    ties-to-even, in ml_dtypes too, so those are compared as well) and +-inf. NaN, which the bit pattern
    would get wrong, is in its own blocks below: those blocks must go through ml_dtypes."""
    monkeypatch.setattr(workload, "_CHUNK", 1 << 14)
    monkeypatch.setattr(workload, "_BLOCK", 1 << 12)
    monkeypatch.setattr(workload, "THREADS", 3)
    rng = np.random.default_rng(0)
    upper = rng.integers(0, 0x7F80, 1 << 14, dtype=np.uint32) << np.uint32(16)  # finite, positive kept halves
    ties = np.concatenate([upper | np.uint32(0x8000), upper | np.uint32(0x7FFF), upper | np.uint32(0x8001)])
    assert {0, 1} <= set(np.unique((ties >> np.uint32(16)) & np.uint32(1)).tolist())  # even and odd kept parts
    subnormals = rng.integers(1, 1 << 23, 1 << 14, dtype=np.uint32)
    edges = np.array([0, 0x80000000, 1, 0x8000, 0x18000, 0x7FFF, 0x7FFFFF, 0x800000, 0x7F7E8000, 0x7F7F7FFF,
                      0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0x3F808000, 0x3F818000], dtype=np.uint32)
    positive = np.concatenate([rng.integers(0, 0x7F800000, 1 << 17, dtype=np.uint32), ties, subnormals, edges])
    bits = np.concatenate([positive, positive | np.uint32(0x80000000)])
    values = bits.view(np.float32)
    assert not np.isnan(values).any() and values.size > 8 * workload._CHUNK
    expected = _ml_dtypes(values)
    at_edges = _ml_dtypes(edges.view(np.float32))
    assert np.isinf(at_edges[10:13]).all() and np.isfinite(at_edges[:10]).all()  # the top ties and above: inf
    got = workload.round_to_dtype(values.copy(), "bfloat16")
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))

    # NaNs (quiet, signalling, payloads that would carry into inf or the sign bit) in some blocks only.
    nans = np.array([0x7FC00000, 0x7F800001, 0x7F80FFFF, 0x7FFFFFFF, 0xFFFF8000, 0xFF800001], dtype=np.uint32)
    with_nan = values.copy()
    with_nan.view(np.uint32)[5 * (1 << 12) + np.arange(nans.size)] = nans
    with_nan.view(np.uint32)[-1] = nans[3]
    got = workload.round_to_dtype(with_nan.copy(), "bfloat16")
    with np.errstate(invalid="ignore"):
        expected = _ml_dtypes(with_nan)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_generated_bfloat16_values_are_the_rounded_float32_values(monkeypatch):
    """The fused generate-scale-round gives ml_dtypes' rounding of the float32 values, scale included."""
    monkeypatch.setattr(workload, "_CHUNK", 4096)
    monkeypatch.setattr(workload, "_BLOCK", 1000)
    monkeypatch.setattr(workload, "THREADS", 2)
    scale = np.array([0.5, 3.0, 1e-3], dtype=np.float32).reshape(3, 1, 1)
    exact = workload._normal((7,), 1, (3, 40, 100), scale, "float32")
    rounded = workload._normal((7,), 1, (3, 40, 100), scale, "bfloat16")
    np.testing.assert_array_equal(rounded.view(np.uint32), _ml_dtypes(exact).view(np.uint32))
    unscaled = workload._normal((7,), 1, (3, 40, 100))
    np.testing.assert_array_equal(exact, unscaled * scale)  # float32 products, one scale per expert


def test_round_to_dtype_keeps_its_contract():
    values = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    assert workload.round_to_dtype(values, "float32") is values
    strided = values.copy()
    view = strided[:, ::3]
    assert workload.round_to_dtype(view, "bfloat16") is view
    np.testing.assert_array_equal(strided[:, ::3], _ml_dtypes(values[:, ::3]))
    np.testing.assert_array_equal(strided[:, 1::3], values[:, 1::3])  # the rest untouched
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        workload.round_to_dtype(values, "float16")
    with pytest.raises(TypeError, match="float32"):
        workload.round_to_dtype(values.astype(np.float64), "bfloat16")
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        workload.make_params(SHAPE, "balanced", "float16")


# -- shapes and statistics ------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("pattern", workload.ROUTINGS)
def test_shapes_dtypes_and_routing_feature(monkeypatch, pattern):
    params, inputs = _generate(monkeypatch, 2, "bfloat16", pattern)
    h, f, e, s = SHAPE.hidden, SHAPE.ffn, SHAPE.experts, SHAPE.shared_ffn
    want = {"router": (h, e), "w13": (e, h, 2 * f), "w2": (e, f, h), "router_bias": (e,), "shared_w13": (h, 2 * s),
            "shared_w2": (s, h)}
    for name, array in params.items():
        assert array.shape == want[name] and array.dtype == np.float32, name
        assert array.flags.c_contiguous, name
        assert np.all(array.view(np.uint32) & 0xFFFF == 0), f"{name}: not bfloat16 values"
    prior = workload.routing_prior(pattern, e).astype(np.float32)
    np.testing.assert_array_equal(params["router"][0], _ml_dtypes(prior))
    assert len(inputs) == 2
    for item in inputs:
        for array in (item.x, item.dy):
            assert array.shape == (SHAPE.tokens, h) and array.dtype == np.float32
            assert np.all(array.view(np.uint32) & 0xFFFF == 0)
        assert np.all(item.x[:, 0] == 1.0)
    assert not np.all(inputs[0].dy[:, 0] == 1.0)


def test_statistics_are_normal_with_the_documented_scales(monkeypatch):
    """Entries standard normal times the scales: the router's logit std over sqrt(H - 1), w13's and w2's
    per-expert magnitude over sqrt(fan-in), inputs unit normal; about 1M elements, on 2 threads."""
    monkeypatch.setattr(workload, "THREADS", 2)
    shape = shapes.BenchShape("t", tokens=1024, hidden=256, ffn=128, experts=16, top_ks=(2,))
    params = workload.make_params(shape, "balanced", "float32")
    h, f, e = shape.hidden, shape.ffn, shape.experts
    magnitude = np.exp(np.random.default_rng([0, h, e, 0]).uniform(-0.5, 0.5, size=e) * np.log(workload.EXPERT_SPREAD))
    for name, fan_in in (("w13", h), ("w2", f)):
        unit = getattr(params, name).reshape(e, -1) * (math.sqrt(fan_in) / magnitude[:, None])
        n = unit.shape[1]
        assert np.abs(unit.mean(axis=1)).max() < 5 / math.sqrt(n), name
        assert np.abs(unit.std(axis=1) - 1).max() < 5 / math.sqrt(2 * n), name
    router = params.router[1:] * (math.sqrt(h - 1) / workload.LOGIT_STD)
    assert abs(router.std() - 1) < 5 / math.sqrt(2 * router.size) and abs(router.mean()) < 5 / math.sqrt(router.size)

    x = workload._normal((3,), 0, (1 << 21,))  # two chunks
    z = x.astype(np.float64)
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.std() - 1) < 5 / math.sqrt(2 * z.size)
    assert abs(np.mean(z ** 4) - 3) < 0.05  # kurtosis of a normal
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.003
    halves = z.reshape(2, -1)
    assert abs(np.corrcoef(halves[0], halves[1])[0, 1]) < 5 / math.sqrt(halves.shape[1])  # chunks independent
    item = workload.make_inputs(shape, "float32", 1)[0]
    assert abs(item.dy.std() - 1) < 0.02 and abs(item.x[:, 1:].std() - 1) < 0.02
