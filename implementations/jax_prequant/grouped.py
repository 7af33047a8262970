"""Grouped (per-expert) matmuls over rows sorted by group, in three formulations, and their int8 VJPs.

``ragged``: rows sorted by group, contiguous, ``group_sizes`` says where each group ends;
``jax.lax.ragged_dot_general`` does the work (the native grouped matmul on CPU and TPU). Rows past
``sum(group_sizes)`` belong to no group and come out zero.

``padded``: every group owns ``capacity`` consecutive rows (unused ones are zero), so the grouped
matmul is one batched matmul ``[G, C, K] x [G, K, N]`` — a cuBLAS batched GEMM on GPU, where XLA
lowers ``ragged_dot`` to a dense masked dot (H100, 2026-11-22: 12.8 TF/s bf16 for the seed shape,
out of memory at top_k 8). ``capacity`` is a static shape: `bucket_capacity` rounds the largest group
up to one of 32 sizes per octave, so a layer recompiles only when its routing moves between buckets.

``pallas``: the ``ragged`` layout (no capacity), computed by the Pallas kernels of `pallas_grouped`
(Triton on GPU, interpreted on CPU): each row tile multiplies by its own expert's weight, int8
products dequantize in the kernel's epilogue, and the weight gradient is a grouped kernel too, so no
group is padded to the largest one's rows (issue 15). Not yet measured on a GPU: ``padded`` stays
the GPU default until a benchmark shows this faster.

All formulations share `Placement`: where each source row lands (``slot_of_row``) and which source
row fills each slot (``source``), so gathers/scatters are plain index lookups with a zero fill.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from jax.lax import RaggedDotDimensionNumbers, ragged_dot_general

from .env import formulation_int8_gemm, precision_for
from .quant import dequantize, quantize_rows

# `pallas_grouped` (Pallas, Triton) is imported where the ``pallas`` formulation runs, not here.

#: Layouts whose rows are sorted by group, contiguous, with no capacity: ``group_sizes`` says it all.
CONTIGUOUS_KINDS = ("ragged", "pallas")


@dataclass(frozen=True)
class GroupedLayout:
    """How M rows map to G groups.

    ``group_sizes`` [G] int32: rows in each group. ``row_group`` [M] int32: the group of each row
    (padding rows carry some valid group; their rows are zero). Static: ``kind`` (ragged | padded |
    pallas), ``groups`` (G), ``capacity`` (rows per group when padded, else 0), ``int8_gemm`` (``xla``,
    ``pallas``, ``split`` or ``mosaic``: the kernel of the int8 x int8 products, `env.select_int8_gemm`, per projection
    `projection_layout`; always ``pallas`` for that kind), ``interpret`` (where Pallas kernels run: in Pallas's
    interpreter, as on CPU, instead of lowering them through Triton).
    """

    group_sizes: jax.Array
    row_group: jax.Array
    kind: str
    groups: int
    capacity: int
    interpret: bool = False
    int8_gemm: str = "xla"

    def kernel_group_sizes(self) -> jax.Array:
        """Rows per group as the Pallas kernels see them (contiguous groups): the padded layout's full
        capacity, whose unused rows are zero and come out zero, else the groups' own sizes."""
        if self.kind == "padded":
            return jnp.full((self.groups,), self.capacity, jnp.int32)
        return self.group_sizes


jax.tree_util.register_dataclass(GroupedLayout, data_fields=["group_sizes", "row_group"],
                                 meta_fields=["kind", "groups", "capacity", "interpret", "int8_gemm"])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Placement:
    """Rows of a source array placed into a grouped layout.

    ``source`` [M]: the source row filling each slot (R, one past the end, for an empty slot).
    ``slot_of_row`` [R]: the slot of each source row (M for a row that is not placed: invalid,
    capacity-dropped, or overflowing a too-small static capacity). ``needed_capacity``: the largest
    group's row count, to check a static capacity against.
    """

    source: jax.Array
    slot_of_row: jax.Array
    layout: GroupedLayout
    needed_capacity: jax.Array


#: Capacity buckets per octave of rows (`bucket_capacity`). 32: a bucket adds at most 3.1% rows to the
#: fullest group. With 8 (12.5%), the H200's "balanced" logbook routing (fullest expert 4419 rows at top-8,
#: mean 4096) got 4608 rows per expert, 12.5% more GEMM work than the rows routed; 4480 now. The price
#: is a recompile for each bucket a drifting routing grows into (capacities never shrink).
BUCKETS_PER_OCTAVE = 32


def bucket_capacity(rows: int, minimum: int = 16) -> int:
    """``rows`` rounded up to one of `BUCKETS_PER_OCTAVE` sizes per octave, then to a multiple of 16.

    Multiples of 16 keep int8 GEMM operands aligned for the tensor cores.
    """
    rows = max(int(rows), 1)
    if rows <= minimum:
        return minimum
    step = 2 ** max(int(math.floor(math.log2(rows))) - int(math.log2(BUCKETS_PER_OCTAVE)), 0)
    bucketed = -(-rows // step) * step
    return -(-bucketed // 16) * 16


def place_rows(row_group: jax.Array, valid: jax.Array, groups: int, kind: str, capacity: int = 0,
               interpret: bool = False, int8_gemm: str = "xla") -> Placement:
    """Sort R source rows by group (stable: a group keeps its rows in source order) into a layout.

    Invalid rows are placed nowhere. ``padded`` needs ``capacity`` > 0; rows past it in their group
    are placed nowhere either, and ``needed_capacity`` tells the caller to retry with a larger one.
    ``int8_gemm``: the int8 products' kernel (for the ``pallas`` kind ``pallas`` unless ``mosaic`` is asked for).
    ``interpret``: whether Pallas kernels run interpreted (CPU) or through Triton (GPU).
    """
    int8_gemm = formulation_int8_gemm(kind, int8_gemm)
    rows = row_group.shape[0]
    key = jnp.where(valid, row_group, groups).astype(jnp.int32)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sorted_key = key[order]
    counts = jnp.zeros((groups + 1,), jnp.int32).at[key].add(1)
    group_sizes = counts[:groups]
    starts = jnp.cumsum(counts) - counts
    position = jnp.arange(rows, dtype=jnp.int32) - starts[sorted_key]
    in_group = sorted_key < groups
    if kind in CONTIGUOUS_KINDS:
        slots = rows
        slot_sorted = jnp.where(in_group, jnp.arange(rows, dtype=jnp.int32), slots)
        source = jnp.where(in_group, order, rows)
        slot_group = jnp.minimum(sorted_key, groups - 1)
    elif kind == "padded":
        if capacity < 1:
            raise ValueError("the padded formulation needs a static capacity >= 1")
        slots = groups * capacity
        fits = in_group & (position < capacity)
        slot_sorted = jnp.where(fits, sorted_key * capacity + position, slots)
        source = jnp.full((slots,), rows, jnp.int32).at[slot_sorted].set(order, mode="drop")
        slot_group = jnp.arange(slots, dtype=jnp.int32) // capacity
    else:
        raise ValueError(f"unknown grouped formulation {kind!r}")
    slot_of_row = jnp.zeros((rows,), jnp.int32).at[order].set(slot_sorted)
    layout = GroupedLayout(group_sizes, slot_group, kind, groups, capacity if kind == "padded" else 0,
                           interpret=interpret and (kind == "pallas" or int8_gemm != "xla"), int8_gemm=int8_gemm)
    needed = jnp.max(group_sizes) if groups else jnp.int32(0)
    return Placement(source, slot_of_row, layout, needed)


#: The int8 GEMMs that apply the scales in their epilogue (the others leave int32 sums and a row scale).
EPILOGUE_SCALED: tuple[str, ...] = ("pallas", "mosaic")

#: The routed projections, as `projection_layout` names them.
PROJECTIONS: tuple[str, ...] = ("up", "down")


def projection_layout(layout: GroupedLayout, projection: str) -> GroupedLayout:
    """The layout whose ``int8_gemm`` runs ``projection``'s int8 products (``up``: w13, ``down``: w2; forward and
    input gradient alike): ``split`` gives the up projection XLA's int8 dot and the down projection the Pallas
    kernel, any other choice is every projection's.

    Why ``split`` (issue 15, H200, logbook top-8 int8_routed_prequant): XLA's int8 dot is the faster GEMM (~1400
    TOP/s against ~1300), but it stores int32 sums, twice the bytes of the layer's dtype. The up projection's go
    straight into the SwiGLU kernel, which dequantizes as it reads; the down projection's were scaled by a pass of
    their own (0.87 ms: 2.35 GB read, 1.17 GB written) before the combine read them, and its input gradient's read
    as int32 by the SwiGLU's backward. The Pallas kernel's epilogue writes those results scaled, in the layer's
    dtype."""
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}: one of {', '.join(PROJECTIONS)}")
    if layout.int8_gemm != "split":
        return layout
    return replace(layout, int8_gemm="pallas" if projection == "down" else "xla")


def take_rows(values: jax.Array, index: jax.Array) -> jax.Array:
    """values[index] along axis 0, zero where index is out of range (the "nowhere" slot/row)."""
    return values.at[index].get(mode="fill", fill_value=0)


@jax.custom_vjp
def permute_rows(values: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """values[index] (zero where out of range) for a partial permutation ``index`` with inverse
    ``inverse``; its transpose is the gather ``g[inverse]`` instead of a scatter-add.

    Why: autodiff of a gather is a scatter-add, which XLA runs with atomics on GPU; the packing and
    unpacking of routed rows are permutations, so the transpose is just the other gather.
    """
    return take_rows(values, index)


def _permute_rows_forward(values, index, inverse):
    return take_rows(values, index), inverse


def _permute_rows_backward(inverse, g):
    return take_rows(g, inverse), None, None


permute_rows.defvjp(_permute_rows_forward, _permute_rows_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_token_rows(tokens: jax.Array, source: jax.Array, slot_of_assignment: jax.Array, top_k: int) -> jax.Array:
    """Rows of token-level ``tokens`` [T, ...] for slots filled by assignment a = source (token a // k;
    empty slots zero). Transpose: d tokens[t] = sum_k g[slot(t, k)], a gather and a sum, no scatter."""
    return take_rows(tokens, token_of_slot(source, tokens.shape[0], top_k))


def token_of_slot(source: jax.Array, tokens: int, top_k: int) -> jax.Array:
    """Token index (a // k) of each slot's assignment, ``tokens`` (out of range) for empty slots."""
    return jnp.where(source < tokens * top_k, source // top_k, tokens)


def _gather_token_rows_forward(tokens, source, slot_of_assignment, top_k):
    return gather_token_rows(tokens, source, slot_of_assignment, top_k), (slot_of_assignment, tokens.shape[0])


def _gather_token_rows_backward(top_k, residuals, g):
    slot_of_assignment, tokens = residuals
    per_assignment = take_rows(g, slot_of_assignment)
    return per_assignment.reshape(tokens, top_k, *g.shape[1:]).sum(axis=1), None, None


gather_token_rows.defvjp(_gather_token_rows_forward, _gather_token_rows_backward)


def weighted_sum(out_rows: jax.Array, placement: Placement, gates: jax.Array) -> jax.Array:
    """y[t] = sum_k gate[t, k] * out[slot(t, k)] in float32; unplaced assignments contribute zero."""
    tokens, top_k = gates.shape
    per_assignment = permute_rows(out_rows, placement.slot_of_row, placement.source).reshape(tokens, top_k, -1)
    # an elementwise product and a k-sum (fused), not a [1, k] x [k, H] dot per token
    return jnp.sum(gates[:, :, None] * per_assignment.astype(jnp.float32), axis=1)


def _dot_numbers(transpose_rhs: bool) -> tuple:
    return (([1], [2 if transpose_rhs else 1]), ([], []))


def grouped_dot(lhs: jax.Array, rhs: jax.Array, layout: GroupedLayout, *, transpose_rhs: bool = False,
                accumulate=jnp.float32, out_dtype=None) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] (rhs [G, K, N]), or lhs[m] @ rhs[g(m)]^T with ``transpose_rhs``
    (rhs [G, N, K]); accumulated in ``accumulate`` (int32 for int8 operands), returned in
    ``out_dtype`` (default: ``accumulate``; the ``pallas`` kernel stores that type directly)."""
    out_dtype = accumulate if out_dtype is None else out_dtype
    if layout.kind == "pallas":
        from . import pallas_grouped

        return pallas_grouped.grouped_matmul(lhs, rhs, layout.group_sizes, transpose_rhs=transpose_rhs,
                                             out_dtype=out_dtype, interpret=layout.interpret)
    if _rounds_in_epilogue(lhs.dtype, accumulate, out_dtype):
        return _xla_grouped_dot(lhs, rhs, layout, transpose_rhs, out_dtype)
    return _xla_grouped_dot(lhs, rhs, layout, transpose_rhs, accumulate).astype(out_dtype)


def _rounds_in_epilogue(operand_dtype, accumulate, out_dtype) -> bool:
    """True where a float GEMM asked for a narrower float result is better asked for that result directly: XLA's
    GPU GEMMs (cuBLAS, its Triton emitter) accumulate 16-bit float operands in float32 and round once as they store,
    the value a float32 result converted afterwards has (up to summation order), where the float32 result took a
    pass of its own to convert (H200, logbook top-8, scheme ``none``: a 1.66 ms ``wrapped_convert`` of a GEMM's
    float32 result in the step's kernel table); CPU computes such a dot in float32 and converts as well."""
    return (jnp.dtype(accumulate) == jnp.float32 and jnp.issubdtype(operand_dtype, jnp.floating)
            and jnp.issubdtype(out_dtype, jnp.floating) and jnp.dtype(out_dtype).itemsize < 4)


def _xla_grouped_dot(lhs: jax.Array, rhs: jax.Array, layout: GroupedLayout, transpose_rhs: bool,
                     accumulate) -> jax.Array:
    """`grouped_dot` by XLA: ``ragged_dot_general``, or the padded layout's batched matmul."""
    precision = precision_for(lhs.dtype)
    if layout.kind == "ragged":
        numbers = RaggedDotDimensionNumbers(dot_dimension_numbers=_dot_numbers(transpose_rhs),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
        return ragged_dot_general(lhs, rhs, layout.group_sizes, numbers, precision=precision,
                                  preferred_element_type=accumulate)
    g, c = layout.groups, layout.capacity
    batched = lhs.reshape(g, c, lhs.shape[-1])
    contract = 2 if transpose_rhs else 1
    out = jax.lax.dot_general(batched, rhs, (([2], [contract]), ([0], [0])), precision=precision,
                              preferred_element_type=accumulate)
    return out.reshape(g * c, out.shape[-1])


def grouped_weight_grad(lhs: jax.Array, g: jax.Array, layout: GroupedLayout, out_dtype=jnp.float32) -> jax.Array:
    """dW[e] = sum over rows m of group e of lhs[m]^T g[m]: [G, K, N] in ``out_dtype``, float32 accumulation.

    A group with no rows gets exactly zero. A bfloat16 layer asks for its weights' dtype: XLA's GEMM then
    rounds its float32 accumulator once on the way out, where a float32 result and a cast made a float32
    temporary the size of the weights (2026-12-01, H200, deepseek-v3: the program's 29.8 GiB temporaries,
    out of memory; +3.5 GB of footprint at logbook-shared5632). The ``pallas`` kernel rounds at its store.
    """
    if layout.kind == "pallas":
        from . import pallas_grouped

        return pallas_grouped.grouped_weight_grad(lhs, g, layout.group_sizes, interpret=layout.interpret,
                                                  out_dtype=out_dtype)
    if layout.kind == "ragged":
        numbers = RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return ragged_dot_general(lhs, g, layout.group_sizes, numbers, precision=precision_for(lhs.dtype),
                                  preferred_element_type=out_dtype)
    groups, c = layout.groups, layout.capacity
    return jax.lax.dot_general(lhs.reshape(groups, c, lhs.shape[-1]), g.reshape(groups, c, g.shape[-1]),
                               (([1], [1]), ([0], [0])), precision=precision_for(lhs.dtype),
                               preferred_element_type=out_dtype)


@jax.custom_vjp
def float_grouped_dot(lhs: jax.Array, rhs: jax.Array, layout: GroupedLayout) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] in the operands' dtype with float32 accumulation.

    Its VJP is the exact one, ``dx = g W[g]^T`` and ``dW = x^T g``, written out so that both products
    keep the operands' dtype: autodiff of a dot with a float32 result hands the transposed dots a
    float32 cotangent, which turns bfloat16 GEMMs into float32 ones (H100, 2026-11-23: forward+backward
    of scheme ``none`` at 192 TF/s against 314 TF/s for the int8 path with its hand-written VJP).
    """
    return grouped_dot(lhs, rhs, layout, out_dtype=lhs.dtype)


def _float_grouped_dot_forward(lhs, rhs, layout):
    return float_grouped_dot(lhs, rhs, layout), (lhs, rhs, layout)


def _float_grouped_dot_backward(residuals, g):
    lhs, rhs, layout = residuals
    g = g.astype(lhs.dtype)
    dx = grouped_dot(g, rhs, layout, transpose_rhs=True, out_dtype=lhs.dtype)
    return dx, grouped_weight_grad(lhs, g, layout, out_dtype=rhs.dtype), None


float_grouped_dot.defvjp(_float_grouped_dot_forward, _float_grouped_dot_backward)


def _expert_scale(scale: jax.Array, layout: GroupedLayout) -> jax.Array:
    """Per-row copy [M, 1] of the per-group weight scale [G, 1, 1]."""
    return scale.reshape(-1)[layout.row_group][:, None]


def int8_grouped_product(codes: jax.Array, scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
                         layout: GroupedLayout, transpose_rhs: bool = False, out_dtype=jnp.float32) -> jax.Array:
    """(q_x q_w[g]) * s_x * s_w[g], computed in float32 and returned in ``out_dtype``: int8 x int8 with
    int32 accumulation, dequantized once (``int8_gemm`` ``pallas``: in the kernel's epilogue, so the int32
    accumulator never reaches memory; ``xla``: by an elementwise pass over it)."""
    if layout.int8_gemm == "mosaic":
        from . import pallas_mosaic

        # the kernel reads [G, N, K] codes (both operands contract their minor axis): the layer passes them so
        # (`layer.step_codes`, the prepared transposed codes); a [G, K, N] operand is transposed here, in every call
        rhs = w_codes if transpose_rhs else jnp.swapaxes(w_codes, 1, 2)
        stride = layout.capacity if layout.kind == "padded" else 0
        if pallas_mosaic.mosaic_unsupported_reason(codes.shape[0], rhs.shape[1], rhs.shape[2], layout.groups, stride,
                                                   out_dtype) is None:
            return pallas_mosaic.grouped_int8_matmul(codes, rhs, scale.reshape(-1), w_scale.reshape(-1),
                                                     layout.group_sizes, out_dtype=out_dtype, group_stride=stride,
                                                     interpret=layout.interpret)
        # below the kernel's tiles (K < 32, or narrow ragged N: small layers, the conformance cases): the Triton kernel
    if layout.int8_gemm in EPILOGUE_SCALED:
        from . import pallas_grouped

        cols = w_codes.shape[1] if transpose_rhs else w_codes.shape[2]
        per_column = jnp.broadcast_to(w_scale.reshape(-1, 1).astype(jnp.float32), (layout.groups, cols))
        return pallas_grouped.grouped_matmul(codes, w_codes, layout.kernel_group_sizes(), transpose_rhs=transpose_rhs,
                                             row_scale=scale.reshape(-1), col_scale=per_column,
                                             out_dtype=out_dtype, interpret=layout.interpret)
    acc, row_scale = int8_accumulator(codes, scale, w_codes, w_scale, layout, transpose_rhs)
    return (acc.astype(jnp.float32) * row_scale[:, None]).astype(out_dtype)


def int8_accumulator(codes: jax.Array, scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
                     layout: GroupedLayout, transpose_rhs: bool = False) -> tuple[jax.Array, jax.Array]:
    """(q_x q_w[g] as XLA's int8 dot's int32 sums [M, N], the scale s_x s_w[g] of each row [M] float32): the
    ``xla`` product of `int8_grouped_product` before its dequantization, for a kernel that dequantizes as it
    reads (`pallas_swiglu.swiglu_quantize`)."""
    acc = grouped_dot(codes, w_codes, layout, transpose_rhs=transpose_rhs, accumulate=jnp.int32)
    return acc, (scale * _expert_scale(w_scale, layout)).reshape(-1)


def _check_rule(rule: str) -> None:
    """Refuse an int8 backward rule other than ``ste`` and ``prequant_vjp``."""
    if rule not in ("ste", "prequant_vjp"):
        raise ValueError(f"unknown backward rule {rule!r}")


@functools.cache
def int8_grouped_dot(rule: str, dtype_name: str):
    """The routed int8 projection with its backward rule, as a custom-VJP function.

    Arguments ``(x, x_codes, x_scale, w, w_codes, w_scale, w_codes_t, layout)``: float rows ``x``
    [M, K] and their per-row codes/scales; float expert weights ``w`` [G, K, N], their per-expert
    codes [G, K, N] and scales [G, 1, 1], and optionally the same codes stored transposed
    (``w_codes_t`` [G, N, K], or None). Forward: ``y = (q_x q_w[g]) s_x s_w[g]`` with int32
    accumulation, from ``w_codes_t`` when given — every int8 product then contracts the minor axis of
    both operands, the layout int8 tensor-core GEMMs take without a transpose. ``w`` itself is not
    read: pre-quantized weights are consumed as they are.

    Backward, for output cotangent ``g`` (codes, scales and layout get no gradient):

    * ``ste`` (straight-through): ``dx = g (s_w q_w)^T``, ``dw = (s_x q_x)^T g``.
    * ``prequant_vjp`` (logbook MOE-I8-023/024): ``dx = (q_g q_w^T) s_g s_w`` — the per-row-quantized
      cotangent against the transposed pre-quantized weights, int32 accumulation — and the float
      surrogate ``dw = x^T g`` from the un-quantized rows.
    """
    _check_rule(rule)
    dtype = jnp.dtype(dtype_name)

    @jax.custom_vjp
    def dot(x, x_codes, x_scale, w, w_codes, w_scale, w_codes_t, layout):
        return _int8_projection(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout, dtype)

    def forward(x, x_codes, x_scale, w, w_codes, w_scale, w_codes_t, layout):
        y = dot(x, x_codes, x_scale, w, w_codes, w_scale, w_codes_t, layout)
        kept = x if rule == "prequant_vjp" else (x_codes, x_scale)
        return y, (kept, w_codes, w_scale, layout)

    def backward(residuals, g):
        kept, w_codes, w_scale, layout = residuals
        dx, dw = _int8_gradients(rule, dtype, kept, g, None, w_codes, w_scale, layout)
        return dx, None, None, dw, None, None, None, None

    dot.defvjp(forward, backward)
    return dot


def _int8_projection(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
                     w_codes_t: jax.Array | None, layout: GroupedLayout, dtype) -> jax.Array:
    """The forward product of `int8_grouped_dot` (and `int8_swiglu_projection`): from the transposed codes
    [G, N, K] where given (both operands contract their minor axis), else from the codes [G, K, N]."""
    codes, transposed = _forward_codes(w_codes, w_codes_t)
    return int8_grouped_product(x_codes, x_scale, codes, w_scale, layout, transpose_rhs=transposed, out_dtype=dtype)


def _forward_codes(w_codes: jax.Array, w_codes_t: jax.Array | None) -> tuple[jax.Array, bool]:
    """The weight codes a forward int8 product reads, and whether they are the transposed [G, N, K] ones (which,
    where given, make both operands contract their minor axis)."""
    return (w_codes, False) if w_codes_t is None else (w_codes_t, True)


def _float_surrogate_grad(kept: jax.Array, g: jax.Array, layout: GroupedLayout, dtype) -> jax.Array:
    """``prequant_vjp``'s weight gradient: the float surrogate x^T g from the un-quantized rows."""
    return grouped_weight_grad(kept, g.astype(dtype), layout, out_dtype=dtype)


def _int8_gradients(rule: str, dtype, kept, g: jax.Array, g_quantized: tuple | None, w_codes: jax.Array,
                    w_scale: jax.Array, layout: GroupedLayout) -> tuple[jax.Array, jax.Array]:
    """(dx, dw) of a routed int8 projection under ``rule`` (`int8_grouped_dot`) for its output cotangent ``g``;
    ``kept``: the float rows (``prequant_vjp``) or their (codes, scales) (``ste``); ``g_quantized``: Q(g) as
    (codes, scales) where the caller made it already (``prequant_vjp``), else None."""
    if rule == "prequant_vjp":
        g_codes, g_scale = g_quantized if g_quantized is not None else quantize_rows(g)
        dx = int8_grouped_product(g_codes, g_scale, w_codes, w_scale, layout, transpose_rhs=True, out_dtype=dtype)
        return dx, _float_surrogate_grad(kept, g, layout, dtype)
    x_codes, x_scale = kept
    dx = grouped_dot(g.astype(dtype), w_codes.astype(dtype), layout, transpose_rhs=True)
    dx = (dx * _expert_scale(w_scale, layout)).astype(dtype)
    return dx, grouped_weight_grad(dequantize(x_codes, x_scale, dtype), g.astype(dtype), layout, out_dtype=dtype)


def _xla_swiglu_forward(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout: GroupedLayout, dtype) -> tuple:
    """(h, Q(h) codes, Q(h) scales) of the up projection by XLA's fusions: what a forward-only program runs (the
    custom VJPs' primal), where XLA reads the int8 GEMM's int32 result straight into the SwiGLU and a kernel would
    need a materialized first (H200, logbook top-8 forward: 11.0 ms with the kernel against 10.0). The same values:
    `pallas_swiglu`'s semantics are these."""
    from .layer import swiglu

    h = swiglu(_int8_projection(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout, dtype), dtype)
    return (h, *quantize_rows(h))


def _kernel_swiglu_forward(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout: GroupedLayout, dtype,
                           interpret: bool) -> tuple[tuple, jax.Array]:
    """((h, Q(h) codes, Q(h) scales), a) of the up projection through `pallas_swiglu.swiglu_quantize`. Under XLA's
    int8 GEMM the kernel reads the int32 sums and dequantizes them as it reads, where a separate pass read them and
    wrote a (H200 profile, logbook top-8 prequant: 1.72 ms); the Pallas GEMM's epilogue dequantizes a itself."""
    from . import pallas_swiglu

    if layout.int8_gemm in EPILOGUE_SCALED:
        a = _int8_projection(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout, dtype)
        return pallas_swiglu.swiglu_quantize(a, interpret=interpret), a
    codes, transposed = _forward_codes(w_codes, w_codes_t)
    acc, row_scale = int8_accumulator(x_codes, x_scale, codes, w_scale, layout, transpose_rhs=transposed)
    h, h_codes, h_scale, a = pallas_swiglu.swiglu_quantize(acc, interpret=interpret, row_scale=row_scale, dtype=dtype)
    return (h, h_codes, h_scale), a


@functools.cache
def int8_swiglu_projection(rule: str, dtype_name: str, interpret: bool):
    """The routed int8 up projection and its SwiGLU as one custom-VJP function, the SwiGLU and the per-row
    quantization on each side of it in one Pallas kernel per direction (`pallas_swiglu`): the layer's where the
    combine is not in the same VJP (expert parallelism, the stage-time programs, the bypass).

    Arguments as `int8_grouped_dot`'s (the projection's); returns (h [M, F] in ``dtype_name``, Q(h) codes,
    Q(h) scales [M, 1]) for the down projection. Backward: d_a = SwiGLU'(a) d_h and, for ``prequant_vjp``,
    Q(d_a) from the same kernel, then the projection's gradients as `int8_grouped_dot` takes them. Q(h)'s
    codes and scales are quantizers (identity in the backward): no gradient flows back through them.
    ``interpret``: run the kernels in Pallas's interpreter (CPU) instead of through Triton.
    """
    _check_rule(rule)
    dtype = jnp.dtype(dtype_name)
    from . import pallas_swiglu

    @jax.custom_vjp
    def up(x, x_codes, x_scale, w, w_codes, w_scale, w_codes_t, layout):
        return _xla_swiglu_forward(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout, dtype)

    def forward(x, x_codes, x_scale, w, w_codes, w_scale, w_codes_t, layout):
        kept = x if rule == "prequant_vjp" else (x_codes, x_scale)
        hidden, a = _kernel_swiglu_forward(x_codes, x_scale, w_codes, w_scale, w_codes_t, layout, dtype, interpret)
        return hidden, (kept, a, w_codes, w_scale, layout)

    def backward(residuals, cotangents):
        kept, a, w_codes, w_scale, layout = residuals
        quantize = rule == "prequant_vjp"
        d_a, d_codes, d_scale = pallas_swiglu.swiglu_backward(a, cotangents[0], quantize, interpret=interpret)
        dx, dw = _int8_gradients(rule, dtype, kept, d_a, (d_codes, d_scale) if quantize else None, w_codes,
                                 w_scale, layout)
        return dx, None, None, dw, None, None, None, None

    up.defvjp(forward, backward)
    return up


def _combine_backward(dy: jax.Array, out: jax.Array, placement: Placement, gates: jax.Array, dtype, quantize: bool,
                      interpret: bool) -> tuple:
    """(g, Q(g) codes or None, Q(g) scales or None, the gates' gradient [T, k]) of `weighted_sum` for its
    cotangent ``dy``, from `pallas_combine.combine_backward` (one pass per slot)."""
    from . import pallas_combine

    tokens, top_k = gates.shape
    g, g_codes, g_scale, d_gate = pallas_combine.combine_backward(
        dy, out, token_of_slot(placement.source, tokens, top_k), take_rows(gates.reshape(-1), placement.source),
        dtype=dtype, quantize=quantize, interpret=interpret)
    return g, g_codes, g_scale, take_rows(d_gate, placement.slot_of_row).reshape(tokens, top_k).astype(gates.dtype)


@functools.cache
def float_down_combine(interpret: bool):
    """The float down projection (`float_grouped_dot`'s) and the gate-weighted combine as one custom-VJP function
    (scheme ``none`` where the kernels run), so that the combine's backward makes g and the gates' gradient in one
    kernel (`pallas_combine`) instead of XLA's passes over [M, H]. Arguments: ``h``, the weights [G, F, H], the
    layout, the placement and the gate weights [T, k]; returns y [T, H] float32 = `weighted_sum` of the rows."""

    @jax.custom_vjp
    def fn(h, w, layout, placement, gates):
        return weighted_sum(grouped_dot(h, w, layout, out_dtype=h.dtype), placement, gates)

    def forward(h, w, layout, placement, gates):
        out = grouped_dot(h, w, layout, out_dtype=h.dtype)
        return weighted_sum(out, placement, gates), (h, w, out, layout, placement, gates)

    def backward(residuals, dy):
        h, w, out, layout, placement, gates = residuals
        g, _, _, d_gates = _combine_backward(dy, out, placement, gates, h.dtype, False, interpret)
        dh, dw, _ = _float_grouped_dot_backward((h, w, layout), g)  # the down projection's own VJP
        return dh, dw, None, None, d_gates

    fn.defvjp(forward, backward)
    return fn


@functools.cache
def int8_experts_combine(rule: str, dtype_name: str, interpret: bool):
    """The routed int8 experts (up projection, SwiGLU, down projection) and the gate-weighted combine as one
    custom-VJP function, each elementwise step a Pallas kernel (`pallas_swiglu`, `pallas_combine`), as
    torch_triton's `_RoutedInt8Layer` is one autograd node.

    One function, so that the backward hands the SwiGLU's kernel the down projection's int32 input-gradient sums
    and their row scales (``prequant_vjp`` under XLA's int8 GEMM), which it dequantizes as it reads, where d_h
    went between two custom VJPs in the layer's dtype through a pass of its own (H200 profile, logbook top-8
    prequant: ~0.86 ms).

    Arguments: the rows ``x`` [M, H] with their codes and scales, ``w13`` and its (codes, scales, transposed codes
    or None), ``w2`` and its own, the layout, the placement and the gate weights [T, k]; returns y [T, H] float32.
    Backward: the combine's kernel (g, the gates' gradient and for ``prequant_vjp`` Q(g)), the down projection's
    gradients, the SwiGLU's kernel (d_a and for ``prequant_vjp`` Q(d_a)), the up projection's gradients, each
    projection's as `int8_grouped_dot` takes them.
    """
    _check_rule(rule)
    dtype = jnp.dtype(dtype_name)
    prequant = rule == "prequant_vjp"
    from . import pallas_swiglu

    @jax.custom_vjp
    def fn(x, x_codes, x_scale, w13, w13_quantized, w2, w2_quantized, layout, placement, gates):
        up, down = (projection_layout(layout, p) for p in PROJECTIONS)
        h_codes, h_scale = _xla_swiglu_forward(x_codes, x_scale, *w13_quantized, up, dtype)[1:]
        return weighted_sum(_int8_projection(h_codes, h_scale, *w2_quantized, down, dtype), placement, gates)

    def forward(x, x_codes, x_scale, w13, w13_quantized, w2, w2_quantized, layout, placement, gates):
        up, down = (projection_layout(layout, p) for p in PROJECTIONS)
        (h, h_codes, h_scale), a = _kernel_swiglu_forward(x_codes, x_scale, *w13_quantized, up, dtype, interpret)
        out = _int8_projection(h_codes, h_scale, *w2_quantized, down, dtype)
        x_kept, h_kept = (x, h) if prequant else ((x_codes, x_scale), (h_codes, h_scale))
        residuals = (x_kept, a, h_kept, out, w13_quantized[:2], w2_quantized[:2], layout, placement, gates)
        return weighted_sum(out, placement, gates), residuals

    def backward(residuals, dy):
        x_kept, a, h_kept, out, (w13_codes, w13_scale), (w2_codes, w2_scale), layout, placement, gates = residuals
        up, down = (projection_layout(layout, p) for p in PROJECTIONS)
        g, g_codes, g_scale, d_gates = _combine_backward(dy, out, placement, gates, dtype, prequant, interpret)
        if prequant and down.int8_gemm == "xla":
            d_h, d_h_scale = int8_accumulator(g_codes, g_scale, w2_codes, w2_scale, down, transpose_rhs=True)
            dw2 = _float_surrogate_grad(h_kept, g, down, dtype)
        else:
            d_h, dw2 = _int8_gradients(rule, dtype, h_kept, g, (g_codes, g_scale) if prequant else None, w2_codes,
                                       w2_scale, down)
            d_h_scale = None
        d_a, d_codes, d_scale = pallas_swiglu.swiglu_backward(a, d_h, prequant, interpret=interpret,
                                                              row_scale=d_h_scale)
        dx, dw13 = _int8_gradients(rule, dtype, x_kept, d_a, (d_codes, d_scale) if prequant else None, w13_codes,
                                   w13_scale, up)
        return dx, None, None, dw13, None, dw2, None, None, None, d_gates

    fn.defvjp(forward, backward)
    return fn
