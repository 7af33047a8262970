"""Grouped GEMM over token rows sorted by expert, in Triton: int8 x int8 -> int32, scales in the epilogue.

    c[r, :] = (sum_k a[r, k] * b[e(r), k, :]) * a_scale[r] * b_scale[e(r)]

for every row r of group e (rows ``group_starts[e] .. group_starts[e+1]`` of a and c). a's rows come in expert
order: the layer writes each token's codes to its sorted rows as it quantizes them (`quant.quantize_rows` with
``dest``), so no product gathers rows. (A gather fused into this kernel's A loads was measured against a copy
followed by `gluon_gemm` on the H200 and lost, 27.57 against 26.49 ms per top-8 step, 2026-12-02; then the
quantizer's scatter made both unnecessary, and the gather was removed.)

No padding to a fixed capacity: the grid has one program per (M-tile of some group, N-tile), sized by
the upper bound ``cdiv(rows, BLOCK_M) + experts`` so that no host synchronisation is needed; every
program finds its expert from the group offsets (a cumulative sum of per-expert tile counts), and the
spare programs of the bound, like a group with zero rows, own no tile and do nothing (the nanochat
devlog's FP8 failure was ``amax`` over such an empty expert: here an empty group is just zero tiles).

The persistent variant (``PERSISTENT``) launches about one program per multiprocessor instead, each
looping over the (M-tile, N-tile) work items with a stride of the program count, in one flattened loop
(Triton's persistent matmul tutorial): the software pipeline then runs across tiles, so one tile's
epilogue overlaps the next tile's first loads, which the one-tile programs leave to the hardware's block
scheduler (the int8 GEMM at ~1140 of cuBLAS's ~1470 TOP/s on the H200, issue 10). The loop counts the real
tiles from the group offsets on the device, so the spare work items of the bound are never visited. The
autotuner chooses between the two (`_GPU_CONFIGS`); ``grouped_gemm(persistent=...)`` forces one.
Measured on the H200 (2026-12-01, Triton 3.6, 64 experts, K 2048): no gain. Top-8 up (262,144 rows, N 4096)
3.92 ms one-tile against 4.01 persistent; down 2.00 / 2.14; top-2 up 1.09 / 1.07, down 0.52 / 0.52. Triton 3.6's Hopper
pipeliner issues a wgmma asynchronously only with a float32 accumulator (the sm_90 PTX has a full wgmma wait after
each int8 dot), but that wait is not what bounds this kernel: a Gluon probe of the same grouped int8 GEMM with the
wgmma left in flight (``warpgroup_mma(is_async=True)``, one outstanding) ran at 810-1050 TOP/s against this kernel's
~1110 (2026-12-01, results/h200/NEXT_RUN.md), where cuBLAS reaches ~1450 on such shapes. Warp specialization
does help: `gluon_gemm` (a loading warp feeding two consumer warpgroups). Kept for the autotuner and for later Triton.

On Hopper (sm_90) the int8 products whose b the TMA reads whole (codes stored [E, N, K]) go to `gluon_gemm`'s
warp-specialized kernel instead (1150-1260 against this kernel's 1040-1090 TOP/s alone at the logbook's top-8
shapes), unless $QMOE_TRITON_INT8_GEMM says otherwise (`int8_kernel`).

The same kernel with ``INT8=False`` is a float grouped GEMM (float32 accumulation, no TF32), used
where a float path must not depend on ``torch._grouped_mm``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..common import (
    cuda_major,
    device_index,
    expert_tiles,
    is_interpreted_kernel,
    multiprocessors,
    next_power_of_2,
    record_launch,
    tile_rows,
)
from . import gluon_gemm


@triton.jit
def _tile_row_offsets(row_begin, row_end, BLOCK_M: tl.constexpr):
    """The tile's rows of a, a_scale and c, 64-bit (row x stride passes 2^31 at the largest presets), and which
    of them are in its group."""
    rows = row_begin + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < row_end


@triton.jit
def _tile_cols(pid_n, n_cols, BLOCK_N: tl.constexpr):
    """N-tile ``pid_n``'s columns of b and c, and which of them exist."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, cols < n_cols


@triton.jit
def _tile_dot(a_ptr, b_ptr, rows, row_ok, row_begin, expert, pid_n, cols, col_ok, k_dim, k_steps,
              stride_am, stride_ak, stride_be, stride_bk, stride_bn,
              INT8: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile's sum over ``k_steps`` K-blocks: int32 (``INT8``) or float32."""
    ks = tl.arange(0, BLOCK_K)
    # Tensor-memory-accelerator loads (``*_DESC``: a_ptr / b_ptr are tensor descriptors, out-of-bounds
    # zero-filled): B's [BLOCK_N, BLOCK_K] tile of expert e from its K-major [E, N, K] codes; A's rows
    # row_begin .. + BLOCK_M, which past row_end are another group's (their sums are never stored).
    if not A_DESC:
        a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    if not B_DESC:
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, k_steps):
        if A_DESC:
            a = a_ptr.load([row_begin, step * BLOCK_K])
        elif EVEN_K:
            # No mask along K: the loads stay 16-byte vectors, which the pipeliner needs to turn them
            # into asynchronous copies (an int8 load masked per element is one byte wide).
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks < k_dim - step * BLOCK_K)[None, :], other=0)
        if B_DESC:
            b = b_ptr.load([expert, pid_n * BLOCK_N, step * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        elif EVEN_K:
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0)
        else:
            b = tl.load(b_ptrs, mask=(ks < k_dim - step * BLOCK_K)[:, None] & col_ok[None, :], other=0)
        if INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        if not A_DESC:
            a_ptrs += BLOCK_K * stride_ak
        if not B_DESC:
            b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _tile_store(c_ptr, acc, a_scale_ptr, b_scale_ptr, rows, row_ok, expert, cols, col_ok,
                stride_cm, stride_cn, INT8: tl.constexpr):
    """The epilogue: the tile's rows of its group into c, dequantized for ``INT8``."""
    if INT8:
        # Dequantize at the output: the int32 sum times the token's scale times the expert's scale.
        a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)
        b_scale = tl.load(b_scale_ptr + expert.to(tl.int64))
        out = acc.to(tl.float32) * a_scale[:, None] * b_scale
    else:
        out = acc
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, group_starts_ptr,
                         n_cols, k_dim, n_experts, rows_per_expert,
                         stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                         INT8: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr,
                         E_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, PERSISTENT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    if PERSISTENT:
        starts, ends, tiles, tile_end = expert_tiles(group_starts_ptr, n_experts, E_BLOCK, BLOCK_M)
        # N-tiles vary fastest in the work order too: the ~NUM_SMS items in flight are a few consecutive
        # M-tiles of one expert, whose B stays in L2. Only real tiles are work items (the bound's spare
        # tiles and the empty groups' none), so every item runs all K steps: the inner loop's trip count
        # must not depend on the item for the compiler to flatten the two loops into one pipeline.
        n_tiles = tl.cdiv(n_cols, BLOCK_N)
        work_items = tl.sum(tiles, axis=0) * n_tiles
        k_steps = tl.cdiv(k_dim, BLOCK_K)
        programs = tl.num_programs(0)
        # The epilogue recomputes its tile from its own counter instead of reusing the prologue's values
        # (the tutorial's tile_id_c): in the flattened, pipelined loop the next tile's prologue runs before
        # this tile's epilogue, and the tutorial keeps the two free of shared values (its workaround for a
        # pipeliner bug); the recomputation is a few scalar ops on the expert table already in registers.
        stored = tl.program_id(0) - programs
        for item in tl.range(tl.program_id(0), work_items, programs, flatten=True):
            expert, row_begin, row_end = tile_rows(item // n_tiles, starts, ends, tiles, tile_end, n_experts,
                                                    E_BLOCK, BLOCK_M)
            rows, row_ok = _tile_row_offsets(row_begin, row_end, BLOCK_M)
            cols, col_ok = _tile_cols(item % n_tiles, n_cols, BLOCK_N)
            acc = _tile_dot(a_ptr, b_ptr, rows, row_ok, row_begin, expert, item % n_tiles, cols, col_ok, k_dim,
                            k_steps, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                            INT8, A_DESC, B_DESC, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
            stored += programs
            expert, row_begin, row_end = tile_rows(stored // n_tiles, starts, ends, tiles, tile_end, n_experts,
                                                    E_BLOCK, BLOCK_M)
            rows, row_ok = _tile_row_offsets(row_begin, row_end, BLOCK_M)
            cols, col_ok = _tile_cols(stored % n_tiles, n_cols, BLOCK_N)
            _tile_store(c_ptr, acc, a_scale_ptr, b_scale_ptr, rows, row_ok, expert, cols, col_ok,
                        stride_cm, stride_cn, INT8)
    else:
        # N-tiles vary fastest: the programs in flight share one A tile and sweep one expert's B, which
        # stays in L2 across that expert's M-tiles (A is read from memory once).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        starts, ends, tiles, tile_end = expert_tiles(group_starts_ptr, n_experts, E_BLOCK, BLOCK_M)
        expert, row_begin, row_end = tile_rows(pid_m, starts, ends, tiles, tile_end, n_experts, E_BLOCK, BLOCK_M)
        rows, row_ok = _tile_row_offsets(row_begin, row_end, BLOCK_M)
        cols, col_ok = _tile_cols(pid_n, n_cols, BLOCK_N)
        k_steps = tl.where(row_begin < row_end, tl.cdiv(k_dim, BLOCK_K), 0)
        acc = _tile_dot(a_ptr, b_ptr, rows, row_ok, row_begin, expert, pid_n, cols, col_ok, k_dim, k_steps,
                        stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                        INT8, A_DESC, B_DESC, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        _tile_store(c_ptr, acc, a_scale_ptr, b_scale_ptr, rows, row_ok, expert, cols, col_ok,
                    stride_cm, stride_cn, INT8)


#: True when the kernel runs in Triton's interpreter (fixed at this module's import).
INTERPRETED: bool = is_interpreted_kernel(_grouped_gemm_kernel)

#: Interpreter tiles: each program is a Python call, so few programs; 32 keeps tile-boundary
#: behaviour visible at the suite's sizes (T = 31, 33, 63, 65).
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})

#: Persistent programs in the interpreter: few, so that each loops over several work items (the CPU tests
#: then see one program store tiles of several experts and N-tiles).
_INTERPRETER_PROGRAMS = 4


def _tiles(block_m: int, block_n: int, block_k: int, warps: int, stages: int, persistent: bool) -> triton.Config:
    """One autotuner config: the tile, the warps, the pipeline depth, and which kernel (``PERSISTENT``)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PERSISTENT": persistent},
                         num_warps=warps, num_stages=stages)


#: Hopper tiles for the int8 tensor cores (wgmma wants K-major operands: callers pass B that way).
#: The deeper pipelines and K = 256 steps were added after the H200 profile (issue 10: the int8 GEMMs
#: at 58% of the int8 peak); an out-of-shared-memory config is skipped by the autotuner. The persistent
#: ones are the tiles that won on that profile, each with the pipeline run across its tiles.
_GPU_CONFIGS = [
    _tiles(128, 128, 128, 8, 3, False),
    _tiles(128, 256, 128, 8, 3, False),
    _tiles(128, 256, 128, 8, 4, False),
    _tiles(128, 128, 256, 8, 3, False),
    _tiles(256, 128, 128, 8, 3, False),
    _tiles(64, 128, 128, 4, 4, False),
    _tiles(128, 128, 64, 4, 4, False),
    _tiles(128, 256, 64, 8, 5, False),
    _tiles(256, 128, 64, 8, 5, False),
    _tiles(128, 128, 128, 8, 3, True),
    _tiles(128, 256, 128, 8, 3, True),
    _tiles(128, 256, 128, 8, 4, True),
    _tiles(128, 128, 64, 4, 4, True),
]
#: One persistent float config, so that ``persistent=True`` has a float kernel to run.
_FLOAT_GPU_CONFIGS = [
    _tiles(128, 128, 64, 8, 3, False),
    _tiles(64, 128, 32, 4, 4, False),
    _tiles(128, 128, 64, 8, 3, True),
]

#: One fixed config below this many multiply-adds: small problems (the correctness checks) then cost
#: one compile each instead of an autotuning sweep, and tiles of 64 waste less on tiny groups.
_AUTOTUNE_MIN_MACS = 2**30
_SMALL_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3)

#: The autotuned kernels by (int8, persistent choice): None tunes over both variants.
_autotuned: dict[tuple[bool, bool | None], Any] = {}


def _set_block_shapes(nargs: dict) -> None:
    """A launch's tiles into its tensor descriptors (a config's pre-hook: the tiles are the config's)."""
    if isinstance(nargs["a_ptr"], TensorDescriptor):
        nargs["a_ptr"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if isinstance(nargs["b_ptr"], TensorDescriptor):
        nargs["b_ptr"].block_shape = [1, nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _gpu_kernel(int8: bool, persistent: bool | None) -> Any:
    """The kernel wrapped in an autotuner over the configs of the ``persistent`` choice (all for None),
    built on first GPU use; the interpreter never tunes. A forced choice gets its own autotuner, so an A/B
    measurement of one variant never reads the other's cached pick."""
    if (int8, persistent) not in _autotuned:
        configs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_block_shapes)
                   for c in (_GPU_CONFIGS if int8 else _FLOAT_GPU_CONFIGS)
                   if persistent is None or c.kwargs["PERSISTENT"] == persistent]
        even_k = triton.heuristics({"EVEN_K": lambda args: args["k_dim"] % args["BLOCK_K"] == 0})
        # rows_per_expert (a power of two at or above the mean group size): the best tile differs between
        # top-2 and top-8 groups of the same matrices, which would otherwise share the first one's pick.
        key = ["n_cols", "k_dim", "stride_bk", "rows_per_expert", "A_DESC", "B_DESC"]
        _autotuned[int8, persistent] = triton.autotune(configs=configs, key=key)(even_k(_grouped_gemm_kernel))
    return _autotuned[int8, persistent]


def _tma_device(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device load through tensor descriptors: Hopper and later (the tensor memory
    accelerator), and the interpreter, which emulates them (so that CPU runs test that path)."""
    if INTERPRETED:
        return True
    return t.device.type == "cuda" and cuda_major(device_index(t)) >= 9


def _persistent_programs(t: torch.Tensor) -> int:
    """How many programs a persistent launch on ``t``'s device runs (at most; never more than work items)."""
    return _INTERPRETER_PROGRAMS if INTERPRETED else multiprocessors(device_index(t))


def _grid(n_rows: int, n_cols: int, experts: int, block_m: int, block_n: int, persistent: bool,
          programs: int) -> tuple[int, ...]:
    """(N-tiles, M-tiles of the bound) programs, or for the persistent variant ``programs`` of them in one
    dimension, fewer where the bound has fewer work items."""
    n_tiles = triton.cdiv(n_cols, block_n)
    m_tiles = triton.cdiv(n_rows, block_m) + experts
    return (min(programs, n_tiles * m_tiles),) if persistent else (n_tiles, m_tiles)


def _descriptor(t: torch.Tensor, shape: list[int], strides: list[int], block_rank: int) -> TensorDescriptor | None:
    """A descriptor of ``t``'s memory as ``shape`` / ``strides`` (innermost unit stride), or None where the
    accelerator cannot address it: a base or an outer stride not on 16 bytes. Its block shape is set per
    launch (`_set_block_shapes`); ``block_rank`` placeholders until then."""
    size = t.element_size()
    if strides[-1] != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in strides[:-1]):
        return None
    return TensorDescriptor(t, shape, strides, [1] * block_rank)


#: Environment choice of the int8 products' kernel (`int8_kernel`): ``auto`` (the default) or ``triton``.
INT8_KERNEL_ENV = "QMOE_TRITON_INT8_GEMM"
INT8_KERNELS: tuple[str, ...] = ("auto", "triton")


def int8_kernel() -> str:
    """$QMOE_TRITON_INT8_GEMM, read at each call: ``auto`` runs `gluon_gemm`'s kernel for every int8 product it can
    run (`gluon_gemm.ineligible`); ``triton`` runs this module's kernel for all (the A/B of the kernels)."""
    choice = os.environ.get(INT8_KERNEL_ENV) or "auto"
    if choice not in INT8_KERNELS:
        raise ValueError(f"${INT8_KERNEL_ENV}={choice!r} is not one of {', '.join(INT8_KERNELS)}")
    return choice


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, group_starts: torch.Tensor, *, out_dtype: torch.dtype,
                 a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                 zero_uncovered: bool = False, persistent: bool | None = None,
                 tiles: gluon_gemm.GemmTiles | None = None) -> torch.Tensor:
    """c [R, N] with rows of group e = a's rows of that group times b[e].

    a: [R, K] int8 (with ``a_scale`` [R] float32) or float; b: [E, K, N] of any strides (int8
    with ``b_scale`` [E], or float); group_starts: [E + 1] int32 row offsets of a and c, non-decreasing.
    Rows of c outside every group are left unwritten, or zero with ``zero_uncovered`` (capacity-dropped
    rows sorted after the last group).

    int8 operands in the layouts the tensor cores read (K-major b, a's rows contiguous)
    are loaded through tensor descriptors where the device has the accelerator (`_tma_device`).

    ``persistent``: None lets the autotuner pick the one-tile or the persistent kernel (the interpreter and
    small problems run the one-tile kernel); True or False runs only that variant, to measure one against
    the other (True in the interpreter or on a small problem: the persistent kernel with the fixed tiles). int8
    products with ``persistent`` None run `gluon_gemm`'s kernel where it can (`int8_kernel`), on ``tiles`` where
    given (the groups' tile table, made with the dispatch plan).
    """
    int8 = a.dtype == torch.int8
    if int8 != (b.dtype == torch.int8) or int8 != (a_scale is not None) or int8 != (b_scale is not None):
        raise ValueError("grouped_gemm: int8 operands need both scales; float operands take none")
    experts, k_dim, n_cols = b.shape
    n_rows = a.shape[0]
    if a.shape[-1] != k_dim:
        raise ValueError(f"grouped_gemm: a has {a.shape[-1]} columns, b contracts over {k_dim}")
    alloc = torch.zeros if zero_uncovered else torch.empty
    c = alloc((n_rows, n_cols), dtype=out_dtype, device=a.device)
    if n_rows == 0 or n_cols == 0:
        return c
    if k_dim == 0:
        return c.zero_()
    # counted whichever kernel runs it (the Gluon one adds its own name)
    record_launch("grouped_gemm_int8" if int8 else "grouped_gemm_float")
    kernel_choice = int8_kernel() if int8 else "triton"
    gluon = kernel_choice == "auto"
    if gluon and persistent is None and not INTERPRETED and gluon_gemm.ineligible(a, b, out_dtype) is None:
        gluon_gemm.grouped_int8_gemm(a, a_scale, b, b_scale, group_starts, c, tiles)
        return c
    a_desc = b_desc = None
    if int8 and _tma_device(a):
        a_desc = _descriptor(a, [a.shape[0], k_dim], [a.stride(0), a.stride(1)], 2)
        b_desc = _descriptor(b, [experts, n_cols, k_dim], [b.stride(0), b.stride(2), b.stride(1)], 3)
    dummy = c  # pointer arguments a constexpr branch never reads
    args = (a if a_desc is None else a_desc, a_scale if int8 else dummy, b if b_desc is None else b_desc,
            b_scale if int8 else dummy, c, group_starts, n_cols, k_dim, experts,
            next_power_of_2(triton.cdiv(n_rows, experts)), a.stride(0), a.stride(1), *b.stride(), c.stride(0),
            c.stride(1))
    flags = dict(INT8=int8, A_DESC=a_desc is not None, B_DESC=b_desc is not None,
                 E_BLOCK=max(2, next_power_of_2(experts)))
    for operand, desc in (("a", a_desc), ("b", b_desc)):
        if desc is not None:
            record_launch(f"grouped_gemm_{operand}_descriptor")
    if INTERPRETED or n_rows * n_cols * k_dim < _AUTOTUNE_MIN_MACS:
        config = _INTERPRETER_CONFIG if INTERPRETED else _SMALL_CONFIG
        tiles = config.kwargs
        ran_persistent = bool(persistent)
        _set_block_shapes({"a_ptr": args[0], "b_ptr": args[2], **tiles})
        programs = _persistent_programs(a) if ran_persistent else 0
        grid = _grid(n_rows, n_cols, experts, tiles["BLOCK_M"], tiles["BLOCK_N"], ran_persistent, programs)
        _grouped_gemm_kernel[grid](*args, **flags, **tiles, EVEN_K=k_dim % tiles["BLOCK_K"] == 0,
                                   PERSISTENT=ran_persistent, num_warps=config.num_warps,
                                   num_stages=config.num_stages)
    else:
        programs = _persistent_programs(a)

        def tuned_grid(meta: dict) -> tuple[int, ...]:
            return _grid(n_rows, n_cols, experts, meta["BLOCK_M"], meta["BLOCK_N"], meta["PERSISTENT"], programs)

        kernel = _gpu_kernel(int8, persistent)
        kernel[tuned_grid](*args, **flags)
        ran_persistent = bool(kernel.best_config.kwargs["PERSISTENT"])
    if ran_persistent:
        record_launch("grouped_gemm_persistent")
    return c
