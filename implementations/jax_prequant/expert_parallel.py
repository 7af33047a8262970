"""Expert parallelism: experts sharded over mesh axis ``ep``, tokens sent to the devices that own
their experts with ``all_to_all``, computed there, and sent back (``shard_map``).

Per device d, with T_l local tokens and E_l = E / N local experts (experts d*E_l .. (d+1)*E_l - 1):

1. dispatch: each kept assignment (token, slot) goes to device ``expert // E_l``; the rows for each
   destination are packed into ``dispatch_capacity`` slots (stable: token order is kept), with the
   activation codes/scales already quantized per token at the source;
2. ``all_to_all`` the float rows, codes, scales and local expert ids;
3. the local experts run the same up/down stages as one device, over the received rows;
4. ``all_to_all`` the outputs back, unsort, and mix with the gate weights at the source.

Routing, capacity and the balance loss are computed on the global token set before the dispatch, so
they equal the one-device result; tokens are padded to a multiple of N with assignments that are
placed nowhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .grouped import gather_token_rows, permute_rows, place_rows, take_rows
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
from .quant import quantize_rows
from .routing import RoutingOut, route

AXIS = "ep"


def _shard_map(fn, mesh, in_specs, out_specs):
    """``jax.shard_map`` where it exists (jax >= 0.6), the experimental one before."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _exchange(values: jax.Array) -> jax.Array:
    """Slot block j of this device's buffer goes to device j; block i of the result came from device i."""
    return jax.lax.all_to_all(values, AXIS, 0, 0, tiled=True)


def _local_layer(plan: LayerPlan, x, expert_ids, gates, kept, w13, w2, w13_q, w2_q):
    """One device's share: dispatch, local experts, return, combine. Returns (y_local, needed sizes)."""
    n, top_k = plan.ep_size, expert_ids.shape[1]
    local_experts = w13.shape[0]
    assignments = expert_ids.size
    flat = expert_ids.reshape(-1)
    send = place_rows(flat // local_experts, kept.reshape(-1), n, "padded", plan.dispatch_capacity)
    placed = send.source < assignments
    send_expert = jnp.where(placed, (flat % local_experts)[jnp.minimum(send.source, assignments - 1)], local_experts)
    outgoing = {"rows": gather_token_rows(x, send.source, send.slot_of_row, top_k), "expert": send_expert}
    if plan.routed_int8:
        codes, scale = quantize_rows(x)
        outgoing["codes"] = gather_tokens(codes, send.source, top_k)
        outgoing["scale"] = gather_tokens(scale, send.source, top_k)
    incoming = {name: _exchange(value) for name, value in outgoing.items()}

    received = place_rows(incoming["expert"], incoming["expert"] < local_experts, local_experts,
                          plan.formulation, plan.expert_capacity)
    layout = received.layout
    rows = (permute_rows(incoming["rows"], received.source, received.slot_of_row),
            *(take_rows(incoming[name], received.source) if name in incoming else None for name in ("codes", "scale")))
    hidden = stage_up(plan, rows, w13, w13_q, layout)
    out_rows = stage_down(plan, hidden, w2, w2_q, layout)
    returned = _exchange(permute_rows(out_rows, received.slot_of_row, received.source))
    y = weighted_sum(returned, send, gates)
    needed = {"expert_capacity": jax.lax.pmax(received.needed_capacity, AXIS),
              "dispatch_capacity": jax.lax.pmax(send.needed_capacity, AXIS)}
    return y, needed


def _pad_tokens(values: jax.Array, tokens: int, fill) -> jax.Array:
    extra = tokens - values.shape[0]
    if extra == 0:
        return values
    return jnp.concatenate([values, jnp.full((extra, *values.shape[1:]), fill, values.dtype)])


def run_layer_ep(plan: LayerPlan, params: dict, frozen: dict, x: jax.Array) -> tuple[jax.Array, RoutingOut, dict]:
    """(y, routing, needed sizes) with experts sharded over ``plan.mesh`` axis ``ep``."""
    n = plan.ep_size
    routing = route(plan.spec, x, params["router"], frozen.get("router_bias"))
    tokens = x.shape[0]
    padded = -(-tokens // n) * n
    local_inputs = (_pad_tokens(x.astype(plan.compute_dtype), padded, 0), _pad_tokens(routing.expert_ids, padded, 0),
                    _pad_tokens(routing.gate_weights, padded, 0), _pad_tokens(routing.kept, padded, False))
    w13_q, w2_q = prequantized_weights(frozen)
    weights = (params["w13"], params["w2"], w13_q, w2_q)
    sharded = P(AXIS)
    in_specs = (sharded,) * 4 + jax.tree.map(lambda _: sharded, weights)
    local = _shard_map(lambda *args: _local_layer(plan, *args), plan.mesh, in_specs,
                       (sharded, {"expert_capacity": P(), "dispatch_capacity": P()}))
    routed, needed = local(*local_inputs, *weights)
    y = finish(plan, routed[:tokens], shared_expert(plan, params, x))
    return y, routing, needed
