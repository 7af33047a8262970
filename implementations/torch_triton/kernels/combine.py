"""Triton kernels that bring expert-sorted rows back to their tokens, forward and backward.

The layer's routed experts produce one row per assignment (token t, slot j), sorted by expert;
``position[t * k + j]`` is that assignment's row. Bringing rows back to tokens:

    combine:  y[t] = sum_j w[t, j] * rows[position[t, j]]      (w = None: an unweighted sum)

over the kept assignments only (a capacity-dropped assignment's row holds whatever the GEMM left
there, NaN included, and is never read). Backward, for dy [T, H]:

    d_rows[position[t, j]] = w[t, j] * dy[t]   (0 for a dropped assignment)
    d_w[t, j] = rows[position[t, j]] . dy[t]   (0 for a dropped assignment)

Every sorted row is exactly one assignment's, so d_rows is written whole and needs no zeroing.

Why kernels: in PyTorch the combine is a gather to [T, k, H], a product and a sum (three passes over
k copies of the token rows), and its backward an index_put with accumulation (a sort), a product and
a reduction; on the H200 at the logbook's shape those took about a third of the int8 layer's forward
(issue 10's profile, 2026-11-30). Here each direction reads the rows once and writes once, with
float32 accumulation in a fixed slot order (deterministic for a given launch shape, no atomics; `_launch`
says where a tuned shape changes the rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import common
from ..common import is_interpreted_kernel, next_power_of_2, record_launch


@triton.jit
def _combine_kernel(rows_ptr, position_ptr, kept_ptr, weight_ptr, out_ptr, n_tokens, hidden, stride_r, stride_o,
                    TOP_K: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < n_tokens
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    # unrolled, so that every slot's row load is in flight before the sums wait on them (the same sums, in slot
    # order): on the H200 at the logbook's top-8 shape 0.305 -> 0.283 ms, 4.3 TB/s (2026-12-02)
    for j in tl.static_range(TOP_K):
        slot = tokens.to(tl.int64) * TOP_K + j
        use = token_ok
        if HAS_KEPT:
            use = use & (tl.load(kept_ptr + slot, mask=token_ok, other=0) != 0)
        row = tl.load(position_ptr + slot, mask=use, other=0).to(tl.int64)
        values = tl.load(rows_ptr + row[:, None] * stride_r + cols[None, :], mask=use[:, None] & col_ok[None, :],
                         other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            values = values * tl.load(weight_ptr + slot, mask=use, other=0.0).to(tl.float32)[:, None]
        acc += values
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_backward_kernel(rows_ptr, dy_ptr, position_ptr, kept_ptr, weight_ptr, d_rows_ptr, d_weight_ptr,
                             n_tokens, hidden, stride_r, stride_dy, stride_dr,
                             TOP_K: tl.constexpr, HAS_KEPT: tl.constexpr,
                             WRITE_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per BLOCK_T tokens and all of H: each d_w[t, j] is a whole-row dot product.

    WRITE_ROWS: d_rows too (else d_w alone: the gates' pass is the only one that reads the rows, so a caller can
    free them before d_rows exists; `_spread_kernel` then makes d_rows)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    tokens64 = tokens.to(tl.int64)
    for j in range(TOP_K):
        slot = tokens64 * TOP_K + j
        use = token_ok
        if HAS_KEPT:
            use = use & (tl.load(kept_ptr + slot, mask=token_ok, other=0) != 0)
        row = tl.load(position_ptr + slot, mask=token_ok, other=0).to(tl.int64)
        weight = tl.load(weight_ptr + slot, mask=use, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for start in range(0, hidden, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            mask = token_ok[:, None] & (cols < hidden)[None, :]
            use_mask = use[:, None] & (cols < hidden)[None, :]
            dy = tl.load(dy_ptr + tokens64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if WRITE_ROWS:
                d_row = tl.where(use_mask, dy * weight[:, None], 0.0).to(d_rows_ptr.dtype.element_ty)
                tl.store(d_rows_ptr + row[:, None] * stride_dr + cols[None, :], d_row, mask=mask)
            values = tl.load(rows_ptr + row[:, None] * stride_r + cols[None, :], mask=use_mask, other=0.0)
            dot += tl.sum(values.to(tl.float32) * dy, axis=1)
        tl.store(d_weight_ptr + slot, dot, mask=token_ok)


@triton.jit
def _spread_kernel(src_ptr, position_ptr, kept_ptr, weight_ptr, out_ptr, n_tokens, hidden, stride_s, stride_o,
                   TOP_K: tl.constexpr, HAS_KEPT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[position[t, j]] = w[t, j] * src[t] (src[t] itself without weights; 0 for a dropped slot): the adjoint of
    `_combine_kernel`. Each token's row is read once and written to its k rows, where a gather by row (x[row_token])
    reads it k times in the rows' order."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < n_tokens
    mask = token_ok[:, None] & (cols < hidden)[None, :]
    tokens64 = tokens.to(tl.int64)
    src = tl.load(src_ptr + tokens64[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    if HAS_WEIGHT:
        src = src.to(tl.float32)
    for j in tl.static_range(TOP_K):
        slot = tokens64 * TOP_K + j
        row = tl.load(position_ptr + slot, mask=token_ok, other=0).to(tl.int64)
        value = src
        if HAS_WEIGHT:
            value = src * tl.load(weight_ptr + slot, mask=token_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_KEPT:
            use = tl.load(kept_ptr + slot, mask=token_ok, other=0) != 0
            value = tl.where(use[:, None], value, tl.zeros_like(value))
        tl.store(out_ptr + row[:, None] * stride_o + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETED: bool = is_interpreted_kernel(_combine_kernel)


def _blocks(hidden: int) -> tuple[int, int, int]:
    """(tokens per program, columns per block, warps). The interpreter takes many tokens per program
    (each program is a Python call); a GPU a few tokens and a coalesced stretch of each row."""
    width = next_power_of_2(hidden)
    if INTERPRETED:
        return 32, min(width, 1024), 4
    return 4, min(width, 512), 4


_tuned: dict[tuple, object] = {}


def _launch(kernel, n_tokens: int, hidden: int, args: tuple, flags: dict, key: list[str], split_h: bool) -> None:
    """Launch ``kernel`` over ``n_tokens`` tokens (and H in blocks when ``split_h``, the forward's grid):
    tuned on a GPU for large problems over tokens per program and warps, and the forward's H block, else
    `_blocks`' fixed shape. The forward and the backward's rows are the same bit for bit
    in every shape; the backward's d_w is a row sum whose reduction order follows the tile's layout, so
    its float32 rounding can differ between shapes (and so between processes whose tuner picked
    differently; the H200 run of 2026-12-01 showed it): deterministic for a given shape only. The
    backward keeps its H block, which bounds the sum's chunks."""
    block_t, block_h, warps = _blocks(hidden)
    if INTERPRETED or n_tokens * hidden < common.TUNE_MIN_ELEMENTS:
        grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(hidden, block_h)) if split_h else (
            triton.cdiv(n_tokens, block_t),)
        kernel[grid](*args, **flags, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps)
        return
    tuned_key = (kernel, block_h)
    if tuned_key not in _tuned:
        shapes = [(4, 512, 4), (8, 512, 4), (8, 512, 8), (16, 512, 8), (2, 1024, 4), (4, 1024, 8), (16, 256, 4)]
        if not split_h:
            shapes = [(t, block_h, w) for t, _, w in shapes]
        configs = list({(t, h, w): triton.Config({"BLOCK_T": t, "BLOCK_H": h}, num_warps=w)
                        for t, h, w in shapes}.values())
        _tuned[tuned_key] = triton.autotune(configs=configs, key=["n_tokens", "hidden", *key])(kernel)

    def grid(meta):
        tiles = triton.cdiv(n_tokens, meta["BLOCK_T"])
        return (tiles, triton.cdiv(hidden, meta["BLOCK_H"])) if split_h else (tiles,)

    _tuned[tuned_key][grid](*args, **flags)


def _operands(rows: torch.Tensor, position: torch.Tensor, kept: torch.Tensor | None, tokens: int, top_k: int):
    if position.numel() != tokens * top_k:
        raise ValueError(f"{position.numel()} row positions for {tokens} tokens x top-{top_k}")
    if kept is not None and kept.numel() != position.numel():
        raise ValueError(f"kept mask of {kept.numel()} entries for {position.numel()} assignments")
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    kept_u8 = None if kept is None else kept.reshape(-1).to(torch.uint8)
    return rows, position.reshape(-1).contiguous(), kept_u8


def combine_rows(rows: torch.Tensor, position: torch.Tensor, top_k: int, weight: torch.Tensor | None = None,
                 kept: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [T, H] = sum over each token's kept slots of weight * rows[position] (module docstring).

    ``rows`` [N, H]; ``position`` [T * k] (or [T, k]) int; ``weight`` [T, k] float or None (sum);
    ``kept`` [T, k] bool or None (all kept). Accumulates in float32, rounds once to ``out_dtype``
    (default: rows' dtype)."""
    tokens = position.numel() // max(top_k, 1)
    hidden = rows.shape[-1]
    rows, position, kept_u8 = _operands(rows, position, kept, tokens, top_k)
    out = torch.empty((tokens, hidden), dtype=out_dtype or rows.dtype, device=rows.device)
    if tokens == 0 or hidden == 0:
        return out
    if top_k == 0:
        return out.zero_()
    weights = None if weight is None else weight.reshape(-1).contiguous()
    record_launch("combine_rows")
    _launch(_combine_kernel, tokens, hidden,
            (rows, position, kept_u8 if kept_u8 is not None else position, weights if weights is not None else rows,
             out, tokens, hidden, rows.stride(0), out.stride(0)),
            dict(TOP_K=top_k, HAS_KEPT=kept_u8 is not None, HAS_WEIGHT=weights is not None),
            key=["TOP_K", "HAS_KEPT", "HAS_WEIGHT"], split_h=True)
    return out


def combine_rows_backward(rows: torch.Tensor, dy: torch.Tensor, position: torch.Tensor, weight: torch.Tensor,
                          top_k: int, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_rows [N, H] in rows' dtype, d_weight [T, k] float32) of `combine_rows` for dy [T, H]."""
    return _backward(rows, dy, position, weight, top_k, kept)


def combine_gate_grads(rows: torch.Tensor, dy: torch.Tensor, position: torch.Tensor, top_k: int,
                       kept: torch.Tensor | None = None) -> torch.Tensor:
    """d_weight [T, k] float32 of `combine_rows` alone: each kept slot's row . dy[t] (0 where dropped).

    With `combine_rows_grad` the two halves of `combine_rows_backward`, for a caller that frees the rows
    (read here only) before the rows' gradient exists."""
    ones = torch.ones(position.numel(), dtype=torch.float32, device=rows.device)
    return _backward(rows, dy, position, ones, top_k, kept, write_rows=False)[1]


def combine_rows_grad(dy: torch.Tensor, position: torch.Tensor, weight: torch.Tensor, top_k: int, n_rows: int,
                      dtype: torch.dtype, kept: torch.Tensor | None = None) -> torch.Tensor:
    """d_rows [n_rows, H] in ``dtype``: the rows' half of `combine_rows_backward`, bit for bit; reads no rows."""
    return _spread(dy, position, weight, top_k, n_rows, dtype, kept, "combine_rows_grad")


def spread_rows(x: torch.Tensor, position: torch.Tensor, top_k: int, n_rows: int,
                kept: torch.Tensor | None = None) -> torch.Tensor:
    """[n_rows, H]: row position[t, j] = x[t] for each kept slot, 0 for a dropped one; x's rows in the sorted
    order (x[row_token] where every slot is kept), each token read once."""
    return _spread(x, position, None, top_k, n_rows, x.dtype, kept, "spread_rows")


#: `_spread_kernel`'s launch on a GPU: (tokens per program, columns, warps). The best of seven shapes on the H200
#: at the logbook's top-8 shape (2026-12-02), all within 4% of it: 0.325 ms, 3.7 TB/s, against 0.549 for torch's
#: gather x[row_token] and 0.415 for the combine backward kernel's rows-only pass.
SPREAD_BLOCKS = (1, 2048, 4)


def _spread(src: torch.Tensor, position: torch.Tensor, weight: torch.Tensor | None, top_k: int, n_rows: int,
            dtype: torch.dtype, kept: torch.Tensor | None, name: str) -> torch.Tensor:
    tokens, hidden = src.shape
    out = torch.empty((n_rows, hidden), dtype=dtype, device=src.device)
    if out.numel() == 0 or tokens == 0 or top_k == 0:
        return out.zero_()
    _, position, kept_u8 = _operands(out, position, kept, tokens, top_k)
    src = src if src.stride(-1) == 1 else src.contiguous()
    weights = None if weight is None else weight.reshape(-1).contiguous()
    width = next_power_of_2(hidden)
    block_t, block_h, warps = (32, min(width, 1024), 4) if INTERPRETED else (
        SPREAD_BLOCKS[0], min(width, SPREAD_BLOCKS[1]), SPREAD_BLOCKS[2])
    record_launch(name)
    _spread_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_h))](
        src, position, kept_u8 if kept_u8 is not None else position, weights if weights is not None else src, out,
        tokens, hidden, src.stride(0), out.stride(0), TOP_K=top_k, HAS_KEPT=kept_u8 is not None,
        HAS_WEIGHT=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps)
    return out


def _backward(rows: torch.Tensor, dy: torch.Tensor, position: torch.Tensor, weight: torch.Tensor, top_k: int,
              kept: torch.Tensor | None, write_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel's launch: (d_rows, d_weight); d_rows (shaped like ``rows``) is ``rows`` itself,
    unwritten, without ``write_rows``."""
    tokens, hidden = dy.shape
    rows, position, kept_u8 = _operands(rows, position, kept, tokens, top_k)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    d_rows = torch.empty_like(rows) if write_rows else rows
    d_weight = torch.zeros((tokens, top_k), dtype=torch.float32, device=rows.device)
    if tokens == 0 or top_k == 0 or hidden == 0:
        return d_rows.zero_() if write_rows else d_rows, d_weight
    record_launch("combine_rows_backward" if write_rows else "combine_gate_grads")
    _launch(_combine_backward_kernel, tokens, hidden,
            (rows, dy, position, kept_u8 if kept_u8 is not None else position, weight.reshape(-1).contiguous(),
             d_rows, d_weight, tokens, hidden, rows.stride(0), dy.stride(0), d_rows.stride(0)),
            dict(TOP_K=top_k, HAS_KEPT=kept_u8 is not None, WRITE_ROWS=write_rows),
            key=["TOP_K", "HAS_KEPT", "WRITE_ROWS"], split_h=False)
    return d_rows, d_weight
