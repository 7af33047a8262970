"""Grouped (per-expert) GEMMs as Pallas kernels with the Triton lowering (GPU), interpreted on CPU.

The ``pallas`` formulation of `grouped` (issue 15). Rows are sorted by group, as `grouped.place_rows`
sorts them for ``ragged``; ``group_sizes`` [G] says where each group ends. Unlike ``padded``, no group
is padded to the largest group's row count: the largest skewed group no longer sets the memory and
the work of every group (H200, T=32768, H=F=2048, E=64, zipf routing: ``padded`` forward+backward
asked for 42-72 GiB at top-k 2..8).

Two kernels:

* `grouped_matmul`: ``out[m] = lhs[m] @ rhs[g(m)]`` (or ``@ rhs[g(m)]^T``), int8 x int8 with int32
  accumulation or float operands with float32 accumulation, and for int8 the dequantization in the
  epilogue: ``out[m, n] = acc[m, n] * row_scale[m] * col_scale[g(m), n]``. Grid: (row tiles, column
  tiles). Each row tile belongs to exactly one group (`row_tile_schedule`, made with jnp ops inside
  the jitted program, as MegaBlocks' and megablox's group metadata): a group's last tile is partial
  and masked, never shared with the next group, so a tile multiplies by one weight matrix.
* `grouped_weight_grad`: ``dW[g] = lhs[rows of g]^T @ rhs[rows of g]`` [G, K, N], float32 accumulation. Grid: (groups,
  K tiles, N tiles); each program walks its group's rows in chunks (a loop with a run-time trip
  count). A group without rows gets exactly zero. On GPU ``ragged_dot_general`` with a ragged
  contracting dimension has the same dense lowering as the forward, so the weight gradient needs its
  own kernel to keep the ``pallas`` formulation free of the dense blow-up.

Inside ``shard_map`` (expert parallelism) the kernels need ``check_vma=False`` (`expert_parallel`
passes it for this formulation): Pallas asks for each output's manual-axis variance, and its
interpreter mixes varying and invariant values (jax 0.10.2: "dynamic_slice requires varying manual
axes to match").

Index arrays (the tile schedule, the group offsets) are ordinary kernel inputs read with scalar loads:
scalar prefetch is TPU-only and the Triton lowering rejects it. Every ref is the whole array and every
block is read and written with masked loads/stores, so shapes need not divide the tiles (the tiles are
powers of two, as Triton requires of every array a kernel materializes).

``interpret=True`` evaluates the kernels with Pallas's interpreter (on CPU: the tests and the CPU
conformance runs); otherwise they lower through Triton, which exists for NVIDIA and AMD GPUs only.
Block sizes are first guesses, not tuned. On the H200 (2026-12-01, logbook-shared0, zipf routing, where
``padded`` runs out of memory; results/h200/throughput.md) the formulation ran every case: top-8 forward
373 TF/s (none) and 573 (int8_routed_prequant), forward+backward 322 and 378.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .env import precision_for


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel (powers of two, as Triton's tensors must be) and its launch options.

    ``rows``: rows of lhs per block (the grouped GEMM's M tile; the weight gradient's contraction
    chunk). ``cols``: output columns per block. ``depth``: the contraction tile (grouped GEMM) or the
    output rows of dW per block (weight gradient). ``num_warps``/``num_stages``: Triton's launch width
    and software-pipelining depth.
    """

    rows: int
    cols: int
    depth: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "depth"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"tile {name}={value}: Triton tiles must be powers of two >= 16")


#: The smallest contraction tile of an int8 product through Triton: an int8 tensor-core MMA takes 32 of K, and
#: on the H200 (Triton 3.6) 16-deep int8 tiles gave wrong sums (tests/test_jax_pallas_grouped.py, 2026-12-01).
INT8_MIN_DEPTH = 32

#: int8 operands: 128 x 128 output tiles with a 128-deep contraction. int8 tensor-core MMAs take 32
#: of K per instruction, and a 128-byte K row is one full cache line per operand row; two 16 KiB
#: operand blocks per stage leave room for 3 stages in an H100/H200 SM's 228 KiB of shared memory.
#: 128 rows per tile bound the masked waste at a group's end to < 128 rows per expert (< 3% of the
#: logbook's 262,144 rows at top-k 8 over 64 experts).
INT8_TILES = Tiles(rows=128, cols=128, depth=128, num_warps=8, num_stages=3)
#: bfloat16/float16 operands: the same 128 x 128 output tile with a 64-deep contraction, again 16 KiB
#: per operand block and stage (Triton's own matmul tutorial starts from 128 x 128 x 64).
HALF_TILES = Tiles(rows=128, cols=128, depth=64, num_warps=8, num_stages=3)
#: float32 operands (IEEE, no TF32: float32 must mean float32): smaller blocks, since a 4-byte
#: operand doubles the shared memory per element and float32 FMAs gain nothing from wide tiles.
FLOAT32_TILES = Tiles(rows=64, cols=64, depth=32, num_warps=4, num_stages=3)

#: Weight gradient: ``depth`` x ``cols`` output blocks of dW (128 x 128 holds a float32 accumulator of
#: 64 KiB spread over the warps) and ``rows`` rows of the group per loop step, 64 so that two 16 KiB
#: (2-byte) operand chunks fit each pipeline stage. float32 halves each side again.
HALF_WEIGHT_GRAD_TILES = Tiles(rows=64, cols=128, depth=128, num_warps=8, num_stages=3)
FLOAT32_WEIGHT_GRAD_TILES = Tiles(rows=32, cols=64, depth=64, num_warps=4, num_stages=3)


def matmul_tiles(dtype) -> Tiles:
    """The grouped GEMM's tiles for operands of ``dtype``."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return INT8_TILES
    if dtype.itemsize == 2:
        return HALF_TILES
    if dtype == jnp.float32:
        return FLOAT32_TILES
    raise TypeError(f"no grouped GEMM tiles for operands of dtype {dtype} (int8, bfloat16, float16, float32)")


def weight_grad_tiles(dtype) -> Tiles:
    """The weight-gradient kernel's tiles for float operands of ``dtype``."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating):
        return HALF_WEIGHT_GRAD_TILES
    if dtype == jnp.float32:
        return FLOAT32_WEIGHT_GRAD_TILES
    raise TypeError(f"no weight-gradient tiles for operands of dtype {dtype} (bfloat16, float16, float32)")


def _compiler_params(tiles: Tiles) -> plgpu.CompilerParams:
    """Triton launch options. Passing Triton's own CompilerParams also selects the Triton lowering
    explicitly, whatever ``jax_pallas_use_mosaic_gpu`` says."""
    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# -- the tile schedule --------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowTileSchedule:
    """Which rows each row tile of the grouped GEMM covers, and for which group.

    ``group`` [n] int32: the tile's group; ``groups`` (one past the last) for the tail of rows that
    belong to no group (they come out zero) and for the unused tiles past the schedule. ``start``,
    ``end`` [n] int32: the tile's rows are ``start <= m < end``, at most ``Tiles.rows`` of them, all
    of one group; an unused tile has ``start == end``. ``n`` is static: an upper bound on the number
    of tiles any split of the rows into ``groups`` groups can need (`max_row_tiles`).
    """

    group: jax.Array
    start: jax.Array
    end: jax.Array


def max_row_tiles(rows: int, groups: int, block_rows: int) -> int:
    """Tiles needed at most: sum over the groups and the tail of ceil(size / block_rows), which is at
    most (rows + (groups + 1) (block_rows - 1)) // block_rows (each part wastes < one tile)."""
    return max((rows + (groups + 1) * (block_rows - 1)) // block_rows, 1)


def row_tile_schedule(group_sizes: jax.Array, rows: int, block_rows: int) -> RowTileSchedule:
    """Split ``rows`` rows sorted by group into tiles of at most ``block_rows`` rows of one group each.

    Group g owns rows [offset_g, offset_g + size_g); the rows past sum(group_sizes) form a tail group
    (index G) whose tiles write zeros. Computed with jnp ops on the device, inside the caller's jitted
    program: a cumulative sum over the groups and a binary search per tile.
    """
    groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    tail = jnp.maximum(rows - jnp.sum(sizes), 0)
    parts = jnp.concatenate([sizes, tail[None]])  # the G groups, then the tail
    offsets = jnp.cumsum(parts) - parts
    tiles_per_part = (parts + block_rows - 1) // block_rows
    tile_ends = jnp.cumsum(tiles_per_part)
    tile = jnp.arange(max_row_tiles(rows, groups, block_rows), dtype=jnp.int32)
    part = jnp.searchsorted(tile_ends, tile, side="right").astype(jnp.int32)  # G + 1: past the schedule
    used = part <= groups
    owner = jnp.minimum(part, groups)
    first_tile = tile_ends[owner] - tiles_per_part[owner]
    start = offsets[owner] + (tile - first_tile) * block_rows
    end = jnp.minimum(start + block_rows, offsets[owner] + parts[owner])
    start = jnp.where(used, start, rows).astype(jnp.int32)
    end = jnp.where(used, end, rows).astype(jnp.int32)
    return RowTileSchedule(owner, start, end)


def _cdiv(a, b):
    return (a + b - 1) // b


# -- grouped GEMM ---------------------------------------------------------------------------------------


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
                   row_scale: jax.Array | None = None, col_scale: jax.Array | None = None, out_dtype=None,
                   interpret: bool = False, tiles: Tiles | None = None) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] for rows sorted by group; rows past sum(group_sizes) come out zero.

    ``lhs`` [M, K]; ``rhs`` [G, K, N], or [G, N, K] with ``transpose_rhs`` (int8 tensor-core GEMMs
    want both operands contracting their minor axis); same dtype. int8 accumulates in int32, floats
    in float32. ``row_scale`` [M] and ``col_scale`` [G, N] (both or neither; float32) dequantize in
    the epilogue: ``out[m, n] = acc[m, n] * row_scale[m] * col_scale[g(m), n]``. ``out_dtype``:
    default int32 for unscaled int8, else the float32 accumulator's type cast to lhs's float dtype.
    """
    _check_operands(lhs, rhs, group_sizes, transpose_rhs)
    if (row_scale is None) != (col_scale is None):
        raise ValueError("row_scale and col_scale come together (the epilogue multiplies by both)")
    rows, depth = lhs.shape
    groups = rhs.shape[0]
    cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    integer = lhs.dtype == jnp.int8
    scaled = row_scale is not None
    if scaled:
        if row_scale.shape != (rows,) or col_scale.shape != (groups, cols):
            raise ValueError(f"row_scale {row_scale.shape} / col_scale {col_scale.shape}: expected ({rows},) / "
                             f"({groups}, {cols})")
        row_scale, col_scale = row_scale.astype(jnp.float32), col_scale.astype(jnp.float32)
    if out_dtype is None:
        out_dtype = jnp.float32 if scaled else (jnp.int32 if integer else lhs.dtype)
    tiles = tiles or matmul_tiles(lhs.dtype)
    if integer and not interpret and tiles.depth < INT8_MIN_DEPTH:
        raise ValueError(f"int8 tiles of depth {tiles.depth}: the GPU's int8 products need a contraction tile of "
                         f"at least {INT8_MIN_DEPTH}")
    schedule = row_tile_schedule(group_sizes, rows, tiles.rows)
    kernel = functools.partial(
        _grouped_matmul_kernel, tiles=tiles, depth=depth, cols=cols, groups=groups, transpose_rhs=transpose_rhs,
        scaled=scaled, accumulate=jnp.int32 if integer else jnp.float32, precision=precision_for(lhs.dtype))
    operands = (schedule.group, schedule.start, schedule.end, lhs, rhs) + ((row_scale, col_scale) if scaled else ())
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, cols), jnp.dtype(out_dtype)),
        grid=(schedule.group.shape[0] * _cdiv(cols, tiles.cols),),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(tiles),
        name="qmoe_grouped_matmul_int8" if integer else "qmoe_grouped_matmul",
    )(*operands)


def _grouped_matmul_kernel(tile_group_ref, tile_start_ref, tile_end_ref, lhs_ref, rhs_ref, *refs, tiles: Tiles,
                           depth: int, cols: int, groups: int, transpose_rhs: bool, scaled: bool, accumulate,
                           precision) -> None:
    """One (row tile, column tile) block of `grouped_matmul`: its group's weight, a K loop, the epilogue.

    One grid axis, column tiles fastest: the programs in flight share a row tile of lhs (read from memory
    once) and sweep one group's weight, which stays in L2 across the group's row tiles. Row tiles fastest
    re-read every lhs tile from memory once per column tile (32 times for the logbook's up projection)."""
    if scaled:
        row_scale_ref, col_scale_ref, out_ref = refs
    else:
        (out_ref,) = refs
    col_blocks = _cdiv(cols, tiles.cols)
    tile, col_block = pl.program_id(0) // col_blocks, pl.program_id(0) % col_blocks
    group = tile_group_ref[tile]
    start = tile_start_ref[tile]
    end = tile_end_ref[tile]
    col0 = col_block * tiles.cols
    row_ok = start + jnp.arange(tiles.rows, dtype=jnp.int32) < end
    col_ok = col0 + jnp.arange(tiles.cols, dtype=jnp.int32) < cols
    # The tail (rows of no group) and unused tiles run no K step: their accumulator stays zero.
    # A product, not jnp.where: Pallas's Triton lowering types a select of two Python ints as i1, and the
    # loop bound must be i32 like the loop's start and step (XLA refuses the module otherwise).
    steps = ((group < groups) & (start < end)).astype(jnp.int32) * jnp.int32(_cdiv(depth, tiles.depth))
    weight = jnp.minimum(group, groups - 1)  # a valid index even where no step reads it

    def k_step(step, acc):
        k0 = pl.multiple_of(step * tiles.depth, tiles.depth)
        k_ok = k0 + jnp.arange(tiles.depth, dtype=jnp.int32) < depth
        a = plgpu.load(lhs_ref.at[pl.ds(start, tiles.rows), pl.ds(k0, tiles.depth)],
                       mask=row_ok[:, None] & k_ok[None, :], other=0)
        if transpose_rhs:  # rhs [G, N, K]: contract both minor axes
            b = plgpu.load(rhs_ref.at[weight, pl.ds(col0, tiles.cols), pl.ds(k0, tiles.depth)],
                           mask=col_ok[:, None] & k_ok[None, :], other=0)
            numbers = (((1,), (1,)), ((), ()))
        else:
            b = plgpu.load(rhs_ref.at[weight, pl.ds(k0, tiles.depth), pl.ds(col0, tiles.cols)],
                           mask=k_ok[:, None] & col_ok[None, :], other=0)
            numbers = (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(a, b, numbers, precision=precision, preferred_element_type=accumulate)

    acc = jax.lax.fori_loop(0, steps, k_step, jnp.zeros((tiles.rows, tiles.cols), accumulate))
    if scaled:  # dequantize once, in float32, before the single store
        s_row = plgpu.load(row_scale_ref.at[pl.ds(start, tiles.rows)], mask=row_ok, other=0.0)
        s_col = plgpu.load(col_scale_ref.at[weight, pl.ds(col0, tiles.cols)], mask=col_ok, other=0.0)
        out = acc.astype(jnp.float32) * s_row[:, None] * s_col[None, :]
    else:
        out = acc
    plgpu.store(out_ref.at[pl.ds(start, tiles.rows), pl.ds(col0, tiles.cols)], out.astype(out_ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


# -- grouped weight gradient ------------------------------------------------------------------------------


def grouped_weight_grad(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, interpret: bool = False,
                        tiles: Tiles | None = None, out_dtype=jnp.float32) -> jax.Array:
    """dW[g] = sum over the rows m of group g of lhs[m]^T rhs[m]: [G, K, N] in ``out_dtype``, accumulated in
    float32 and rounded once at the store (a bfloat16 layer's dW then never exists in float32: weight-sized).

    ``lhs`` [M, K] and ``rhs`` [M, N] float, rows sorted by group (rows past sum(group_sizes) are
    ignored). A group with no rows gets exactly zero.
    """
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"weight gradient of lhs {lhs.shape} and rhs {rhs.shape}: expected [M, K] and [M, N]")
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(f"weight gradient operands must share a float dtype, got {lhs.dtype} and {rhs.dtype}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be [G], got shape {group_sizes.shape}")
    rows, depth = lhs.shape
    cols = rhs.shape[1]
    groups = group_sizes.shape[0]
    tiles = tiles or weight_grad_tiles(lhs.dtype)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes).astype(jnp.int32)
    kernel = functools.partial(_weight_grad_kernel, tiles=tiles, rows=rows, depth=depth, cols=cols,
                               precision=precision_for(lhs.dtype))
    operands = (ends - sizes, ends, lhs, rhs)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, depth, cols), out_dtype),
        grid=(groups * _cdiv(depth, tiles.depth) * _cdiv(cols, tiles.cols),),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(tiles),
        name="qmoe_grouped_weight_grad",
    )(*operands)


def _weight_grad_kernel(group_start_ref, group_end_ref, lhs_ref, rhs_ref, out_ref, *, tiles: Tiles, rows: int,
                        depth: int, cols: int, precision) -> None:
    """One (group, K block, N block) of dW: a loop over the group's rows, ``tiles.rows`` at a time.

    One grid axis, N blocks fastest, then K blocks, then groups: the programs in flight read the same
    group's rows (the K block's lhs columns once for all its N blocks) instead of one block of every
    group, whose rows no other program in flight shares."""
    n_blocks, k_blocks = _cdiv(cols, tiles.cols), _cdiv(depth, tiles.depth)
    block = pl.program_id(0)
    group, k_block, n_block = block // (k_blocks * n_blocks), (block // n_blocks) % k_blocks, block % n_blocks
    start = group_start_ref[group]
    end = jnp.minimum(group_end_ref[group], rows)
    k0, n0 = k_block * tiles.depth, n_block * tiles.cols
    k_ok = k0 + jnp.arange(tiles.depth, dtype=jnp.int32) < depth
    n_ok = n0 + jnp.arange(tiles.cols, dtype=jnp.int32) < cols

    def row_step(step, acc):
        r0 = start + step * tiles.rows
        r_ok = r0 + jnp.arange(tiles.rows, dtype=jnp.int32) < end
        a = plgpu.load(lhs_ref.at[pl.ds(r0, tiles.rows), pl.ds(k0, tiles.depth)],
                       mask=r_ok[:, None] & k_ok[None, :], other=0)
        b = plgpu.load(rhs_ref.at[pl.ds(r0, tiles.rows), pl.ds(n0, tiles.cols)],
                       mask=r_ok[:, None] & n_ok[None, :], other=0)
        return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

    steps = _cdiv(jnp.maximum(end - start, 0), tiles.rows)
    acc = jax.lax.fori_loop(0, steps, row_step, jnp.zeros((tiles.depth, tiles.cols), jnp.float32))
    plgpu.store(out_ref.at[group, pl.ds(k0, tiles.depth), pl.ds(n0, tiles.cols)], acc.astype(out_ref.dtype),
                mask=k_ok[:, None] & n_ok[None, :])


def _check_operands(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"grouped GEMM of lhs {lhs.shape} and rhs {rhs.shape}: expected [M, K] and [G, K, N]")
    contracted = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if contracted != lhs.shape[1]:
        layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
        raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} ({layout}) disagree on K")
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"grouped GEMM operands must share a dtype, got {lhs.dtype} and {rhs.dtype}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes has shape {group_sizes.shape}, expected ({rhs.shape[0]},)")
