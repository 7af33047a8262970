"""The grouped int8 GEMM with its dequantizing epilogue as a warp-specialized Pallas kernel with the Mosaic GPU
lowering (Hopper: wgmma and TMA).

    out[r, :] = out_dtype(f32(lhs[r, :] . rhs[g(r)]^T) * (lhs_scale[r] * rhs_scale[g(r)]))

Why a second kernel next to `pallas_grouped`'s Triton one: XLA's int8 dot alone (no scales) over the
capacity-padded layout [64, 4480, 2048] x [64, 4096, 2048] took 3.784 ms on the H200; this kernel, with the
scales, takes 3.149 ms on the tile-aligned layout and ~3.3-3.45 ms on a ragged one (M = 64 groups x 4096 rows,
N = 4096, K = 2048; 1276-1397 int8 TOP/s of the real rows, bit-exact against XLA; 2026-12, jax 0.11 on the device).

Structure (after jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py): one memory warpgroup issues the TMA loads
(`plgpu.emit_pipeline_warp_specialized`); two compute warpgroups each own one half of a CTA tile (split along M)
with its own int32 accumulator of ``tile_m x tile_n``; the CTAs are persistent over the SMs (`plgpu.nd_loop` over
the work tiles, N tiles fastest so the CTAs in flight share an lhs row block and sweep one group's weight).

Two layouts, two kernels:

* padded (``group_stride`` C > 0): group g owns rows g C .. g C + C, its first ``group_sizes[g]`` real. C must be a
  multiple of the CTA tile's M, so every CTA M tile lies in one group (`aligned_tile_groups`). A tile with no real
  row runs no product: its compute warpgroups store zeros (one zeroed SMEM piece, TMA-stored over the tile). A tile
  that is partly padding is computed whole: its padding rows of lhs are zero, so their outputs are too.
* ragged (``group_stride`` 0): groups contiguous from row 0 with any sizes. `ragged_tiles` cuts the rows into work
  tiles of one part each (a CTA M block shared by two groups is two work tiles, each computing the whole block and
  storing only its own rows); the rows past sum(group_sizes) are one more part whose tiles only store zeros. A
  warpgroup stages its whole result tile in SMEM and stores its rows of the part with TMA stores of 2**i rows (a
  TMA store writes a whole box; the power-of-two pieces cover any row count exactly, without masks).

Every output row is written exactly once, so the output needs no zero fill first (a memset of M x N would cost
~0.5 ms at the benchmark shape).

``interpret=True`` runs the kernels in Pallas's GPU interpreter on CPU (the tests). Its wgmma has no
`plgpu.transpose_ref`, so there rhs is fed as [G, K, N] (one transposing copy, interpreter only); on the GPU int8
wgmma needs both operands K-major and rhs [G, N, K] is passed through ``transpose_ref``. Shapes the kernels refuse
(`mosaic_unsupported_reason`): K not a multiple of 32 (the int8 wgmma's contraction step), N not a multiple of 16,
for the ragged layout an N whose output tile rows are under 128 bytes (bfloat16: N not a multiple of 64), and for
the padded layout a group stride that is not a multiple of the CTA tile's M (128).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class Config:
    """One kernel's tiles. Each compute warpgroup holds a ``tile_m x tile_n`` int32 accumulator; the CTA tile is
    two of them stacked along M (``cta_m = 2 tile_m``). ``stages``: TMA loads in flight (pipeline depth).
    ``epi_m x epi_n``: the padded layout's epilogue piece (swizzled SMEM, two slots a warpgroup)."""

    tile_m: int
    tile_n: int
    tile_k: int
    stages: int
    epi_m: int = 64
    epi_n: int = 64

    @property
    def cta_m(self) -> int:
        return 2 * self.tile_m

    @property
    def cta_n(self) -> int:
        return self.tile_n

    def epilogue_slots(self) -> int:
        return min(2, (self.tile_m // self.epi_m) * (self.tile_n // self.epi_n))

    def smem_bytes(self, ragged: bool, out_dtype) -> int:
        """Shared memory of the kernel: the pipeline's stages, the output staging, the row scales."""
        out_bytes = jnp.dtype(out_dtype).itemsize
        stage = (self.cta_m + self.cta_n) * self.tile_k
        if ragged:  # each warpgroup stages its whole tile
            out = 2 * self.tile_m * self.tile_n * out_bytes
        else:
            out = 2 * self.epilogue_slots() * self.epi_m * self.epi_n * out_bytes
        return self.stages * stage + out + 2 * self.tile_m * 4


#: Padded layout: CTA 128 x 256 (each compute warpgroup 64 x 256: m64n256k32 wgmmas, 128 accumulator registers a
#: thread), 128 deep, 3 stages of 48 KiB, epilogue pieces 64 x 128. H200, M = 64 x 4096, N = 4096, K = 2048:
#: 3.149 ms, 1397 int8 TOP/s (CTA 256 x 128 with 4 stages: 3.168 ms; XLA's int8 dot alone, padded: 3.784 ms).
ALIGNED_CONFIG = Config(tile_m=64, tile_n=256, tile_k=128, stages=3, epi_m=64, epi_n=128)
#: Ragged layout: CTA 256 x 128 (each warpgroup 128 x 128), 128 deep, 3 stages (the whole-tile output staging takes
#: 64 KiB). Same H200 shape with even, +-200 and skewed group sizes: 1276-1327 int8 TOP/s for this and CTA 128 x 256.
RAGGED_CONFIG = Config(tile_m=128, tile_n=128, tile_k=128, stages=3)
#: The padded layout's group stride must be a multiple of this (the aligned kernel's CTA tile rows): callers round
#: their capacity up to it.
ROW_ALIGNMENT = 2 * ALIGNED_CONFIG.tile_m

#: An int8 wgmma contracts 32 elements (32 bytes: the smallest swizzle wgmma operands take).
MIN_TILE_K = 32
#: The narrowest output tile: 16 columns keep every TMA box row >= 32 bytes (a 16-byte row has no swizzle).
MIN_TILE_N = 16
#: A TMA copy's shared-memory address must be 128-byte aligned (CUDA's TMA rules): the ragged kernel's row-piece
#: stores start at any row of the staged tile, so its rows must be whole multiples of this (a misaligned address
#: otherwise, H200, 2026-12-01: N = 32 float16).
TMA_SMEM_ALIGNMENT = 128
#: The SMEM tiling's rows (`_swizzled`): a TMA load of lhs rows into a tiled buffer must start at a multiple of it,
#: and Mosaic GPU's layout inference refuses a block start it cannot prove divisible (M = 628, jax 0.10-0.11).
TILING_ROWS = 8
#: Hopper's 227 KiB of shared memory a block, less room for the pipeline's barriers.
SMEM_BUDGET = 226 * 1024
#: The memory warpgroup only issues TMA copies: it gives its registers to the compute warpgroups (232 each).
MEMORY_REGISTERS = 40
#: SMs of an H100/H200 SXM, where the device count is unknown (lowering for CUDA on a machine without a GPU).
DEFAULT_SMS = 132
#: CTAs the interpreter simulates: two still share the work tiles, so slot and barrier reuse across tiles runs.
INTERPRET_SMS = 2
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def mosaic_unsupported_reason(m: int, n: int, k: int, groups: int, group_stride: int, out_dtype) -> str | None:
    """Why `grouped_int8_matmul` refuses lhs [m, k], rhs [groups, n, k] with ``out_dtype`` output in this layout, or
    None if it runs them."""
    if groups < 1:
        return "needs at least one group"
    if n <= 0 or k <= 0:
        return f"N = {n} and K = {k} must be positive"
    if k % MIN_TILE_K:
        return f"K = {k} must be a multiple of {MIN_TILE_K} (the int8 wgmma's contraction step)"
    if n % MIN_TILE_N:
        return f"N = {n} must be a multiple of {MIN_TILE_N} (the narrowest output tile)"
    if group_stride < 0:
        return f"group_stride = {group_stride} must be 0 (ragged) or positive (padded)"
    row_bytes = min(n & -n, RAGGED_CONFIG.tile_n) * jnp.dtype(out_dtype).itemsize
    if not group_stride and row_bytes < TMA_SMEM_ALIGNMENT:
        return (f"ragged layout: N = {n} gives output tiles of {row_bytes}-byte rows, and the row-piece stores need "
                f"{TMA_SMEM_ALIGNMENT} (a TMA store's shared-memory source starts {TMA_SMEM_ALIGNMENT}-byte aligned): "
                f"N must be a multiple of {TMA_SMEM_ALIGNMENT // jnp.dtype(out_dtype).itemsize}")
    if group_stride:
        if m != groups * group_stride:
            return f"padded layout: M = {m} must be groups x group_stride = {groups} x {group_stride}"
        if group_stride % ALIGNED_CONFIG.cta_m:
            return (f"padded layout: group_stride = {group_stride} must be a multiple of the CTA tile's "
                    f"{ALIGNED_CONFIG.cta_m} rows")
    return None


def kernel_config(n: int, k: int, out_dtype, ragged: bool) -> Config:
    """The layout's default tiles, narrowed to divide N and K, with the contraction tile halved until the shared
    memory fits (float32 outputs double the output staging)."""
    base = RAGGED_CONFIG if ragged else ALIGNED_CONFIG
    tile_n = base.tile_n
    while n % tile_n:
        tile_n //= 2
    # the epilogue piece keeps its bytes: 64 x 128 bfloat16 or 64 x 64 float32
    epi_n = min(tile_n, base.epi_n * 2 // jnp.dtype(out_dtype).itemsize)
    tile_k = base.tile_k
    while tile_k > MIN_TILE_K and k % tile_k:
        tile_k //= 2
    while True:
        config = dataclasses.replace(base, tile_n=tile_n, tile_k=tile_k, epi_n=epi_n)
        if config.smem_bytes(ragged, out_dtype) <= SMEM_BUDGET or tile_k == MIN_TILE_K:
            return config
        tile_k //= 2


# -- work tiles -----------------------------------------------------------------------------------------------


def aligned_tile_groups(group_sizes: jax.Array, group_stride: int, block_m: int) -> jax.Array:
    """[G C / block_m] int32: the group of each CTA M tile of the padded layout, -1 where the tile holds no real row
    (its output is stored as zeros). ``group_stride`` C must be a multiple of ``block_m``."""
    groups = group_sizes.shape[0]
    sizes = jnp.clip(group_sizes.astype(jnp.int32), 0, group_stride)
    per_group = group_stride // block_m
    first_row = jnp.arange(per_group, dtype=jnp.int32) * block_m  # of each tile, within its group
    return jnp.where(first_row[None, :] < sizes[:, None], jnp.arange(groups, dtype=jnp.int32)[:, None],
                     -1).reshape(-1)


def ragged_tile_count(m: int, groups: int, block_m: int) -> int:
    """Work tiles of `ragged_tiles`: the M blocks, plus one for each boundary between two parts (G groups and the
    tail) that can split a block."""
    return -(-m // block_m) + groups


def ragged_tiles(group_sizes: jax.Array, block_m: int, m: int) -> jax.Array:
    """Work tiles of the ragged layout: [`ragged_tile_count`, 4] int32 rows of (part, M block, first row of the part
    within the CTA block, the part's row count in the block).

    Parts: the groups 0..G-1 (rows sorted by group from row 0), then the tail G (rows past sum(group_sizes), stored
    as zeros); -1 marks an unused tile (nothing to do). A part's rows are cut at multiples of ``block_m``: M block b
    holds rows b block_m .. (b + 1) block_m, but its CTA block (the rows the kernel loads, which the third column
    counts from) starts at min(b block_m, m - block_m) (m >= block_m), so that no load reads past the last row.
    Computed with jnp ops inside the caller's jitted program."""
    groups = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])  # the tail ends at m
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first_block = starts // block_m
    tiles = jnp.where(ends > starts, (ends - 1) // block_m - first_block + 1, 0)
    tile_end = jnp.cumsum(tiles)
    t = jnp.arange(ragged_tile_count(m, groups, block_m), dtype=jnp.int32)
    part = jnp.searchsorted(tile_end, t, side="right").astype(jnp.int32)
    used = part <= groups
    p = jnp.minimum(part, groups)
    block = first_block[p] + t - (tile_end[p] - tiles[p])
    row0 = jnp.maximum(starts[p], block * block_m)
    row1 = jnp.minimum(ends[p], (block + 1) * block_m)
    base = jnp.minimum(block * block_m, m - block_m)
    return jnp.stack([jnp.where(used, part, -1), jnp.where(used, block, 0), jnp.where(used, row0 - base, 0),
                      jnp.where(used, row1 - row0, 0)], axis=1).astype(jnp.int32)


# -- kernel pieces --------------------------------------------------------------------------------------------


def _swizzled(minor_elems: int, dtype) -> tuple:
    """SMEM transforms of a 2D tile with ``minor_elems`` elements a row: the widest swizzle the row allows (wgmma
    operands and TMA want swizzled, 8-row tiled SMEM to avoid bank conflicts)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _pipeline(config: Config, k_steps: int, body, compute_context, rhs_kn: bool):
    """The K loop: the memory warpgroup streams the CTA's lhs [cta_m, tile_k] and rhs blocks through ``stages``
    SMEM slots; ``body`` runs on the compute warpgroups once per step."""
    in_specs = [plgpu.BlockSpec((config.cta_m, config.tile_k), lambda kk: (0, kk),
                                transforms=_swizzled(config.tile_k, jnp.int8), memory_space=plgpu.SMEM)]
    if rhs_kn:
        in_specs.append(plgpu.BlockSpec((config.tile_k, config.cta_n), lambda kk: (kk, 0),
                                        transforms=_swizzled(config.cta_n, jnp.int8), memory_space=plgpu.SMEM))
    else:
        in_specs.append(plgpu.BlockSpec((config.cta_n, config.tile_k), lambda kk: (0, kk),
                                        transforms=_swizzled(config.tile_k, jnp.int8), memory_space=plgpu.SMEM))
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), memory_registers=MEMORY_REGISTERS, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=2, max_concurrent_steps=config.stages, compute_context=compute_context)


def _mma_step(config: Config, wg, rhs_kn: bool):
    """One K step of a compute warpgroup: acc[m, n] += lhs[m, :] . rhs[n, :] over its half of the CTA's rows.
    ``wgmma_wait(0)`` every step, as hopper_matmul_mgpu: the other compute warpgroup keeps the tensor cores busy,
    and leaving a wgmma in flight would race with the memory warpgroup refilling the last step's slot for the next
    persistent tile (its release of that slot is not awaited)."""
    rows = pl.ds(wg * config.tile_m, config.tile_m)

    def step(_, lhs_smem, rhs_smem, acc_ref):
        if rhs_kn:
            plgpu.wgmma(acc_ref, lhs_smem.at[rows], rhs_smem)
        else:
            plgpu.wgmma(acc_ref, lhs_smem.at[rows], plgpu.transpose_ref(rhs_smem, (1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref

    return step


def _scaled(acc, scale_smem, wg, group_scale, out_dtype, interpret: bool):
    """f32(acc) * (row scale * group scale), rounded to out_dtype, in the accumulator's (WGMMA) register layout: the
    order of XLA's dequantization (`grouped.int8_accumulator`'s row scale), so the two round alike (on the H200 the
    other order flipped a per-row int8 code downstream), and one multiply an element instead of two."""
    if interpret:  # the interpreter has no register layouts
        row_scale = scale_smem[wg]
        acc_f = acc.astype(jnp.float32)
    else:
        row_scale = plgpu.load(scale_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
        acc_f = plgpu.layout_cast(acc.astype(jnp.float32), plgpu.Layout.WGMMA)
    out = acc_f * lax.broadcast_in_dim(row_scale * group_scale, acc_f.shape, [0])
    return out.astype(out_dtype)


def _zeros(shape: tuple[int, int], dtype, interpret: bool):
    """Zeros in the WGMMA register layout, stored like a computed result (a splat's layout is not storable)."""
    zeros = jnp.zeros(shape, dtype)
    return zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)


def _launch(body, operands, out_shape: tuple[int, int], out_dtype, tiles: int, interpret: bool):
    """The persistent kernel: one CTA an SM (at most one a work tile), three warpgroups each."""
    sms = INTERPRET_SMS if interpret else _sm_count()
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype), grid=(max(1, min(sms, tiles)),),
        grid_names=("sm",), num_threads=3, thread_name="wg", interpret=_interpret_params() if interpret else None,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return kernel(*operands)


def _sm_count() -> int:
    try:
        device = jax.local_devices(backend="gpu")[0]
    except RuntimeError:  # no GPU backend here: lowering for CUDA elsewhere
        return DEFAULT_SMS
    return int(getattr(device, "core_count", DEFAULT_SMS))


def _interpret_params():
    """Unwritten output reads as NaN in the interpreter, so a row the kernel forgot to store cannot pass as zero."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # moved in another jax version: plain interpretation (uninitialized memory may be zero)
        return True
    return InterpretGPUParams(uninitialized_memory="nan")


# -- the persistent kernel both layouts share -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Refs:
    """What a work tile's code reaches: the kernel's operands in GMEM (``table``: the layout's per-tile table), the
    scoped SMEM and barriers, and ``wg``, this thread's warpgroup (0 and 1 compute, 2 loads)."""

    table: Any
    lhs: Any
    rhs: Any
    lhs_scale: Any
    rhs_scale: Any
    out: Any
    pipeline: Any
    out_smem: Any
    scale_smem: Any
    scale_barrier: Any
    wg: Any


def _persistent_body(config: Config, k_steps: int, out_smem, tiles: int, tile: Callable[[_Refs, Any], None],
                     interpret: bool):
    """The kernel body: SMEM for the K pipeline, the layout's output staging (``out_smem``) and the row scales, then
    the CTAs' persistent loop over ``tiles`` work tiles, ``tile(refs, index)`` each."""

    def body(table_gmem, lhs_gmem, rhs_gmem, lscale_gmem, rscale_gmem, out_gmem):
        def ignore(*_, **__):
            return None

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=_pipeline(config, k_steps, ignore, ignore, interpret).get_allocations(
                lhs_gmem, rhs_gmem.at[0]),
            out_smem=out_smem,
            scale_smem=plgpu.SMEM((2, config.tile_m), jnp.float32),
            scale_barrier=plgpu.Barrier(num_arrivals=1, num_barriers=2),
            collective_axes="wg",
        )
        def _scope(pipeline_allocs, out_smem, scale_smem, scale_barrier):
            refs = _Refs(table_gmem, lhs_gmem, rhs_gmem, lscale_gmem, rscale_gmem, out_gmem, pipeline_allocs,
                         out_smem, scale_smem, scale_barrier, lax.axis_index("wg"))

            @plgpu.nd_loop((tiles,), collective_axes="sm")
            def _tile(info: plgpu.NDLoopInfo):
                tile(refs, info.index[0])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return body


def _compute_tile(config: Config, k_steps: int, refs: _Refs, lhs_rows, cols, row0, group,
                  store: Callable[[Any], None], out_dtype, interpret: bool) -> None:
    """One work tile's product: the memory warpgroup streams the CTA's ``lhs_rows`` and group ``group``'s ``cols``
    of rhs through the K pipeline; each compute warpgroup accumulates its half in int32 while its row scales (rows
    ``row0`` ..) arrive, then hands ``store`` its dequantized half."""
    wg = refs.wg

    def compute_context(run_pipeline):
        # this warpgroup's row scales arrive while the products run
        plgpu.copy_gmem_to_smem(refs.lhs_scale.at[pl.ds(row0, config.tile_m)], refs.scale_smem.at[wg],
                                refs.scale_barrier.at[wg])

        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((config.tile_m, config.tile_n), jnp.int32))
        def _acc_scope(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...]
            plgpu.barrier_wait(refs.scale_barrier.at[wg])
            store(_scaled(acc, refs.scale_smem, wg, refs.rhs_scale[group], out_dtype, interpret))

    rhs_block = refs.rhs.at[group, :, cols] if interpret else refs.rhs.at[group, cols, :]
    _pipeline(config, k_steps, _mma_step(config, wg, interpret), compute_context, interpret)(
        refs.lhs.at[lhs_rows, :], rhs_block, allocations=refs.pipeline)


# -- padded layout --------------------------------------------------------------------------------------------


def _aligned_kernel(lhs, rhs, lhs_scale, rhs_scale, tile_group, *, config: Config, out_dtype, interpret: bool):
    """Padded layout: ``tile_group`` [M / cta_m] (`aligned_tile_groups`) -> out [M, N]."""
    m, k = lhs.shape
    n = rhs.shape[2] if interpret else rhs.shape[1]
    m_tiles, n_tiles, k_steps = m // config.cta_m, n // config.cta_n, k // config.tile_k
    epi_rows, epi_cols = config.tile_m // config.epi_m, config.tile_n // config.epi_n
    slots = config.epilogue_slots()

    def tile(refs: _Refs, index) -> None:
        wg = refs.wg
        mi = lax.div(index, jnp.int32(n_tiles))
        ni = index - mi * n_tiles
        group = refs.table[mi]
        cta_rows = pl.ds(mi * config.cta_m, config.cta_m)
        cta_cols = pl.ds(ni * config.cta_n, config.cta_n)
        row0 = mi * config.cta_m + wg * config.tile_m

        def out_piece(i: int, j: int):
            """This warpgroup's output piece (i, j) in GMEM."""
            return refs.out.at[pl.ds(row0 + i * config.epi_m, config.epi_m),
                               pl.ds(ni * config.cta_n + j * config.epi_n, config.epi_n)]

        def store(out) -> None:
            """The half tile in epilogue pieces through two swizzled SMEM slots, each TMA-stored."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for i in range(epi_rows):
                for j in range(epi_cols):
                    slot = (i * epi_cols + j) % slots
                    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)  # slot's last store
                    refs.out_smem[wg, slot] = out[i * config.epi_m:(i + 1) * config.epi_m,
                                                  j * config.epi_n:(j + 1) * config.epi_n]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(refs.out_smem.at[wg, slot], out_piece(i, j))

        @pl.when(group >= 0)
        def _compute():
            _compute_tile(config, k_steps, refs, cta_rows, cta_cols, row0, group, store, out_dtype, interpret)

        @pl.when((group < 0) & (wg < 2))
        def _store_zeros():
            # one zeroed piece, TMA-stored over every piece of this warpgroup's half of the tile
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            refs.out_smem[wg, 0] = _zeros((config.epi_m, config.epi_n), out_dtype, interpret)
            plgpu.commit_smem()
            for i in range(epi_rows):
                for j in range(epi_cols):
                    plgpu.copy_smem_to_gmem(refs.out_smem.at[wg, 0], out_piece(i, j))

    out_smem = plgpu.SMEM((2, slots, config.epi_m, config.epi_n), out_dtype,
                          transforms=_swizzled(config.epi_n, out_dtype))
    body = _persistent_body(config, k_steps, out_smem, m_tiles * n_tiles, tile, interpret)
    return _launch(body, (tile_group, lhs, rhs, lhs_scale, rhs_scale), (m, n), out_dtype, m_tiles * n_tiles,
                   interpret)


# -- ragged layout --------------------------------------------------------------------------------------------


def _ragged_kernel(lhs, rhs, lhs_scale, rhs_scale, table, *, config: Config, out_dtype, interpret: bool):
    """Ragged layout: ``table`` = `ragged_tiles` (group_sizes, cta_m, M), M >= cta_m -> out [M, N]."""
    m, k = lhs.shape
    groups = rhs.shape[0]
    n = rhs.shape[2] if interpret else rhs.shape[1]
    work, n_tiles, k_steps = table.shape[0], n // config.cta_n, k // config.tile_k

    def tile(refs: _Refs, index) -> None:
        wg = refs.wg
        wi = lax.div(index, jnp.int32(n_tiles))
        ni = index - wi * n_tiles
        # the block's first row, clamped as in `ragged_tiles` (computed here: the lowering's layout inference failed
        # on a kernel that read the clamped row from the table, jax 0.10.2)
        part, base = refs.table[wi, 0], jnp.minimum(refs.table[wi, 1] * config.cta_m, m - config.cta_m)
        first, count = refs.table[wi, 2], refs.table[wi, 3]
        cta_cols = pl.ds(ni * config.cta_n, config.cta_n)
        wg_first = wg * config.tile_m  # this warpgroup's first row in the CTA block
        lo = jnp.clip(first - wg_first, 0, config.tile_m)  # its rows of the part: [lo, hi)
        hi = jnp.clip(first + count - wg_first, 0, config.tile_m)
        row0 = base + wg_first
        stage = refs.out_smem.at[wg]

        def store_rows() -> None:
            """TMA-store rows [lo, hi) of the staged tile: one store of each power of two in hi - lo."""
            rows, offset, piece = hi - lo, lo, 1 << (config.tile_m.bit_length() - 1)
            while piece >= 1:
                @pl.when(rows & piece != 0)
                def _(piece=piece, offset=offset):
                    plgpu.copy_smem_to_gmem(stage.at[pl.ds(offset, piece)],
                                            refs.out.at[pl.ds(row0 + offset, piece), cta_cols])

                offset = offset + (rows & piece)
                piece //= 2

        def store(out) -> None:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the stores of the last tile
            stage[...] = out
            plgpu.commit_smem()
            store_rows()

        @pl.when((part >= 0) & (part < groups))
        def _compute():
            _compute_tile(config, k_steps, refs, pl.ds(base, config.cta_m), cta_cols, row0, part, store, out_dtype,
                          interpret)

        @pl.when((part == groups) & (wg < 2))
        def _store_zeros():  # the tail: rows of no group
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            stage[...] = _zeros((config.tile_m, config.tile_n), out_dtype, interpret)
            plgpu.commit_smem()
            store_rows()

    body = _persistent_body(config, k_steps, plgpu.SMEM((2, config.tile_m, config.tile_n), out_dtype), work * n_tiles,
                            tile, interpret)
    return _launch(body, (table, lhs, rhs, lhs_scale, rhs_scale), (m, n), out_dtype, work * n_tiles, interpret)


# -- entry point ----------------------------------------------------------------------------------------------


def grouped_int8_matmul(lhs: jax.Array, rhs: jax.Array, lhs_scale: jax.Array, rhs_scale: jax.Array,
                        group_sizes: jax.Array, *, out_dtype, group_stride: int = 0,
                        interpret: bool = False) -> jax.Array:
    """out [M, N] in out_dtype: out[r] = f32(lhs[r] . rhs[g(r)]^T) * (lhs_scale[r] * rhs_scale[g(r)]) -> out_dtype.
    lhs [M, K] int8; rhs [G, N, K] int8 (K-major, as the layer's transposed codes); lhs_scale [M] float32;
    rhs_scale [G] float32; group_sizes [G] int32.
    group_stride 0: groups contiguous from row 0 (ragged layout: group g's rows start at sum(group_sizes[:g]));
      rows past sum(group_sizes) come out ZERO.
    group_stride C > 0: padded layout, group g owns rows g*C .. g*C + C; its first group_sizes[g] rows are real,
      the rest are padding rows (their lhs rows are zero) and must come out ZERO; M == G*C.

    Padding rows in a CTA tile (128 rows) that also holds real rows are computed: they are zero only because their
    lhs rows are. Raises ValueError for the shapes `mosaic_unsupported_reason` names, TypeError for other dtypes.
    """
    out_dtype = jnp.dtype(out_dtype)
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[2] != lhs.shape[1]:
        raise ValueError(f"grouped int8 GEMM of lhs {lhs.shape} and rhs {rhs.shape}: expected [M, K] and [G, N, K]")
    if lhs.dtype != jnp.int8 or rhs.dtype != jnp.int8:
        raise TypeError(f"operands must be int8, got {lhs.dtype} and {rhs.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype {out_dtype}: expected one of bfloat16, float16, float32")
    m, k = lhs.shape
    groups, n, _ = rhs.shape
    if lhs_scale.shape != (m,) or rhs_scale.shape != (groups,) or group_sizes.shape != (groups,):
        raise ValueError(f"lhs_scale {lhs_scale.shape}, rhs_scale {rhs_scale.shape}, group_sizes "
                         f"{group_sizes.shape}: expected ({m},), ({groups},), ({groups},)")
    reason = mosaic_unsupported_reason(m, n, k, groups, group_stride, out_dtype)
    if reason:
        raise ValueError(f"Mosaic GPU grouped int8 GEMM of lhs {lhs.shape} and rhs {rhs.shape}: {reason}")
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    lhs_scale, rhs_scale = lhs_scale.astype(jnp.float32), rhs_scale.astype(jnp.float32)
    group_sizes = group_sizes.astype(jnp.int32)
    config = kernel_config(n, k, out_dtype, ragged=not group_stride)
    # The interpreter's wgmma takes no transpose_ref: feed it rhs [G, K, N] (a copy, interpreter only).
    rhs_fed = jnp.swapaxes(rhs, 1, 2) if interpret else rhs
    options = dict(config=config, out_dtype=out_dtype, interpret=interpret)
    if group_stride:
        tile_group = aligned_tile_groups(group_sizes, group_stride, config.cta_m)
        return _aligned_kernel(lhs, rhs_fed, lhs_scale, rhs_scale, tile_group, **options)
    # A CTA block loads cta_m rows: fewer rows in all are padded with zero rows (small shapes only); more are
    # covered by blocks that start at most at M - cta_m (`ragged_tiles`), which must be a multiple of the tiling's
    # rows: an M that is not is padded to one (a copy of lhs; the layer's row counts are multiples of 8).
    rows = max(-(-m // TILING_ROWS) * TILING_ROWS, config.cta_m)
    if rows > m:
        lhs = jnp.pad(lhs, ((0, rows - m), (0, 0)))
        lhs_scale = jnp.pad(lhs_scale, (0, rows - m))
    table = ragged_tiles(group_sizes, config.cta_m, rows)
    out = _ragged_kernel(lhs, rhs_fed, lhs_scale, rhs_scale, table, **options)
    return out[:m] if rows > m else out
