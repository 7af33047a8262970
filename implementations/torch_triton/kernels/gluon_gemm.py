"""The grouped int8 GEMM of `grouped_gemm` for Hopper (sm_90), warp-specialized, in Gluon (Triton's tile-level
language with explicit layouts, shared memory, mbarriers and wgmma).

    c[r, :] = (sum_k a[r, k] * b[e(r), :, k]) * a_scale[r] * b_scale[e(r)]      (rows r of group e)

Why a second kernel: Triton's pipeliner runs every int8 wgmma synchronously and interleaves the loads, the products
and the epilogue in one instruction stream; `grouped_gemm`'s kernel stays near 1100 int8 TOP/s on the H200 where
cuBLAS reaches ~1450 (issue 10). Here one loading warp keeps a ring of ``STAGES`` shared-memory slots full with the
tensor memory accelerator (TMA), and the kernel's other warps (two warpgroups, one 128 x 256 tile between them)
only issue wgmma, with one product in flight while they wait for the next slot. Each slot has two mbarriers:
``ready`` (the TMA bytes landed) and ``empty`` (the product that read it has retired). Persistent: one program per
multiprocessor, the loader running ahead into the program's next tile while the consumers run the epilogue.

The epilogue scales the int32 sums. A tile whose 128 rows all lie in its group (16-bit output) is written to a
64 KiB shared-memory tile and handed to the TMA, whose store runs on under the next tile's products (the tile is
waited for only before the buffer is rewritten); a group's last, partial tile, and any float32 output, is stored
synchronously from registers (16-byte pieces, masked), because the TMA would write the next group's rows. That
synchronous store of every tile (about 2 us of a ~9 us tile during which no product is issued) is what
$QMOE_GLUON_EPILOGUE=store (`epilogue`) still asks for. On the H200 (2026-12-02, `results/h200/issue10_2026-12-02c/`)
the TMA store took the int8_routed_prequant forward+backward step from 25.58 to 25.46 ms at top-8 and from 7.67 to
7.59 ms at top-2, and int8_routed's from 32.54 to 31.05 ms, bit for bit the same output
(`test_gluon_int8_gemm_equals_the_triton_kernel`).

Measured alone on the H200 (2026-12-01, Triton 3.6, 64 experts x 4096 rows; `results/h200/NEXT_RUN.md`): 1157,
1152 and 1264 TOP/s at the logbook top-8 forward up (N 4096, K 2048), down (N 2048, K 2048) and input-gradient
(N 2048, K 4096) shapes, against 1090, 1040 and 1081 for `grouped_gemm`'s Triton kernel in the same run; equal
sums, bit for bit. Two consumer warpgroups taking tiles in turn (CUTLASS's ping-pong) failed to launch there.

Only for operands the TMA can read whole: a's rows contiguous (no gathered rows: Hopper's TMA cannot gather) and
b's codes stored [E, N, K] contiguous (`eligible`). Gluon is experimental and its names move between Triton
releases; the few that moved are resolved once below (`_tma_load`, `_tma_store`), and the kernel is compiled for
sm_90a, with either epilogue, in the CPU test suite against the Triton installed there. It cannot run in Triton's
interpreter.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..common import cuda_major, device_index, expert_tiles, multiprocessors, next_power_of_2, record_launch, tile_rows

#: The oldest Triton whose Gluon API this module is written against (3.5's ``warp_specialize`` took its partitions'
#: arguments apart; checked here: 3.6 on the H200, 3.9 compiled for sm_90a in the CPU tests).
MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a Triton version string ("3.6.0", "3.7.0+git...")."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


try:
    if _release(triton.__version__) < MIN_TRITON:
        raise ImportError(f"Gluon's API changed before {'.'.join(map(str, MIN_TRITON))}")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
except ImportError as _error:  # a Triton without Gluon's Hopper API: `grouped_gemm` keeps its own kernel
    GLUON_MISSING: str | None = f"triton {triton.__version__} has no Gluon Hopper API ({_error})"
else:
    GLUON_MISSING = None
    # Triton 3.7 renamed the TMA copies; the old names raise there
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

#: The tile (M, N, K), the ring's slots and the consumers' warps: the best of 13 configurations on the H200
#: (`results/h200/NEXT_RUN.md`); three slots of 48 KiB, the layout conversion's scratch and the TMA-store epilogue's
#: 64 KiB tile (16-bit outputs only: a float32 one would take 128 KiB) fit Hopper's 227 KiB.
BLOCK_M, BLOCK_N, BLOCK_K, STAGES, WARPS = 128, 256, 128, 3, 8
#: Registers of the loading warp (it holds a few addresses and counters; the consumers get the rest).
LOADER_REGISTERS = 40

EPILOGUE_ENV = "QMOE_GLUON_EPILOGUE"
EPILOGUES: tuple[str, ...] = ("tma", "store")


def epilogue() -> str:
    """$QMOE_GLUON_EPILOGUE, read at each call: ``tma`` (the default) writes a 16-bit output's full tiles through
    shared memory and an asynchronous TMA store (the module's docstring); ``store`` writes every tile's rows from
    registers, masked, synchronously. ``tma`` is a preference, not a demand: `grouped_int8_gemm` stores from
    registers where the TMA cannot write c (`tma_storable`)."""
    choice = os.environ.get(EPILOGUE_ENV) or "tma"
    if choice not in EPILOGUES:
        raise ValueError(f"${EPILOGUE_ENV}={choice!r} is not one of {', '.join(EPILOGUES)}")
    return choice


def tma_storable(c: torch.Tensor) -> bool:
    """Whether the TMA-store epilogue can write ``c`` [R, N]: 16-bit elements (a float32 tile of shared memory would
    not fit beside the ring) and rows the TMA can address (contiguous, 16-byte aligned)."""
    return (c.dtype in (torch.bfloat16, torch.float16) and c.stride(1) == 1
            and (c.stride(0) * c.element_size()) % 16 == 0 and c.data_ptr() % 16 == 0)


@triton.jit
def _tile_table_kernel(group_starts_ptr, table_ptr, count_ptr, n_experts, E_BLOCK: tl.constexpr,
                       TILE_M: tl.constexpr):
    """One program per M-tile of the bound ``cdiv(rows, TILE_M) + experts``: its (expert, first row, end row) as
    `grouped_gemm`'s kernel finds them, the real tiles first in expert order (a spare tile has no rows); program 0
    writes how many are real to ``count_ptr``. An empty group owns no tile."""
    m = tl.program_id(0)
    starts, ends, tiles, tile_end = expert_tiles(group_starts_ptr, n_experts, E_BLOCK, TILE_M)
    expert, row_begin, row_end = tile_rows(m, starts, ends, tiles, tile_end, n_experts, E_BLOCK, TILE_M)
    tl.store(table_ptr + 3 * m, expert)
    tl.store(table_ptr + 3 * m + 1, row_begin)
    tl.store(table_ptr + 3 * m + 2, row_end)
    if m == 0:
        tl.store(count_ptr, tl.sum(tiles, axis=0))


class GemmTiles(NamedTuple):
    """A tile table made before the GEMM (`dispatch.plan_from_counts`, with the dispatch plan), so that the GEMM's
    call launches no `_tile_table_kernel`: for ``tile_m``-row tiles of ``rows`` rows, the table and count
    `tile_table` returns."""

    tile_m: int
    rows: int
    table: torch.Tensor
    count: torch.Tensor


def tile_table(group_starts: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([3 x bound] int32 (expert, first row, end row) per M-tile, [1] int32 real tile count) of ``rows`` rows in the
    groups ``group_starts`` [E + 1] cuts them into (`_tile_table_kernel`), made on their device."""
    experts = group_starts.shape[0] - 1
    bound = triton.cdiv(rows, BLOCK_M) + experts
    table = torch.empty(3 * bound, dtype=torch.int32, device=group_starts.device)
    count = torch.empty(1, dtype=torch.int32, device=group_starts.device)
    record_launch("gluon_tile_table")
    _tile_table_kernel[(bound,)](group_starts, table, count, experts, E_BLOCK=max(2, next_power_of_2(experts)),
                                 TILE_M=BLOCK_M)
    return table, count


if GLUON_MISSING is None:

    @gluon.jit
    def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, table_ptr, count_ptr, n_cols, k_dim,
                RING: gl.constexpr):
        """The loading warp: for each of the program's tiles, its K steps' A and B blocks into the ring."""
        TK: gl.constexpr = a_desc.block_type.shape[1]
        TN: gl.constexpr = b_desc.block_type.shape[0]
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        n_tiles = gl.cdiv(n_cols, TN)
        items = gl.load(count_ptr) * n_tiles
        k_steps = gl.cdiv(k_dim, TK)
        step = 0
        for item in range(gl.program_id(0), items, gl.num_programs(0)):
            m = item // n_tiles
            row_begin = gl.load(table_ptr + 3 * m + 1)
            b_row = gl.load(table_ptr + 3 * m) * n_cols + (item % n_tiles) * TN
            for kk in range(k_steps):
                s = step % RING
                # a fresh mbarrier counts as having completed the phase before its first, so the first pass over
                # the ring does not wait
                mbarrier.wait(empty.index(s), ((step // RING) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [row_begin, kk * TK], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [b_row, kk * TK], ready.index(s), b_bufs.index(s))
                step += 1

    @gluon.jit
    def _store_rows(c_ptr, out, row_begin, row_end, col, n_cols, stride_cm):
        """The synchronous epilogue's store: ``out``'s rows ``row_begin .. row_end`` (the rest of the tile is the next
        group's) and columns below ``n_cols`` into c at (row_begin, col), in 16-byte pieces."""
        TM: gl.constexpr = out.type.shape[0]
        TN: gl.constexpr = out.type.shape[1]
        # the wgmma layout stores 4 bytes a thread; this one 16 (8 threads to a 128-byte row segment)
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        out = gl.convert_layout(out.to(c_ptr.dtype.element_ty), store_layout)
        rows = row_begin + gl.arange(0, TM, layout=gl.SliceLayout(1, store_layout))
        cols = col + gl.arange(0, TN, layout=gl.SliceLayout(0, store_layout))
        ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64), 1) * stride_cm + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(rows < row_end, 1) & gl.expand_dims(cols < n_cols, 0))

    @gluon.jit
    def _tma_store_tile(c_desc, c_smem, out, row, col):
        """The asynchronous epilogue's store of a full tile: ``out`` into ``c_smem``, then a TMA store of it to c at
        (row, col), left in flight (the TMA drops the columns past c's last itself)."""
        # the previous tile's store may still be reading the buffer (a wait of the threads that issued it: the
        # compiler's barrier after it holds the partition's other warps)
        tma.store_wait(0)
        # straight from the wgmma layout (stmatrix): no conversion through scratch memory
        c_smem.store(out.to(c_desc.dtype))
        # each thread's writes (generic proxy) ordered before the TMA's reads (async proxy); the compiler's barrier
        # before the store then makes every warp's land first
        fence_async_shared()
        _tma_store(c_desc, [row, col], c_smem)

    @gluon.jit
    def _consumer(c_ptr, c_desc, c_smem, a_scale_ptr, b_scale_ptr, a_bufs, b_bufs, ready, empty, table_ptr, count_ptr,
                  n_cols, k_dim, stride_cm, RING: gl.constexpr, TMA_STORE: gl.constexpr):
        """The default partition's warps: each tile's wgmma chain, one product in flight, then the epilogue (the
        scales, the group's rows stored in 16-byte pieces; with ``TMA_STORE`` a full tile through ``c_smem`` and the
        TMA instead, `_tma_store_tile`)."""
        TM: gl.constexpr = a_bufs.type.shape[1]
        TK: gl.constexpr = a_bufs.type.shape[2]
        TN: gl.constexpr = b_bufs.type.shape[1]
        warps: gl.constexpr = gl.num_warps()
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                                             instr_shape=[16, 128, 32])
        n_tiles = gl.cdiv(n_cols, TN)
        items = gl.load(count_ptr) * n_tiles
        k_steps = gl.cdiv(k_dim, TK)
        step = 0
        for item in range(gl.program_id(0), items, gl.num_programs(0)):
            acc = gl.zeros((TM, TN), dtype=gl.int32, layout=mma_layout)
            for kk in range(k_steps):
                s = step % RING
                mbarrier.wait(ready.index(s), (step // RING) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_bufs.index(s), b_bufs.index(s)))
                # the product issued one step ago has retired: its slot goes back to the loader
                mbarrier.arrive(empty.index((step + RING - 1) % RING), pred=kk > 0)
                step += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((step + RING - 1) % RING))
            m = item // n_tiles
            expert = gl.load(table_ptr + 3 * m)
            row_begin = gl.load(table_ptr + 3 * m + 1)
            row_end = gl.load(table_ptr + 3 * m + 2)
            col = (item % n_tiles) * TN
            rows = row_begin + gl.arange(0, TM, layout=gl.SliceLayout(1, mma_layout))
            a_s = gl.load(a_scale_ptr + rows, mask=rows < row_end, other=0.0)
            out = acc.to(gl.float32) * gl.expand_dims(a_s, 1) * gl.load(b_scale_ptr + expert)
            if TMA_STORE:
                # the same value in every thread: the partition's warps all take one branch
                if row_end - row_begin >= TM:
                    _tma_store_tile(c_desc, c_smem, out, row_begin, col)
                else:  # a group's last tile: its rows past row_end are the next group's
                    _store_rows(c_ptr, out, row_begin, row_end, col, n_cols, stride_cm)
            else:
                _store_rows(c_ptr, out, row_begin, row_end, col, n_cols, stride_cm)
        if TMA_STORE:
            # the last store must have read c_smem before the program ends and frees it
            tma.store_wait(0)

    @gluon.jit
    def _grouped_int8_kernel(a_desc, b_desc, c_ptr, c_desc, a_scale_ptr, b_scale_ptr, table_ptr, count_ptr, n_cols,
                             k_dim, stride_cm, RING: gl.constexpr, LOADER_REGS: gl.constexpr,
                             TMA_STORE: gl.constexpr):
        """The ring and its barriers (and with ``TMA_STORE`` the epilogue's tile, through ``c_desc``; None
        otherwise), then the consumers (`_consumer`) and the loading warp (`_loader`) on them."""
        TM: gl.constexpr = a_desc.block_type.shape[0]
        TK: gl.constexpr = a_desc.block_type.shape[1]
        TN: gl.constexpr = b_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [RING, TM, TK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [RING, TN, TK], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        if TMA_STORE:
            # one [TM, TN] tile in c's dtype and the TMA's swizzle (c_desc's layout), reused by every tile
            c_smem = gl.allocate_shared_memory(c_desc.dtype, [TM, TN], c_desc.layout)
        else:  # the stores go from registers: placeholders, as a partition's arguments cannot be None
            c_desc = gl.constexpr(0)
            c_smem = gl.constexpr(0)
        for i in gl.static_range(RING):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (c_ptr, c_desc, c_smem, a_scale_ptr, b_scale_ptr, a_bufs, b_bufs, ready, empty, table_ptr,
                         count_ptr, n_cols, k_dim, stride_cm, RING, TMA_STORE)),
            (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, table_ptr, count_ptr, n_cols, k_dim, RING)),
        ], [1], [LOADER_REGS])


def ineligible(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why this kernel cannot compute ``a`` [R, K] int8 (rows contiguous) times ``b`` [E, K, N] int8 here, or None
    where it can: a Hopper GPU (sm_90: wgmma), Gluon's Hopper API, b's codes stored [E, N, K] contiguous (its
    K-major layout, read as one [E x N, K] matrix), 16-byte-aligned rows for the TMA, a 16- or 32-bit float out."""
    if GLUON_MISSING is not None:
        return GLUON_MISSING
    if a.device.type != "cuda":
        return f"runs on CUDA devices, not {a.device.type}"
    major = cuda_major(device_index(a))
    if major != 9:
        return f"runs on Hopper (sm_90) only: wgmma; this GPU is sm_{major}x"
    experts, k_dim, n_cols = b.shape
    if a.stride(1) != 1 or a.stride(0) % 16 or a.data_ptr() % 16:
        return "a's rows must be contiguous and 16-byte aligned"
    if b.stride() != (n_cols * k_dim, 1, k_dim) or b.data_ptr() % 16 or k_dim % 16:
        return "b's codes must be stored [E, N, K] contiguous, K a multiple of 16"
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"stores bfloat16, float16 or float32, not {out_dtype}"
    return None


@functools.cache
def _shared_layouts() -> tuple:
    """The swizzled shared-memory layouts of the A and B blocks, made once (they cost host time at every launch, and
    the step's first GEMM waits on the host)."""
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8))


def descriptors(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """TMA descriptors of ``a`` [R, K] and of ``b`` [E, K, N]'s codes as the [E x N, K] matrix they are stored as."""
    experts, k_dim, n_cols = b.shape
    a_layout, b_layout = _shared_layouts()
    b_rows = b.transpose(1, 2).reshape(experts * n_cols, k_dim)  # a view: `ineligible` checked the strides
    return (GluonDescriptor(a, list(a.shape), list(a.stride()), [BLOCK_M, BLOCK_K], a_layout),
            GluonDescriptor(b_rows, list(b_rows.shape), list(b_rows.stride()), [BLOCK_N, BLOCK_K], b_layout))


@functools.cache
def _output_layout(dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled shared-memory layout of the TMA-store epilogue's [BLOCK_M, BLOCK_N] tile of ``dtype`` (16-bit),
    made once (`_shared_layouts`)."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], {torch.bfloat16: gl.bfloat16,
                                                                     torch.float16: gl.float16}[dtype])


def output_descriptor(c: torch.Tensor) -> GluonDescriptor:
    """TMA descriptor of ``c`` [R, N] in the TMA-store epilogue's tiles (`tma_storable` checked)."""
    return GluonDescriptor(c, list(c.shape), list(c.stride()), [BLOCK_M, BLOCK_N], _output_layout(c.dtype))


def grouped_int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      group_starts: torch.Tensor, c: torch.Tensor, tiles: GemmTiles | None = None) -> None:
    """Write each group's rows of ``c`` [R, N]: a's rows of group e times b[e] ([E, K, N], codes stored [E, N, K]),
    dequantized by ``a_scale`` [R] and ``b_scale`` [E]. Rows outside every group are left as they are. The caller
    checked `ineligible`. $QMOE_GLUON_EPILOGUE (`epilogue`) picks the epilogue; ``tma`` on a c the TMA cannot write
    (`tma_storable`: float32, misaligned rows) stores from registers. ``tiles``: the groups' tile table, made
    beforehand; made here where None or made for other tiles or rows."""
    experts, k_dim, n_cols = b.shape
    tma_store = epilogue() == "tma" and tma_storable(c)
    if tiles is not None and (tiles.tile_m, tiles.rows) == (BLOCK_M, a.shape[0]):
        table, count = tiles.table, tiles.count
    else:
        table, count = tile_table(group_starts, a.shape[0])
    a_desc, b_desc = descriptors(a, b)
    c_desc = output_descriptor(c) if tma_store else None
    programs = multiprocessors(device_index(a))
    record_launch("grouped_gemm_int8_gluon")
    if tma_store:
        record_launch("grouped_gemm_int8_gluon_tma_store")
    _grouped_int8_kernel[(programs,)](a_desc, b_desc, c, c_desc, a_scale, b_scale, table, count, n_cols, k_dim,
                                      c.stride(0), RING=STAGES, LOADER_REGS=LOADER_REGISTERS, TMA_STORE=tma_store,
                                      num_warps=WARPS)
