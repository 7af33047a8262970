"""Triton quantization kernels of the torch_triton backend.

* `quantize_rows`: symmetric int8 per row (per token): s_r = amax_r / 127 (1 where amax_r = 0),
  q = clip(rint(v / s_r), -127, 127). Activations and output gradients go through it.
* (the SwiGLU hidden and its gradient, fused with the same per-row int8, are in `kernels.swiglu`)
* `quantize_per_expert`: one scale per expert matrix (amax over the whole matrix), codes written in
  the layout the grouped GEMM reads them in.
* `fake_quant_rows`: the QAT exporter's per-row rule, fused: for each output channel (a column of a
  [.., in, out] weight) clip_abs = amax over the input axis (or a given clip quantile),
  s = max(clip_abs / 127, floor), q = clip(rint(clip(w, +-clip_abs) / s), -127, 127); writes the
  fake-quantized values q * s (training) and/or the codes (export) and the scales.

All arithmetic is float32 whatever the storage dtype. Every wrapper records its launch in
`LAUNCHES` and launches nothing for an empty tensor (a zero-row expert, a zero-size grid).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import common
from ..common import INT8_MAX, is_interpreted_kernel, next_power_of_2, record_launch, round_half_even

# -- kernels --------------------------------------------------------------------------------------

@triton.jit
def _row_scale(amax):
    """amax / 127, and 1 where that is 0: an all-zero row (the suite's zero rows) quantizes to codes
    0, never 0/0; so does a row whose amax is so small (a float32 denormal, e.g. the gradient through
    a saturated SiLU) that amax / 127 underflows, where v / 0 would give inf."""
    scale = amax / 127.0
    return tl.where(scale > 0.0, scale, 1.0)


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, dest_ptr, weight_ptr, n_rows, n_cols, stride_x, stride_c,
                          COPIES: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """Rows [BLOCK_R] per program: amax pass, then a quantize pass over the columns. COPIES = 0: row r's codes and
    scale go to row r; else to each of the rows dest[r * COPIES + j], j < COPIES (the scatter is free: the codes
    are in registers, and each copy is written once anyway), that copy's scale times weight[r * COPIES + j] with
    HAS_WEIGHT."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    scale = _row_scale(amax)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(round_half_even(v / scale[:, None]), -127.0), 127.0).to(tl.int8)
        if COPIES == 0:
            tl.store(codes_ptr + rows64[:, None] * stride_c + cols[None, :], q, mask=mask)
        else:
            for j in tl.static_range(COPIES):
                dest = tl.load(dest_ptr + rows64 * COPIES + j, mask=row_ok, other=0).to(tl.int64)
                tl.store(codes_ptr + dest[:, None] * stride_c + cols[None, :], q, mask=mask)
    if COPIES == 0:
        tl.store(scale_ptr + rows, scale, mask=row_ok)
    else:
        for j in tl.static_range(COPIES):
            dest = tl.load(dest_ptr + rows64 * COPIES + j, mask=row_ok, other=0).to(tl.int64)
            if HAS_WEIGHT:
                weight = tl.load(weight_ptr + rows64 * COPIES + j, mask=row_ok, other=0.0).to(tl.float32)
                tl.store(scale_ptr + dest, scale * weight, mask=row_ok)
            else:
                tl.store(scale_ptr + dest, scale, mask=row_ok)


@triton.jit
def _quantize_with_scale_kernel(w_ptr, codes_ptr, scale_ptr, n_r, n_c,
                                stride_we, stride_wr, stride_wc, stride_ce, stride_cr, stride_cc,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """codes[e] = clip(rint(w[e] / scale[e]), -127, 127), written with the output's own strides."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_r)[:, None] & (cols < n_c)[None, :]
    scale = tl.load(scale_ptr + e)
    w = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wr + cols[None, :] * stride_wc,
                mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(round_half_even(w / scale), -127.0), 127.0)
    tl.store(codes_ptr + e * stride_ce + rows[:, None] * stride_cr + cols[None, :] * stride_cc, q.to(tl.int8),
             mask=mask)


@triton.jit
def _dequantize_rows_kernel(codes_ptr, scale_ptr, out_ptr, n_rows, n_cols, rows_per_scale, stride_c, stride_o,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r] = codes[r] * scale[r // rows_per_scale], the float32 product rounded once to out's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)
    scale = tl.load(scale_ptr + rows64 // rows_per_scale, mask=row_ok, other=0.0)
    codes = tl.load(codes_ptr + rows64[:, None] * stride_c + cols[None, :], mask=mask, other=0)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :],
             (codes.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_rows_kernel(w_ptr, values_ptr, codes_ptr, scale_ptr, clip_ptr, n_batch, n_in, n_out,
                            stride_wb, stride_wi, stride_wo, stride_vb, stride_vi, stride_vo, scale_floor,
                            HAS_CLIP: tl.constexpr, WRITE_VALUES: tl.constexpr, WRITE_CODES: tl.constexpr,
                            FLAT_BATCH: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    """One block of output channels: scale from amax (or the given clip), then clip, round, and
    write q * s and/or q. Codes share the values' strides.

    A block is ``BLOCK_O`` channels of matrix ``program_id(1)``; with ``FLAT_BATCH`` (interpreter
    only: one program can then cover every matrix) it is ``BLOCK_O`` of the ``batch * n_out``
    channels of all matrices, each column finding its matrix by division.
    """
    if FLAT_BATCH:
        flat = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        col_ok = flat < n_batch * n_out
        b = (flat // n_out).to(tl.int64)
        cols = flat % n_out
        channel = flat
    else:
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        col_ok = cols < n_out
        channel = b * n_out + cols
    w_cols = w_ptr + b * stride_wb + cols * stride_wo
    v_cols = b * stride_vb + cols * stride_vo
    if HAS_CLIP:
        clip_abs = tl.load(clip_ptr + channel, mask=col_ok, other=0.0)
    else:
        clip_abs = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for start in range(0, n_in, BLOCK_I):
            ins = start + tl.arange(0, BLOCK_I)
            mask = (ins < n_in)[:, None] & col_ok[None, :]
            w = tl.load(w_cols[None, :] + ins[:, None] * stride_wi, mask=mask, other=0.0).to(tl.float32)
            clip_abs = tl.maximum(clip_abs, tl.max(tl.abs(w), axis=0))
    # The exporter's floor (1/127): a row of small weights keeps a step of 1/127, so training sees
    # the same coarse grid the int8 checkpoint will have (review finding 4: same rule both sides).
    scale = tl.maximum(clip_abs / 127.0, scale_floor)
    for start in range(0, n_in, BLOCK_I):
        ins = start + tl.arange(0, BLOCK_I)
        mask = (ins < n_in)[:, None] & col_ok[None, :]
        w = tl.load(w_cols[None, :] + ins[:, None] * stride_wi, mask=mask, other=0.0).to(tl.float32)
        if HAS_CLIP:
            w = tl.minimum(tl.maximum(w, -clip_abs[None, :]), clip_abs[None, :])
        q = tl.minimum(tl.maximum(round_half_even(w / scale[None, :]), -127.0), 127.0)
        offsets = v_cols[None, :] + ins[:, None] * stride_vi
        if WRITE_VALUES:
            tl.store(values_ptr + offsets, (q * scale[None, :]).to(values_ptr.dtype.element_ty), mask=mask)
        if WRITE_CODES:
            tl.store(codes_ptr + offsets, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + channel, scale, mask=col_ok)


#: True when these kernels run in Triton's interpreter (fixed at this module's import).
INTERPRETED: bool = is_interpreted_kernel(_quantize_rows_kernel)


# -- wrappers -------------------------------------------------------------------------------------

def _row_blocks(n_cols: int) -> tuple[int, int]:
    """(rows, columns) per program: few large programs in the interpreter, where each program is a
    Python call; on a GPU a few rows of at most 1024 columns (16 values per thread at 4 warps)."""
    if INTERPRETED:
        return 32, min(next_power_of_2(n_cols), 1024)
    return 4, min(next_power_of_2(n_cols), 512)


def quantize_rows(x: torch.Tensor, dest: torch.Tensor | None = None, weight: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of x [R, C]: codes int8 [R, C], scales float32 [R].

    ``dest`` [R, k] (row indices, a permutation of 0 .. R k - 1): row r's codes and scale are written to rows
    ``dest[r, 0 .. k-1]`` of [R k, C] codes and [R k] scales instead: the layer's tokens quantized once and placed
    in expert order (``dest`` = the dispatch plan's inverse), where a copy of the codes would read and write them
    again. ``weight`` [R, k] (with ``dest``): copy j's scale is multiplied by weight[r, j], which makes them the
    per-row int8 of the rows weight[r, j] * x[r] (a row's amax scales by |weight| and its codes do not change; a
    negative weight gives a negative scale, the same values as the codes negated): the combine's gradient rows
    g = gate * dy[token], quantized from dy without reading g."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-d tensor, got shape {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    copies, out_rows = 0, rows
    if dest is not None:
        if dest.dim() != 2 or dest.shape[0] != rows:
            raise ValueError(f"quantize_rows: dest must be [{rows}, k], got {tuple(dest.shape)}")
        copies, out_rows = dest.shape[1], dest.numel()
        dest = dest.contiguous()
    if weight is not None:
        if dest is None or weight.shape != dest.shape:
            raise ValueError("quantize_rows: weight scales the copies: it needs dest, and dest's shape")
        weight = weight.to(torch.float32).contiguous()
    codes = torch.empty((out_rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((out_rows,), dtype=torch.float32, device=x.device)
    if codes.numel() == 0:
        return codes, scale.fill_(1.0)
    block_r, block_c = _row_blocks(cols)
    record_launch("quantize_rows" if dest is None else "quantize_rows_scattered")
    _quantize_rows_kernel[(triton.cdiv(rows, block_r),)](
        x, codes, scale, dest if dest is not None else scale, weight if weight is not None else scale, rows, cols,
        x.stride(0), codes.stride(0), COPIES=copies, HAS_WEIGHT=weight is not None, BLOCK_R=block_r,
        BLOCK_C=block_c)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows_per_scale: int = 1
                    ) -> torch.Tensor:
    """[R, C] ``codes[r] * scale[r // rows_per_scale]`` in ``dtype`` (float32 product, one rounding).

    A Triton kernel, as torch's int8 x float32 -> bfloat16 multiply is not one: it runs the casting
    elementwise path (9.7 ms of a 42 ms int8_routed training step on the H200, most of it on the
    weights' K-major views)."""
    if codes.dim() != 2 or codes.stride(-1) != 1:
        raise ValueError(f"dequantize_rows takes 2-d codes with unit column stride, got {tuple(codes.stride())}")
    n_rows, n_cols = codes.shape
    out = torch.empty((n_rows, n_cols), dtype=dtype, device=codes.device)
    if out.numel() == 0:
        return out
    scale = scale.reshape(-1).to(torch.float32).contiguous()
    width = next_power_of_2(n_cols)
    args = (codes, scale, out, n_rows, n_cols, rows_per_scale, codes.stride(0), out.stride(0))
    record_launch("dequantize_rows")
    if INTERPRETED or out.numel() < common.TUNE_MIN_ELEMENTS:
        block_r, block_c = (32, min(width, 1024)) if INTERPRETED else (8, min(width, 512))
        _dequantize_rows_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))](
            *args, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
        return out

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(n_cols, meta["BLOCK_C"]))

    _tuned_dequantize_rows()[grid](*args)
    return out


@functools.cache
def _tuned_dequantize_rows():
    """The dequantization autotuned over tiles: int8_routed's straight-through backward makes both projections'
    float weights and x's rows every step (1.1 ms of its 31 ms at the logbook shape, top-8, on the H200, at
    8 x 512 tiles, ~3.6 TB/s). An elementwise map: every tile gives the same values."""
    tiles = ((8, 512, 4), (16, 512, 4), (4, 1024, 4), (8, 1024, 4), (8, 1024, 8), (16, 1024, 8), (32, 512, 8),
             (4, 2048, 8))
    return _autotuned_tiles(_dequantize_rows_kernel, tiles, ["n_rows", "n_cols", "rows_per_scale"])


def dequantize_experts(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stacked expert codes [E, A, B] (any layout whose storage is dense, e.g. a K-major view) times one
    scale per expert, in ``dtype``, returned in the codes' own layout (so reading it costs what reading
    the codes does: no transposing copy)."""
    experts = codes.shape[0]
    order = sorted(range(3), key=lambda d: -codes.stride(d))
    physical = codes.permute(*order)
    if order[0] != 0 or not physical.is_contiguous():
        raise ValueError(f"dequantize_experts wants expert-major dense codes, got strides {codes.stride()}")
    flat = physical.reshape(-1, physical.shape[-1])
    out = dequantize_rows(flat, scale, dtype, rows_per_scale=max(1, flat.shape[0] // max(experts, 1)))
    inverse = [order.index(d) for d in range(3)]
    return out.view(physical.shape).permute(*inverse)


def per_expert_scale(w: torch.Tensor) -> torch.Tensor:
    """s_e = amax(|w_e|) / 127 over each whole expert matrix, 1 where that is 0 (an all-zero matrix)."""
    if w.numel() == 0:
        return torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
    # One reduction, exact in w's dtype (a max of magnitudes rounds nothing): w.abs().amax() would first
    # write |w|, a temporary of the weights' size (22 GiB at DeepSeek-V3), and read it back.
    amax = torch.linalg.vector_norm(w.detach(), ord=float("inf"), dim=(-2, -1))
    scale = amax.to(torch.float32) / INT8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_per_expert(w: torch.Tensor, k_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of stacked expert weights w [E, R, C] with one scale per expert (float32 [E]).

    The codes come back as an [E, R, C] tensor; with ``k_major`` its storage is [E, C, R] (R, the
    contraction axis of ``x @ w``, contiguous), the layout the Hopper int8 tensor-core path wants for
    the B operand. Without it, storage is [E, R, C], which is K-major for the transposed product
    ``g @ w^T`` of the prequant backward.
    """
    experts, n_r, n_c = w.shape
    scale = per_expert_scale(w)
    if k_major:
        codes = torch.empty((experts, n_c, n_r), dtype=torch.int8, device=w.device).transpose(1, 2)
    else:
        codes = torch.empty((experts, n_r, n_c), dtype=torch.int8, device=w.device)
    if w.numel() == 0:
        return codes, scale
    record_launch("quantize_per_expert")
    args = (w, codes, scale, n_r, n_c, *w.stride(), *codes.stride())
    if INTERPRETED or w.numel() < common.TUNE_MIN_ELEMENTS:
        block = 32 if INTERPRETED else 64
        _quantize_with_scale_kernel[(triton.cdiv(n_c, block), triton.cdiv(n_r, block), experts)](
            *args, BLOCK_R=block, BLOCK_C=block)
        return codes, scale

    def grid(meta):
        return (triton.cdiv(n_c, meta["BLOCK_C"]), triton.cdiv(n_r, meta["BLOCK_R"]), experts)

    _tuned_quantize_with_scale()[grid](*args)
    return codes, scale


@functools.cache
def _tuned_quantize_with_scale():
    """The per-expert quantization autotuned over tiles (int8_routed quantizes both projections every step:
    1.35 ms of its 9.2 ms forward at the logbook shape, top-8, on the H200 with 64 x 64 tiles). A transposing
    store (K-major codes) writes BLOCK_R bytes per column; an elementwise map, every tile gives the same codes."""
    tiles = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (256, 64, 8), (64, 256, 8), (256, 128, 8))
    return _autotuned_tiles(_quantize_with_scale_kernel, tiles, ["n_r", "n_c", "stride_wr", "stride_cr"])


def _autotuned_tiles(kernel, tiles: tuple[tuple[int, int, int], ...], key: list[str]):
    """``kernel`` autotuned over (BLOCK_R, BLOCK_C, warps) ``tiles``, keyed on its arguments ``key``."""
    configs = [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w) for r, c, w in tiles]
    return triton.autotune(configs=configs, key=key)(kernel)


def fake_quant_rows(w: torch.Tensor, scale_floor: float, clip_abs: torch.Tensor | None = None,
                    write_values: bool = True, write_codes: bool = False
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The QAT exporter's per-row rule on w [in, out] or [B, in, out] (rows = output channels).

    Returns (fake-quantized values in w's dtype or None, int8 codes or None, float32 scales shaped
    like w with the input axis kept as 1). ``clip_abs`` ([B, out] or [out]) replaces the amax when
    a clip quantile is in force; it is computed by the caller with the exporter's quantile rule.
    """
    squeeze = w.dim() == 2
    w3 = (w.unsqueeze(0) if squeeze else w).contiguous()
    batch, n_in, n_out = w3.shape
    values = torch.empty_like(w3) if write_values else None
    codes = torch.empty(w3.shape, dtype=torch.int8, device=w.device) if write_codes else None
    scale = torch.empty((batch, 1, n_out), dtype=torch.float32, device=w.device)
    if w3.numel() > 0:
        target = values if values is not None else codes
        if values is not None and codes is not None and values.stride() != codes.stride():
            raise AssertionError("values and codes must share strides")
        clip = None if clip_abs is None else clip_abs.reshape(batch, n_out).to(torch.float32).contiguous()
        # Interpreter: as few programs as possible (each is a Python call, and per-op overhead
        # dominates), so all matrices' channels in one flat block; GPU: 64 x 128 tiles of one
        # matrix, coalesced along the output axis.
        if INTERPRETED:
            block_i, block_o = min(next_power_of_2(n_in), 256), min(next_power_of_2(batch * n_out), 8192)
            grid = (triton.cdiv(batch * n_out, block_o), 1)
        else:
            block_i, block_o = 64, 128
            grid = (triton.cdiv(n_out, block_o), batch)
        record_launch("fake_quant_rows")
        _fake_quant_rows_kernel[grid](
            w3, target, codes if codes is not None else target, scale, clip if clip is not None else scale,
            batch, n_in, n_out, *w3.stride(), *target.stride(), float(scale_floor),
            HAS_CLIP=clip is not None, WRITE_VALUES=write_values, WRITE_CODES=write_codes,
            FLAT_BATCH=INTERPRETED, BLOCK_I=block_i, BLOCK_O=block_o)
    if squeeze:
        return (None if values is None else values[0], None if codes is None else codes[0], scale[0])
    return values, codes, scale
