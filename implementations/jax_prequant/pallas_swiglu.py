"""The SwiGLU between the routed projections with its per-row int8 quantization, one pass each way, as Pallas
kernels (Triton on GPU, interpreted on CPU).

    forward:  h = silu(gate) * up (a = [gate | up] [M, 2F]), rounded to the layer's dtype; Q(h) per row
    backward: d_a = [d_h * up * silu'(gate) | d_h * silu(gate)], rounded to the layer's dtype; Q(d_a) per row

Why (issue 15, H200, logbook top-8, int8_routed_prequant forward+backward): XLA split these into several
fusions, each a full pass over [M, 2F] or [M, F] rows, and materialized float32 intermediates the size of h
(the forward's SwiGLU wrote a float32 copy of h for the quantizer's second pass; the backward's silu gradient
a float32 [M, F] term): 7.2 ms of a 34 ms step, against 2.7 ms for torch_triton's fused Triton kernels.
Here each direction reads its inputs and writes its outputs once: a row up to BLOCK_COLS wide is one tile,
computed once; a wider one is swept twice (amax, then values and codes), the second sweep recomputing from
inputs it finds in L2.

Under XLA's int8 GEMM each kernel also takes the int32 sums of the product feeding it (a's in the forward,
d_h's in the backward) with each row's scale, and dequantizes them as it reads, as XLA would (the float32
product rounded once to the layer's dtype): no separate pass writes a or d_h (`grouped.int8_experts_combine`).

Semantics are those of `layer.swiglu` followed by `quant.quantize_rows`: the quantizer sees the values rounded
to the layer's dtype, float32 arithmetic throughout, round half to even. Pallas's Triton lowering has no
``round``: `round_half_even` builds it from ``floor`` (exact for the |v| <= 127 the quantizer rounds).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .quant import codes_at, scale_from_amax

#: Rows per program, columns per step, warps, pipeline stages: swept on the H200 at the logbook's top-8 shape
#: (M = 262144, F = 2048, bfloat16; results/h200/NEXT_RUN.md). One row of 2048 columns per program, 4 warps:
#: forward 1.03 ms (3.6 TB/s), backward with Q(d_a) 1.73 ms (3.7 TB/s), against 1.60 / 2.87 ms at the former
#: 4 rows x 1024 columns, whose two sweeps per row read the inputs twice. More rows per program or more warps
#: were slower (2 rows: 1.05 / 1.95 ms; 4 rows of 2048 on 8 warps: 1.17 / 3.55 ms, registers spilled).
BLOCK_ROWS = 1
BLOCK_COLS = 2048
NUM_WARPS = 4
NUM_STAGES = 1


def round_half_even(v: jax.Array) -> jax.Array:
    """rint(v) for |v| < 2^22, from floor: floor(v + 1/2), minus one where that was an odd tie."""
    up = jnp.floor(v + 0.5)
    odd = up - 2.0 * jnp.floor(up * 0.5) != 0.0
    return jnp.where((up - v == 0.5) & odd, up - 1.0, up)


def row_codes(values: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 codes of float32 ``values`` [R, C] at per-row ``scale`` [R, 1] (`quant.quantize_symmetric`'s rule)."""
    return codes_at(values, scale, rint=round_half_even)


def _silu(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(silu(x), sigmoid(x)) in float32."""
    sig = 1.0 / (1.0 + jnp.exp(-x))
    return x * sig, sig


def rounded(x: jax.Array, dtype, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """(float32 ``x`` rounded to ``dtype``, that value back in float32). Interpreted, the kernel is an XLA
    program, and XLA (``xla_allow_excess_precision``, on by default) drops a float32 -> bfloat16 -> float32
    round trip, so the quantizer would see unrounded values; ``reduce_precision`` it keeps. Triton keeps both."""
    low = x.astype(dtype)
    if not interpret or jnp.dtype(dtype) == jnp.float32:
        return low, low.astype(jnp.float32)
    info = jnp.finfo(dtype)
    return low, jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def once(body) -> None:
    """``body(0, carry)`` as a loop of one trip: its column offset is then traced, and a tile wider than F,
    which reaches past the array's end (masked), is not refused by the interpreter's static slice check."""
    jax.lax.fori_loop(0, 1, body, jnp.int32(0))


def block_columns(width: int, widest: int) -> int:
    """Columns per step over rows ``width`` wide: a power of two (Triton's tensors), at most ``widest``, no wider
    than needed."""
    return min(widest, max(16, pl.next_power_of_2(width)))


def launch_params(interpret: bool, num_warps: int, num_stages: int):
    """Triton launch options, or None for the interpreter."""
    return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tiles(ffn: int) -> tuple[int, int]:
    """(rows, columns) per block."""
    return BLOCK_ROWS, block_columns(ffn, BLOCK_COLS)


def _forward_kernel(a_ref, *refs, rows: int, ffn: int, block_cols: int, dequantize: bool, interpret: bool) -> None:
    """Rows r0 .. r0 + BLOCK_ROWS: h, then Q(h) (a row wider than one tile in two sweeps: amax, then codes).
    With ``dequantize``, ``a_ref`` holds the up projection's int32 sums, which the kernel scales by its row's
    ``row_scale`` and rounds to the layer's dtype (the a it also stores) before the SwiGLU."""
    if dequantize:
        row_scale_ref, h_ref, codes_ref, scale_ref, a_out_ref = refs
    else:
        h_ref, codes_ref, scale_ref = refs
    r0 = pl.program_id(0) * BLOCK_ROWS
    row_ok = r0 + jnp.arange(BLOCK_ROWS, dtype=jnp.int32) < rows
    if dequantize:
        row_scale = plgpu.load(row_scale_ref.at[pl.ds(r0, BLOCK_ROWS)], mask=row_ok, other=0.0)[:, None]

    def half(c0, mask):
        """a's columns c0 .. of one half: (in the layer's dtype or None, in float32)."""
        value = plgpu.load(a_ref.at[pl.ds(r0, BLOCK_ROWS), pl.ds(c0, block_cols)], mask=mask, other=0)
        if dequantize:
            return rounded(value.astype(jnp.float32) * row_scale, h_ref.dtype, interpret)
        return None, value.astype(jnp.float32)

    def h_block(c0):
        col_ok = c0 + jnp.arange(block_cols, dtype=jnp.int32) < ffn
        mask = row_ok[:, None] & col_ok[None, :]
        gate, up = half(c0, mask), half(ffn + c0, mask)
        h, h32 = rounded(_silu(gate[1])[0] * up[1], h_ref.dtype, interpret)
        return h, h32, mask, (gate[0], up[0])

    def store(c0, block, scale):
        h, h32, mask, (gate, up) = block
        plgpu.store(h_ref.at[pl.ds(r0, BLOCK_ROWS), pl.ds(c0, block_cols)], h, mask=mask)
        plgpu.store(codes_ref.at[pl.ds(r0, BLOCK_ROWS), pl.ds(c0, block_cols)], row_codes(h32, scale[:, None]),
                    mask=mask)
        if dequantize:
            plgpu.store(a_out_ref.at[pl.ds(r0, BLOCK_ROWS), pl.ds(c0, block_cols)], gate, mask=mask)
            plgpu.store(a_out_ref.at[pl.ds(r0, BLOCK_ROWS), pl.ds(ffn + c0, block_cols)], up, mask=mask)

    def amax_step(step, amax):
        h32 = h_block(step * block_cols)[1]
        return jnp.maximum(amax, jnp.max(jnp.abs(h32), axis=1))

    steps = pl.cdiv(ffn, block_cols)
    if steps == 1:  # the whole row in one tile: computed once, no second sweep
        def whole_row(c0, carry):
            block = h_block(c0)
            scale = scale_from_amax(jnp.max(jnp.abs(block[1]), axis=1))
            store(c0, block, scale)
            plgpu.store(scale_ref.at[pl.ds(r0, BLOCK_ROWS)], scale, mask=row_ok)
            return carry

        once(whole_row)
        return
    scale = scale_from_amax(jax.lax.fori_loop(0, steps, amax_step, jnp.zeros((BLOCK_ROWS,), jnp.float32)))

    def store_step(step, carry):
        store(step * block_cols, h_block(step * block_cols), scale)
        return carry

    jax.lax.fori_loop(0, steps, store_step, jnp.int32(0))
    plgpu.store(scale_ref.at[pl.ds(r0, BLOCK_ROWS)], scale, mask=row_ok)


def _backward_kernel(a_ref, d_h_ref, *refs, rows: int, ffn: int, block_cols: int, quantize: bool, dequantize: bool,
                     interpret: bool) -> None:
    """Rows r0 .. r0 + BLOCK_ROWS: d_a, and with ``quantize`` Q(d_a) (amax over both halves first). With
    ``dequantize``, ``d_h_ref`` holds int32 sums, scaled by the row's ``row_scale`` and rounded to the layer's
    dtype as they are read."""
    row_scale_ref, refs = (refs[0], refs[1:]) if dequantize else (None, refs)
    d_a_ref, codes_ref, scale_ref = refs if quantize else (refs[0], None, None)
    r0 = pl.program_id(0) * BLOCK_ROWS
    row_ok = r0 + jnp.arange(BLOCK_ROWS, dtype=jnp.int32) < rows
    dtype = d_a_ref.dtype
    if dequantize:
        d_h_scale = plgpu.load(row_scale_ref.at[pl.ds(r0, BLOCK_ROWS)], mask=row_ok, other=0.0)[:, None]

    def d_a_block(c0):
        col_ok = c0 + jnp.arange(block_cols, dtype=jnp.int32) < ffn
        mask = row_ok[:, None] & col_ok[None, :]
        rows_ = pl.ds(r0, BLOCK_ROWS)
        gate = plgpu.load(a_ref.at[rows_, pl.ds(c0, block_cols)], mask=mask, other=0.0).astype(jnp.float32)
        up = plgpu.load(a_ref.at[rows_, pl.ds(ffn + c0, block_cols)], mask=mask, other=0.0).astype(jnp.float32)
        d_h = plgpu.load(d_h_ref.at[rows_, pl.ds(c0, block_cols)], mask=mask, other=0).astype(jnp.float32)
        if dequantize:
            d_h = rounded(d_h * d_h_scale, dtype, interpret)[1]
        silu, sig = _silu(gate)
        d_gate = rounded(d_h * up * (sig + silu * (1.0 - sig)), dtype, interpret)
        d_up = rounded(d_h * silu, dtype, interpret)
        return d_gate, d_up, mask

    def _store_d_a(d_gate, d_up, c0, mask, scale):
        rows_ = pl.ds(r0, BLOCK_ROWS)
        plgpu.store(d_a_ref.at[rows_, pl.ds(c0, block_cols)], d_gate[0], mask=mask)
        plgpu.store(d_a_ref.at[rows_, pl.ds(ffn + c0, block_cols)], d_up[0], mask=mask)
        if quantize:
            plgpu.store(codes_ref.at[rows_, pl.ds(c0, block_cols)], row_codes(d_gate[1], scale[:, None]), mask=mask)
            plgpu.store(codes_ref.at[rows_, pl.ds(ffn + c0, block_cols)], row_codes(d_up[1], scale[:, None]),
                        mask=mask)

    steps = pl.cdiv(ffn, block_cols)
    scale = None
    if steps == 1:  # the whole row in one tile: computed once, no second sweep
        def whole_row(c0, carry):
            d_gate, d_up, mask = d_a_block(c0)
            row_scale = None
            if quantize:
                row_scale = scale_from_amax(jnp.max(jnp.maximum(jnp.abs(d_gate[1]), jnp.abs(d_up[1])), axis=1))
                plgpu.store(scale_ref.at[pl.ds(r0, BLOCK_ROWS)], row_scale, mask=row_ok)
            _store_d_a(d_gate, d_up, c0, mask, row_scale)
            return carry

        once(whole_row)
        return
    if quantize:
        def amax_step(step, amax):
            (_, d_gate), (_, d_up), _ = d_a_block(step * block_cols)
            both = jnp.maximum(jnp.abs(d_gate), jnp.abs(d_up))
            return jnp.maximum(amax, jnp.max(both, axis=1))

        scale = scale_from_amax(jax.lax.fori_loop(0, steps, amax_step, jnp.zeros((BLOCK_ROWS,), jnp.float32)))

    def store_step(step, carry):
        c0 = step * block_cols
        d_gate, d_up, mask = d_a_block(c0)
        _store_d_a(d_gate, d_up, c0, mask, scale)
        return carry

    jax.lax.fori_loop(0, steps, store_step, jnp.int32(0))
    if quantize:
        plgpu.store(scale_ref.at[pl.ds(r0, BLOCK_ROWS)], scale, mask=row_ok)


def _check(a: jax.Array) -> int:
    if a.ndim != 2 or a.shape[1] % 2:
        raise ValueError(f"SwiGLU pre-activations must be [M, 2F], got shape {a.shape}")
    return a.shape[1] // 2


@functools.partial(jax.jit, static_argnames=("interpret", "dtype"))
def swiglu_quantize(a: jax.Array, interpret: bool = False, row_scale: jax.Array | None = None, dtype=None
                    ) -> tuple[jax.Array, ...]:
    """(h [M, F] in a's dtype, Q(h) codes [M, F] int8, scales [M, 1] float32) of a = [gate | up] [M, 2F].

    With ``row_scale`` [M] float32, ``a`` is the up projection's int32 sums, dequantized here as XLA would:
    a = (float32(acc) * row_scale) rounded to ``dtype``; then a [M, 2F] in ``dtype`` comes back fourth (the
    backward's residual), and the int32 sums never pass through a separate scaling pass."""
    ffn = _check(a)
    rows = a.shape[0]
    dequantize = row_scale is not None
    if dequantize != (a.dtype == jnp.int32) or dequantize != (dtype is not None):
        raise ValueError(f"swiglu_quantize: int32 sums come with row_scale and dtype, float pre-activations with "
                         f"neither (got {a.dtype}, row_scale {'given' if dequantize else 'None'}, dtype {dtype})")
    if dequantize and row_scale.shape != (rows,):
        raise ValueError(f"row_scale has shape {row_scale.shape}, expected {(rows,)}")
    out_dtype = jnp.dtype(dtype) if dequantize else a.dtype
    block_rows, block_cols = _tiles(ffn)
    out_shape = [jax.ShapeDtypeStruct((rows, ffn), out_dtype), jax.ShapeDtypeStruct((rows, ffn), jnp.int8),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)]
    if dequantize:
        out_shape.append(jax.ShapeDtypeStruct((rows, 2 * ffn), out_dtype))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, rows=rows, ffn=ffn, block_cols=block_cols, dequantize=dequantize,
                          interpret=interpret),
        out_shape=tuple(out_shape),
        grid=(pl.cdiv(rows, block_rows),),
        interpret=interpret,
        compiler_params=launch_params(interpret, NUM_WARPS, NUM_STAGES),
        name="qmoe_swiglu_quantize",
    )(a, *((row_scale.astype(jnp.float32),) if dequantize else ()))
    h, codes, scale = outs[:3]
    return (h, codes, scale[:, None]) + tuple(outs[3:])


@functools.partial(jax.jit, static_argnames=("quantize", "interpret"))
def swiglu_backward(a: jax.Array, d_h: jax.Array, quantize: bool, interpret: bool = False,
                    row_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(d_a [M, 2F] in a's dtype, and with ``quantize`` Q(d_a) codes [M, 2F] int8 and scales [M, 1] float32,
    else None twice) for the cotangent ``d_h`` [M, F] of h = silu(gate) * up.

    With ``row_scale`` [M] float32, ``d_h`` is the int32 sums of the product that makes it, dequantized here as
    XLA would (float32(acc) * row_scale rounded to a's dtype), so no separate pass writes d_h."""
    ffn = _check(a)
    rows = a.shape[0]
    if d_h.shape != (rows, ffn):
        raise ValueError(f"d_h has shape {d_h.shape}, expected {(rows, ffn)}")
    dequantize = row_scale is not None
    if dequantize != (d_h.dtype == jnp.int32):
        raise ValueError(f"swiglu_backward: int32 d_h comes with row_scale, a float one without (got {d_h.dtype}, "
                         f"row_scale {'given' if dequantize else 'None'})")
    if dequantize and row_scale.shape != (rows,):
        raise ValueError(f"row_scale has shape {row_scale.shape}, expected {(rows,)}")
    block_rows, block_cols = _tiles(ffn)
    out_shape = [jax.ShapeDtypeStruct((rows, 2 * ffn), a.dtype)]
    if quantize:
        out_shape += [jax.ShapeDtypeStruct((rows, 2 * ffn), jnp.int8), jax.ShapeDtypeStruct((rows,), jnp.float32)]
    inputs = (a, d_h, row_scale.astype(jnp.float32)) if dequantize else (a, d_h.astype(a.dtype))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, rows=rows, ffn=ffn, block_cols=block_cols, quantize=quantize,
                          dequantize=dequantize, interpret=interpret),
        out_shape=tuple(out_shape),
        grid=(pl.cdiv(rows, block_rows),),
        interpret=interpret,
        compiler_params=launch_params(interpret, NUM_WARPS, NUM_STAGES),
        name="qmoe_swiglu_backward",
    )(*inputs)
    if not quantize:
        return outs[0], None, None
    d_a, codes, scale = outs
    return d_a, codes, scale[:, None]
