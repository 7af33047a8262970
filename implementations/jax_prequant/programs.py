"""The jit-compiled programs of the `jax_prequant` backend, each keyed by its static `LayerPlan`.

``forward``: y, routing and the sizes the routing needs. ``forward_backward``: y and the VJP of
(y, balance_loss) for cotangents (dy, balance_coeff) — the gradient of
``sum(y * dy) + balance_coeff * balance_loss`` — with respect to x and the float parameters.
The stage programs (pack, up, down, combine, shared) time the forward's parts separately; on an
expert-parallel plan, `ep_forward_stages` (route, dispatch, experts, combine, shared).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .env import INT8_GPU_OPTIONS
from .expert_parallel import (
    run_layer_ep,
    stage_combine_ep,
    stage_dispatch_ep,
    stage_experts_ep,
    stage_route_ep,
)
from .layer import (
    LayerPlan,
    Packed,
    prequantized_weights,
    run_bypass,
    run_layer,
    shared_expert,
    stage_combine,
    stage_down,
    stage_pack,
    stage_up,
)
from .quant import quantize_columns, quantize_per_expert
from .routing import route


def _run_layer(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array, differentiated: bool = False):
    """The layer on one device, or with its experts split over ``plan.ep_size`` devices
    (``differentiated``: the program takes its VJP too)."""
    if plan.ep_size > 1:
        return run_layer_ep(plan, params, frozen, x, differentiated)
    return run_layer(plan, params, frozen, x)


class _Program:
    """A program jit-compiled per `LayerPlan` (static), with XLA's default options or, for plans
    with int8 GEMMs on a GPU, `INT8_GPU_OPTIONS` (cuBLASLt int8 GEMMs; see `env`).

    Called like the jitted function: ``program(*arrays, plan)`` or ``program(*arrays, plan=plan)``.
    """

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.default = jax.jit(fn, static_argnames=("plan",))
        self.int8_gpu = jax.jit(fn, static_argnames=("plan",), compiler_options=INT8_GPU_OPTIONS)

    def for_plan(self, plan: LayerPlan):
        return self.int8_gpu if plan.int8_gemms_on_gpu else self.default

    def __call__(self, *args, plan: LayerPlan | None = None):
        if plan is None:
            *args, plan = args
        return self.for_plan(plan)(*args, plan=plan)

    def lower(self, *args, plan: LayerPlan):
        return self.for_plan(plan).lower(*args, plan=plan)

    def clear_cache(self) -> None:
        self.default.clear_cache()
        self.int8_gpu.clear_cache()


_jit = _Program


@_jit
def forward(params: dict, frozen: dict, x: jax.Array, plan: LayerPlan):
    """(y, expert_ids, gate_weights, balance_loss, needed sizes)."""
    y, routing, needed = _run_layer(plan, params, frozen, x)
    return y, routing.expert_ids, routing.gate_weights, routing.balance_loss, needed


@_jit
def forward_backward(params: dict, frozen: dict, x: jax.Array, dy: jax.Array, balance_coeff: jax.Array,
                     plan: LayerPlan):
    """(d params, d x, y, needed sizes) of L = sum(y * dy) + balance_coeff * balance_loss.

    y is an output as in a training step, whose loss reads it: without it XLA drops the forward's combine, which
    no gradient needs, and the step would time less work than a torch layer's forward+backward does."""

    def objective(params, x):
        y, routing, needed = _run_layer(plan, params, frozen, x, differentiated=True)
        return (y, routing.balance_loss), needed

    (y, _), pullback, needed = jax.vjp(objective, params, x, has_aux=True)
    d_params, d_x = pullback((dy.astype(y.dtype), jnp.asarray(balance_coeff, jnp.float32)))
    return d_params, d_x, y, needed


def zero_like_scalar(like: jax.Array) -> jax.Array:
    """A float32 zero committed to ``like``'s devices (replicated where ``like`` is sharded over a mesh)."""
    sharding = like.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(jnp.float32(0.0), sharding)


@functools.partial(jax.jit, static_argnames=("spec",))
def routing_only(router: jax.Array, router_bias: jax.Array | None, x: jax.Array, spec):
    """(expert_ids, kept): what sizing the static capacities needs. Keyed by the spec alone (not the
    plan), so every scheme and dtype of a layer shares one compiled program."""
    routing = route(spec, x, router, router_bias)
    return routing.expert_ids, routing.kept


@_jit
def bypass(params: dict, frozen: dict, x: jax.Array, plan: LayerPlan):
    return run_bypass(plan, params, frozen, x)


@jax.jit
def quantize_experts(w13: jax.Array, w2: jax.Array):
    """Per-expert int8 codes and scales of both routed weights (prepare time, or for effective weights)."""
    return quantize_per_expert(w13), quantize_per_expert(w2)


@jax.jit
def transpose_codes(w13_codes: jax.Array, w2_codes: jax.Array):
    """[E, in, out] -> [E, out, in] copies of the pre-quantized codes (prepare time)."""
    return jnp.swapaxes(w13_codes, 1, 2), jnp.swapaxes(w2_codes, 1, 2)


@jax.jit
def quantize_shared(w13: jax.Array, w2: jax.Array):
    """Per-output-channel int8 codes and scales of the shared expert's weights."""
    return quantize_columns(w13), quantize_columns(w2)


# -- stages (single device), for stage timing --------------------------------------------------------

@_jit
def pack_stage(params, frozen, x, plan: LayerPlan) -> Packed:
    return stage_pack(plan, params, frozen, x)


@_jit
def up_stage(params, frozen, packed: Packed, plan: LayerPlan):
    w13_q, _ = prequantized_weights(frozen)
    rows = (packed.rows, packed.rows_codes, packed.rows_scale)
    return stage_up(plan, rows, params["w13"], w13_q, packed.placement.layout)


@_jit
def down_stage(params, frozen, hidden, packed: Packed, plan: LayerPlan):
    _, w2_q = prequantized_weights(frozen)
    return stage_down(plan, hidden, params["w2"], w2_q, packed.placement.layout)


@_jit
def combine_stage(out_rows, packed: Packed, plan: LayerPlan):
    return stage_combine(out_rows, packed)


@_jit
def shared_stage(params, x, plan: LayerPlan):
    return shared_expert(plan, params, x)


# -- stages of the expert-parallel forward (over the plan's mesh), for stage timing -----------------------

@_jit
def ep_route_stage(params, frozen, x, plan: LayerPlan):
    return stage_route_ep(plan, params, frozen, x)


@_jit
def ep_dispatch_stage(send_expert, payload, plan: LayerPlan):
    return stage_dispatch_ep(plan, send_expert, payload)


@_jit
def ep_experts_stage(params, frozen, incoming_expert, received, plan: LayerPlan):
    return stage_experts_ep(plan, params, frozen, incoming_expert, received)


@_jit
def ep_combine_stage(x, back, sent, gates, shared, plan: LayerPlan):
    return stage_combine_ep(plan, x, back, sent, gates, shared)


def ep_forward_stages(params: dict, frozen: dict, x: jax.Array, plan: LayerPlan):
    """The expert-parallel forward run once as its separately jitted stage programs (`expert_parallel`'s
    ``stage_*_ep``): (y, {stage: a callable re-running that stage program on the same inputs}).

    Stages, as torch_triton's: ``route`` (routing on the global tokens + each source's dispatch placement
    and payload: rows gathered, or quantized to int8 codes + scales), ``dispatch`` (the all-to-alls of the
    slots' expert ids and payload), ``experts`` (the local experts on the received slots), ``combine``
    (reverse all-to-all + gate-weighted sum + the shared expert's output), and ``shared`` (the shared
    expert) where the layer has one. y equals `forward`'s."""
    _, gates, sent = ep_route_stage(params, frozen, x, plan)
    incoming, received = ep_dispatch_stage(sent["send_expert"], sent["payload"], plan)
    back = ep_experts_stage(params, frozen, incoming, received, plan)
    shared = shared_stage(params, x, plan) if "shared_w13" in params else None
    y = ep_combine_stage(x, back, sent, gates, shared, plan)
    stages = {"route": lambda: ep_route_stage(params, frozen, x, plan),
              "dispatch": lambda: ep_dispatch_stage(sent["send_expert"], sent["payload"], plan),
              "experts": lambda: ep_experts_stage(params, frozen, incoming, received, plan),
              "combine": lambda: ep_combine_stage(x, back, sent, gates, shared, plan)}
    if shared is not None:
        stages["shared"] = lambda: shared_stage(params, x, plan)
    return y, stages


# -- what a program sends ---------------------------------------------------------------------------------

def exchanged_operands(program: _Program, *args, plan: LayerPlan) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype name, per-device shape) of the operand of every ``all_to_all`` in ``program`` traced for
    these arguments, in program order (sub-programs included: shard_map bodies, custom VJPs, the
    backward). Each device sends that many bytes per all-to-all, its own block included."""
    from jax.extend.core import jaxprs_in_params

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "all_to_all":
                yield from ((v.aval.dtype.name, tuple(v.aval.shape)) for v in eqn.invars)
            for sub in jaxprs_in_params(eqn.params):
                yield from walk(sub)

    return list(walk(program.for_plan(plan).trace(*args, plan=plan).jaxpr.jaxpr))


# -- compiled-program housekeeping ------------------------------------------------------------------------

_PROGRAMS = (forward, forward_backward, routing_only, bypass, quantize_experts, transpose_codes, quantize_shared,
             pack_stage, up_stage, down_stage, combine_stage, shared_stage, ep_route_stage, ep_dispatch_stage,
             ep_experts_stage, ep_combine_stage)
#: Layer plans whose programs may stay compiled at once.
MAX_LIVE_PLANS = 32
_live_plans: set = set()


def note_plan(plan: LayerPlan) -> None:
    """Record that ``plan`` is about to run; past `MAX_LIVE_PLANS` plans, drop every compiled program.

    Why: each XLA:CPU executable keeps its own memory mappings, and a conformance run compiles about a
    thousand programs; it reached the kernel's limit of 65,530 mappings per process and the next
    compilation crashed (a segfault inside XLA, 2026-11-23). Recompiling a dropped plan costs a second.
    """
    if plan in _live_plans:
        return
    if len(_live_plans) >= MAX_LIVE_PLANS:
        for program in _PROGRAMS:
            program.clear_cache()
        _live_plans.clear()
    _live_plans.add(plan)
