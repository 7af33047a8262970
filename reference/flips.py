"""Which int8 codes a correct backend may legitimately choose differently, and what that does.

A backend computes a quantizer's input v (the activations x, the SwiGLU hidden h, the prequant
VJP's cotangents g and d_a) in its own precision, so where v / scale lies within that rounding of a
code boundary its code may be the neighbour of the reference's. Nowhere else may it differ: exact
ties (a power-of-two scale, where v / scale is exact in any float format) round half to even.

`flip_envelope` finds those quantizer inputs per row, and propagates one code step at each of them
(``step = scale``) through the rest of the layer, forward and backward, with absolute values: a
first-order bound on how far each output element and each gradient element of a correct backend
may sit from the reference because of flips. Rows with no possible flip get exactly 0; their
bound is the float arithmetic alone (the suite's tolerance table).

Precision of the quantizer inputs (unit roundoff u of the compute dtype, accumulation in float32):

    a = Q(x) W13 : |da| <= (K u_acc + u) |Q(x)| |W13|           (K = contraction length)
    h = silu(gate) * up : |dh| <= |silu'(gate)| |d gate| |up| + |silu(gate)| |d up| + 3 u |h|
    scale = amax / 127 : relative error max|dv| / amax + 2 u;  v / scale : 2 u more

Propagation of a perturbation e (>= 0) through the layer's operations:

    C = A B           : e_C = e_A |B| + |A| e_B
    silu(g) * up      : (|silu'(g)| e_g + e_g^2 / 4) (|up| + e_up) + |silu(g)| e_up   (|silu''| <= 1/2)
    quantizer         : codes within r +- eps of r = v / scale, eps = (e_v + arithmetic) / scale
    routing           : |d logits| <= sum_k |d logits / d gate_k| e_{d gate_k}   (exact Jacobian columns)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np

from .experts import MLPCache, mlp_forward, silu, silu_grad
from .layer import ForwardResult, _family_rule, _run, _Trace, effective_params
from .quantization import INT8_MAX, quantize_per_token
from .routing import Routing, routing_backward
from .schemes import Scheme, get_scheme
from .spec import MoEParams, MoESpec

#: Unit roundoff of the compute dtypes (half the machine epsilon); accumulation is float32 in both.
UNIT_ROUNDOFF: dict[str, float] = {"float32": 2.0**-24, "bfloat16": 2.0**-8}
ACCUMULATE_ROUNDOFF = 2.0**-24
#: |silu''| <= 1/2 everywhere (its maximum, at 0): the second-order term of a perturbed SwiGLU.
SILU_SECOND_DERIVATIVE_MAX = 0.5


@dataclass
class FlipEnvelope:
    """Per-element bounds (>= 0) on what possible code flips can do, shaped like what they bound.

    ``y`` [T, H]; ``expert_outputs`` [E, T, H] (bypass); ``grads`` by gradient name (``x``, ``router``,
    ``w13``, ...; empty without a cotangent). ``flips`` counts the possibly flipped codes per
    quantizer site (``x``, ``hidden``, ``shared_x``, ``shared_hidden``, ``cotangent``, ``d_pre``) and
    ``flip_rows`` marks the tokens [T] with any possible flip.
    """

    y: np.ndarray
    expert_outputs: np.ndarray | None = None
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    flips: dict[str, int] = field(default_factory=dict)
    flip_rows: np.ndarray | None = None

    def row_norms(self, name: str) -> np.ndarray:
        """||e_t|| per row (token) of ``y`` or a gradient; weight gradients: one norm per expert."""
        value = self.y if name == "y" else self.grads[name]
        return np.linalg.norm(value.reshape(value.shape[0], -1), axis=1)


def possible_code_change(v: np.ndarray, error: np.ndarray, unit_roundoff: float) -> tuple[np.ndarray, np.ndarray]:
    """(codes a backend may be off by [rows, n], per-row scale [rows, 1]) for a per-token quantizer.

    ``v`` is the reference's quantizer input, ``error`` a bound on the backend's error in it. The
    backend's ratio v' / scale' lies within eps of the reference's r = v / scale; every code that
    rounds from that interval is possible. eps = 0 where the scale is a power of two and v is exact:
    there the ratio is exact, and a tie must round half to even like the reference's.
    """
    v = np.asarray(v, dtype=np.float64)
    q = quantize_per_token(v)
    scale = q.scale
    amax = np.abs(v).max(axis=-1, keepdims=True) if v.size else np.zeros((v.shape[0], 1))
    row_error = error.max(axis=-1, keepdims=True) if v.size else np.zeros_like(amax)
    ratio = v / scale
    with np.errstate(divide="ignore", invalid="ignore"):
        scale_relative = np.where(amax > 0, row_error / np.where(amax > 0, amax, 1.0), 0.0) + 2 * unit_roundoff
    power_of_two = np.exp2(np.round(np.log2(scale))) == scale
    exact = power_of_two & (row_error == 0)
    eps = np.where(exact, 0.0, np.abs(ratio) * (scale_relative + 2 * unit_roundoff) + error / scale)
    codes = q.codes.astype(np.float64)
    high = np.clip(np.floor(ratio + eps + 0.5), -INT8_MAX, INT8_MAX)
    low = np.clip(np.ceil(ratio - eps - 0.5), -INT8_MAX, INT8_MAX)
    change = np.where(eps > 0, np.maximum(high - codes, codes - low), 0.0)
    # A zero row (amax 0) whose backend value may be nonzero: its codes are unconstrained.
    change = np.where((amax == 0) & (row_error > 0), 2 * INT8_MAX, change)
    return change, scale


def _swiglu_perturbation(gate: np.ndarray, up: np.ndarray, e_gate: np.ndarray, e_up: np.ndarray) -> np.ndarray:
    """Bound on |silu(gate + d) (up + d') - silu(gate) up| for |d| <= e_gate, |d'| <= e_up."""
    d_silu = np.abs(silu_grad(gate)) * e_gate + 0.5 * SILU_SECOND_DERIVATIVE_MAX * e_gate**2
    return d_silu * (np.abs(up) + e_up) + np.abs(silu(gate)) * e_up


def _swiglu_backward_perturbation(gate: np.ndarray, up: np.ndarray, d_h: np.ndarray, e_gate: np.ndarray,
                                  e_up: np.ndarray, e_dh: np.ndarray) -> np.ndarray:
    """Bound on the change of d_a = [d_h up silu'(gate), d_h silu(gate)] (first order in each error)."""
    s1 = np.abs(silu_grad(gate))
    gate_part = (e_dh * np.abs(up) * s1 + np.abs(d_h) * (e_up * s1 + np.abs(up) * SILU_SECOND_DERIVATIVE_MAX * e_gate)
                 + e_dh * e_up * s1)
    up_part = e_dh * np.abs(silu(gate)) + np.abs(d_h) * s1 * e_gate + e_dh * s1 * e_gate
    return np.concatenate([gate_part, up_part], axis=-1)


def _hidden_arithmetic(gate: np.ndarray, up: np.ndarray, e_a: np.ndarray, u: float) -> np.ndarray:
    """The backend's own rounding error in h = silu(gate) * up, from its pre-activations' error e_a."""
    ffn = gate.shape[-1]
    h = silu(gate) * up
    return (np.abs(silu_grad(gate)) * e_a[:, :ffn] * np.abs(up) + np.abs(silu(gate)) * e_a[:, ffn:]
            + 3 * u * np.abs(h))


@dataclass
class _ExpertFlips:
    """One projection chain's flips (rows = the tokens it saw): forward and what the backward needs."""

    e_xq: np.ndarray   # [rows, H] input codes' step where they may flip
    e_a: np.ndarray    # [rows, 2F] pre-activation change
    e_h: np.ndarray    # [rows, F] float hidden change (from input flips)
    e_hq: np.ndarray   # [rows, F] quantized hidden change
    e_out: np.ndarray  # [rows, H]
    hidden_flips: int


def _mlp_flips(xq: np.ndarray, a: np.ndarray, w13: np.ndarray, w2: np.ndarray, e_xq: np.ndarray,
               quantized: bool, u: float) -> _ExpertFlips:
    ffn = w13.shape[-1] // 2
    gate, up = a[:, :ffn], a[:, ffn:]
    e_a = e_xq @ np.abs(w13)
    e_h = _swiglu_perturbation(gate, up, e_a[:, :ffn], e_a[:, ffn:])
    if quantized:
        arithmetic_a = (w13.shape[0] * ACCUMULATE_ROUNDOFF + u) * (np.abs(xq) @ np.abs(w13))
        h = silu(gate) * up
        change, scale = possible_code_change(h, _hidden_arithmetic(gate, up, arithmetic_a, u) + e_h, u)
        e_hq = change * scale
        flips = int(np.count_nonzero(change))
    else:
        e_hq, flips = e_h, 0
    return _ExpertFlips(e_xq, e_a, e_h, e_hq, e_hq @ np.abs(w2), flips)


def flip_envelope(spec: MoESpec, params: MoEParams, x: np.ndarray, scheme: str | Scheme, dtype: str,
                  dy: np.ndarray | None = None, gate_error: np.ndarray | float = 0.0,
                  weights_are_effective: bool = True, bypass: bool = False) -> FlipEnvelope:
    """Bounds on the effect of every code flip a correct backend computing in ``dtype`` may make.

    ``params`` are the weights the backend computes with (its effective weights, by default).
    ``gate_error``: relative error bound of the float32 router's gate weights ([T, 1] or a number);
    it moves the prequant VJP's quantized cotangent g = gate * dy. With ``dy``, gradients too (the
    scheme's backward rule); with ``bypass``, every expert's output on every token.
    """
    scheme_ = get_scheme(scheme) if isinstance(scheme, str) else scheme
    u = UNIT_ROUNDOFF[dtype]
    x = np.asarray(x, dtype=np.float64)
    eff = params if weights_are_effective else effective_params(spec, params, scheme_)
    result, trace, eff = _run(spec, eff, x, scheme_, True)
    tokens_total, hidden = x.shape
    flips = {"x": 0, "hidden": 0, "shared_x": 0, "shared_hidden": 0, "cotangent": 0, "d_pre": 0}
    flip_rows = np.zeros(tokens_total, dtype=bool)

    def input_flips(rule: str, site: str) -> np.ndarray:
        if rule != "per_token":
            return np.zeros_like(x)
        change, scale = possible_code_change(x, np.zeros_like(x), u)
        flips[site] += int(np.count_nonzero(change))
        flip_rows[:] |= change.any(axis=-1)
        return change * scale

    routed_quantized = scheme_.routed_activations == "per_token"
    e_x_routed = input_flips(scheme_.routed_activations, "x")
    e_y = np.zeros_like(x)
    chains: list[tuple[np.ndarray, np.ndarray, int, MLPCache, _ExpertFlips]] = []
    for tokens, slots, cache in trace.assignments:
        e = int(result.expert_ids[tokens[0], slots[0]])
        chain = _mlp_flips(cache.xq, cache.a, cache.w13, cache.w2, e_x_routed[tokens], routed_quantized, u)
        flips["hidden"] += chain.hidden_flips
        flip_rows[tokens[chain.e_hq.any(axis=-1)]] = True
        e_y[tokens] += np.abs(result.gate_weights[tokens, slots])[:, None] * chain.e_out
        chains.append((tokens, slots, e, cache, chain))
    shared_chain = None
    if trace.shared is not None:
        shared_quantized = scheme_.shared_activations == "per_token"
        e_x_shared = input_flips(scheme_.shared_activations, "shared_x")
        sc = trace.shared
        shared_chain = _mlp_flips(sc.xq, sc.a, sc.w13, sc.w2, e_x_shared, shared_quantized, u)
        flips["shared_hidden"] += shared_chain.hidden_flips
        flip_rows |= shared_chain.e_hq.any(axis=-1)
        e_y += shared_chain.e_out
    envelope = FlipEnvelope(e_y, flips=flips, flip_rows=flip_rows)
    if bypass:
        envelope.expert_outputs = _bypass_envelope(spec, eff, x, scheme_, e_x_routed, routed_quantized, u)
    if dy is not None:
        envelope.grads = _backward_envelope(spec, eff, x, np.asarray(dy, dtype=np.float64), scheme_, result, trace,
                                            chains, shared_chain, gate_error, u, flips, flip_rows)
    return envelope


def _bypass_envelope(spec: MoESpec, eff: MoEParams, x: np.ndarray, scheme: Scheme, e_x: np.ndarray,
                     quantized: bool, u: float) -> np.ndarray:
    outs = []
    for e in range(spec.experts):
        _, cache = mlp_forward(x, eff.w13[e], eff.w2[e], scheme.routed_activations)
        outs.append(_mlp_flips(cache.xq, cache.a, cache.w13, cache.w2, e_x, quantized, u).e_out)
    return np.stack(outs)


def _backward_chain(cache: MLPCache, chain: _ExpertFlips, g: np.ndarray, rule: str, u: float, flips: dict[str, int],
                    flip_rows: np.ndarray, tokens: np.ndarray, gate_relative: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(e_dx [rows, H], e_dw13, e_dw2) of one projection chain under its backward rule."""
    ffn = cache.w13.shape[-1] // 2
    gate, up = cache.a[:, :ffn], cache.a[:, ffn:]
    e_gate, e_up = chain.e_a[:, :ffn], chain.e_a[:, ffn:]
    if rule == "prequant_vjp":
        change, scale = possible_code_change(g, np.abs(g) * (gate_relative + 2 * u), u)
        flips["cotangent"] += int(np.count_nonzero(change))
        flip_rows[tokens[change.any(axis=-1)]] = True
        g_q = quantize_per_token(g).dequantize()
        e_dh = (change * scale) @ np.abs(cache.w2.T)
        d_h = g_q @ cache.w2.T
        e_da = _swiglu_backward_perturbation(gate, up, d_h, e_gate, e_up, e_dh)
        d_a = np.concatenate([d_h * up * silu_grad(gate), d_h * silu(gate)], axis=-1)
        # The backend's own rounding of d_a, which decides its codes: d_h's accumulation, then two products.
        arithmetic_dh = (cache.w2.shape[1] * ACCUMULATE_ROUNDOFF + u) * (np.abs(g_q) @ np.abs(cache.w2.T))
        arithmetic_a = (cache.w13.shape[0] * ACCUMULATE_ROUNDOFF + u) * (np.abs(cache.xq) @ np.abs(cache.w13))
        arithmetic_da = (_swiglu_backward_perturbation(gate, up, d_h, arithmetic_a[:, :ffn], arithmetic_a[:, ffn:],
                                                       arithmetic_dh) + 3 * u * np.abs(d_a))
        change_da, scale_da = possible_code_change(d_a, arithmetic_da + e_da, u)
        flips["d_pre"] += int(np.count_nonzero(change_da))
        flip_rows[tokens[change_da.any(axis=-1)]] = True
        e_dx = (change_da * scale_da) @ np.abs(cache.w13.T)
        e_dw13 = np.abs(cache.x.T) @ e_da
        e_dw2 = chain.e_h.T @ np.abs(g)
        return e_dx, e_dw13, e_dw2
    d_h = g @ cache.w2.T
    e_da = _swiglu_backward_perturbation(gate, up, d_h, e_gate, e_up, np.zeros_like(d_h))
    d_a = np.concatenate([d_h * up * silu_grad(gate), d_h * silu(gate)], axis=-1)
    e_dx = e_da @ np.abs(cache.w13.T)
    e_dw13 = chain.e_xq.T @ np.abs(d_a) + np.abs(cache.xq.T) @ e_da
    e_dw2 = chain.e_hq.T @ np.abs(g)
    return e_dx, e_dw13, e_dw2


def _backward_envelope(spec: MoESpec, eff: MoEParams, x: np.ndarray, dy: np.ndarray, scheme: Scheme,
                       result: ForwardResult, trace: _Trace,
                       chains: list[tuple[np.ndarray, np.ndarray, int, MLPCache, _ExpertFlips]],
                       shared_chain: _ExpertFlips | None, gate_error: np.ndarray | float,
                       u: float, flips: dict[str, int], flip_rows: np.ndarray) -> dict[str, np.ndarray]:
    gate_relative = np.broadcast_to(np.asarray(gate_error, dtype=np.float64), (x.shape[0], 1))
    routed_rule = _family_rule(scheme, scheme.routed_weights, scheme.routed_activations)
    grads = {"x": np.zeros_like(x), "w13": np.zeros_like(eff.w13), "w2": np.zeros_like(eff.w2)}
    e_dgate = np.zeros_like(result.gate_weights)
    for tokens, slots, e, cache, chain in chains:
        e_dgate[tokens, slots] = np.sum(np.abs(dy[tokens]) * chain.e_out, axis=-1)
        g = result.gate_weights[tokens, slots][:, None] * dy[tokens]
        e_dx, e_dw13, e_dw2 = _backward_chain(cache, chain, g, routed_rule, u, flips, flip_rows, tokens,
                                              gate_relative[tokens])
        np.add.at(grads["x"], tokens, e_dx)
        grads["w13"][e] += e_dw13
        grads["w2"][e] += e_dw2
    # d logits is linear in d gate: bound it with the absolute Jacobian column of each slot.
    e_dlogits = np.zeros_like(trace.routing.logits)
    for k in range(spec.top_k):
        unit = np.zeros_like(result.gate_weights)
        unit[:, k] = 1.0
        e_dlogits += np.abs(routing_backward(spec, trace.routing, unit, 0.0)) * e_dgate[:, k:k + 1]
    grads["router"] = np.abs(x.T) @ e_dlogits
    grads["x"] += e_dlogits @ np.abs(eff.router.T)
    if shared_chain is not None:
        shared_rule = _family_rule(scheme, scheme.shared_weights, scheme.shared_activations)
        all_rows = np.arange(x.shape[0])
        e_dx, grads["shared_w13"], grads["shared_w2"] = _backward_chain(
            cast(MLPCache, trace.shared), shared_chain, dy, shared_rule, u, flips, flip_rows, all_rows,
            gate_relative * 0)
        grads["x"] += e_dx
    return grads


def routing_vjp_terms(spec: MoESpec, routing: Routing, d_gate_magnitude: np.ndarray) -> np.ndarray:
    """[T, E] the magnitude of the terms the router's VJP adds up, for gate cotangents of magnitude
    ``d_gate_magnitude`` [T, k]: `routing_backward` with every difference made a sum of absolute values.

    Why terms and not the Jacobian: a saturated softmax (one gate 1, the others 0) has a zero Jacobian,
    d logit_1 = w_1 (dw_1 - w_1 dw_1) = 0, but a backend that evaluates dw_1 twice (XLA:GPU recomputes
    the dot dy . out in two fusions, each summed in its own order) subtracts two roundings of it and
    keeps their difference: u |dw_1|, times |x| in the router gradient (an outlier token, x * 1e3,
    on the H200, 2026-11-30). Rounding-error analysis of the formula bounds that by its terms.
    """
    ids, scores, weights = routing.expert_ids, np.abs(routing.scores), np.abs(routing.gate_weights)
    dw = np.abs(d_gate_magnitude)
    if spec.router == "sigmoid_topk":
        dw = dw * spec.routed_scaling
        weights = weights / spec.routed_scaling
    one_minus = np.abs(1.0 - routing.scores)
    if spec.renormalize:
        selected = weights * (dw + np.sum(dw * weights, axis=-1, keepdims=True))
        terms = np.zeros_like(scores)
        np.put_along_axis(terms, ids, selected, axis=-1)
        return terms if spec.router == "softmax_topk" else terms * one_minus
    d_scores = np.zeros_like(scores)
    np.put_along_axis(d_scores, ids, dw, axis=-1)
    if spec.router == "softmax_topk":
        return scores * (d_scores + np.sum(d_scores * scores, axis=-1, keepdims=True))
    return d_scores * scores * one_minus


def gate_cotangent_magnitude(spec: MoESpec, params: MoEParams, x: np.ndarray, dy: np.ndarray,
                             scheme: str | Scheme = "none") -> np.ndarray:
    """[T, E] the router VJP's terms (`routing_vjp_terms`) for gate cotangents of magnitude
    sum_h |dy_h| |out_k,h|: what d logits becomes when each gate's cotangent d gate_k = dy . out_k (a
    dot product whose terms may cancel) errs by its terms' magnitude.

    A backend's d logits errs by u times this (u of its dtype): the bound of a router gradient whose
    gate cotangents cancel, or whose saturated gates cancel two evaluations of one cotangent, which a
    bound relative to d logits itself would miss.
    """
    scheme_ = get_scheme(scheme) if isinstance(scheme, str) else scheme
    result, trace, _ = _run(spec, params, np.asarray(x, dtype=np.float64), scheme_, True)
    dy = np.abs(np.asarray(dy, dtype=np.float64))
    magnitude = np.zeros_like(result.gate_weights)
    for tokens, slots, _cache in trace.assignments:
        e = int(result.expert_ids[tokens[0], slots[0]])
        magnitude[tokens, slots] = np.sum(dy[tokens] * np.abs(trace.expert_out[e]), axis=-1)
    return routing_vjp_terms(spec, trace.routing, magnitude)


__all__ = ["FlipEnvelope", "UNIT_ROUNDOFF", "flip_envelope", "gate_cotangent_magnitude", "possible_code_change",
           "routing_vjp_terms"]
