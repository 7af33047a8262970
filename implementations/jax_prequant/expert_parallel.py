"""Expert parallelism: experts sharded over mesh axis ``ep``, tokens sent to the devices that own
their experts with ``all_to_all``, computed there, and sent back (``shard_map``).

Per device d, with T_l local tokens and E_l = E / N local experts (experts d*E_l .. (d+1)*E_l - 1):

1. dispatch: each kept assignment (token, slot) goes to device ``expert // E_l``; the rows for each
   destination are packed into ``dispatch_capacity`` slots (stable: token order is kept);
2. ``all_to_all`` the rows and their local expert ids. A row travels as int8 codes and one float32
   scale (H + 4 bytes instead of H times the float width; `dispatch_int8`) where the scheme quantizes
   the routed activations per token anyway (``int8_routed``, ``int8_all``, ``int8_routed_prequant``:
   the codes are the ones the expert would make from the float row, so the result is unchanged), and
   for every scheme under ``LayerPlan.dispatch == "int8"``; otherwise as the float row;
3. the local experts run the same up/down stages as one device, over the received rows;
4. ``all_to_all`` the outputs back, unsort, and mix with the gate weights at the source.

The backward's exchanges stay float: the cotangent of each received row goes back to its token
(straight-through: the dispatch's quantizer is the identity for the gradient). One exception keeps float
rows in the dispatch: the forward+backward program of ``int8_routed_prequant`` under the default
dispatch, whose weight gradient is the float surrogate ``dw = x^T g`` of the un-quantized rows
(MOE-I8-024), so the expert device needs those rows; it quantizes them itself.

Routing, capacity and the balance loss are computed on the global token set before the dispatch, so
they equal the one-device result; tokens are padded to a multiple of N with assignments that are
placed nowhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .grouped import Placement, gather_token_rows, permute_rows, place_rows, take_rows
from .layer import (
    LayerPlan,
    finish,
    gather_tokens,
    prequantized_weights,
    shared_expert,
    stage_down,
    stage_up,
    weighted_sum,
)
from .quant import dequantize, quantize_rows
from .routing import RoutingOut, route

AXIS = "ep"


def _shard_map(fn, mesh, in_specs, out_specs, check_vma: bool = True):
    """``jax.shard_map`` where it exists (jax >= 0.6), the experimental one before. ``check_vma``: JAX's
    check of which values vary over the mesh axes (``check_rep`` before jax 0.6)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def _checks_vma(plan: LayerPlan) -> bool:
    """Whether the shard_map running the experts keeps JAX's variance check: not around Pallas kernels
    (the ``pallas`` formulation's, or the int8 GEMM's: `LayerPlan.runs_pallas`), whose outputs carry no
    manual-axis variance and whose interpreter mixes varying and invariant values (jax 0.10.2:
    "dynamic_slice requires varying manual axes to match"). Safe here: every input of those shard_maps
    is sharded over ``ep`` (none replicated, so the check changes no transpose), and the replicated
    ``needed`` output is made equal on every device by ``pmax``."""
    return not plan.runs_pallas


def _exchange(values: jax.Array) -> jax.Array:
    """Slot block j of this device's buffer goes to device j; block i of the result came from device i."""
    return jax.lax.all_to_all(values, AXIS, 0, 0, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch_int8(x: jax.Array, source: jax.Array, slot_of_assignment: jax.Array, top_k: int):
    """Send token rows to their experts' devices as int8: (codes int8 [S, H], scale float32 [S, 1],
    rows [S, H]) received, for the S dispatch slots of this device.

    Each token row of ``x`` [T_l, H] is quantized once, here at its source (per token, as the expert
    would); the codes and scales of the slots (``source``: the assignment filling each slot) are what
    crosses the all-to-all. ``rows`` is the dequantized row, codes x scale, in x's dtype: what a float
    expert computes with, and the carrier of the rows' gradient. Backward (straight-through): the rows'
    cotangent goes back as float and is summed over each token's k slots; codes and scales get none.
    """
    codes_out, scale_out = _int8_payload(x, source, top_k)
    return _int8_received(_exchange(codes_out), _exchange(scale_out), x.dtype)


def _int8_payload(x: jax.Array, source: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of the dispatch slots at the source: each token row quantized once, gathered per slot."""
    codes, scale = quantize_rows(x)
    return gather_tokens(codes, source, top_k), gather_tokens(scale, source, top_k)


def _int8_received(codes_in: jax.Array, scale_in: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codes, scales, dequantized rows) of the received slots."""
    return codes_in, scale_in, dequantize(codes_in, scale_in, dtype)


def _dispatch_int8_forward(x, source, slot_of_assignment, top_k):
    return dispatch_int8(x, source, slot_of_assignment, top_k), slot_of_assignment


def _dispatch_int8_backward(top_k, slot_of_assignment, cotangents):
    _, _, g_rows = cotangents
    per_assignment = take_rows(_exchange(g_rows), slot_of_assignment)
    tokens = slot_of_assignment.shape[0] // top_k
    return per_assignment.reshape(tokens, top_k, *g_rows.shape[1:]).sum(axis=1), None, None


dispatch_int8.defvjp(_dispatch_int8_forward, _dispatch_int8_backward)


def sends_int8(plan: LayerPlan, differentiated: bool) -> bool:
    """Whether the dispatch sends int8 codes + scales (see the module docstring)."""
    if plan.dispatch == "int8":
        return True
    return plan.routed_activations_per_token and not (differentiated and plan.prequantized)


def _placement_at_source(plan: LayerPlan, expert_ids, kept, local_experts: int):
    """(send placement, send_expert): the dispatch slots of this device's assignments by destination device,
    and the local expert id each slot's row has there (``local_experts`` for an empty slot)."""
    assignments = expert_ids.size
    flat = expert_ids.reshape(-1)
    send = place_rows(flat // local_experts, kept.reshape(-1), plan.ep_size, "padded", plan.dispatch_capacity)
    placed = send.source < assignments
    send_expert = jnp.where(placed, (flat % local_experts)[jnp.minimum(send.source, assignments - 1)], local_experts)
    return send, send_expert


def _payload_at_source(plan: LayerPlan, differentiated: bool, x, send, top_k: int) -> tuple:
    """What the dispatch sends per slot, before the all-to-all: (codes, scales) or (float rows,)."""
    if sends_int8(plan, differentiated):
        return _int8_payload(x, send.source, top_k)
    return (gather_token_rows(x, send.source, send.slot_of_row, top_k),)


def _received_rows(plan: LayerPlan, differentiated: bool, received: tuple, dtype) -> tuple:
    """(rows, codes, scales) from the received payload (codes and scales None for float rows)."""
    if sends_int8(plan, differentiated):
        codes, scale, rows = _int8_received(*received, dtype)
        return rows, codes, scale
    return received[0], None, None


def _experts_on_received(plan: LayerPlan, incoming_expert, rows, codes, scale, w13, w2, w13_q, w2_q):
    """The local experts over the received slots: (outputs in received slot order, needed expert capacity)."""
    local_experts = w13.shape[0]
    received = place_rows(incoming_expert, incoming_expert < local_experts, local_experts,
                          plan.formulation, plan.expert_capacity, interpret=plan.interpret_kernels,
                          int8_gemm=plan.int8_gemm)
    layout = received.layout
    rows = (permute_rows(rows, received.source, received.slot_of_row),
            *(None if value is None else take_rows(value, received.source) for value in (codes, scale)))
    hidden = stage_up(plan, rows, w13, w13_q, layout)
    out_rows = stage_down(plan, hidden, w2, w2_q, layout)
    return permute_rows(out_rows, received.slot_of_row, received.source), received.needed_capacity


def _local_layer(plan: LayerPlan, differentiated: bool, x, expert_ids, gates, kept, w13, w2, w13_q, w2_q):
    """One device's share: dispatch, local experts, return, combine. Returns (y_local, needed sizes)."""
    top_k = expert_ids.shape[1]
    send, send_expert = _placement_at_source(plan, expert_ids, kept, w13.shape[0])
    incoming_expert = _exchange(send_expert)
    if sends_int8(plan, differentiated):
        codes, scale, rows = dispatch_int8(x, send.source, send.slot_of_row, top_k)
    else:  # float rows; an int8 scheme's expert quantizes them (`layer.routed_projection`)
        codes = scale = None
        (rows,) = map(_exchange, _payload_at_source(plan, differentiated, x, send, top_k))
    back, expert_needed = _experts_on_received(plan, incoming_expert, rows, codes, scale, w13, w2, w13_q, w2_q)
    returned = _exchange(back)
    y = weighted_sum(returned, send, gates)
    needed = {"expert_capacity": jax.lax.pmax(expert_needed, AXIS),
              "dispatch_capacity": jax.lax.pmax(send.needed_capacity, AXIS)}
    return y, needed


def _pad_tokens(values: jax.Array, tokens: int, fill) -> jax.Array:
    extra = tokens - values.shape[0]
    if extra == 0:
        return values
    return jnp.concatenate([values, jnp.full((extra, *values.shape[1:]), fill, values.dtype)])


def _routed_inputs(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array) -> tuple[RoutingOut, tuple]:
    """(routing on the global token set, the per-device inputs: x in the compute dtype, expert ids, gate
    weights and kept, padded to a multiple of N tokens)."""
    n = plan.ep_size
    routing = route(plan.spec, x, params["router"], frozen.get("router_bias"), plan.router)
    padded = -(-x.shape[0] // n) * n
    return routing, (_pad_tokens(x.astype(plan.compute_dtype), padded, 0), _pad_tokens(routing.expert_ids, padded, 0),
                     _pad_tokens(routing.gate_weights, padded, 0), _pad_tokens(routing.kept, padded, False))


def _expert_weights(params: dict, frozen: dict) -> tuple:
    w13_q, w2_q = prequantized_weights(frozen)
    return params["w13"], params["w2"], w13_q, w2_q


def _sharded_specs(values) -> tuple:
    return jax.tree.map(lambda _: P(AXIS), values)


def run_layer_ep(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array, differentiated: bool = False
                 ) -> tuple[jax.Array, RoutingOut, dict]:
    """(y, routing, needed sizes) with experts sharded over ``plan.mesh`` axis ``ep``.

    ``differentiated``: the program also takes the layer's VJP (it decides what the dispatch sends for
    ``int8_routed_prequant``: `sends_int8`).
    """
    routing, local_inputs = _routed_inputs(plan, params, frozen, x)
    weights = _expert_weights(params, frozen)
    sharded = P(AXIS)
    in_specs = (sharded,) * 4 + _sharded_specs(weights)
    local = _shard_map(lambda *args: _local_layer(plan, differentiated, *args), plan.mesh, in_specs,
                       (sharded, {"expert_capacity": P(), "dispatch_capacity": P()}), check_vma=_checks_vma(plan))
    routed, needed = local(*local_inputs, *weights)
    y = finish(plan, routed[:x.shape[0]], shared_expert(plan, params, x))
    return y, routing, needed


# -- the forward as separate stages (`programs.ep_*_stage`: stage timing) ------------------------------------
# Each is `run_layer_ep`'s forward (``differentiated=False``) cut at an all-to-all, over the same mesh, from
# the same functions: route (+ the dispatch's placement and payload at the source) -> dispatch (the
# all-to-alls of the slots' expert ids and payload) -> experts (on the received slots) -> combine (the
# reverse all-to-all, the gate-weighted sum, + the shared expert's output). Composed, they give the one
# program's output; between them the intermediates are materialized in device memory.

def stage_route_ep(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array) -> tuple[RoutingOut, jax.Array, dict]:
    """(routing, padded gate weights, the sources' dispatch: ``source``, ``slot_of_row``, ``send_expert``,
    ``payload``), all but the routing sharded over ``ep``."""
    routing, (x_local, expert_ids, gates, kept) = _routed_inputs(plan, params, frozen, x)
    local_experts = params["w13"].shape[0] // plan.ep_size

    def at_source(x, expert_ids, kept):
        send, send_expert = _placement_at_source(plan, expert_ids, kept, local_experts)
        return {"source": send.source, "slot_of_row": send.slot_of_row, "send_expert": send_expert,
                "payload": _payload_at_source(plan, False, x, send, expert_ids.shape[1])}

    sent = _shard_map(at_source, plan.mesh, (P(AXIS),) * 3, P(AXIS))(x_local, expert_ids, kept)
    return routing, gates, sent


def stage_dispatch_ep(plan: LayerPlan, send_expert: jax.Array, payload: tuple) -> tuple[jax.Array, tuple]:
    """(incoming expert ids, received payload): the dispatch's all-to-alls."""
    def exchange(send_expert, payload):
        return _exchange(send_expert), tuple(map(_exchange, payload))

    return _shard_map(exchange, plan.mesh, (P(AXIS), _sharded_specs(payload)), P(AXIS))(send_expert, payload)


def stage_experts_ep(plan: LayerPlan, params: dict, frozen: dict, incoming_expert: jax.Array, received: tuple
                     ) -> jax.Array:
    """The local experts' outputs on the received slots, in received slot order (ready to send back)."""
    weights = _expert_weights(params, frozen)

    def local(incoming_expert, received, *weights):
        rows, codes, scale = _received_rows(plan, False, received, plan.compute_dtype)
        return _experts_on_received(plan, incoming_expert, rows, codes, scale, *weights)[0]

    in_specs = (P(AXIS), _sharded_specs(received), *_sharded_specs(weights))
    return _shard_map(local, plan.mesh, in_specs, P(AXIS), check_vma=_checks_vma(plan))(incoming_expert, received,
                                                                                         *weights)


def stage_combine_ep(plan: LayerPlan, x: jax.Array, back: jax.Array, sent: dict, gates: jax.Array,
                     shared: jax.Array | None) -> jax.Array:
    """y: the reverse all-to-all, each token's gate-weighted sum at its source, + the shared expert's output."""
    def local(back, source, slot_of_row, gates):
        return weighted_sum(_exchange(back), Placement(source, slot_of_row, None, None), gates)

    routed = _shard_map(local, plan.mesh, (P(AXIS),) * 4, P(AXIS))(back, sent["source"], sent["slot_of_row"], gates)
    return finish(plan, routed[:x.shape[0]], shared)
