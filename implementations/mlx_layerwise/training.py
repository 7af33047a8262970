"""Gradients, the re-quantizing SGD step and the layerwise / grouped trainer, in MLX.

Every gradient here is taken in two phases. First the router runs and a `DispatchPlan` fixes the
selection (top-k is piecewise constant, so its selection is a constant of the gradient anyway) and
the set of experts that received tokens. Then `mx.value_and_grad` runs over those experts'
sub-stacks only: the weight gradients are [U, ...] for the U used experts, never [E, ...] (the
MoE8 report's dense-gradient memory problem). Gradients of a quantized expert come from
`trainable_gather_qmm`'s straight-through VJP.

The residual stack and its loss are those of `qmoe.reference.updates`:
``x_{l+1} = x_l + moe_l(x_l)``, ``L = 0.5 * sum((x_L - target)^2) / T + balance_coeff * sum_l balance_l``.

This module imports mlx at import time; `qmoe.implementations.mlx_layerwise` imports it lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from qmoe.reference.spec import MoESpec

from .layer import DispatchPlan, LayerWeights, forward_planned, plan_layer

#: Float (never quantized) parameters that SGD steps; ``router_bias`` steers selection only.
FLOAT_TRAINABLE: tuple[str, ...] = ("router", "shared_w13", "shared_w2")


def trainable_leaves(weights: LayerWeights, plan: DispatchPlan) -> dict[str, mx.array]:
    """The arrays a layer's gradient is taken with respect to: float params and the used experts' leaves."""
    index = plan.used_index
    leaves = {"router": weights.router, "w13": weights.w13.take(index).leaf(), "w2": weights.w2.take(index).leaf()}
    for name in ("shared_w13", "shared_w2"):
        if getattr(weights, name) is not None:
            leaves[name] = getattr(weights, name)
    return leaves


def forward_with_leaves(spec: MoESpec, weights: LayerWeights, plan: DispatchPlan, leaves: dict[str, mx.array],
                        x: mx.array):
    """`forward_planned` with the trainable arrays taken from ``leaves`` (what autodiff varies)."""
    index = plan.used_index
    trained = (weights.w13.take(index).with_leaf(leaves["w13"]), weights.w2.take(index).with_leaf(leaves["w2"]))
    floats = {name: leaves[name] for name in FLOAT_TRAINABLE if name in leaves}
    return forward_planned(spec, weights.replace(**floats), x, plan, trained)


@dataclass(frozen=True)
class LayerGradients:
    """Gradients of one layer on the device; expert gradients for ``plan.used`` only, qmoe layout."""

    plan: DispatchPlan
    grads: dict[str, mx.array]


def to_qmoe_gradients(weights: LayerWeights, grads: dict[str, mx.array]) -> dict[str, mx.array]:
    """Expert leaf cotangents as gradients of the dequantized weights, qmoe layout [U, in, out]."""
    out = dict(grads)
    out["w13"] = weights.w13.leaf_grad_to_qmoe(grads["w13"])
    out["w2"] = weights.w2.leaf_grad_to_qmoe(grads["w2"])
    return out


def layer_gradients(spec: MoESpec, weights: LayerWeights, x: mx.array, dy: mx.array,
                    balance_coeff: float = 0.0) -> tuple[mx.array, LayerGradients]:
    """d/d(x, params) of L = sum(y * dy) + balance_coeff * balance_loss for one layer; returns (L, grads).

    ``grads`` holds ``x`` too. The loss is formed in float32 whatever the compute dtype.
    """
    plan = plan_layer(spec, weights, x)

    def objective(inputs: dict[str, mx.array]) -> mx.array:
        params = {k: v for k, v in inputs.items() if k != "x"}
        y, routing = forward_with_leaves(spec, weights, plan, params, inputs["x"])
        return mx.sum(y.astype(mx.float32) * dy) + balance_coeff * routing.balance_loss

    loss, grads = mx.value_and_grad(objective)({"x": x, **trainable_leaves(weights, plan)})
    return loss, LayerGradients(plan, to_qmoe_gradients(weights, grads))


def sgd_step(weights: LayerWeights, gradients: LayerGradients, lr: float) -> LayerWeights:
    """One SGD step: experts re-quantized (one projection at a time), float parameters W - lr * g.

    Matches `qmoe.reference.updates.requantize_step` for the experts that received tokens; experts with
    none keep their codes bit for bit (their gradient is exactly zero; see `QuantizedExperts.sgd_step`).
    """
    grads, used = gradients.grads, gradients.plan.used
    floats = {name: getattr(weights, name) - (lr * grads[name]).astype(getattr(weights, name).dtype)
              for name in FLOAT_TRAINABLE if name in grads}
    stepped = weights.replace(w13=weights.w13.sgd_step(used, grads["w13"], lr),
                              w2=weights.w2.sgd_step(used, grads["w2"], lr), **floats)
    mx.eval(stepped.arrays())
    return stepped


# -- residual stack ---------------------------------------------------------------------------------

def stack_plans(spec: MoESpec, layers: Sequence[LayerWeights], x: mx.array) -> tuple[mx.array, list[DispatchPlan]]:
    """Run x_{l+1} = x_l + moe_l(x_l) frozen, returning x_L and each layer's dispatch plan."""
    hidden, plans = x, []
    for weights in layers:
        plan = plan_layer(spec, weights, hidden)
        y, _ = forward_planned(spec, weights, hidden, plan)
        hidden = hidden + y
        mx.eval(hidden)
        plans.append(plan)
    return hidden, plans


def stack_loss_value(out: mx.array, target: mx.array, balance: Sequence[mx.array], balance_coeff: float) -> mx.array:
    """0.5 * sum((x_L - target)^2) / T + balance_coeff * sum_l balance_l, in float32."""
    residual = out.astype(mx.float32) - target
    loss = 0.5 * mx.sum(residual * residual) / out.shape[0]
    if balance_coeff:
        loss = loss + balance_coeff * sum(balance)
    return loss


def group_gradients(spec: MoESpec, tail: Sequence[LayerWeights], plans: Sequence[DispatchPlan], x_start: mx.array,
                    target: mx.array, group_len: int, balance_coeff: float = 0.0) -> list[LayerGradients]:
    """Gradients of the stack loss for the first ``group_len`` layers of ``tail`` (the rest frozen).

    ``tail`` starts at the group (earlier layers only shift ``x_start``), ``plans`` are its layers'
    plans on the current weights. The frozen layers are still differentiated with respect to their
    input: the loss sits at the top of the stack.
    """

    def objective(group_leaves: list[dict[str, mx.array]]) -> mx.array:
        hidden, balance = x_start, []
        for index, (weights, plan) in enumerate(zip(tail, plans)):
            if index < group_len:
                y, routing = forward_with_leaves(spec, weights, plan, group_leaves[index], hidden)
            else:
                y, routing = forward_planned(spec, weights, hidden, plan)
            balance.append(routing.balance_loss)
            hidden = hidden + y
        return stack_loss_value(hidden, target, balance, balance_coeff)

    leaves = [trainable_leaves(tail[i], plans[i]) for i in range(group_len)]
    grads = mx.grad(objective)(leaves)
    return [LayerGradients(plans[i], to_qmoe_gradients(tail[i], grads[i])) for i in range(group_len)]


def run_layer(spec: MoESpec, weights: LayerWeights, x: mx.array) -> mx.array:
    """x + moe(x) with the layer's own plan (the same arithmetic as the gradient pass)."""
    y, _ = forward_planned(spec, weights, x, plan_layer(spec, weights, x))
    out = x + y
    mx.eval(out)
    return out


def block_coordinate_descent(spec: MoESpec, layers: Sequence[LayerWeights], x: mx.array, target: mx.array,
                             lr: float, group_size: int, balance_coeff: float = 0.0) -> list[LayerWeights]:
    """One front-to-back pass of grouped SGD over the stack, as `qmoe.reference.updates.block_coordinate_descent`.

    For each group of ``group_size`` consecutive layers: plan the tail from the group's input, take
    the group's gradients jointly with the later layers frozen, step each of its layers (experts
    dequantized, stepped and requantized), then advance the group's input through the updated
    layers. group_size = 1 is the report's layerwise trainer; larger groups trade memory (the
    group's expert gradients are alive together) for fewer passes over the tail.
    """
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    current = list(layers)
    x_start = x
    for start in range(0, len(current), group_size):
        stop = min(start + group_size, len(current))
        _, plans = stack_plans(spec, current[start:], x_start)
        gradients = group_gradients(spec, current[start:], plans, x_start, target, stop - start, balance_coeff)
        # The joint gradient of the group exists as a whole before any layer steps (the report's
        # grouped trainer; it is what makes memory grow with G). Lazily, each layer's would be
        # computed on first use instead, and the measured peak would not be the algorithm's.
        mx.eval([layer_grads.grads for layer_grads in gradients])
        for offset, layer_grads in enumerate(gradients):
            current[start + offset] = sgd_step(current[start + offset], layer_grads, lr)
        del gradients
        for index in range(start, stop):
            x_start = run_layer(spec, current[index], x_start)
    return current
