"""The gate-weighted combine's backward with the per-row int8 quantization of its result, one Pallas kernel
(Triton on GPU, interpreted on CPU).

For each slot r of the grouped layout, filled by assignment (token t, choice j) with gate weight w, or empty:

    g[r]      = w * dy[t], rounded to the layer's dtype (zero for an empty slot)
    Q(g)[r]   per-row int8 codes and scale of g[r] (``quantize``: the down projection's prequant backward)
    d_gate[r] = sum_h dy[t, h] * out[r, h] in float32 (the gate's gradient; zero for an empty slot)

Why (issue 15, H200, logbook top-8, int8_routed_prequant forward+backward): XLA ran these as three passes
over [M, H] rows: g with its row maxima (0.79 ms), Q(g)'s codes from g again (0.78 ms), and the gates'
gradient, which gathered the expert output rows into assignment order (1.06 ms). Here each slot reads its
token's dy row and its own output row once and writes g, Q(g) and d_gate once.

Semantics are those of autodiff through `layer.weighted_sum` (``d per_assignment = gates * dy`` in float32,
cast to the rows' dtype, permuted to slots) followed by `quant.quantize_rows`; d_gate sums the same products
in another order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .pallas_swiglu import block_columns, launch_params, rounded, row_codes
from .quant import scale_from_amax

#: Columns per step, warps and pipeline stages: one slot per program, a whole logbook row (H = 2048) per step.
#: Swept on the H200 at the logbook's balanced top-8 layout (286,720 slots, 262,144 filled): 1.03 ms, 3.8 TB/s;
#: 2 or 8 warps, 1024 columns or 2 stages were no faster (1.03-1.06 ms).
BLOCK_COLS = 2048
NUM_WARPS = 4
NUM_STAGES = 1


def _kernel(token_ref, gate_ref, dy_ref, out_ref, g_ref, *refs, tokens: int, hidden: int, block_cols: int,
            quantize: bool, interpret: bool) -> None:
    """Slot r = program_id: g, d_gate and with ``quantize`` Q(g) (amax over the row first where it spans
    several column steps)."""
    codes_ref, scale_ref, d_gate_ref = refs if quantize else (None, None, refs[0])
    slot = pl.program_id(0)
    token = token_ref[slot]
    filled = token < tokens
    row = jnp.minimum(token, tokens - 1)  # an index in range even for an empty slot, whose loads are masked
    gate = gate_ref[slot]

    def block(c0):
        cols_ok = (c0 + jnp.arange(block_cols, dtype=jnp.int32) < hidden)[None, :]
        dy = plgpu.load(dy_ref.at[pl.ds(row, 1), pl.ds(c0, block_cols)], mask=cols_ok & filled, other=0.0)
        out = plgpu.load(out_ref.at[pl.ds(slot, 1), pl.ds(c0, block_cols)], mask=cols_ok & filled, other=0.0)
        dy = dy.astype(jnp.float32)
        g = rounded(gate * dy, g_ref.dtype, interpret)
        return g, jnp.sum(dy * out.astype(jnp.float32), axis=1), cols_ok

    def store(g, c0, cols_ok, scale):
        plgpu.store(g_ref.at[pl.ds(slot, 1), pl.ds(c0, block_cols)], g[0], mask=cols_ok)
        if quantize:
            plgpu.store(codes_ref.at[pl.ds(slot, 1), pl.ds(c0, block_cols)], row_codes(g[1], scale[:, None]),
                        mask=cols_ok)

    steps = pl.cdiv(hidden, block_cols)
    if steps == 1 or not quantize:  # one sweep: a row in one tile is quantized as it is made
        def step(i, d_gate):
            g, part, cols_ok = block(i * block_cols)
            scale = scale_from_amax(jnp.max(jnp.abs(g[1]), axis=1)) if quantize else None
            store(g, i * block_cols, cols_ok, scale)
            if quantize:
                plgpu.store(scale_ref.at[pl.ds(slot, 1)], scale)
            return d_gate + part

        # a loop even for one step: its column offset is then traced (see `pallas_swiglu.once`)
        plgpu.store(d_gate_ref.at[pl.ds(slot, 1)], jax.lax.fori_loop(0, steps, step, jnp.zeros((1,), jnp.float32)))
        return

    def amax_step(i, carry):
        amax, d_gate = carry
        g, part, _ = block(i * block_cols)
        return jnp.maximum(amax, jnp.max(jnp.abs(g[1]), axis=1)), d_gate + part

    amax, d_gate = jax.lax.fori_loop(0, steps, amax_step, (jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32)))
    scale = scale_from_amax(amax)

    def store_step(i, carry):
        g, _, cols_ok = block(i * block_cols)
        store(g, i * block_cols, cols_ok, scale)
        return carry

    jax.lax.fori_loop(0, steps, store_step, jnp.int32(0))
    plgpu.store(scale_ref.at[pl.ds(slot, 1)], scale)
    plgpu.store(d_gate_ref.at[pl.ds(slot, 1)], d_gate)


@functools.partial(jax.jit, static_argnames=("dtype", "quantize", "interpret"))
def combine_backward(dy: jax.Array, out_rows: jax.Array, slot_token: jax.Array, slot_gate: jax.Array, dtype,
                     quantize: bool, interpret: bool = False
                     ) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array]:
    """(g [M, H] in ``dtype``, Q(g) codes [M, H] int8 and scales [M, 1] float32 or None twice, d_gate [M]
    float32) for the combine's cotangent ``dy`` [T, H].

    ``out_rows`` [M, H]: the expert outputs per slot (the combine's input); ``slot_token`` [M] int32: each
    slot's token, T for an empty slot; ``slot_gate`` [M] float32: its gate weight.
    """
    tokens, hidden = dy.shape
    slots = out_rows.shape[0]
    if out_rows.shape != (slots, hidden) or slot_token.shape != (slots,) or slot_gate.shape != (slots,):
        raise ValueError(f"combine_backward: dy {dy.shape}, out_rows {out_rows.shape}, slot_token "
                         f"{slot_token.shape}, slot_gate {slot_gate.shape}: expected [T, H], [M, H], [M], [M]")
    block_cols = block_columns(hidden, BLOCK_COLS)
    out_shape = [jax.ShapeDtypeStruct((slots, hidden), jnp.dtype(dtype))]
    if quantize:
        out_shape += [jax.ShapeDtypeStruct((slots, hidden), jnp.int8), jax.ShapeDtypeStruct((slots,), jnp.float32)]
    out_shape.append(jax.ShapeDtypeStruct((slots,), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_kernel, tokens=tokens, hidden=hidden, block_cols=block_cols, quantize=quantize,
                          interpret=interpret),
        out_shape=tuple(out_shape),
        grid=(slots,),
        interpret=interpret,
        compiler_params=launch_params(interpret, NUM_WARPS, NUM_STAGES),
        name="qmoe_combine_backward",
    )(slot_token.astype(jnp.int32), slot_gate.astype(jnp.float32), dy, out_rows)
    if not quantize:
        return outs[0], None, None, outs[1]
    g, codes, scale, d_gate = outs
    return g, codes, scale[:, None], d_gate
