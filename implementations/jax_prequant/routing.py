"""Router (softmax / sigmoid top-k), capacity mask and Switch balance loss, in float32 JAX.

Same equations as `qmoe.reference.routing`; the router is never quantized, also in bfloat16 layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from qmoe.reference.spec import MoESpec

from .env import FLOAT_PRECISION


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RoutingOut:
    """``expert_ids`` [T, k] int32 best first, ``gate_weights`` [T, k] float32, ``kept`` [T, k] bool
    (False where capacity dropped the assignment), ``balance_loss`` scalar float32."""

    expert_ids: jax.Array
    gate_weights: jax.Array
    kept: jax.Array
    balance_loss: jax.Array


def route(spec: MoESpec, x: jax.Array, router: jax.Array, router_bias: jax.Array | None) -> RoutingOut:
    """softmax_topk: p = softmax(x R), ids = topk(p), w = p[ids] (/ sum w if ``renormalize``).
    sigmoid_topk: s = sigmoid(x R), ids = topk(s + bias), w = s[ids] (/ sum) * ``routed_scaling``.
    Renormalized weights and the sigmoid router's balance probabilities are softmaxes of log-scores,
    as in the reference.

    ``lax.top_k`` returns equal scores lower index first, the reference's tie rule; exact ties in p
    are exact ties in the logits. The balance loss
    E * sum_i f_i P_i takes f (selection counts) as a constant and P (mean probabilities) with its
    gradient, as the reference does.
    """
    tokens = x.shape[0]
    logits = jnp.dot(x.astype(jnp.float32), router, precision=FLOAT_PRECISION)
    if spec.router == "softmax_topk":
        scores = jax.nn.softmax(logits, axis=-1)
        # Select on the logits (softmax is monotonic): float32 probabilities of far-behind experts
        # underflow to exact ties at 0, where float64 still orders them (an outlier token, x * 1e3).
        selection, probs, log_scores = logits, scores, logits
    else:
        scores = sigmoid(logits)
        selection = scores + (router_bias if router_bias is not None else 0.0)
        log_scores = jax.nn.log_sigmoid(logits)
        # s / sum(s) as a softmax of log s: no 0/0 where every score underflows
        probs = jax.nn.softmax(log_scores, axis=-1)
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(selection), spec.top_k)
    if spec.renormalize:
        # s_sel / sum(s_sel) as a softmax of the selected log-scores: the same values, and a top-1
        # gate is exactly 1 with exactly zero gradient (autodiff of s / s leaves rounding noise)
        gates = jax.nn.softmax(jnp.take_along_axis(log_scores, ids, axis=-1), axis=-1)
    else:
        gates = jnp.take_along_axis(scores, ids, axis=-1)
    if spec.router == "sigmoid_topk":
        gates = gates * spec.routed_scaling
    counts = jnp.zeros((spec.experts,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    balance = spec.experts * jnp.sum(counts / ids.size * jnp.mean(probs, axis=0))
    return RoutingOut(ids.astype(jnp.int32), gates, capacity_mask(spec, ids, tokens), balance)


def sigmoid(z: jax.Array) -> jax.Array:
    """1 / (1 + e^-z) with relative accuracy for very negative z: e^-|z| / (1 + e^-|z|) there.

    Why: XLA:CPU evaluates the logistic through tanh, and 1 + tanh(z / 2) cancels to exactly 0 in
    float32 from z ~ -17 on, where the float64 reference still has 1e-8 .. 1e-13 (an outlier token's
    gate weight). Both branches stay finite, so the gradient has no NaN from the unused one.
    """
    e = jnp.exp(-jnp.abs(z))
    return jnp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def capacity_mask(spec: MoESpec, expert_ids: jax.Array, tokens: int) -> jax.Array:
    """True for the first C assignments of each expert in (token, slot) order; all True if dropless."""
    capacity = spec.capacity(tokens)
    if capacity is None:
        return jnp.ones(expert_ids.shape, bool)
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.zeros((spec.experts,), jnp.int32).at[flat].add(1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(flat.size, dtype=jnp.int32) - starts[flat[order]]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    return (rank < capacity).reshape(expert_ids.shape)
