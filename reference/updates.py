"""Weight updates of the reference: one SGD step, and block-coordinate descent over a residual stack.

Two update rules (DESIGN.md, conformance level 5):

* ``master_float`` (QAT, mlx-qat-ste review): the float master weights W are kept; the forward
  fake-quantizes them and the straight-through gradient g is applied to the masters:
  ``W' = W - lr * g``.
* ``requantize`` (MLX layerwise trainer report): only the effective (dequantized) weights exist,
  because the checkpoint stores int8 experts. Each quantized projection is dequantized, stepped and
  requantized with the scheme's own rule: ``W' = deq(Q(W - lr * g))``, g taken at the effective W.

The stack is ``x_{l+1} = x_l + moe_l(x_l)`` with loss
``0.5 * sum((x_L - target)^2) / T + balance_coeff * sum_l balance_loss_l``. The report's
"layerwise / grouped trainer" is one front-to-back pass of block-coordinate descent over groups of
consecutive layers: group_size = 1 is layerwise, group_size = L is one joint step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .layer import backward, effective_params, forward
from .quantization import dequantized_weight
from .schemes import Scheme, get_scheme
from .spec import MoEParams, MoESpec, SpecError, validate_input

UpdateRule = Literal["master_float", "requantize"]
UPDATE_RULES: tuple[str, ...] = ("master_float", "requantize")

#: Parameters an SGD step changes. ``router_bias`` steers selection only and has no gradient
#: (DeepSeek-V3 adjusts it by a separate balancing rule, not by SGD).
TRAINABLE_PARAMS: tuple[str, ...] = ("router", "w13", "w2", "shared_w13", "shared_w2")


def _scheme(scheme: str | Scheme) -> Scheme:
    return get_scheme(scheme) if isinstance(scheme, str) else scheme


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not np.isfinite(lr):
        raise ValueError(f"learning rate must be finite, got {lr}")
    return lr


def master_float_step(params: MoEParams, grads: dict[str, np.ndarray], lr: float) -> MoEParams:
    """W' = W - lr * g for every trainable parameter present; ``router_bias`` copied unchanged."""
    lr = _check_lr(lr)
    return MoEParams(**{name: (value - lr * grads[name]) if name in TRAINABLE_PARAMS else np.array(value)
                        for name, value in params.items()})


def requantize_step(spec: MoESpec, params: MoEParams, grads: dict[str, np.ndarray], scheme: str | Scheme,
                    lr: float) -> MoEParams:
    """W' = deq(Q_rule(W - lr * g)) per parameter, Q_rule the scheme's weight rule for it.

    ``params`` are effective weights. Each projection is handled on its own (the MLX streaming
    update dequantizes, steps and requantizes one expert projection at a time so that no dense
    gradient of all experts is ever held); since g is taken once, before any of them changes, the
    order does not matter. Float parameters (router, and any the scheme leaves float) take the plain
    step; ``router_bias`` is copied unchanged.
    """
    scheme_ = _scheme(scheme)
    lr = _check_lr(lr)
    params.validate(spec)
    updated = {}
    for name, value in params.items():
        if name not in TRAINABLE_PARAMS:
            updated[name] = np.array(value)
            continue
        stepped = np.asarray(value, dtype=np.float64) - lr * grads[name]
        updated[name] = dequantized_weight(stepped, scheme_.weight_quant(name), scheme_)
    return MoEParams(**updated)


def sgd_step_master_float(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray,
                          scheme: str | Scheme, lr: float, balance_coeff: float = 0.0) -> MoEParams:
    """One QAT step on L = sum(y * dy) + balance_coeff * balance_loss.

    g = reference.backward at the master weights under ``scheme`` (straight-through through every
    quantizer); returns the new master weights W - lr * g.
    """
    scheme_ = _scheme(scheme)
    grads = backward(spec, params, x, dy, scheme_.name, balance_coeff=balance_coeff)
    return master_float_step(params, grads, lr)


def sgd_step_requantize(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray,
                        scheme: str | Scheme, lr: float, balance_coeff: float = 0.0) -> MoEParams:
    """One MLX-layerwise step on L = sum(y * dy) + balance_coeff * balance_loss.

    ``params`` hold the current effective (dequantized) weights; g is the scheme's gradient at them
    (only activation quantization applies in that forward); returns deq(Q(W - lr * g)) per
    quantized projection and W - lr * g for float parameters (`requantize_step`).
    """
    scheme_ = _scheme(scheme)
    params.validate(spec)
    grads = backward(spec, params, x, dy, scheme_.name, balance_coeff=balance_coeff, weights_are_effective=True)
    return requantize_step(spec, params, grads, scheme_, lr)


# -- residual stack -------------------------------------------------------------------------------

def _check_stack(spec: MoESpec, layers: Sequence[MoEParams], x: np.ndarray,
                 target: np.ndarray | None = None) -> None:
    if len(layers) == 0:
        raise SpecError("a stack needs at least one layer")
    validate_input(spec, x)
    for index, layer in enumerate(layers):
        try:
            layer.validate(spec)
        except SpecError as error:
            raise SpecError(f"layer {index}: {error}") from None
    if target is not None and np.shape(target) != x.shape:
        raise SpecError(f"target has shape {np.shape(target)}, expected the input's shape {x.shape}")


def _stack_run(spec: MoESpec, layers: Sequence[MoEParams], x: np.ndarray, scheme: str,
               weights_are_effective: bool) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    hidden = np.asarray(x, dtype=np.float64)
    inputs, balance = [], []
    for layer in layers:
        inputs.append(hidden)
        result = forward(spec, layer, hidden, scheme, weights_are_effective=weights_are_effective)
        balance.append(result.balance_loss)
        hidden = hidden + result.y
    return hidden, inputs, balance


def stack_forward(spec: MoESpec, layers: Sequence[MoEParams], x: np.ndarray, scheme: str = "none",
                  weights_are_effective: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """x_{l+1} = x_l + moe_l(x_l) for l = 0..L-1; returns (x_L, [x_0, ..., x_{L-1}])."""
    _check_stack(spec, layers, x)
    out, inputs, _ = _stack_run(spec, layers, x, _scheme(scheme).name, weights_are_effective)
    return out, inputs


def stack_loss(spec: MoESpec, layers: Sequence[MoEParams], x: np.ndarray, target: np.ndarray,
               scheme: str = "none", balance_coeff: float = 0.0, weights_are_effective: bool = False) -> float:
    """0.5 * sum((x_L - target)^2) / T + balance_coeff * sum_l balance_loss_l (T = tokens)."""
    _check_stack(spec, layers, x, target)
    out, _, balance = _stack_run(spec, layers, x, _scheme(scheme).name, weights_are_effective)
    tokens = out.shape[0]
    return float(0.5 * np.sum((out - target) ** 2) / tokens + balance_coeff * sum(balance))


def stack_backward(spec: MoESpec, layers: Sequence[MoEParams], x: np.ndarray, target: np.ndarray,
                   scheme: str = "none", balance_coeff: float = 0.0,
                   weights_are_effective: bool = False) -> list[dict[str, np.ndarray]]:
    """Per-layer gradients of `stack_loss`, by the chain rule through the residuals.

    g_L = (x_L - target) / T; for l = L-1..0: the layer's parameter gradients are
    reference.backward(moe_l, x_l, dy = g_{l+1}) and g_l = g_{l+1} + dx_l (residual + layer).
    Entry ``l`` holds the layer's parameter gradients and, under ``x``, the full d loss / d x_l
    (so ``[0]["x"]`` is the gradient with respect to the stack input).
    """
    _check_stack(spec, layers, x, target)
    scheme_name = _scheme(scheme).name
    out, inputs, _ = _stack_run(spec, layers, x, scheme_name, weights_are_effective)
    upstream = (out - np.asarray(target, dtype=np.float64)) / out.shape[0]
    grads: list[dict[str, np.ndarray]] = [{} for _ in layers]
    for index in reversed(range(len(layers))):
        layer_grads = backward(spec, layers[index], inputs[index], upstream, scheme_name,
                               balance_coeff=balance_coeff, weights_are_effective=weights_are_effective)
        upstream = upstream + layer_grads["x"]
        layer_grads["x"] = upstream
        grads[index] = layer_grads
    return grads


def block_coordinate_descent(spec: MoESpec, layers: Sequence[MoEParams], x: np.ndarray, target: np.ndarray,
                             scheme: str | Scheme, lr: float, group_size: int, update: UpdateRule = "requantize",
                             balance_coeff: float = 0.0) -> list[MoEParams]:
    """One front-to-back pass of grouped SGD over the stack (MLX layerwise / grouped trainer).

    Layers are split into groups of ``group_size`` consecutive layers. For each group in turn, the
    gradient of `stack_loss` with respect to the group's layers is taken with every other layer
    frozen at its current value (earlier groups already updated, later ones not yet), and the
    group takes one SGD step jointly:

    * ``requantize``: the layers are first brought onto the scheme's grid (effective weights, as a
      quantized checkpoint stores them); each step is W' = deq(Q(W - lr * g)) per projection, g at
      the effective weights. Returns the effective weights.
    * ``master_float``: the layers are float masters, g is the straight-through gradient, and
      W' = W - lr * g. Returns the masters.

    group_size = 1 is layerwise coordinate descent; group_size >= L is one joint step on all layers.
    """
    scheme_ = _scheme(scheme)
    if update not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {update!r}; known: {', '.join(UPDATE_RULES)}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    _check_stack(spec, layers, x, target)
    _check_lr(lr)
    effective = update == "requantize"
    current = [effective_params(spec, layer, scheme_) if effective else layer.copy() for layer in layers]
    for start in range(0, len(current), group_size):
        stop = min(start + group_size, len(current))
        # Earlier layers only shift the group's input (and add a constant balance term), so the
        # gradient of the whole-stack loss for layers start.. is that of the tail stack at x_start.
        x_start = _stack_run(spec, current[:start], x, scheme_.name, effective)[0]
        tail_grads = stack_backward(spec, current[start:], x_start, target, scheme_.name,
                                    balance_coeff=balance_coeff, weights_are_effective=effective)
        for index in range(start, stop):
            grads = tail_grads[index - start]
            current[index] = (requantize_step(spec, current[index], grads, scheme_, lr) if effective
                              else master_float_step(current[index], grads, lr))
    return current
