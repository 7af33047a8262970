"""The MoE layer in JAX, as four stages: pack, up, down, combine (+ the shared expert).

    y = sum_k gate_k * W2[e_k]^T Q(silu(Q(x) W1[e_k]) * (Q(x) W3[e_k])) [+ shared(x)]

with Q the per-token int8 quantizer where the scheme quantizes routed activations, and the expert
weights int8 with one scale per expert matrix (quantized in the step for ``int8_routed``/``int8_all``,
once at prepare for ``int8_routed_prequant``). Routed rows are packed by a stable argsort on the
expert id (the logbook's ``argsort`` routing pack), the fused ``w13`` projection gives gate and up in
one grouped matmul, and the shared expert is one fused dense SwiGLU.

Activations are quantized once per token and their codes gathered for the first projection
(MOE-I8-009: T rows quantized instead of T*k).

`LayerPlan` is the static part of a compiled layer: everything that fixes shapes or code paths.
Single-device layers run `run_layer`; expert-parallel ones (``ep_size`` > 1) run the same stages per
device inside `expert_parallel.run_layer_ep`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from qmoe.reference.schemes import get_scheme
from qmoe.reference.spec import MoESpec

from .env import GPU_PLATFORMS, pallas_interpret, precision_for
from .grouped import (
    EPILOGUE_SCALED,
    GroupedLayout,
    Placement,
    float_down_combine,
    float_grouped_dot,
    gather_token_rows,
    int8_experts_combine,
    int8_grouped_dot,
    int8_swiglu_projection,
    place_rows,
    projection_layout,
    take_rows,
    token_of_slot,
    weighted_sum,
)
from .quant import int8_dense_dot, quantize_columns, quantize_per_expert, quantize_rows
from .routing import RoutingOut, route


@dataclass(frozen=True)
class LayerPlan:
    """Static description of one compiled layer (hashable: part of jit's cache key).

    ``experts`` is the spec's expert count rounded up to a multiple of ``ep_size`` (the extra experts
    are zero and never selected). ``expert_capacity``: rows per expert of the padded formulation
    (0 for ragged and pallas). ``dispatch_capacity``: rows each device sends to each other device (EP only).
    ``platform``: the devices' JAX platform (``cpu``, ``gpu``, ...). ``dispatch``: how expert
    parallelism sends token rows, ``float`` (int8 codes only where the scheme quantizes routed
    activations per token anyway) or ``int8`` (codes and scales for every scheme; see `expert_parallel`).
    """

    spec: MoESpec
    scheme: str
    dtype: str
    formulation: str
    experts: int
    expert_capacity: int = 0
    ep_size: int = 1
    dispatch_capacity: int = 0
    mesh: Any = None
    platform: str = "cpu"
    dispatch: str = "float"
    int8_gemm: str = "xla"
    swiglu: str = "xla"
    router: str = "float32"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def routed_int8(self) -> bool:
        return get_scheme(self.scheme).routed_weights != "float"

    @property
    def routed_activations_per_token(self) -> bool:
        return get_scheme(self.scheme).routed_activations == "per_token"

    @property
    def shared_int8(self) -> bool:
        return get_scheme(self.scheme).shared_weights != "float"

    @property
    def prequantized(self) -> bool:
        return get_scheme(self.scheme).backward == "prequant_vjp"

    @property
    def int8_gemms_on_gpu(self) -> bool:
        """True where the program has int8 x int8 GEMMs and runs on a GPU (see `env.INT8_GPU_OPTIONS`)."""
        return self.platform in GPU_PLATFORMS and (self.routed_int8 or self.shared_int8)

    @property
    def interpret_kernels(self) -> bool:
        """True where the plan's Pallas kernels (the ``pallas`` formulation's, ``int8_gemm`` or ``swiglu``
        ``pallas``; ``int8_gemm`` ``split`` holds it too) run interpreted (CPU), not through Triton."""
        return self.runs_pallas and pallas_interpret(self.platform)

    @property
    def runs_pallas(self) -> bool:
        """True where the program holds Pallas kernels: the ``pallas`` formulation, its int8 GEMM or its SwiGLU."""
        return self.formulation == "pallas" or self.swiglu == "pallas" or (self.routed_int8
                                                                           and self.int8_gemm != "xla")

    @property
    def fused_swiglu(self) -> bool:
        """True where the routed SwiGLU and its quantizers run as `pallas_swiglu`'s kernels (int8 schemes
        with ``swiglu`` ``pallas``, `env.select_swiglu`), else as XLA's fusions of `swiglu` and `quantize_rows`."""
        return self.routed_int8 and self.swiglu == "pallas"

    @property
    def fused_combine(self) -> bool:
        """True where the combine's backward is `pallas_combine`'s kernel, in one custom VJP with the experts
        (`stage_experts_combine`, int8 schemes) or with the float down projection (`stage_down_combine`,
        ``none``): wherever the SwiGLU kernels run (``swiglu`` ``pallas``, `env.select_swiglu`)."""
        return self.swiglu == "pallas"

    @property
    def routed_rule(self) -> str:
        return "prequant_vjp" if self.prequantized else "ste"


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Packed:
    """What the pack stage hands to the experts: float rows, their int8 codes/scales (or None),
    where they came from, and the routing."""

    rows: jax.Array
    rows_codes: jax.Array | None
    rows_scale: jax.Array | None
    placement: Placement
    routing: RoutingOut


def swiglu(a: jax.Array, dtype) -> jax.Array:
    """h = silu(a_gate) * a_up for fused pre-activations a = [gate | up], computed in float32."""
    a = a.astype(jnp.float32)
    ffn = a.shape[-1] // 2
    return (jax.nn.silu(a[:, :ffn]) * a[:, ffn:]).astype(dtype)


@functools.cache
def swiglu_with_kernel_backward(dtype_name: str, interpret: bool):
    """`swiglu` whose backward is `pallas_swiglu.swiglu_backward` (d_a in one pass, unquantized): the float
    experts' SwiGLU where ``swiglu`` is ``pallas``. XLA's own backward stores the silu gradient's float32
    sum the size of h before d_a (H200, logbook top-8: 1.4 ms of such a pass in the int8 step's profile)."""
    from . import pallas_swiglu

    @jax.custom_vjp
    def fn(a):
        return swiglu(a, dtype_name)

    def forward(a):
        return swiglu(a, dtype_name), a

    def backward(a, d_h):
        return (pallas_swiglu.swiglu_backward(a, d_h, False, interpret=interpret)[0],)

    fn.defvjp(forward, backward)
    return fn


def gather_tokens(values: jax.Array, source: jax.Array, top_k: int) -> jax.Array:
    """Rows of token-level ``values`` [T, ...] for slots whose source is assignment a (token a // k),
    without a gradient (int8 codes and scales)."""
    return take_rows(values, token_of_slot(source, values.shape[0], top_k))


def pack_rows(plan: LayerPlan, x: jax.Array, expert_ids: jax.Array, valid: jax.Array, groups: int,
              capacity: int) -> tuple[Placement, jax.Array, jax.Array | None, jax.Array | None]:
    """Place the T*k assignments by expert and gather their rows (and pre-quantized codes/scales)."""
    top_k = expert_ids.shape[1]
    placement = place_rows(expert_ids.reshape(-1), valid.reshape(-1), groups, plan.formulation, capacity,
                           interpret=plan.interpret_kernels, int8_gemm=plan.int8_gemm)
    rows = gather_token_rows(x, placement.source, placement.slot_of_row, top_k)
    if not plan.routed_int8:
        return placement, rows, None, None
    codes, scale = quantize_rows(x)
    return placement, rows, gather_tokens(codes, placement.source, top_k), gather_tokens(scale, placement.source, top_k)


def stage_pack(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array) -> Packed:
    """Route (float32), then pack the kept assignments by expert (stable argsort)."""
    routing = route(plan.spec, x, params["router"], frozen.get("router_bias"), plan.router)
    placement, rows, codes, scale = pack_rows(plan, x.astype(plan.compute_dtype), routing.expert_ids,
                                              routing.kept, plan.experts, plan.expert_capacity)
    return Packed(rows, codes, scale, placement, routing)


def step_codes(weight: jax.Array, layout: GroupedLayout) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(codes, scale, transposed codes or None) of expert weights quantized in the step (``int8_routed``,
    ``int8_all``).

    The Pallas int8 kernel (``int8_gemm`` ``pallas``) also gets the codes transposed to [G, N, K], as prepare
    makes them for ``int8_routed_prequant``: Hopper's int8 tensor-core GEMM contracts the minor axis of both
    operands. On the H200 (2026-12-01, zipf, top-8 forward) ``int8_routed`` ran at 159 TF/s on [G, K, N] codes against
    573 for ``int8_routed_prequant`` on [G, N, K] ones, the same kernel otherwise; quantizing the weights in
    the step reads and writes ~2.4 GB there, under a millisecond of the 30 ms gap, so the layout is the
    suspect. Not yet re-measured with this copy (weight-sized, once per step). XLA's own GEMMs (``ragged``,
    ``padded``) choose their layouts themselves.
    """
    codes, scale = quantize_per_expert(weight)
    return codes, scale, jnp.swapaxes(codes, 1, 2) if layout.int8_gemm in EPILOGUE_SCALED else None


def routed_weight_codes(plan: LayerPlan, weight: jax.Array, prequantized: tuple | None, layout: GroupedLayout
                        ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(codes, scale, transposed codes or None) of a routed projection's weights: made once at prepare for
    ``int8_routed_prequant`` (``prequantized``), else quantized here, in the step (`step_codes`)."""
    return prequantized if plan.prequantized else step_codes(weight, layout)


def quantized_rows(rows: jax.Array, codes: jax.Array | None, scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of ``rows`` per row: those given (quantized once per token at the pack), else made here."""
    return (codes, scale) if codes is not None else quantize_rows(rows)


def routed_projection(plan: LayerPlan, rows: jax.Array, rows_codes, rows_scale, weight: jax.Array,
                      prequantized: tuple | None, layout: GroupedLayout) -> jax.Array:
    """rows @ weight[expert] per row, float or int8 as the scheme says.

    ``int8_routed``/``int8_all`` quantize the weight here, in the step; ``int8_routed_prequant``
    consumes the codes made once at prepare (MOE-I8-019: no weight rounding in the hot path).
    """
    if not plan.routed_int8:
        return float_grouped_dot(rows, weight, layout)
    dot = int8_grouped_dot(plan.routed_rule, plan.dtype)
    return dot(rows, *quantized_rows(rows, rows_codes, rows_scale), weight,
               *routed_weight_codes(plan, weight, prequantized, layout), layout)


def stage_up(plan: LayerPlan, packed_rows: tuple, w13: jax.Array, w13_prequantized, layout: GroupedLayout
             ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(h, Q(h) codes, Q(h) scales): h = silu(x W1[e]) * (x W3[e]) for every packed row, from one fused w13
    projection; Q(h) where the SwiGLU kernels make it with h (`LayerPlan.fused_swiglu`), else None twice."""
    rows, codes, scale = packed_rows
    layout = projection_layout(layout, "up")
    if plan.fused_swiglu:
        up = int8_swiglu_projection(plan.routed_rule, plan.dtype, plan.interpret_kernels)
        return up(rows, *quantized_rows(rows, codes, scale), w13,
                  *routed_weight_codes(plan, w13, w13_prequantized, layout), layout)
    a = routed_projection(plan, rows, codes, scale, w13, w13_prequantized, layout)
    if plan.swiglu == "pallas":
        return swiglu_with_kernel_backward(plan.dtype, plan.interpret_kernels)(a), None, None
    return swiglu(a, plan.compute_dtype), None, None


def stage_down(plan: LayerPlan, hidden: tuple, w2: jax.Array, w2_prequantized, layout: GroupedLayout
               ) -> jax.Array:
    """out = Q(h) W2[e] for every packed row (h quantized per row for int8 schemes, unless `stage_up` did)."""
    h, codes, scale = hidden
    return routed_projection(plan, h, codes, scale, w2, w2_prequantized, projection_layout(layout, "down"))


def stage_experts_combine(plan: LayerPlan, packed: Packed, w13: jax.Array, w13_prequantized, w2: jax.Array,
                          w2_prequantized) -> jax.Array:
    """`stage_up`, `stage_down` and `stage_combine` as one custom VJP where the plan runs the kernels of an int8
    scheme (`LayerPlan.fused_swiglu`; `grouped.int8_experts_combine`). The same values as the three stages."""
    layout = packed.placement.layout
    fn = int8_experts_combine(plan.routed_rule, plan.dtype, plan.interpret_kernels)
    return fn(packed.rows, *quantized_rows(packed.rows, packed.rows_codes, packed.rows_scale),
              w13, routed_weight_codes(plan, w13, w13_prequantized, projection_layout(layout, "up")),
              w2, routed_weight_codes(plan, w2, w2_prequantized, projection_layout(layout, "down")),
              layout, packed.placement, packed.routing.gate_weights)


def stage_down_combine(plan: LayerPlan, h: jax.Array, w2: jax.Array, packed: Packed) -> jax.Array:
    """`stage_down` then `stage_combine` of the float experts as one custom VJP where the plan runs the kernels
    (`LayerPlan.fused_combine`; `grouped.float_down_combine`). The same values as the two stages."""
    fn = float_down_combine(plan.interpret_kernels)
    return fn(h, w2, packed.placement.layout, packed.placement, packed.routing.gate_weights)


def stage_combine(out_rows: jax.Array, packed: Packed) -> jax.Array:
    """Unsort the expert outputs back to their tokens and mix them with the gate weights."""
    return weighted_sum(out_rows, packed.placement, packed.routing.gate_weights)


@jax.custom_vjp
def float_dense_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` in the operands' dtype with a float32 result, and a VJP whose products keep that dtype.

    Autodiff of a dot with a float32 result hands both transposed dots a float32 cotangent, so a
    bfloat16 layer's backward runs float32 GEMMs (at HIGHEST precision when the caller pins it). The
    shared expert did so until 2026-12-01: on the H200 (logbook-shared5632, results/h200) forward+backward
    of every scheme with a float shared expert took ~80 ms more than its forward's three times, 95-200
    TF/s against 478-534 for the int8-shared schemes, whose dot had its own VJP. Here the cotangent is
    rounded to the operands' dtype once, as the routed experts' `float_grouped_dot` does; float32 layers
    are unchanged.
    """
    return jnp.dot(x, w, precision=precision_for(x.dtype), preferred_element_type=jnp.float32)


def _float_dense_dot_forward(x: jax.Array, w: jax.Array):
    return float_dense_dot(x, w), (x, w)


def _float_dense_dot_backward(residuals, g: jax.Array):
    x, w = residuals
    g = g.astype(x.dtype)
    precision = precision_for(x.dtype)
    dx = jnp.dot(g, w.T, precision=precision, preferred_element_type=jnp.float32)
    dw = jnp.dot(x.T, g, precision=precision, preferred_element_type=w.dtype)  # no float32 weight-sized temporary
    return dx.astype(x.dtype), dw


float_dense_dot.defvjp(_float_dense_dot_forward, _float_dense_dot_backward)


def shared_expert(plan: LayerPlan, params: dict, x: jax.Array) -> jax.Array | None:
    """The shared SwiGLU on every token, fused w13; int8 per-token x per-output-channel where the
    scheme quantizes it (quantized in the step, straight-through backward). float32 result."""
    if "shared_w13" not in params:
        return None
    dtype = plan.compute_dtype
    x = x.astype(dtype)
    w13, w2 = params["shared_w13"], params["shared_w2"]
    if not plan.shared_int8:
        return float_dense_dot(swiglu(float_dense_dot(x, w13), dtype), w2)
    dot = int8_dense_dot(plan.dtype)
    h = swiglu(dot(x, *quantize_rows(x), w13, *quantize_columns(w13)), dtype)
    return dot(h, *quantize_rows(h), w2, *quantize_columns(w2)).astype(jnp.float32)


def prequantized_weights(frozen: dict) -> tuple[tuple | None, tuple | None]:
    """(codes, scale, transposed codes) of w13 and of w2 made at prepare, or None."""
    if "w13_codes" not in frozen:
        return None, None
    return tuple((frozen[f"{name}_codes"], frozen[f"{name}_scale"], frozen[f"{name}_codes_t"])
                 for name in ("w13", "w2"))


def finish(plan: LayerPlan, routed: jax.Array, shared: jax.Array | None) -> jax.Array:
    return (routed if shared is None else routed + shared).astype(plan.compute_dtype)


def run_layer(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array) -> tuple[jax.Array, RoutingOut, dict]:
    """(y, routing, needed sizes) on one device (``plan.ep_size`` 1; `expert_parallel.run_layer_ep`
    otherwise): pack -> up -> down -> combine, plus the shared expert.

    ``needed``: the static sizes this routing needs (``expert_capacity`` for the padded formulation),
    for the caller to check against the plan and recompile with a larger bucket if exceeded.
    """
    w13_q, w2_q = prequantized_weights(frozen)
    packed = stage_pack(plan, params, frozen, x)
    layout = packed.placement.layout
    if plan.fused_swiglu:
        routed = stage_experts_combine(plan, packed, params["w13"], w13_q, params["w2"], w2_q)
    else:
        hidden = stage_up(plan, (packed.rows, packed.rows_codes, packed.rows_scale), params["w13"], w13_q, layout)
        if plan.fused_combine:  # float experts with the kernels
            routed = stage_down_combine(plan, hidden[0], params["w2"], packed)
        else:
            routed = stage_combine(stage_down(plan, hidden, params["w2"], w2_q, layout), packed)
    y = finish(plan, routed, shared_expert(plan, params, x))
    needed = {"expert_capacity": packed.placement.needed_capacity, "dispatch_capacity": jnp.int32(0)}
    return y, packed.routing, needed


def run_bypass(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array) -> jax.Array:
    """Every expert on every token, [E, T, H], gate weights unused (GPTQ calibration statistics)."""
    tokens = x.shape[0]
    x = x.astype(plan.compute_dtype)
    experts = jnp.repeat(jnp.arange(plan.experts, dtype=jnp.int32), tokens)
    rows_x = jnp.tile(x, (plan.experts, 1))
    plan_all = LayerPlan(plan.spec, plan.scheme, plan.dtype, plan.formulation, plan.experts,
                         expert_capacity=tokens if plan.formulation == "padded" else 0, platform=plan.platform,
                         int8_gemm=plan.int8_gemm, swiglu=plan.swiglu)
    placement, rows, codes, scale = pack_rows(plan_all, rows_x, experts[:, None], jnp.ones((experts.size, 1), bool),
                                              plan.experts, plan_all.expert_capacity)
    w13_q, w2_q = prequantized_weights(frozen)
    hidden = stage_up(plan_all, (rows, codes, scale), params["w13"], w13_q, placement.layout)
    out_rows = stage_down(plan_all, hidden, params["w2"], w2_q, placement.layout)
    out = take_rows(out_rows, placement.slot_of_row)
    return out.reshape(plan.experts, tokens, -1)
