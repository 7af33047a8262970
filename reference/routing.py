"""Routers (softmax top-k, sigmoid top-k), capacity dropping and the Switch balance loss.

The router is always float: no scheme quantizes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import MoEParams, MoESpec


def softmax(z: np.ndarray) -> np.ndarray:
    """softmax over the last axis, shifted by the row max for range safety."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z), in a form that keeps relative precision for very negative z (no 0 below -38)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def top_k_lowest_index_wins(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first; among equal scores the lower index wins."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


@dataclass
class Routing:
    """One routing decision. ``probs`` is what the balance loss averages (softmax p, or s / sum s)."""

    logits: np.ndarray        # [T, E]
    scores: np.ndarray        # [T, E]: softmax p or sigmoid s
    probs: np.ndarray         # [T, E]
    expert_ids: np.ndarray    # [T, k]
    gate_weights: np.ndarray  # [T, k]
    kept: np.ndarray          # [T, k] bool: False where capacity dropped the assignment
    balance_loss: float
    selection: np.ndarray     # [T, E]: what top-k ranks (softmax: logits; sigmoid: s + bias)


def route(spec: MoESpec, params: MoEParams, x: np.ndarray) -> Routing:
    """Router scores, top-k selection, gate weights, capacity mask and balance loss.

    softmax_topk: p = softmax(x R); ids = topk(p); w = p[ids], divided by sum(w) if ``renormalize``.
    sigmoid_topk: s = sigmoid(x R); ids = topk(s + bias); w = s[ids] (/ sum if ``renormalize``)
    times ``routed_scaling`` (DeepSeek-V3: the bias steers selection only).
    """
    logits = x @ params.router
    if spec.router == "softmax_topk":
        scores = softmax(logits)
        # Select on logits: the same order as p, but p underflows to 0 and would fake a tie.
        selection = logits
        probs = scores
    else:
        scores = sigmoid(logits)
        bias = params.router_bias if params.router_bias is not None else 0.0
        selection = scores + bias
        probs = scores / scores.sum(axis=-1, keepdims=True)
    ids = top_k_lowest_index_wins(selection, spec.top_k)
    weights = np.take_along_axis(scores, ids, axis=-1)
    if spec.renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if spec.router == "sigmoid_topk":
        weights = weights * spec.routed_scaling
    kept = capacity_mask(spec, ids)
    return Routing(logits, scores, probs, ids, weights, kept, balance_loss(spec, ids, probs), selection)


def capacity_mask(spec: MoESpec, expert_ids: np.ndarray) -> np.ndarray:
    """True for assignments an expert keeps: the first C of each expert in token-major order.

    Order is (token, slot) row-major: token 0's picks first. Dropped assignments contribute
    nothing to the output; the remaining gate weights are not renormalized.
    """
    tokens = expert_ids.shape[0]
    capacity = spec.capacity(tokens)
    if capacity is None:
        return np.ones(expert_ids.shape, dtype=bool)
    flat = expert_ids.reshape(-1)
    onehot = flat[:, None] == np.arange(spec.experts)[None, :]
    position = np.cumsum(onehot, axis=0)[np.arange(flat.size), flat] - 1
    return (position < capacity).reshape(expert_ids.shape)


def balance_loss(spec: MoESpec, expert_ids: np.ndarray, probs: np.ndarray) -> float:
    """Switch loss E * sum_i f_i P_i; f_i = share of the T*k selections that picked i (before
    capacity), P_i = mean router probability of i. Perfect balance gives 1."""
    f = np.bincount(expert_ids.reshape(-1), minlength=spec.experts) / expert_ids.size
    return float(spec.experts * np.sum(f * probs.mean(axis=0)))


def routing_backward(spec: MoESpec, routing: Routing, d_gate_weights: np.ndarray,
                     balance_coeff: float) -> np.ndarray:
    """d loss / d logits [T, E] from d loss / d gate_weights [T, k] and the balance-loss weight."""
    ids, scores, weights = routing.expert_ids, routing.scores, routing.gate_weights
    dw = d_gate_weights
    if spec.router == "sigmoid_topk":
        dw = dw * spec.routed_scaling
        weights = weights / spec.routed_scaling
    selected = np.take_along_axis(scores, ids, axis=-1)
    if spec.renormalize:
        # w_k = s_k / S with S = sum of selected: d s_j = (dw_j - sum_k dw_k w_k) / S
        d_selected = (dw - np.sum(dw * weights, axis=-1, keepdims=True)) / selected.sum(axis=-1, keepdims=True)
    else:
        d_selected = dw
    d_scores = np.zeros_like(scores)
    np.put_along_axis(d_scores, ids, d_selected, axis=-1)

    tokens = scores.shape[0]
    f = np.bincount(ids.reshape(-1), minlength=spec.experts) / ids.size
    d_probs = np.broadcast_to(balance_coeff * spec.experts * f / tokens, scores.shape)
    if spec.router == "softmax_topk":
        d_scores = d_scores + d_probs
        return scores * (d_scores - np.sum(d_scores * scores, axis=-1, keepdims=True))
    total = scores.sum(axis=-1, keepdims=True)
    d_scores = d_scores + (d_probs - np.sum(d_probs * routing.probs, axis=-1, keepdims=True)) / total
    return d_scores * scores * (1.0 - scores)
