"""The dispatch plan's index arrays: row p of the expert-sorted order is assignment ``order[p]`` (= t * k + slot),
and the layer needs

    inverse[order[p]] = p,   group_starts[e] = #{keys < e}  (e = 0 .. E),
    row_valid[p] = sorted_key[p] < E   (capacity drops carry the key E)

They are made at the start of the step, before the first GEMM, while the GPU waits on the host (a trace of the
logbook's top-8 int8 training step on the H200 put ~1.3 ms of idle GPU there; a Triton launch costs ~100 us of
host time on that machine, a sort ~200), so in as few launches as can be:

* A dropless routing (no capacity): `plan_from_counts`, one kernel. The router's top-k kernel has counted each
  block of tokens' assignments per expert (`ExpertCounts`); from them each program places its block's assignments
  where a stable sort would (`_counting_plan_kernel`), and writes the grouped int8 GEMM's tile table besides
  (`gluon_gemm.GemmTiles`), which the GEMMs would otherwise make at each call.
* With capacity drops: a stable sort of the keys narrowed to 16 bits (`sort_keys`: two radix passes instead of
  eight), then one kernel for the rest (`plan_indices`; in PyTorch six launches). Measured on the H200 (2026-12-02,
  logbook shape, int8_routed_prequant forward+backward, 12 alternating repetitions), against those six: the plan's
  host time 501 -> 396 us and the step 8.62 -> 8.46 ms at top-2; 652 -> 591 us and no change of the step (25.3 ms)
  at top-8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..common import is_interpreted_kernel, next_power_of_2, record_launch
from . import gluon_gemm


class ExpertCounts(NamedTuple):
    """How many assignments each expert got in each block of tokens: ``per_block`` [blocks, C] int32 (C >= E
    columns, those past E zero), block b holding tokens b * block_tokens onwards (`router.logits_top_k`)."""

    per_block: torch.Tensor
    block_tokens: int

#: Sorted positions per program of `_plan_indices_kernel`.
BLOCK = 1024


@triton.jit
def _plan_indices_kernel(sorted_key_ptr, order_ptr, inverse_ptr, starts_ptr, row_valid_ptr, n, experts,
                         HAS_DROPS: tl.constexpr, SEARCH_STEPS: tl.constexpr, E_BLOCK: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Each program its BLOCK sorted positions' inverse and (with drops) validity; program 0 also
    every group start, a binary search (lower bound) of each expert id in the sorted keys."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = p < n
    assignment = tl.load(order_ptr + p, mask=in_range, other=0)
    tl.store(inverse_ptr + assignment, p.to(tl.int64), mask=in_range)
    if HAS_DROPS:
        key = tl.load(sorted_key_ptr + p, mask=in_range, other=0)
        tl.store(row_valid_ptr + p, key < experts, mask=in_range)
    if tl.program_id(0) == 0:
        expert = tl.arange(0, E_BLOCK)
        low = tl.zeros((E_BLOCK,), dtype=tl.int32)
        high = tl.zeros((E_BLOCK,), dtype=tl.int32) + n
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (low + high) // 2
            probe = tl.load(sorted_key_ptr + mid, mask=mid < high, other=0).to(tl.int32)
            below = (mid < high) & (probe < expert)
            low = tl.where(below, mid + 1, low)
            high = tl.where(below | (mid >= high), high, mid)
        tl.store(starts_ptr + expert, low, mask=expert <= experts)


INTERPRETED: bool = is_interpreted_kernel(_plan_indices_kernel)


#: Blocks of counts `_counting_plan_kernel` sums at a time.
COUNT_CHUNK = 32
#: The most per-block counts (blocks x columns) `plan_from_counts` takes. Each of its programs reads all of them
#: (its offsets need no scan launch), so its reads grow as blocks^2 x E: at this bound 128 KiB a program, 64 MiB
#: at 512 blocks of 64 experts (the logbook's 32768 tokens through the unfused top-k). Beyond it (many tokens and
#: experts: 2048 blocks of 256 at 32768 tokens would read 4 GiB) the keys are sorted instead.
MAX_COUNTS = 1 << 15


def counts_fit(counts: ExpertCounts) -> bool:
    """Whether `plan_from_counts` takes these counts (`MAX_COUNTS`)."""
    return counts.per_block.numel() <= MAX_COUNTS


@triton.jit
def _counting_plan_kernel(ids_ptr, counts_ptr, inverse_ptr, order_ptr, starts_ptr, table_ptr,
                          tile_count_ptr, n_tokens, n_blocks, experts, counts_stride, table_bound,
                          TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, E_BLOCK: tl.constexpr,
                          COUNT_CHUNK: tl.constexpr, TILE_M: tl.constexpr, TABLE_BLOCK: tl.constexpr):
    """A dropless plan without a sort: program p places the assignments of tokens p * BLOCK_T onwards (the
    router's block p, whose expert counts are ``counts[p]``). Assignment (t, j) of expert e goes to row

        group_start[e] + (e's assignments in blocks before p) + (tokens of this block before t that chose e)

    which is where a stable sort by expert puts it (a token names an expert at most once). Every program also sums
    the counts itself (no second launch for the group starts), program 0 writes them, and each writes its share of
    `gluon_gemm`'s tile table for TILE_M-row tiles (`gluon_gemm.tile_table`'s entries)."""
    p = tl.program_id(0)
    e = tl.arange(0, E_BLOCK)
    e_ok = e < experts
    totals = tl.zeros((E_BLOCK,), dtype=tl.int32)
    before = tl.zeros((E_BLOCK,), dtype=tl.int32)
    for first in range(0, n_blocks, COUNT_CHUNK):
        b = first + tl.arange(0, COUNT_CHUNK)
        c = tl.load(counts_ptr + b[:, None] * counts_stride + e[None, :],
                    mask=(b < n_blocks)[:, None] & e_ok[None, :], other=0)
        totals += tl.sum(c, axis=0)
        before += tl.sum(tl.where((b < p)[:, None], c, 0), axis=0)
    ends = tl.cumsum(totals, axis=0)
    starts = ends - totals
    tokens = p * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    chose = tl.zeros((BLOCK_T, E_BLOCK), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + tokens.to(tl.int64) * TOP_K + j, mask=token_ok, other=-1)
        chose += (e[None, :] == expert[:, None]).to(tl.int32)
    row = (starts + before)[None, :] + tl.cumsum(chose, axis=0) - chose
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + tokens.to(tl.int64) * TOP_K + j, mask=token_ok, other=-1)
        r = tl.sum(tl.where(e[None, :] == expert[:, None], row, 0), axis=1).to(tl.int64)
        assignment = tokens.to(tl.int64) * TOP_K + j
        tl.store(inverse_ptr + assignment, r, mask=token_ok)
        tl.store(order_ptr + r, assignment, mask=token_ok)
    if p == 0:
        tl.store(starts_ptr + e, starts, mask=e_ok)
        tl.store(starts_ptr + experts, tl.sum(totals, axis=0))
    tiles = (totals + TILE_M - 1) // TILE_M
    tile_end = tl.cumsum(tiles, axis=0)
    m = p * TABLE_BLOCK + tl.arange(0, TABLE_BLOCK)
    owner = tl.sum((tile_end[None, :] <= m[:, None]).to(tl.int32), axis=1)
    mine = e[None, :] == owner[:, None]  # no expert for a spare tile (owner past them): no rows below
    first_tile = tl.sum(tl.where(mine, (tile_end - tiles)[None, :], 0), axis=1)
    row_begin = tl.sum(tl.where(mine, starts[None, :], 0), axis=1) + (m - first_tile) * TILE_M
    row_end = tl.sum(tl.where(mine, ends[None, :], 0), axis=1)
    m_ok = m < table_bound
    tl.store(table_ptr + 3 * m, tl.minimum(owner, experts - 1), mask=m_ok)
    tl.store(table_ptr + 3 * m + 1, row_begin, mask=m_ok)
    tl.store(table_ptr + 3 * m + 2, row_end, mask=m_ok)
    if p == 0:
        tl.store(tile_count_ptr, tl.sum(tiles, axis=0))


def plan_from_counts(expert_ids: torch.Tensor, counts: ExpertCounts, experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, gluon_gemm.GemmTiles]:
    """(order, inverse, group_starts [E + 1] int32, the Gluon GEMM's tile table) of a dropless
    routing ``expert_ids`` [T, k] from its per-block expert counts, in one launch (`_counting_plan_kernel`): what
    `sort_keys` and `plan_indices` give, and `gluon_gemm.tile_table`, without the sort's launches."""
    tokens, top_k = expert_ids.shape
    n = tokens * top_k
    device = expert_ids.device
    order = torch.empty(n, dtype=torch.int64, device=device)
    inverse = torch.empty_like(order)
    blocks = counts.per_block.shape[0]
    # the kernel writes every group start and the tile count: no memsets (launches of their own) unless it is not run
    alloc = torch.empty if blocks else torch.zeros
    starts = alloc(experts + 1, dtype=torch.int32, device=device)
    tile_m = gluon_gemm.BLOCK_M
    bound = triton.cdiv(n, tile_m) + experts
    table = alloc(3 * bound, dtype=torch.int32, device=device)
    tile_count = alloc(1, dtype=torch.int32, device=device)
    if blocks:
        record_launch("dispatch_counting_plan")
        _counting_plan_kernel[(blocks,)](
            expert_ids, counts.per_block, inverse, order, starts, table, tile_count, tokens, blocks,
            experts, counts.per_block.stride(0), bound, TOP_K=top_k, BLOCK_T=counts.block_tokens,
            E_BLOCK=next_power_of_2(experts), COUNT_CHUNK=COUNT_CHUNK, TILE_M=tile_m,
            TABLE_BLOCK=next_power_of_2(triton.cdiv(bound, blocks)), num_warps=8)
    return order, inverse, starts, gluon_gemm.GemmTiles(tile_m, n, table, tile_count)


def sort_keys(keys: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted keys, order): a stable sort of ``keys`` [N] in 0 .. experts, on 16-bit keys where they fit (a radix
    sort makes one pass per byte of its key type)."""
    narrow = torch.int16 if experts < 2**15 else torch.int32
    return torch.sort(keys.to(narrow), stable=True)


def plan_indices(sorted_key: torch.Tensor, order: torch.Tensor, experts: int, has_drops: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inverse [N] int64, group_starts [E + 1] int32, row_valid [N] bool or None) of a stable
    sort of the routing keys (`sort_keys`); ``row_valid`` only ``has_drops``."""
    n = order.numel()
    inverse = torch.empty_like(order)
    starts = torch.empty(experts + 1, dtype=torch.int32, device=order.device)
    row_valid = torch.empty(n, dtype=torch.bool, device=order.device) if has_drops else None
    record_launch("dispatch_plan_indices")
    _plan_indices_kernel[(max(1, triton.cdiv(n, BLOCK)),)](
        sorted_key, order, inverse, starts, row_valid if row_valid is not None else starts, n, experts,
        HAS_DROPS=has_drops, SEARCH_STEPS=max(1, n.bit_length()),
        E_BLOCK=next_power_of_2(experts + 1), BLOCK=BLOCK, num_warps=4)
    return inverse, starts, row_valid
