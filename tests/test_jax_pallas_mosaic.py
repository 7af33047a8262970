"""The warp-specialized Mosaic GPU grouped int8 GEMM of `jax_prequant.pallas_mosaic`, run in Pallas's GPU interpreter
on CPU (on the GPU itself with ``--device cuda``) and compared bit for bit with NumPy: an exact int64 product, the
two float32 scale multiplications in the kernel's order, one rounding to the output dtype. Both layouts: ragged
(empty groups, a one-row group, groups straddling CTA blocks, rows past every group, M not a multiple of the tile,
M smaller than the tile) and padded (groups of size 0, 1, C and partial). Rows of no group must come out exactly
zero; the interpreter fills unwritten output with NaN, so a row the kernel forgot to store fails too. Then the
work-tile tables, the tile choice and the refused shapes, and finally the Mosaic GPU lowering for CUDA at the
benchmark's shapes (no GPU needed to lower; compiling and running need one).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")
pytest.importorskip("jax.experimental.pallas.mosaic_gpu", reason="the kernel needs Pallas's Mosaic GPU backend")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qmoe.implementations.jax_prequant import env as _jax_env  # noqa: E402, F401  (pins x64 off before any array)
from qmoe.implementations.jax_prequant import pallas_mosaic as pm  # noqa: E402
from qmoe.suite.checks import assert_exactly_zero  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")

#: Ragged cases: (group sizes, rows past every group, N, K). "straddling" spans three 256-row CTA blocks with a
#: block shared by four parts, M = 628 (not a multiple of the SMEM tiling's 8 rows: padded to 632 inside, whose last
#: block is clamped), two N tiles and two K steps of the default tiles. "clamped": M = 400, a multiple of 8 but not
#: of 256 (its second block starts at row 144, unpadded), K = 96 (32-deep steps). "small" has fewer rows than a CTA
#: block (padded inside) and narrowed N, K. N = 64 is the narrowest 16-bit output the ragged kernel takes.
RAGGED = {
    "straddling": ([0, 1, 300, 0, 37, 200], 90, 256, 256),
    "clamped": ([5, 250, 0, 145], 0, 128, 96),
    "small": ([30, 0, 33], 7, 64, 64),
    "all_empty": ([0, 0, 0], 300, 64, 32),
}
#: Padded case: C = 256 (two 128-row CTA tiles a group), sizes 0 (both tiles zero-stored), 1 (second tile
#: zero-stored), C (both computed) and 150 (second tile partly padding); N = 384 takes 128-wide tiles (3 of them).
PADDED = ([0, 1, 256, 150], 256, 384, 256)
OUT_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _operands(rows: int, groups: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    lhs = rng.integers(-127, 128, (rows, k)).astype(np.int8)
    rhs = rng.integers(-127, 128, (groups, n, k)).astype(np.int8)
    lhs_scale = rng.uniform(0.5, 2.0, rows).astype(np.float32) * 2.0**-14
    rhs_scale = rng.uniform(0.5, 2.0, groups).astype(np.float32)
    return lhs, rhs, lhs_scale, rhs_scale


def _expected(lhs, rhs, lhs_scale, rhs_scale, group: np.ndarray, out_dtype) -> np.ndarray:
    """NumPy: the exact int64 product, f32(acc) * (lhs_scale * rhs_scale) in float32 (the kernel's order), rounded to
    out_dtype; zero for rows of no group (``group`` -1)."""
    out = np.zeros((lhs.shape[0], rhs.shape[1]), np.float32)
    for g in np.unique(group[group >= 0]):
        rows = group == g
        acc = lhs[rows].astype(np.int64) @ rhs[g].astype(np.int64).T
        out[rows] = acc.astype(np.float32) * (lhs_scale[rows] * rhs_scale[g])[:, None]
    return np.asarray(jnp.asarray(out).astype(out_dtype))


def _run(lhs, rhs, lhs_scale, rhs_scale, sizes, out_dtype, group_stride: int, interpret: bool) -> np.ndarray:
    fn = functools.partial(pm.grouped_int8_matmul, out_dtype=out_dtype, group_stride=group_stride, interpret=interpret)
    out = jax.jit(fn)(lhs, rhs, lhs_scale, rhs_scale, np.asarray(sizes, np.int32))
    assert out.dtype == jnp.dtype(out_dtype) and out.shape == (lhs.shape[0], rhs.shape[1])
    return np.asarray(out)


def _assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert not np.any(np.isnan(actual.astype(np.float32))), f"{what}: unwritten (NaN) output"
    bits = np.dtype(f"u{actual.dtype.itemsize}")
    mismatch = actual.view(bits) != expected.view(bits)
    assert not np.any(mismatch), (f"{what}: {mismatch.sum()} elements differ, rows "
                                  f"{np.unique(np.nonzero(mismatch)[0])[:10]}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", ["straddling", "clamped", "all_empty"])
def test_ragged_layout_is_exact(case, dtype, interpret):
    sizes, tail, n, k = RAGGED[case]
    group = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.full(tail, -1)])
    operands = _operands(group.size, len(sizes), n, k, seed=0)
    out = _run(*operands, sizes, OUT_DTYPES[dtype], 0, interpret)
    _assert_bits_equal(out, _expected(*operands, group, OUT_DTYPES[dtype]), f"ragged {case} {dtype}")
    assert_exactly_zero(out[group < 0], "rows past every group")


def test_ragged_layout_smaller_than_a_tile(interpret):
    """M = 70 < the 256-row CTA block, N = 64, K = 64 (narrowed tiles), float16 out."""
    sizes, tail, n, k = RAGGED["small"]
    group = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.full(tail, -1)])
    operands = _operands(group.size, len(sizes), n, k, seed=1)
    out = _run(*operands, sizes, jnp.float16, 0, interpret)
    _assert_bits_equal(out, _expected(*operands, group, jnp.float16), "ragged small float16")
    assert_exactly_zero(out[group < 0], "rows past every group")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_padded_layout_is_exact(dtype, interpret):
    """Padding rows come out zero: those in a tile with real rows because their lhs rows are zero (as the layer's
    are), those in a tile with none because the tile is stored as zeros without a product. Their lhs rows are
    filled with garbage here, so a computed tile would show."""
    sizes, stride, n, k = PADDED
    groups = len(sizes)
    lhs, rhs, lhs_scale, rhs_scale = _operands(groups * stride, groups, n, k, seed=2)
    local = np.tile(np.arange(stride), groups)
    group = np.where(local < np.repeat(sizes, stride), np.repeat(np.arange(groups), stride), -1)
    in_real_tile = (local // pm.ALIGNED_CONFIG.cta_m) * pm.ALIGNED_CONFIG.cta_m < np.repeat(sizes, stride)
    lhs[(group < 0) & in_real_tile] = 0
    assert np.any((group < 0) & ~in_real_tile) and np.any((group < 0) & in_real_tile)
    out = _run(lhs, rhs, lhs_scale, rhs_scale, sizes, OUT_DTYPES[dtype], stride, interpret)
    _assert_bits_equal(out, _expected(lhs, rhs, lhs_scale, rhs_scale, group, OUT_DTYPES[dtype]), f"padded {dtype}")
    assert_exactly_zero(out[group < 0], "padding rows")


@pytest.mark.parametrize("m, block_m", [(628, 256), (538, 256), (1000, 128)])
@pytest.mark.parametrize("sizes", [[0, 1, 300, 0, 37, 200], [0, 0, 0], [256, 0], [1, 1, 1, 1]])
def test_ragged_tiles_cover_every_row_once(sizes, m, block_m):
    """Each row lies in exactly one work tile, of its own part (the tail is part G); no CTA block reads past m."""
    table = np.asarray(pm.ragged_tiles(jnp.asarray(sizes, jnp.int32), block_m, m))
    assert table.shape == (pm.ragged_tile_count(m, len(sizes), block_m), 4)
    owner = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.full(m - sum(sizes), len(sizes))])
    covered = np.zeros(m, np.int64)
    for part, block, first, count in table:
        if part < 0:
            assert count == 0
            continue
        base = min(block * block_m, m - block_m)
        assert 0 <= base and base + block_m <= m and 0 <= first and first + count <= block_m
        rows = slice(base + first, base + first + count)
        assert block * block_m <= rows.start and rows.stop <= (block + 1) * block_m, "rows outside their M block"
        assert np.all(owner[rows] == part)
        covered[rows] += 1
    np.testing.assert_array_equal(covered, 1, err_msg="every row must lie in exactly one work tile")


def test_aligned_tile_groups():
    tiles = pm.aligned_tile_groups(jnp.asarray([0, 1, 256, 150, 999], jnp.int32), 256, 128)
    np.testing.assert_array_equal(np.asarray(tiles), [-1, -1, 1, -1, 2, 2, 3, 3, 4, 4])


def test_tiles_follow_the_measured_defaults_and_fit_shared_memory():
    assert pm.kernel_config(4096, 2048, jnp.bfloat16, ragged=False) == pm.ALIGNED_CONFIG
    assert pm.kernel_config(4096, 2048, jnp.bfloat16, ragged=True) == pm.RAGGED_CONFIG
    for n, k in ((4096, 2048), (2048, 4096), (384, 96), (64, 32), (32, 32), (16, 64)):
        for dtype in pm.OUT_DTYPES:
            for ragged in (False, True):
                config = pm.kernel_config(n, k, dtype, ragged)
                assert n % config.tile_n == 0 and k % config.tile_k == 0 and config.tile_n % config.epi_n == 0
                assert config.smem_bytes(ragged, dtype) <= pm.SMEM_BUDGET, (n, k, dtype, ragged, config)
                if ragged and pm.mosaic_unsupported_reason(256, n, k, 1, 0, dtype) is None:
                    # its row-piece stores start at any row of the staged tile: each must be TMA-aligned
                    assert config.tile_n * jnp.dtype(dtype).itemsize % pm.TMA_SMEM_ALIGNMENT == 0, (n, dtype)
    assert pm.kernel_config(4096, 2048, jnp.float32, ragged=True).tile_k == 64  # float32 staging: 128 KiB


@pytest.mark.parametrize("shape, reason", [
    ((100, 32, 16, 4, 0), "K = 16 must be a multiple of 32"),
    ((100, 24, 32, 4, 0), "N = 24 must be a multiple of 16"),
    ((4 * 192, 32, 32, 4, 192), "group_stride = 192 must be a multiple"),
    ((1000, 32, 32, 4, 128), "M = 1000 must be groups x group_stride"),
    ((100, 32, 32, 0, 0), "at least one group"),
    ((100, 96, 32, 4, 0), "N = 96 gives output tiles of 64-byte rows"),
])
def test_refused_shapes_say_why(shape, reason):
    assert reason in pm.mosaic_unsupported_reason(*shape, jnp.bfloat16)
    m, n, k, groups, stride = shape
    with pytest.raises(ValueError, match=reason.split(" must")[0]):
        pm.grouped_int8_matmul(jnp.zeros((m, k), jnp.int8), jnp.zeros((groups, n, k), jnp.int8), jnp.ones(m),
                               jnp.ones(groups), jnp.zeros(groups, jnp.int32), out_dtype=jnp.bfloat16,
                               group_stride=stride, interpret=True)


def test_supported_shapes():
    assert pm.mosaic_unsupported_reason(64 * 4480, 4096, 2048, 64, 4480, jnp.bfloat16) is None
    assert pm.mosaic_unsupported_reason(262144, 4096, 2048, 64, 0, jnp.bfloat16) is None
    assert pm.mosaic_unsupported_reason(33, 64, 32, 4, 0, jnp.bfloat16) is None
    assert pm.mosaic_unsupported_reason(33, 32, 32, 4, 0, jnp.float32) is None  # 128-byte rows
    assert pm.mosaic_unsupported_reason(4 * 128, 16, 32, 4, 128, jnp.bfloat16) is None  # padded: whole pieces


def test_operand_errors():
    lhs, rhs, scale, sizes = jnp.zeros((8, 32), jnp.int8), jnp.zeros((2, 16, 32), jnp.int8), jnp.ones(8), jnp.ones(2)
    with pytest.raises(TypeError, match="int8"):
        pm.grouped_int8_matmul(lhs.astype(jnp.float32), rhs, scale, sizes, sizes.astype(jnp.int32),
                               out_dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        pm.grouped_int8_matmul(lhs, rhs, scale, sizes, sizes.astype(jnp.int32), out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="expected \\[M, K\\] and \\[G, N, K\\]"):
        pm.grouped_int8_matmul(lhs, jnp.zeros((2, 32, 16), jnp.int8), scale, sizes, sizes.astype(jnp.int32),
                               out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="lhs_scale"):
        pm.grouped_int8_matmul(lhs, rhs, scale[:4], sizes, sizes.astype(jnp.int32), out_dtype=jnp.bfloat16)


#: Lowered for CUDA: the benchmark's up projection (64 groups of 4096 rows, capacity 4480 when padded; H = 2048,
#: 2F = 4096), its down projection's shape with float32 out, conformance-sized shapes (narrowed tiles), and ragged row
#: counts that are not multiples of the 256-row block (628 = 4 mod 8: jax 0.10.2's layout inference refused it
#: before the rows were padded to the tiling's 8; 400: the clamped block start 144).
LOWERED = {
    "padded_up_bfloat16": (64 * 4480, 4096, 2048, 64, 4480, jnp.bfloat16),
    "ragged_up_bfloat16": (262144, 4096, 2048, 64, 0, jnp.bfloat16),
    "padded_down_float32": (64 * 4480, 2048, 4096, 64, 4480, jnp.float32),
    "ragged_down_float32": (262144, 2048, 4096, 64, 0, jnp.float32),
    "padded_small_float16": (4 * 128, 32, 32, 4, 128, jnp.float16),
    "ragged_small_bfloat16": (66, 64, 32, 4, 0, jnp.bfloat16),
    "ragged_unaligned_rows_bfloat16": (628, 256, 256, 6, 0, jnp.bfloat16),
    "ragged_clamped_float32": (400, 128, 96, 4, 0, jnp.float32),
}


@pytest.mark.parametrize("case", list(LOWERED))
def test_lowers_through_mosaic_gpu_for_cuda(case):
    """Pallas's Mosaic GPU lowering (its layout inference and the Mosaic GPU dialect's lowering run in Python)
    accepts each kernel, for CUDA, on a machine without a GPU, and emits the Mosaic GPU custom call. Compiling the
    module to PTX and running it need a GPU: not checked here."""
    m, n, k, groups, stride, dtype = LOWERED[case]
    args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in (
        ((m, k), jnp.int8), ((groups, n, k), jnp.int8), ((m,), jnp.float32), ((groups,), jnp.float32),
        ((groups,), jnp.int32))]
    fn = functools.partial(pm.grouped_int8_matmul, out_dtype=dtype, group_stride=stride)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, "no Mosaic GPU kernel in the CUDA program"
