"""Triton kernels of the torch_triton router: float32-accurate logits from bfloat16 tokens on the tensor
cores, their two gradients likewise, and the top-k selection.

The router is float32 in every backend: logits = x R with R [H, E] float32. For float32 tokens that is
a float32 GEMM; for bfloat16 tokens torch would first copy x to float32 and run the GEMM without tensor
cores (on the H200 at T 32768, H 2048, E 64 the copy, the GEMM and the two backward GEMMs took ~0.9 ms of
a 9.8 ms int8 training step at top-2). Here a float32 operand is split exactly into three bfloat16 parts,

    r = hi + mid + lo,  hi = bf16(r), mid = bf16(r - hi), lo = bf16(r - hi - mid)

(each remainder has at most 16, then 8, significant bits: the parts add up to r exactly, to float32's
normal range), and x r = x hi + x mid + x lo: products of bfloat16 operands are exact in float32, the
tensor cores accumulate in float32, so the logits carry a float32 GEMM's rounding and no more. The
gradients split both float32 factors (d_logits and R) and keep the six part products above 2^-24 of the
leading one. A bfloat16 x needs no split.

`top_k_lower_index_first`: the k largest of each row, larger first, equal values by lower index (the
reference's rule), on integer keys that order as the floats do.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..common import is_interpreted_kernel, next_power_of_2, record_launch
from .dispatch import ExpertCounts


@triton.jit
def _split3(v):
    """float32 v as bfloat16 (hi, mid, lo) with hi + mid + lo == v exactly: each remainder is exact in
    float32 and has at most 16, then 8 significant bits (so whether the conversion rounds to nearest,
    compiled, or truncates, in the interpreter, the three parts still add up to v)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a b, float32 accumulation. UPCAST (the interpreter, whose dot reads bfloat16 as its integer
    bits) multiplies float32 copies instead: the same exact products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(x_ptr, r_ptr, tokens, cols, n_tokens, hidden, experts, stride_x, stride_r,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_T, BLOCK_E] float32: logits[t, e] = sum_k x[t, k] (hi + mid + lo)[k, e] for the given token rows and
    expert columns (zero outside them), float32 accumulation; small parts first."""
    token_ok = tokens < n_tokens
    col_ok = cols < experts
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_x + ks[None, :],
                    mask=token_ok[:, None] & k_ok[None, :], other=0.0)
        r_offsets = ks[:, None] * stride_r + cols[None, :]
        r_mask = k_ok[:, None] & col_ok[None, :]
        hi, mid, lo = _split3(tl.load(r_ptr + r_offsets, mask=r_mask, other=0.0))
        acc = _dot(x, lo, acc, UPCAST)
        acc = _dot(x, mid, acc, UPCAST)
        acc = _dot(x, hi, acc, UPCAST)
    return acc


@triton.jit
def _logits_kernel(x_ptr, r_ptr, out_ptr, n_tokens, hidden, experts,
                   stride_x, stride_r, stride_o,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """logits[t, e] (`_logits_tile`), one [BLOCK_T, BLOCK_E] tile per program."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = _logits_tile(x_ptr, r_ptr, tokens, cols, n_tokens, hidden, experts, stride_x, stride_r,
                       BLOCK_T, BLOCK_E, BLOCK_K, UPCAST)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_o + cols[None, :], acc,
             mask=(tokens < n_tokens)[:, None] & (cols < experts)[None, :])


@triton.jit
def _input_grad_kernel(d_ptr, r_ptr, out_ptr, n_tokens, hidden, experts,
                       stride_d, stride_r, stride_o,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, UPCAST: tl.constexpr):
    """dx[t, h] = sum_e d[t, e] r[h, e] (d, r float32 as three bfloat16 parts each), rounded once to
    out's dtype. r is read transposed: its [H, E] rows are the B operand's columns."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < n_tokens
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for start in range(0, experts, BLOCK_E):
        es = start + tl.arange(0, BLOCK_E)
        e_ok = es < experts
        d_offsets = tokens.to(tl.int64)[:, None] * stride_d + es[None, :]
        d_mask = token_ok[:, None] & e_ok[None, :]
        r_offsets = cols[None, :] * stride_r + es[:, None]
        r_mask = e_ok[:, None] & col_ok[None, :]
        d1, d2, d3 = _split3(tl.load(d_ptr + d_offsets, mask=d_mask, other=0.0))
        r1, r2, r3 = _split3(tl.load(r_ptr + r_offsets, mask=r_mask, other=0.0))
        # The six part products down to 2^-16 x 2^-8 of the leading one, smallest first.
        acc = _dot(d2, r2, acc, UPCAST)
        acc = _dot(d1, r3, acc, UPCAST)
        acc = _dot(d3, r1, acc, UPCAST)
        acc = _dot(d1, r2, acc, UPCAST)
        acc = _dot(d2, r1, acc, UPCAST)
        acc = _dot(d1, r1, acc, UPCAST)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _router_grad_kernel(x_ptr, d_ptr, out_ptr, n_tokens, hidden, experts, tokens_per_split,
                        stride_x, stride_d, stride_os, stride_o,
                        BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
    """One split's share of dR[h, e] = sum_t x[t, h] d[t, e] (d float32 as three bfloat16 parts) over
    tokens split * tokens_per_split onwards, into out[split] (the splits are summed afterwards, in a
    fixed order: deterministic, no atomics)."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    experts_ = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    col_ok = cols < hidden
    e_ok = experts_ < experts
    first = split * tokens_per_split
    last = tl.minimum(first + tokens_per_split, n_tokens)
    acc = tl.zeros((BLOCK_H, BLOCK_E), dtype=tl.float32)
    for start in range(first, last, BLOCK_T):
        tokens = start + tl.arange(0, BLOCK_T)
        token_ok = tokens < last
        x_t = tl.load(x_ptr + cols[:, None] + tokens.to(tl.int64)[None, :] * stride_x,
                      mask=col_ok[:, None] & token_ok[None, :], other=0.0)
        d_offsets = tokens.to(tl.int64)[:, None] * stride_d + experts_[None, :]
        d_mask = token_ok[:, None] & e_ok[None, :]
        d1, d2, d3 = _split3(tl.load(d_ptr + d_offsets, mask=d_mask, other=0.0))
        acc = _dot(x_t, d3, acc, UPCAST)
        acc = _dot(x_t, d2, acc, UPCAST)
        acc = _dot(x_t, d1, acc, UPCAST)
    tl.store(out_ptr + split.to(tl.int64) * stride_os + cols[:, None] * stride_o + experts_[None, :], acc,
             mask=col_ok[:, None] & e_ok[None, :])


@triton.jit
def _sortable_keys(v, WIDE: tl.constexpr):
    """Integers that order as the floats ``v`` do (the bits, negatives' magnitude bits flipped; -0.0 made +0.0
    first so that the two zeros tie), and a key below every one of them."""
    v = tl.where(v == 0.0, 0.0, v)
    if WIDE:
        bits = v.to(tl.int64, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
        lowest = -9223372036854775807 - 1
    else:
        bits = v.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        lowest = -2147483647 - 1
    return key, lowest


@triton.jit
def _next_pick(key, taken, cols, lowest, BLOCK_C: tl.constexpr):
    """Per row, the column of the largest key not yet ``taken``, the lowest such column among equal keys."""
    best = tl.max(tl.where(taken, lowest, key), axis=1)
    return tl.min(tl.where((~taken) & (key == best[:, None]), cols[None, :], BLOCK_C), axis=1)


@triton.jit
def _store_top_k(key, lowest, rows, row_ok, cols, n_cols, ids_ptr, counts_ptr, TOP_K: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """ids[r, :k]: k rounds of (largest ``key`` left, lowest column holding it) per row (`_next_pick`), columns past
    ``n_cols`` never taken; counts[program, c]: how many of the rows' ids are c."""
    taken = tl.broadcast_to((cols >= n_cols)[None, :], key.shape)
    counts = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        pick = _next_pick(key, taken, cols, lowest, BLOCK_C)
        tl.store(ids_ptr + rows.to(tl.int64) * TOP_K + j, pick.to(tl.int64), mask=row_ok)
        chosen = cols[None, :] == pick[:, None]
        taken = taken | chosen
        counts += tl.sum((chosen & row_ok[:, None]).to(tl.int32), axis=0)
    tl.store(counts_ptr + tl.program_id(0) * BLOCK_C + cols, counts)


@triton.jit
def _top_k_kernel(values_ptr, ids_ptr, counts_ptr, n_rows, n_cols, stride_v, TOP_K: tl.constexpr,
                  WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """ids[r, :k] = the k largest of values[r], larger first, equal values by lower index (`_store_top_k` on
    `_sortable_keys`); counts[program, c]: how many of the block's ids are c."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    v = tl.load(values_ptr + rows.to(tl.int64)[:, None] * stride_v + cols[None, :],
                mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
    key, lowest = _sortable_keys(v, WIDE)
    _store_top_k(key, lowest, rows, row_ok, cols, n_cols, ids_ptr, counts_ptr, TOP_K, BLOCK_C)


@triton.jit
def _logits_top_k_kernel(x_ptr, r_ptr, out_ptr, ids_ptr, counts_ptr, n_tokens, hidden, experts,
                         stride_x, stride_r, stride_o, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """`_logits_kernel` and `_top_k_kernel` in one pass over BLOCK_T tokens and every expert (BLOCK_E >= E): the
    logits, their top-k ids (the same selection, on the same float32 values, still in registers) and how many of
    the block's assignments each expert got, counts[program, e] (`dispatch.plan_from_counts` reads them)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    token_ok = tokens < n_tokens
    acc = _logits_tile(x_ptr, r_ptr, tokens, cols, n_tokens, hidden, experts, stride_x, stride_r,
                       BLOCK_T, BLOCK_E, BLOCK_K, UPCAST)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_o + cols[None, :], acc,
             mask=token_ok[:, None] & (cols < experts)[None, :])
    key, lowest = _sortable_keys(acc, False)
    _store_top_k(key, lowest, tokens, token_ok, cols, experts, ids_ptr, counts_ptr, TOP_K, BLOCK_E)


INTERPRETED: bool = is_interpreted_kernel(_logits_kernel)


def _tiles(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two tile of at most ``cap`` covering ``n`` where it can (tl.dot wants >= 16)."""
    return max(floor, min(cap, next_power_of_2(n)))


def logits_bf16(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, E] = x R for bfloat16 x [T, H] and float32 R [H, E] (module docstring)."""
    tokens, hidden = x.shape
    experts = router.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    router = router.to(torch.float32).contiguous()
    out = torch.empty((tokens, experts), dtype=torch.float32, device=x.device)
    if tokens == 0 or experts == 0:
        return out
    if hidden == 0:
        return out.zero_()
    block_t, block_e, block_k = (32, _tiles(experts, 32), 32) if INTERPRETED else (128, _tiles(experts, 128), 64)
    record_launch("router_logits")
    _logits_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(experts, block_e))](
        x, router, out, tokens, hidden, experts, x.stride(0), router.stride(0), out.stride(0),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, UPCAST=INTERPRETED, num_warps=4)
    return out


#: The most experts `logits_top_k` holds in one tile: each program owns whole rows of logits.
FUSED_TOP_K_EXPERTS = 128


def logits_top_k(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, ExpertCounts]:
    """(logits [T, E] float32, the top-``k`` ids [T, k] int64, per-block expert counts) for bfloat16 x [T, H] and
    float32 R [H, E], E <= `FUSED_TOP_K_EXPERTS`: `logits_bf16` then `top_k_lower_index_first`, bit for bit, in one
    launch (`_logits_top_k_kernel`). The launches before the step's first GEMM are where the GPU waits on the
    host (~100 us of host time per Triton launch on the H200); the counts save the dispatch plan its sort."""
    tokens, hidden = x.shape
    experts = router.shape[1]
    if not 0 < k <= experts <= FUSED_TOP_K_EXPERTS:
        raise ValueError(f"logits_top_k: top-{k} of {experts} experts (1 <= k <= E <= {FUSED_TOP_K_EXPERTS})")
    x = x if x.stride(-1) == 1 else x.contiguous()
    router = router.to(torch.float32).contiguous()
    block_e = _tiles(experts, FUSED_TOP_K_EXPERTS)
    block_t, block_k = (32, 32) if INTERPRETED else (128 if block_e <= 64 else 64, 64)
    blocks = triton.cdiv(tokens, block_t)
    out = torch.empty((tokens, experts), dtype=torch.float32, device=x.device)
    ids = torch.empty((tokens, k), dtype=torch.int64, device=x.device)
    counts = torch.empty((blocks, block_e), dtype=torch.int32, device=x.device)
    if tokens:
        record_launch("router_logits_top_k")
        _logits_top_k_kernel[(blocks,)](
            x, router, out, ids, counts, tokens, hidden, experts, x.stride(0), router.stride(0), out.stride(0),
            TOP_K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, UPCAST=INTERPRETED, num_warps=4)
    return out, ids, ExpertCounts(counts, block_t)


def input_grad(d_logits: torch.Tensor, router: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dx [T, H] = d_logits R^T in ``dtype``, from float32 d_logits [T, E] and R [H, E]."""
    tokens, experts = d_logits.shape
    hidden = router.shape[0]
    out = torch.empty((tokens, hidden), dtype=dtype, device=d_logits.device)
    if tokens == 0 or hidden == 0:
        return out
    if experts == 0:
        return out.zero_()
    d_logits = d_logits.to(torch.float32).contiguous()
    router = router.to(torch.float32).contiguous()
    args = (d_logits, router, out, tokens, hidden, experts, d_logits.stride(0), router.stride(0), out.stride(0))
    record_launch("router_input_grad")
    if INTERPRETED:
        block_t, block_h, block_e = 32, 32, _tiles(experts, 32)
        _input_grad_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_h))](
            *args, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_E=block_e, UPCAST=True)
        return out

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(hidden, meta["BLOCK_H"]))

    _tuned_input_grad()[grid](*args, BLOCK_E=_tiles(experts, 64), UPCAST=False)
    return out


@functools.cache
def _tuned_input_grad():
    """The input-gradient kernel autotuned over output tiles, at one pipeline stage (six operand tiles, one
    E step at E <= 64: three stages needed 288 KiB of shared memory at 128 x 128, over the H200's 227)."""
    tiles = ((128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 256, 8), (128, 256, 8))
    configs = [triton.Config({"BLOCK_T": t, "BLOCK_H": h}, num_warps=w, num_stages=1) for t, h, w in tiles]
    return triton.autotune(configs=configs, key=["n_tokens", "hidden", "experts"])(_input_grad_kernel)


def router_grad(x: torch.Tensor, d_logits: torch.Tensor) -> torch.Tensor:
    """dR [H, E] float32 = x^T d_logits for bfloat16 x [T, H] and float32 d_logits [T, E]."""
    tokens, hidden = x.shape
    experts = d_logits.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    if tokens == 0 or hidden == 0 or experts == 0:
        return torch.zeros((hidden, experts), dtype=torch.float32, device=x.device)
    d_logits = d_logits.to(torch.float32).contiguous()
    if INTERPRETED:
        block_h, block_e, block_t, per_split = 32, _tiles(experts, 32), 32, 64
    else:
        block_h, block_e, block_t = 128, _tiles(experts, 64), 64
        # Enough splits to fill the GPU (~2 programs per SM), each a run of whole token tiles.
        programs = triton.cdiv(hidden, block_h) * triton.cdiv(experts, block_e)
        per_split = block_t * triton.cdiv(tokens, block_t * max(1, min(256 // programs, triton.cdiv(tokens, 1024))))
    splits = triton.cdiv(tokens, per_split)
    partial = torch.empty((splits, hidden, experts), dtype=torch.float32, device=x.device)
    record_launch("router_weight_grad")
    _router_grad_kernel[(triton.cdiv(hidden, block_h), triton.cdiv(experts, block_e), splits)](
        x, d_logits, partial, tokens, hidden, experts, per_split, x.stride(0), d_logits.stride(0),
        partial.stride(0), partial.stride(1), BLOCK_H=block_h, BLOCK_E=block_e, BLOCK_T=block_t, UPCAST=INTERPRETED,
        num_warps=4)
    return partial.sum(dim=0)


def top_k_lower_index_first(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] int64 of the k largest of each row of float32 or float64 ``values`` [R, C], larger
    first, equal values by lower index (a stable descending sort's first k; -0.0 ties +0.0)."""
    return top_k_counted(values, k)[0]


def top_k_counted(values: torch.Tensor, k: int) -> tuple[torch.Tensor, ExpertCounts]:
    """`top_k_lower_index_first`'s ids and how many of each block of rows' ids name each column (the dispatch
    plan places the assignments from these counts, `dispatch.plan_from_counts`), from one launch."""
    if values.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"top_k_lower_index_first takes float32 or float64 values, got {values.dtype}")
    rows, cols = values.shape
    if not 0 <= k <= cols:
        raise ValueError(f"top-{k} of {cols} columns")
    values = values if values.stride(-1) == 1 else values.contiguous()
    ids = torch.empty((rows, k), dtype=torch.int64, device=values.device)
    block_c = next_power_of_2(cols)
    block_r = max(1, min(64, 4096 // block_c)) if not INTERPRETED else 32
    blocks = triton.cdiv(rows, block_r)
    # each program writes its block's row whole: no memset (a launch of its own)
    counts = (torch.empty if k else torch.zeros)((blocks, block_c), dtype=torch.int32, device=values.device)
    if rows == 0 or k == 0:
        return ids, ExpertCounts(counts, block_r)
    record_launch("router_top_k")
    _top_k_kernel[(blocks,)](
        values, ids, counts, rows, cols, values.stride(0), TOP_K=k, WIDE=values.dtype == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return ids, ExpertCounts(counts, block_r)
