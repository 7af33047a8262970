"""Shared pieces of the torch_triton kernels: the launch record, the run mode, round-half-even.

Imported only when the torch_triton backend runs (it imports triton). Whether kernels run compiled
or in Triton's interpreter is fixed when a kernel module is imported: ``triton.jit`` reads
``TRITON_INTERPRET`` at decoration time, so the suite sets it in ``pytest_configure`` on CPU.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
import triton
import triton.language as tl

#: Kernel launches by kernel name, counted by every wrapper right before it launches. The
#: backend-specific tests read it to prove that a Triton kernel (not a torch fallback) ran.
LAUNCHES: Counter[str] = Counter()

#: Uses of a non-Triton, non-grouped fallback by name (a per-group loop where torch refused
#: `torch._grouped_mm` for a device and dtype). Empty in a healthy run.
FALLBACKS: Counter[str] = Counter()

INT8_MAX = 127

#: Below this many elements the memory-bound kernels (SwiGLU, combine, per-expert quantization) launch with their
#: fixed shape, not an autotuned one: the correctness checks' small problems then cost one compile each,
#: not a tuning sweep. Read at each launch (a test lowers it to compare the two).
TUNE_MIN_ELEMENTS = 2**22


def is_interpreted_kernel(kernel: object) -> bool:
    """True when ``kernel`` (a ``triton.jit`` result) was built for the interpreter, whatever the
    environment says now: the mode is fixed when the kernel's module is imported."""
    return type(kernel).__name__ == "InterpretedFunction"


def record_launch(kernel: str) -> None:
    LAUNCHES[kernel] += 1


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def round_half_even(v):
    """rint(v) with ties to even, exact for |v| < 2^23 (float32): floor, then bump where the
    fraction is above one half or is exactly one half on an odd integer (NumPy's rint, the
    reference's rule; `tl.math.rint` is not available in the interpreter on every version)."""
    low = tl.floor(v)
    fraction = v - low
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (fraction > 0.5) | ((fraction == 0.5) & low_is_odd)
    return tl.where(up, low + 1.0, low)


# -- grouped GEMMs: expert tiles and the device they run on ---------------------------------------------

@triton.jit
def expert_tiles(group_starts_ptr, n_experts, E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each expert's first row, end row, M-tile count (an empty group owns none) and cumulative tile end.
    They do not depend on the tile, so a persistent program reads them once for all its tiles."""
    ids = tl.arange(0, E_BLOCK)
    in_range = ids < n_experts
    starts = tl.load(group_starts_ptr + ids, mask=in_range, other=0)
    ends = tl.load(group_starts_ptr + ids + 1, mask=in_range, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    return starts, ends, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def tile_rows(pid_m, starts, ends, tiles, tile_end, n_experts, E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """The expert owning M-tile ``pid_m`` (clamped to a valid index) and the tile's rows ``row_begin ..
    row_end`` of c: none for a tile past every group's (the bound's spare tiles)."""
    ids = tl.arange(0, E_BLOCK)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    mine = ids == expert  # no id matches for a spare tile (expert == n_experts): no rows below
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), axis=0)
    row_begin = tl.sum(tl.where(mine, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    return tl.minimum(expert, n_experts - 1), row_begin, row_end


def device_index(t: torch.Tensor) -> int:
    """``t``'s CUDA device index (the current device for a bare ``cuda``)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def cuda_major(index: int) -> int:
    """The compute capability's major version of CUDA device ``index``, asked once (every launch wants it)."""
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def multiprocessors(index: int) -> int:
    """CUDA device ``index``'s multiprocessor count, asked once: one persistent program each."""
    return torch.cuda.get_device_properties(index).multi_processor_count
