"""Triton SwiGLU kernels of the torch_triton backend, fused with the per-row int8 quantization.

Forward, for a = x W13 [R, 2F] (gate = first F columns, up = last F):

    h = silu(a_gate) * a_up,  and optionally its per-row int8 codes q = clip(rint(h / s), -127, 127)
    with s = amax(|h_row|) / 127 (1 where that is 0); the stored hidden is h, or Q(h)'s values q * s

Backward, for the hidden's cotangent d_h [R, F] (silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)):

    d_a = [d_h * a_up * silu'(a_gate), d_h * silu(a_gate)],  and optionally Q(d_a) per row
    (the prequant VJP quantizes d_a per token before the int8 product with W13^T).

Both do all arithmetic in float32 and quantize the float32 values (before any rounding to the
storage dtype). When a row fits one block (F <= 4096 on a GPU) it is read once and kept in
registers; otherwise a first pass finds the row's amax and a second recomputes and writes — a
program never reads back what it wrote, so no barrier is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import common
from ..common import is_interpreted_kernel, next_power_of_2, record_launch, round_half_even
from .quant import _row_scale


@triton.jit
def _gate_up(a_ptr, rows64, cols, mask, stride_a, ffn):
    gate = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(a_ptr + rows64[:, None] * stride_a + (cols + ffn)[None, :], mask=mask, other=0.0).to(tl.float32)
    return gate, up


@triton.jit
def _hidden(a_ptr, rows64, cols, mask, stride_a, ffn):
    gate, up = _gate_up(a_ptr, rows64, cols, mask, stride_a, ffn)
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _codes(v, scale):
    return tl.minimum(tl.maximum(round_half_even(v / scale[:, None]), -127.0), 127.0).to(tl.int8)


@triton.jit
def _swiglu_forward_kernel(a_ptr, h_ptr, codes_ptr, scale_ptr, n_rows, ffn, stride_a, stride_h, stride_c,
                           STORE_H: tl.constexpr, QUANTIZE: tl.constexpr, DEQUANTIZED: tl.constexpr,
                           ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < ffn)[None, :]
        h = _hidden(a_ptr, rows64, cols, mask, stride_a, ffn)
        if QUANTIZE:
            scale = _row_scale(tl.max(tl.abs(h), axis=1))
            codes = _codes(h, scale)
            tl.store(codes_ptr + rows64[:, None] * stride_c + cols[None, :], codes, mask=mask)
            tl.store(scale_ptr + rows, scale, mask=row_ok)
            if DEQUANTIZED:  # Q(h)'s values: `dequantize_rows`'s float32 product
                h = codes.to(tl.float32) * scale[:, None]
        if STORE_H:
            tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        scale = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
        if QUANTIZE:
            amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for start in range(0, ffn, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                mask = row_ok[:, None] & (cols < ffn)[None, :]
                amax = tl.maximum(amax, tl.max(tl.abs(_hidden(a_ptr, rows64, cols, mask, stride_a, ffn)), axis=1))
            scale = _row_scale(amax)
            tl.store(scale_ptr + rows, scale, mask=row_ok)
        for start in range(0, ffn, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < ffn)[None, :]
            h = _hidden(a_ptr, rows64, cols, mask, stride_a, ffn)
            if QUANTIZE:
                codes = _codes(h, scale)
                tl.store(codes_ptr + rows64[:, None] * stride_c + cols[None, :], codes, mask=mask)
                if DEQUANTIZED:
                    h = codes.to(tl.float32) * scale[:, None]
            if STORE_H:
                tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_grads(a_ptr, dh_ptr, rows64, cols, mask, stride_a, stride_dh, ffn):
    gate, up = _gate_up(a_ptr, rows64, cols, mask, stride_a, ffn)
    d_h = tl.load(dh_ptr + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    return d_h * up * s * (1.0 + gate * (1.0 - s)), d_h * gate * s


@triton.jit
def _store_grads(a_ptr, da_ptr, da_row, cols, ffn, d_gate, d_up, mask, IN_PLACE: tl.constexpr):
    """d_a's gate and up halves, rounded to the dtype of the tensor they go to (a's, in place)."""
    if IN_PLACE:
        out_ty = a_ptr.dtype.element_ty
    else:
        out_ty = da_ptr.dtype.element_ty
    tl.store(da_row + cols[None, :], d_gate.to(out_ty), mask=mask)
    tl.store(da_row + (cols + ffn)[None, :], d_up.to(out_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(a_ptr, dh_ptr, da_ptr, codes_ptr, scale_ptr, n_rows, ffn,
                            stride_a, stride_dh, stride_da, stride_c,
                            QUANTIZE: tl.constexpr, ONE_PASS: tl.constexpr, IN_PLACE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    # In place, d_a goes through a's own pointer (one argument, no aliasing between two): a program owns
    # its rows, and in each column block it reads gate and up before writing their gradients there.
    if IN_PLACE:
        da_row = a_ptr + rows64[:, None] * stride_a
    else:
        da_row = da_ptr + rows64[:, None] * stride_da
    codes_row = codes_ptr + rows64[:, None] * stride_c
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < ffn)[None, :]
        d_gate, d_up = _swiglu_grads(a_ptr, dh_ptr, rows64, cols, mask, stride_a, stride_dh, ffn)
        if IN_PLACE:
            tl.debug_barrier()  # every thread's loads of these rows are done before any thread stores
        _store_grads(a_ptr, da_ptr, da_row, cols, ffn, d_gate, d_up, mask, IN_PLACE)
        if QUANTIZE:
            scale = _row_scale(tl.maximum(tl.max(tl.abs(d_gate), axis=1), tl.max(tl.abs(d_up), axis=1)))
            tl.store(codes_row + cols[None, :], _codes(d_gate, scale), mask=mask)
            tl.store(codes_row + (cols + ffn)[None, :], _codes(d_up, scale), mask=mask)
            tl.store(scale_ptr + rows, scale, mask=row_ok)
    else:
        scale = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
        if QUANTIZE:
            amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for start in range(0, ffn, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                mask = row_ok[:, None] & (cols < ffn)[None, :]
                d_gate, d_up = _swiglu_grads(a_ptr, dh_ptr, rows64, cols, mask, stride_a, stride_dh, ffn)
                amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(d_gate), axis=1), tl.max(tl.abs(d_up), axis=1)))
            scale = _row_scale(amax)
            tl.store(scale_ptr + rows, scale, mask=row_ok)
        for start in range(0, ffn, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < ffn)[None, :]
            d_gate, d_up = _swiglu_grads(a_ptr, dh_ptr, rows64, cols, mask, stride_a, stride_dh, ffn)
            if IN_PLACE:
                tl.debug_barrier()
            _store_grads(a_ptr, da_ptr, da_row, cols, ffn, d_gate, d_up, mask, IN_PLACE)
            if QUANTIZE:
                tl.store(codes_row + cols[None, :], _codes(d_gate, scale), mask=mask)
                tl.store(codes_row + (cols + ffn)[None, :], _codes(d_up, scale), mask=mask)


INTERPRETED: bool = is_interpreted_kernel(_swiglu_forward_kernel)

#: Widest row a GPU program keeps in registers (4096 float32 per array over 8-16 warps).
_ONE_PASS_MAX = 4096


#: (rows per program, warps) the GPU's one-pass launches are tuned over, where a block of rows x F
#: float32 values per array still fits the registers (at most 8192 per array).
_ROW_CONFIGS = ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 8), (4, 16))

_tuned: dict[tuple, object] = {}


def _launch(kernel, n_rows: int, ffn: int, args: tuple, flags: dict, key: list[str], restore: tuple[str, ...]) -> None:
    """Launch ``kernel`` over ``n_rows`` rows: tuned over `_ROW_CONFIGS` on a GPU for large one-pass
    problems (keyed on the rows, F and ``key``'s flags; ``restore``: arguments the kernel writes over,
    put back between trial runs), else with `_launch_shape`'s fixed shape. Every shape gives the same
    values bit for bit: rows are independent and a row's amax is a max."""
    one_pass, block_r, block_c, warps = _launch_shape(ffn)
    if INTERPRETED or not one_pass or n_rows * ffn < common.TUNE_MIN_ELEMENTS:
        kernel[(triton.cdiv(n_rows, block_r),)](*args, **flags, ONE_PASS=one_pass, BLOCK_R=block_r, BLOCK_C=block_c,
                                                num_warps=warps)
        return
    tuned_key = (kernel, restore, block_c)
    if tuned_key not in _tuned:
        configs = [triton.Config({"BLOCK_R": rows}, num_warps=warps) for rows, warps in _ROW_CONFIGS
                   if rows * block_c <= 8192]
        _tuned[tuned_key] = triton.autotune(configs=configs, key=["n_rows", "ffn", *key],
                                            restore_value=list(restore))(kernel)
    _tuned[tuned_key][lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)](
        *args, **flags, ONE_PASS=True, BLOCK_C=block_c)


def _launch_shape(ffn: int) -> tuple[bool, int, int, int]:
    """(one pass, rows per program, columns per block, warps). The interpreter takes many rows per
    program (each program is a Python call); a GPU one row, the whole row when it fits."""
    width = next_power_of_2(ffn)
    if INTERPRETED:
        return width <= 1024, 32, min(width, 1024), 4
    if width <= _ONE_PASS_MAX:
        return True, 1, width, max(4, min(16, width // 256))
    return False, 4, 512, 4


def swiglu_forward(a: torch.Tensor, store_h: bool = True, quantize: bool = True, dequantized: bool = False
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """h [R, F] (a's dtype; None unless ``store_h``) and, with ``quantize``, int8 codes [R, F] and
    float32 scales [R] of h, for a [R, 2F].

    ``dequantized`` (with ``quantize``): the stored hidden is Q(h)'s values, codes * scale rounded once to a's
    dtype, bit for bit what `quant.dequantize_rows` makes of the codes (the straight-through backward's
    d_w2 = Q(h)^T g), written from registers instead of by a later pass that reads the codes."""
    if dequantized and not quantize:
        raise ValueError("swiglu_forward: dequantized stores Q(h), which needs quantize")
    rows, two_f = a.shape
    ffn = two_f // 2
    a = a if a.stride(-1) == 1 else a.contiguous()
    h = torch.empty((rows, ffn), dtype=a.dtype, device=a.device) if store_h else None
    codes = torch.empty((rows, ffn), dtype=torch.int8, device=a.device) if quantize else None
    scale = torch.ones((rows,), dtype=torch.float32, device=a.device) if quantize else None
    if rows == 0 or ffn == 0 or not (store_h or quantize):
        return h, codes, scale
    record_launch("swiglu_quantize_rows" if quantize else "swiglu")
    dummy = h if h is not None else codes
    _launch(_swiglu_forward_kernel, rows, ffn,
            (a, h if store_h else dummy, codes if quantize else dummy, scale if quantize else dummy, rows, ffn,
             a.stride(0), h.stride(0) if store_h else 0, codes.stride(0) if quantize else 0),
            dict(STORE_H=store_h, QUANTIZE=quantize, DEQUANTIZED=dequantized and store_h),
            key=["STORE_H", "QUANTIZE", "DEQUANTIZED"], restore=())
    return h, codes, scale


def swiglu_backward(a: torch.Tensor, d_h: torch.Tensor, quantize: bool = False, in_place: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """d_a [R, 2F] (a's dtype) for a [R, 2F] and d_h [R, F]; with ``quantize`` also Q(d_a) per row.

    ``in_place``: d_a is written over a (returned as that same tensor), for a caller that is done with a:
    the backward's largest buffer then never exists twice (2 GiB at the logbook shape, top-8)."""
    rows, two_f = a.shape
    ffn = two_f // 2
    if in_place and a.stride(-1) != 1:
        raise ValueError("swiglu_backward(in_place=True) needs a with unit column stride")
    a = a if a.stride(-1) == 1 else a.contiguous()
    d_h = d_h if d_h.stride(-1) == 1 else d_h.contiguous()
    d_a = a if in_place else torch.empty_like(a)
    codes = torch.empty((rows, two_f), dtype=torch.int8, device=a.device) if quantize else None
    scale = torch.ones((rows,), dtype=torch.float32, device=a.device) if quantize else None
    if rows == 0 or ffn == 0:
        return d_a.zero_(), codes, scale
    record_launch("swiglu_backward_quantize_rows" if quantize else "swiglu_backward")
    _launch(_swiglu_backward_kernel, rows, ffn,
            (a, d_h, d_h if in_place else d_a, codes if quantize else d_h, scale if quantize else d_h, rows, ffn,
             a.stride(0), d_h.stride(0), d_a.stride(0), codes.stride(0) if quantize else 0),
            dict(QUANTIZE=quantize, IN_PLACE=in_place), key=["QUANTIZE", "IN_PLACE"],
            restore=("a_ptr",) if in_place else ())
    return d_a, codes, scale
