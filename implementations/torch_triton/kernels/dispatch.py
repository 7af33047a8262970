"""The dispatch plan's index arrays from a stable sort of the routing keys, in one Triton kernel after the sort.

The layer sorts the T * k assignments by expert (`layer.plan_dispatch`): row p of the sorted order is assignment
``order[p]``. From the sorted keys and ``order`` it needs

    inverse[order[p]] = p,   row_token[p] = order[p] // k,   group_starts[e] = #{keys < e}  (e = 0 .. E),
    row_valid[p] = sorted_key[p] < E   (capacity drops carry the key E)

Why a kernel: in PyTorch these are six operations (an ``arange``, an ``index_put_``, another ``arange``, a
``searchsorted``, a floor division, a gather), each a launch, and the sort on int64 keys is ten radix kernels
with their memsets. They run at the start of the step, before the first GEMM, while the GPU waits on the host (a
trace of the logbook's top-8 int8 training step on the H200 put ~1.3 ms of idle GPU there). `sort_keys` narrows
the keys to 16 bits first (two radix passes instead of eight). Measured on the H200 (2026-12-02, logbook shape,
int8_routed_prequant forward+backward, 12 alternating repetitions): the plan's host time 501 -> 396 us and the step
8.62 -> 8.46 ms at top-2; 652 -> 591 us and no change of the step (25.3 ms) at top-8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import is_interpreted_kernel, next_power_of_2, record_launch

#: Sorted positions per program of `_plan_indices_kernel`.
BLOCK = 1024


@triton.jit
def _plan_indices_kernel(sorted_key_ptr, order_ptr, inverse_ptr, row_token_ptr, starts_ptr, row_valid_ptr, n,
                         experts, TOP_K: tl.constexpr, HAS_DROPS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                         E_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Each program its BLOCK sorted positions' inverse, row token and (with drops) validity; program 0 also
    every group start, a binary search (lower bound) of each expert id in the sorted keys."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = p < n
    assignment = tl.load(order_ptr + p, mask=in_range, other=0)
    tl.store(inverse_ptr + assignment, p.to(tl.int64), mask=in_range)
    tl.store(row_token_ptr + p, assignment // TOP_K, mask=in_range)
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


def sort_keys(keys: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted keys, order): a stable sort of ``keys`` [N] in 0 .. experts, on 16-bit keys where they fit (a radix
    sort makes one pass per byte of its key type)."""
    narrow = torch.int16 if experts < 2**15 else torch.int32
    return torch.sort(keys.to(narrow), stable=True)


def plan_indices(sorted_key: torch.Tensor, order: torch.Tensor, experts: int, top_k: int, has_drops: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inverse [N] int64, row_token [N] int64, group_starts [E + 1] int32, row_valid [N] bool or None) of a stable
    sort of the routing keys (`sort_keys`); ``row_valid`` only ``has_drops``."""
    n = order.numel()
    inverse = torch.empty_like(order)
    row_token = torch.empty_like(order)
    starts = torch.empty(experts + 1, dtype=torch.int32, device=order.device)
    row_valid = torch.empty(n, dtype=torch.bool, device=order.device) if has_drops else None
    record_launch("dispatch_plan_indices")
    _plan_indices_kernel[(max(1, triton.cdiv(n, BLOCK)),)](
        sorted_key, order, inverse, row_token, starts, row_valid if row_valid is not None else starts, n, experts,
        TOP_K=top_k, HAS_DROPS=has_drops, SEARCH_STEPS=max(1, n.bit_length()),
        E_BLOCK=next_power_of_2(experts + 1), BLOCK=BLOCK, num_warps=4)
    return inverse, row_token, starts, row_valid
