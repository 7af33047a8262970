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
        # s / sum(s) in log space: for logits below -745 every s is 0 in float64 and the ratio 0/0.
        probs = softmax(-np.logaddexp(0.0, -logits))
    ids = top_k_lowest_index_wins(selection, spec.top_k)
    if spec.renormalize:
        # w = s_sel / sum(s_sel) as a softmax of the selected log-scores: the same values, and no 0/0
        # where every selected score underflows (sigmoid logits below -745).
        log_scores = logits if spec.router == "softmax_topk" else -np.logaddexp(0.0, -logits)
        weights = softmax(np.take_along_axis(log_scores, ids, axis=-1))
    else:
        weights = np.take_along_axis(scores, ids, axis=-1)
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
    tokens = scores.shape[0]
    f = np.bincount(ids.reshape(-1), minlength=spec.experts) / ids.size
    d_probs = np.broadcast_to(balance_coeff * spec.experts * f / tokens, scores.shape)
    if spec.renormalize:
        # w = softmax(log s_sel): d log s_k = w_k (dw_k - sum_j dw_j w_j). Softmax: d log p = d logit
        # up to a per-row constant that p's own softmax removes (sum_k w_k (dw_k - ...) = 0).
        # Sigmoid: d logit = d log s * (1 - s). No division by the (possibly underflowed) sum.
        d_log_selected = weights * (dw - np.sum(dw * weights, axis=-1, keepdims=True))
        d_log = np.zeros_like(scores)
        np.put_along_axis(d_log, ids, d_log_selected, axis=-1)
        if spec.router == "softmax_topk":
            return d_log + scores * (d_probs - np.sum(d_probs * scores, axis=-1, keepdims=True))
        d_balance = (d_probs - np.sum(d_probs * routing.probs, axis=-1, keepdims=True)) * routing.probs
        return (d_log + d_balance) * (1.0 - scores)
    d_scores = np.zeros_like(scores)
    np.put_along_axis(d_scores, ids, dw, axis=-1)
    if spec.router == "softmax_topk":
        d_scores = d_scores + d_probs
        return scores * (d_scores - np.sum(d_scores * scores, axis=-1, keepdims=True))
    # P = s / sum(s): dP/ds_j / s_j' = P_j / s_j, and ds/dlogit = s (1 - s), so the balance term's
    # d logit = (d_P - sum d_P P) * P * (1 - s): no division by sum(s), which underflows to 0.
    d_balance = (d_probs - np.sum(d_probs * routing.probs, axis=-1, keepdims=True)) * routing.probs * (1.0 - scores)
    return d_scores * scores * (1.0 - scores) + d_balance
