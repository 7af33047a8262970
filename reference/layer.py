"""The MoE layer: forward, analytic backward and bypass expert outputs, in float64.

    y = sum_k gate_weight_k * expert_{e_k}(x) [+ shared(x)]

under a quantization scheme: weights as `effective_params` gives them, activations quantized
per token where the scheme says, the router always float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np

from .experts import MLPCache, mlp_backward, mlp_forward
from .quantization import dequantized_weight
from .routing import Routing, route, routing_backward
from .schemes import Scheme, get_scheme
from .spec import MoEParams, MoESpec, SpecError, validate_input


@dataclass
class ForwardResult:
    """What a forward returns: the output and the routing that produced it."""

    y: np.ndarray             # [T, H]
    expert_ids: np.ndarray    # [T, k], best first
    gate_weights: np.ndarray  # [T, k]
    balance_loss: float


def effective_params(spec: MoESpec, params: MoEParams, scheme: str | Scheme) -> MoEParams:
    """The float weights a scheme computes with: every quantized weight dequantized, the rest as is."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    params.validate(spec)
    return MoEParams(**{name: dequantized_weight(value, scheme.weight_quant(name), scheme)
                        for name, value in params.items()})


def _family_rule(scheme: Scheme, weights: str, activations: str) -> str:
    """Backward rule of one projection family: exact where the scheme leaves it all float."""
    return "exact" if weights == "float" and activations == "float" else scheme.backward


@dataclass
class _Trace:
    routing: Routing
    assignments: list[tuple[np.ndarray, np.ndarray, MLPCache]]  # per expert: tokens, slots, cache
    expert_out: dict[int, np.ndarray]
    shared: MLPCache | None


def _run(spec: MoESpec, params: MoEParams, x: np.ndarray, scheme: Scheme,
         weights_are_effective: bool) -> tuple[ForwardResult, _Trace, MoEParams]:
    validate_input(spec, x)
    x = np.asarray(x, dtype=np.float64)
    eff = params if weights_are_effective else effective_params(spec, params, scheme)
    routing = route(spec, eff, x)
    y = np.zeros_like(x)
    assignments = []
    expert_out = {}
    for e in range(spec.experts):
        tokens, slots = np.nonzero((routing.expert_ids == e) & routing.kept)
        if tokens.size == 0:
            continue
        out, cache = mlp_forward(x[tokens], eff.w13[e], eff.w2[e], scheme.routed_activations)
        np.add.at(y, tokens, routing.gate_weights[tokens, slots][:, None] * out)
        assignments.append((tokens, slots, cache))
        expert_out[e] = out
    shared = None
    if spec.shared_ffn:
        # shared_ffn > 0: the validated parameters carry the shared expert.
        out, shared = mlp_forward(x, cast(np.ndarray, eff.shared_w13), cast(np.ndarray, eff.shared_w2),
                                  scheme.shared_activations)
        y += out
    result = ForwardResult(y, routing.expert_ids, routing.gate_weights, routing.balance_loss)
    return result, _Trace(routing, assignments, expert_out, shared), eff


def forward(spec: MoESpec, params: MoEParams, x: np.ndarray, scheme: str = "none",
            weights_are_effective: bool = False) -> ForwardResult:
    """The layer output under ``scheme``.

    With ``weights_are_effective=True`` the given weights are used as they are (they already are a
    backend's dequantized weights) and only the scheme's activation quantization is applied: this is
    the tight conformance comparison of level 3.
    """
    return _run(spec, params, x, get_scheme(scheme), weights_are_effective)[0]


def backward(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray, scheme: str = "none",
             balance_coeff: float = 0.0, weights_are_effective: bool = False) -> dict[str, np.ndarray]:
    """Gradients of L = sum(y * dy) + balance_coeff * balance_loss.

    Keys: ``x``, ``router``, ``w13``, ``w2`` and, with a shared expert, ``shared_w13``, ``shared_w2``.
    ``router_bias`` steers selection only (DeepSeek-V3) and has no gradient. Quantized schemes give
    the straight-through gradient (or the prequant custom VJP), which is also the gradient with
    respect to the float master weights. Experts that received no token get exactly zero.
    """
    return _backward(spec, params, x, dy, scheme, balance_coeff, weights_are_effective)[0]


class RouterPath(NamedTuple):
    """The router's share of a backward pass: d loss / d logits [T, E] and its part of dx [T, H]."""

    d_logits: np.ndarray
    x_grad: np.ndarray


def router_path(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray, scheme: str = "none",
                balance_coeff: float = 0.0, weights_are_effective: bool = False) -> RouterPath:
    """What `backward` sends through the router logits. A float32 router's error there is conditioned
    by its margin from saturation and by cancellation over tokens; the suite bounds it from these."""
    return _backward(spec, params, x, dy, scheme, balance_coeff, weights_are_effective)[1]


def _backward(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray, scheme: str,
              balance_coeff: float, weights_are_effective: bool) -> tuple[dict[str, np.ndarray], RouterPath]:
    scheme_ = get_scheme(scheme)
    result, trace, eff = _run(spec, params, x, scheme_, weights_are_effective)
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != result.y.shape:
        raise SpecError(f"dy has shape {dy.shape}, expected the output's shape {result.y.shape}")
    x = np.asarray(x, dtype=np.float64)
    routed_rule = _family_rule(scheme_, scheme_.routed_weights, scheme_.routed_activations)
    grads = {"x": np.zeros_like(x), "w13": np.zeros_like(eff.w13), "w2": np.zeros_like(eff.w2)}
    d_gate = np.zeros_like(result.gate_weights)
    for tokens, slots, cache in trace.assignments:
        e = int(result.expert_ids[tokens[0], slots[0]])
        d_gate[tokens, slots] = np.sum(dy[tokens] * trace.expert_out[e], axis=-1)
        g = result.gate_weights[tokens, slots][:, None] * dy[tokens]
        d_x, d_w13, d_w2 = mlp_backward(cache, g, routed_rule)
        np.add.at(grads["x"], tokens, d_x)
        grads["w13"][e] += d_w13
        grads["w2"][e] += d_w2
    d_logits = routing_backward(spec, trace.routing, d_gate, balance_coeff)
    grads["router"] = x.T @ d_logits
    x_through_router = d_logits @ eff.router.T
    grads["x"] += x_through_router
    if trace.shared is not None:
        shared_rule = _family_rule(scheme_, scheme_.shared_weights, scheme_.shared_activations)
        d_x, grads["shared_w13"], grads["shared_w2"] = mlp_backward(trace.shared, dy, shared_rule)
        grads["x"] += d_x
    return grads, RouterPath(d_logits, x_through_router)


def expert_outputs(spec: MoESpec, params: MoEParams, x: np.ndarray, scheme: str = "none",
                   weights_are_effective: bool = False) -> np.ndarray:
    """Bypass routing (GPTQ calibration): every expert on every token, [E, T, H], gate weights unused."""
    scheme_ = get_scheme(scheme)
    validate_input(spec, x)
    eff = params if weights_are_effective else effective_params(spec, params, scheme_)
    x = np.asarray(x, dtype=np.float64)
    return np.stack([mlp_forward(x, eff.w13[e], eff.w2[e], scheme_.routed_activations)[0]
                     for e in range(spec.experts)])
