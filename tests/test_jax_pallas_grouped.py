"""The Pallas grouped-GEMM kernels of `jax_prequant.pallas_grouped` (the ``pallas`` formulation, issue 15),
run in Pallas's interpreter on CPU (through Triton with ``--device cuda``) against NumPy: the row-tile
schedule, the int8 and float grouped GEMM (both weight layouts, the epilogue scales) and the grouped weight
gradient, on skewed group sizes with empty groups, a one-row group, groups that are not a multiple of the
tile and rows past every group. Each kernel also runs with 16-row/column, 32-deep tiles so that small arrays
span several row tiles per group, several column blocks and several K steps. Finally the kernels go through
Pallas's Triton lowering for CUDA (no GPU needed to lower; compiling and running them needs one).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")
pytest.importorskip("jax.experimental.pallas.triton", reason="the pallas formulation needs Pallas's Triton backend")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qmoe.implementations.jax_prequant import env as _jax_env  # noqa: E402, F401  (pins x64 off before any array)
from qmoe.implementations.jax_prequant import pallas_grouped as pg  # noqa: E402
from qmoe.suite.checks import assert_close, assert_exactly_zero  # noqa: E402
from tests.pallas_lowering import verified_cuda_lowerings  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")

#: Group sizes that stress a grouped kernel: empty groups (first, middle, last), a one-row group, groups
#: above and below the tile, and rows past every group (the tail, which must come out zero).
SIZES = {
    "skewed": ([0, 1, 37, 0, 5, 130, 2, 0], 6),
    "one_group": ([0, 0, 44, 0], 0),
    "all_empty": ([0, 0, 0], 9),
}


#: Tiles small enough that the arrays below span several row tiles per group, column blocks and K steps (72 of
#: K in three steps: 32 is the smallest int8 contraction tile on a GPU, `pallas_grouped.INT8_MIN_DEPTH`).
SMALL_TILES = pg.Tiles(rows=16, cols=16, depth=32, num_warps=4, num_stages=2)
TILES = {"default": None, "small": SMALL_TILES}
#: float32 operands: the kernel and NumPy sum the same products in another order (K <= 72 terms).
FLOAT32_RTOL = 1e-6
#: bfloat16 operands: the products are exact in float32 and only the summation order differs, but the
#: result is rounded to bfloat16 once (half an ulp, 2^-8 relative).
BFLOAT16_RTOL = 2.0**-8
#: int8 epilogue: an exact int32 accumulator times two float32 scales, two roundings.
SCALED_RTOL = 1e-6


def _rows_of(sizes: list[int], tail: int) -> tuple[np.ndarray, np.ndarray]:
    """(group of each row, or -1 for the tail; group sizes int32)."""
    group = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.full(tail, -1)]).astype(np.int64)
    return group, np.asarray(sizes, np.int32)


def _expected_matmul(lhs: np.ndarray, rhs: np.ndarray, group: np.ndarray, transpose_rhs: bool) -> np.ndarray:
    """NumPy float64 (exact for int8): out[m] = lhs[m] @ rhs[g(m)] (or its transpose), zero for the tail."""
    weights = np.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out = np.zeros((lhs.shape[0], weights.shape[2]))
    for m, g in enumerate(group):
        if g >= 0:
            out[m] = lhs[m].astype(np.float64) @ weights[g].astype(np.float64)
    return out


@pytest.mark.parametrize("block_rows", [16, 128])
@pytest.mark.parametrize("case", list(SIZES))
def test_row_tile_schedule(case, block_rows):
    """Every row lies in exactly one tile; a tile holds rows of one group only (the tail counts as group
    G), at most block_rows of them; tiles past the schedule are empty."""
    sizes, tail = SIZES[case]
    group, group_sizes = _rows_of(sizes, tail)
    rows = group.size
    schedule = jax.device_get(pg.row_tile_schedule(jnp.asarray(group_sizes), rows, block_rows))
    owner = np.where(group < 0, len(sizes), group)
    covered = np.zeros(rows, np.int64)
    assert schedule.group.shape == (pg.max_row_tiles(rows, len(sizes), block_rows),)
    for g, start, end in zip(schedule.group, schedule.start, schedule.end):
        assert 0 <= start <= end <= rows and end - start <= block_rows, (g, start, end)
        covered[start:end] += 1
        assert np.all(owner[start:end] == g), f"tile [{start}, {end}) of group {g} holds rows of {owner[start:end]}"
    np.testing.assert_array_equal(covered, 1, err_msg="every row must lie in exactly one tile")


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["rhs_gkn", "rhs_gnk"])
@pytest.mark.parametrize("case", list(SIZES))
def test_int8_grouped_matmul(case, transpose_rhs, tiles, interpret):
    """int8 x int8 -> int32 exactly (no scales), and the epilogue's per-row x per-(expert, column)
    dequantization; the tail rows come out zero."""
    sizes, tail = SIZES[case]
    group, group_sizes = _rows_of(sizes, tail)
    rng = np.random.default_rng(0)
    depth, cols, groups = 72, 40, len(sizes)
    lhs = rng.integers(-127, 128, (group.size, depth)).astype(np.int8)
    rhs = rng.integers(-127, 128, (groups, cols, depth) if transpose_rhs else (groups, depth, cols)).astype(np.int8)
    row_scale = rng.uniform(0.5, 2.0, group.size).astype(np.float32)
    col_scale = rng.uniform(0.5, 2.0, (groups, cols)).astype(np.float32)
    exact = _expected_matmul(lhs, rhs, group, transpose_rhs)

    @jax.jit
    def run(lhs, rhs, sizes, row_scale, col_scale):
        options = dict(transpose_rhs=transpose_rhs, interpret=interpret, tiles=TILES[tiles])
        return (pg.grouped_matmul(lhs, rhs, sizes, **options),
                pg.grouped_matmul(lhs, rhs, sizes, row_scale=row_scale, col_scale=col_scale, **options))

    acc, scaled = jax.device_get(run(lhs, rhs, group_sizes, row_scale, col_scale))
    assert acc.dtype == np.int32 and scaled.dtype == np.float32
    np.testing.assert_array_equal(acc, exact.astype(np.int64), err_msg="int32 accumulator")
    expected = exact * row_scale[:, None].astype(np.float64) * col_scale[np.maximum(group, 0)].astype(np.float64)
    assert_exactly_zero(scaled[group < 0], "rows past every group")
    if np.any(group >= 0):
        assert_close(scaled, expected, SCALED_RTOL, "scaled int8 grouped matmul")


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["rhs_gkn", "rhs_gnk"])
def test_float_grouped_matmul(transpose_rhs, dtype, tiles, interpret):
    """Float operands (scheme ``none``, the straight-through backward): float32 accumulation, stored in
    the operands' dtype."""
    sizes, tail = SIZES["skewed"]
    group, group_sizes = _rows_of(sizes, tail)
    rng = np.random.default_rng(1)
    depth, cols, groups = 72, 40, len(sizes)
    lhs = jnp.asarray(rng.standard_normal((group.size, depth)), dtype)
    rhs = jnp.asarray(rng.standard_normal((groups, cols, depth) if transpose_rhs else (groups, depth, cols)), dtype)
    out = pg.grouped_matmul(lhs, rhs, jnp.asarray(group_sizes), transpose_rhs=transpose_rhs, interpret=interpret,
                            tiles=TILES[tiles])
    assert out.dtype == jnp.dtype(dtype)
    expected = _expected_matmul(np.asarray(lhs, np.float64), np.asarray(rhs, np.float64), group, transpose_rhs)
    out = np.asarray(out, np.float64)
    assert_exactly_zero(out[group < 0], "rows past every group")
    assert_close(out, expected, FLOAT32_RTOL if dtype == "float32" else BFLOAT16_RTOL, f"{dtype} grouped matmul")


def test_grouped_weight_grad_rounds_once_at_its_store(interpret):
    """With ``out_dtype`` bfloat16 the kernel stores its float32 accumulator rounded: bit for bit the float32
    result cast afterwards, without that float32 result (weight-sized) ever existing."""
    sizes, tail = SIZES["skewed"]
    _, group_sizes = _rows_of(sizes, tail)
    rng = np.random.default_rng(3)
    rows = int(sum(sizes)) + tail
    lhs = jnp.asarray(rng.standard_normal((rows, 40)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((rows, 24)), jnp.bfloat16)
    wide = pg.grouped_weight_grad(lhs, rhs, jnp.asarray(group_sizes), interpret=interpret)
    narrow = pg.grouped_weight_grad(lhs, rhs, jnp.asarray(group_sizes), interpret=interpret, out_dtype=jnp.bfloat16)
    assert narrow.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(narrow).view(np.uint16),
                                  np.asarray(wide.astype(jnp.bfloat16)).view(np.uint16))


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_weight_grad(dtype, tiles, interpret):
    """dW[g] = x_g^T dy_g over each group's rows; empty groups exactly zero; tail rows ignored."""
    sizes, tail = SIZES["skewed"]
    group, group_sizes = _rows_of(sizes, tail)
    rng = np.random.default_rng(2)
    depth, cols = 40, 24
    lhs = jnp.asarray(rng.standard_normal((group.size, depth)), dtype)
    rhs = jnp.asarray(rng.standard_normal((group.size, cols)), dtype)
    dw = pg.grouped_weight_grad(lhs, rhs, jnp.asarray(group_sizes), interpret=interpret, tiles=TILES[tiles])
    assert dw.dtype == jnp.float32 and dw.shape == (len(sizes), depth, cols)
    dw = np.asarray(dw, np.float64)
    x64, g64 = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    for e, size in enumerate(sizes):
        if size == 0:
            assert_exactly_zero(dw[e], f"dW[{e}] of an empty group")
        else:
            rows = group == e
            # bfloat16 operands multiply exactly in float32: only the summation order differs
            assert_close(dw[e], x64[rows].T @ g64[rows], FLOAT32_RTOL, f"dW[{e}]", by_row=False)


def test_tiles_must_be_powers_of_two():
    with pytest.raises(ValueError, match="powers of two"):
        pg.Tiles(rows=48, cols=128, depth=64, num_warps=4, num_stages=3)
    assert all(t.rows & (t.rows - 1) == 0 for t in (pg.INT8_TILES, pg.HALF_TILES, pg.FLOAT32_TILES))


def test_int8_tiles_shallower_than_an_int8_mma_are_refused_on_gpus():
    """16-deep int8 tiles gave wrong sums through Triton on the H200: refused there, not run; interpreted they
    are exact (the interpreter does not lower to tensor cores)."""
    lhs, rhs, sizes = jnp.zeros((4, 64), jnp.int8), jnp.zeros((2, 8, 64), jnp.int8), jnp.asarray([2, 2], jnp.int32)
    shallow = pg.Tiles(rows=16, cols=16, depth=16, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="contraction tile of at least 32"):
        pg.grouped_matmul(lhs, rhs, sizes, transpose_rhs=True, tiles=shallow)
    assert not np.any(np.asarray(pg.grouped_matmul(lhs, rhs, sizes, transpose_rhs=True, tiles=shallow, interpret=True)))


def test_operand_errors_say_what_is_wrong():
    sizes = jnp.asarray([2, 1], jnp.int32)
    lhs = jnp.zeros((3, 8), jnp.int8)
    with pytest.raises(TypeError, match="share a dtype"):
        pg.grouped_matmul(lhs, jnp.zeros((2, 8, 4), jnp.float32), sizes, interpret=True)
    with pytest.raises(ValueError, match="disagree on K"):
        pg.grouped_matmul(lhs, jnp.zeros((2, 4, 8), jnp.int8), sizes, interpret=True)
    with pytest.raises(ValueError, match="come together"):
        pg.grouped_matmul(lhs, jnp.zeros((2, 8, 4), jnp.int8), sizes, row_scale=jnp.ones(3), interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        pg.grouped_matmul(lhs, jnp.zeros((2, 8, 4), jnp.int8), sizes[:1], interpret=True)


#: What reaches Triton on a GPU: the forward / input-gradient GEMM for each operand type and weight
#: layout, and the weight gradient. Shapes as in the logbook's layer, scaled down.
LOWERED = {
    "int8_scaled_rhs_gnk": lambda: (
        lambda a, b, s, r, c: pg.grouped_matmul(a, b, s, transpose_rhs=True, row_scale=r, col_scale=c,
                                                out_dtype=jnp.bfloat16),
        [((1000, 256), jnp.int8), ((8, 512, 256), jnp.int8), ((8,), jnp.int32), ((1000,), jnp.float32),
         ((8, 512), jnp.float32)]),
    "bfloat16_rhs_gkn": lambda: (
        lambda a, b, s: pg.grouped_matmul(a, b, s),
        [((1000, 256), jnp.bfloat16), ((8, 256, 512), jnp.bfloat16), ((8,), jnp.int32)]),
    "float32_rhs_gnk": lambda: (
        lambda a, b, s: pg.grouped_matmul(a, b, s, transpose_rhs=True),
        [((1000, 256), jnp.float32), ((8, 512, 256), jnp.float32), ((8,), jnp.int32)]),
    "bfloat16_weight_grad": lambda: (
        lambda a, b, s: pg.grouped_weight_grad(a, b, s),
        [((1000, 256), jnp.bfloat16), ((1000, 512), jnp.bfloat16), ((8,), jnp.int32)]),
}


@pytest.mark.parametrize("kernel", list(LOWERED))
def test_kernels_lower_through_triton_for_cuda(kernel):
    """Pallas's Triton lowering accepts each kernel (its ops, its masked loads and stores, its loops with
    run-time trip counts) and emits the Triton custom call, for CUDA, on a machine without a GPU; and the
    Triton module it emits verifies, as XLA's parser will verify it on a GPU (a K loop whose run-time bound
    was lowered as i1 against an i32 start passed the first check and failed only on the H200).
    Compiling the module to PTX and running it need a GPU: that is not checked here."""
    fn, shapes = LOWERED[kernel]()
    verified = verified_cuda_lowerings(fn, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes])
    assert verified and all(verified), "the Triton module does not verify"
