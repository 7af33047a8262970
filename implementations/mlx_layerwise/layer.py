"""One MoE layer in MLX: float32 router, top-k with the lower-index tie rule, capacity, dispatch, SwiGLU experts.

    y = sum_k gate_k * expert_{e_k}(x) [+ shared(x)],  expert(x) = (silu(x W1) * (x W3)) W2

Two dispatch paths share one expert computation (`expert_rows_forward`):

* `forward_static`: every (token, slot) assignment, sorted by expert on the device, dropped ones
  weighted 0 — fixed shapes, no host synchronization: the inference and benchmark path.
* `forward_planned`: a `DispatchPlan` built on the host from the routing decision keeps only the
  assignments experts kept and the experts that received at least one, re-indexed 0..U-1, so the
  trainable gather (`trainable_gather_qmm`) produces weight gradients for those U experts only.

This module imports mlx at import time; `qmoe.implementations.mlx_layerwise` imports it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from qmoe.reference.spec import MoESpec

from .experts import Experts


@dataclass(frozen=True)
class LayerWeights:
    """One layer on the device. ``router``/``router_bias`` are float32 always; the rest in the compute dtype."""

    router: mx.array
    w13: Experts
    w2: Experts
    router_bias: mx.array | None = None
    shared_w13: mx.array | None = None
    shared_w2: mx.array | None = None

    def replace(self, **changes) -> LayerWeights:
        return replace(self, **changes)

    def arrays(self) -> list[mx.array]:
        """Every array of the layer: `mx.eval` does not look inside dataclasses, so pass it these."""
        floats = [self.router, self.router_bias, self.shared_w13, self.shared_w2]
        return [a for a in floats if a is not None] + self.w13.arrays() + self.w2.arrays()


@dataclass(frozen=True)
class RouterOutput:
    """Routing of T tokens: selections (constants for autodiff) and differentiable gate weights."""

    expert_ids: mx.array    # [T, k] int32, best first
    gate_weights: mx.array  # [T, k] float32
    kept: mx.array          # [T, k] bool
    balance_loss: mx.array  # scalar float32


@mx.custom_function
def peaked_softmax(logits: mx.array) -> mx.array:
    """p = softmax(logits) over the last axis, with a VJP that stays accurate when p is one-hot.

    The textbook VJP p_j (g_j - sum_i g_i p_i) cancels catastrophically when one p_m rounds to 1
    (a router with an outlier or a hot expert: the "all tokens on one expert" case): the bracket is
    g_m - g_m = 0 in float32 while the true value is sum_{i != m} p_i (g_m - g_i), tiny but not 0.
    Using sum_i p_i = 1, the same bracket is (g_j - g_m) + sum_i p_i (g_m - g_i), m = argmax p,
    which has no cancellation for j = m and loses nothing elsewhere.
    """
    return mx.softmax(logits, axis=-1, precise=True)


@peaked_softmax.vjp
def _peaked_softmax_vjp(primals, cotangent, output):
    probs = output
    top = mx.argmax(probs, axis=-1, keepdims=True)
    g_top = mx.take_along_axis(cotangent, top, axis=-1)
    spread = mx.sum(probs * (g_top - cotangent), axis=-1, keepdims=True)
    return probs * ((cotangent - g_top) + spread)


def top_k_lowest_index_wins(selection: mx.array, k: int) -> mx.array:
    """[T, k] indices of the k largest entries per row, best first; equal scores go to the lower index.

    k rounds of `mx.argmax` (which returns the first maximum) with the winner masked to -inf: the
    tie rule holds by construction instead of depending on a sort's stability.
    """
    remaining = selection
    picks = []
    columns = mx.arange(selection.shape[-1])
    for _ in range(k):
        best = mx.argmax(remaining, axis=-1)
        picks.append(best)
        remaining = mx.where(columns[None, :] == best[:, None], -mx.inf, remaining)
    return mx.stack(picks, axis=-1).astype(mx.int32)


def capacity_mask(spec: MoESpec, expert_ids: mx.array) -> mx.array:
    """[T, k] True for the first C assignments of each expert in token-major (token, slot) order.

    C = ceil(capacity_factor * T * k / E) (`MoESpec.capacity`); all True when dropless.
    """
    capacity = spec.capacity(expert_ids.shape[0])
    if capacity is None:
        return mx.ones(expert_ids.shape, dtype=mx.bool_)
    flat = expert_ids.reshape(-1)
    onehot = (flat[:, None] == mx.arange(spec.experts)[None, :]).astype(mx.int32)
    position = mx.take_along_axis(mx.cumsum(onehot, axis=0), flat[:, None], axis=-1)[:, 0] - 1
    return (position < capacity).reshape(expert_ids.shape)


def route(spec: MoESpec, router: mx.array, router_bias: mx.array | None, x: mx.array) -> RouterOutput:
    """Router in float32 (no scheme quantizes it), as `qmoe.reference.routing.route`.

    softmax_topk: p = softmax(x R); ids = topk(p); w = p[ids] (/ sum w if renormalize).
    sigmoid_topk: s = sigmoid(x R); ids = topk(s + bias); w = s[ids] (/ sum if renormalize) * scaling;
    the bias steers selection only (DeepSeek-V3), so it never reaches the gate weights.
    Balance loss (Switch): E * sum_i f_i P_i, f_i the share of the T*k selections (before capacity),
    P_i the mean of softmax p, or of s / sum s for sigmoid.

    Every "divide by the sum" is a softmax over log-scores (logits, or log sigmoid(z) =
    -log(1 + e^-z)): the same value, but a float32 sigmoid of an outlier token's logit underflows to
    0 and s / sum s would be 0 / 0; and `peaked_softmax`'s VJP is exactly 0 where the result cannot
    move (top-1 renormalized: w = 1), as the reference's is.
    """
    logits = x.astype(mx.float32) @ router
    if spec.router == "softmax_topk":
        log_scores = logits
        scores = peaked_softmax(logits)
        # Select on the logits: softmax is monotonic, so the order is p's, but a float32 p underflows
        # to exactly 0 for an outlier token and would turn distinct experts into false ties.
        selection, probs = logits, scores
    else:
        log_scores = -mx.logaddexp(mx.zeros_like(logits), -logits)
        scores = mx.sigmoid(logits)
        selection = scores if router_bias is None else scores + router_bias
        probs = peaked_softmax(log_scores)
    expert_ids = top_k_lowest_index_wins(mx.stop_gradient(selection), spec.top_k)
    if spec.renormalize:
        weights = peaked_softmax(mx.take_along_axis(log_scores, expert_ids, axis=-1))
    else:
        weights = mx.take_along_axis(scores, expert_ids, axis=-1)
    if spec.router == "sigmoid_topk":
        weights = weights * spec.routed_scaling
    counts = mx.zeros((spec.experts,), dtype=mx.float32).at[expert_ids.reshape(-1)].add(1.0)
    share = mx.stop_gradient(counts / expert_ids.size)
    balance = spec.experts * mx.sum(share * probs.mean(axis=0))
    return RouterOutput(expert_ids, weights, capacity_mask(spec, expert_ids), balance)


def swiglu(a: mx.array) -> mx.array:
    """silu(gate) * up for a = [gate | up] along the last axis."""
    ffn = a.shape[-1] // 2
    gate, up = a[..., :ffn], a[..., ffn:]
    return gate * mx.sigmoid(gate) * up


def expert_rows_forward(x: mx.array, w13: Experts, w2: Experts, tokens: mx.array, expert_ids: mx.array,
                        row_gates: mx.array, trainable: bool) -> mx.array:
    """y[t] = sum over rows r with tokens[r] = t of row_gates[r] * expert_{ids[r]}(x[t]); ids ascending."""
    rows = x[tokens][:, None, :]
    hidden = swiglu(w13.matmul(rows, expert_ids, trainable))
    out = w2.matmul(hidden, expert_ids, trainable)[:, 0, :]
    weighted = out * row_gates[:, None].astype(out.dtype)
    return mx.zeros(x.shape, dtype=weighted.dtype).at[tokens].add(weighted)


def shared_forward(x: mx.array, weights: LayerWeights) -> mx.array:
    """The shared expert (float in every scheme): silu(x S1) * (x S3) S2 on every token."""
    return swiglu(x @ weights.shared_w13) @ weights.shared_w2


@dataclass(frozen=True)
class DispatchPlan:
    """Kept assignments sorted by expert, with the experts that received tokens re-indexed 0..U-1.

    ``used``: original indices of those U experts (ascending). Per kept assignment, ascending by
    expert: ``tokens``/``slots`` its (token, slot), ``expert_ids`` its expert, ``local_ids`` that
    expert's position in ``used``. A frozen layer multiplies with ``expert_ids`` on its full stacks;
    a trained one with ``local_ids`` on the used experts' sub-stacks.
    """

    used: np.ndarray
    tokens: mx.array
    slots: mx.array
    expert_ids: mx.array
    local_ids: mx.array

    @classmethod
    def from_routing(cls, routing: RouterOutput) -> DispatchPlan:
        """Built on the host: the number of used experts decides array shapes, so it must be known."""
        ids = np.array(routing.expert_ids)
        kept = np.array(routing.kept)
        tokens, slots = np.nonzero(kept)
        experts = ids[tokens, slots]
        order = np.argsort(experts, kind="stable")
        tokens, slots, experts = tokens[order], slots[order], experts[order]
        used, local = np.unique(experts, return_inverse=True)
        return cls(used.astype(np.int64), mx.array(tokens.astype(np.int32)), mx.array(slots.astype(np.int32)),
                   mx.array(experts.astype(np.uint32)), mx.array(local.reshape(-1).astype(np.uint32)))

    @property
    def used_index(self) -> mx.array:
        return mx.array(self.used.astype(np.int32))


def forward_static(spec: MoESpec, weights: LayerWeights, x: mx.array) -> tuple[mx.array, RouterOutput]:
    """The layer on device only: all T*k assignments sorted by expert, dropped ones gated by 0."""
    routing = route(spec, weights.router, weights.router_bias, x)
    flat_ids = routing.expert_ids.reshape(-1)
    order = mx.argsort(flat_ids)
    tokens = (order // spec.top_k).astype(mx.int32)
    gates = (routing.gate_weights * routing.kept).reshape(-1)[order]
    y = expert_rows_forward(x, weights.w13, weights.w2, tokens, flat_ids[order].astype(mx.uint32), gates,
                            trainable=False)
    if weights.shared_w13 is not None:
        y = y + shared_forward(x, weights)
    return y.astype(x.dtype), routing


def forward_planned(spec: MoESpec, weights: LayerWeights, x: mx.array, plan: DispatchPlan,
                    trained: tuple[Experts, Experts] | None = None) -> tuple[mx.array, RouterOutput]:
    """The layer with a fixed dispatch plan; ``trained`` = the used experts' (w13, w2) sub-stacks.

    The router is recomputed (its gate weights and balance loss carry gradients); its selection is
    the plan's, which `DispatchPlan.from_routing` took from the same inputs. With ``trained`` the
    experts go through the trainable gather (weight gradients for the U used experts only); without,
    the layer is frozen: the full stacks, stock gather, gradients for x only.
    """
    routing = route(spec, weights.router, weights.router_bias, x)
    gates = routing.gate_weights[plan.tokens, plan.slots]
    if trained is None:
        y = expert_rows_forward(x, weights.w13, weights.w2, plan.tokens, plan.expert_ids, gates, trainable=False)
    else:
        y = expert_rows_forward(x, trained[0], trained[1], plan.tokens, plan.local_ids, gates, trainable=True)
    if weights.shared_w13 is not None:
        y = y + shared_forward(x, weights)
    return y.astype(x.dtype), routing


def plan_layer(spec: MoESpec, weights: LayerWeights, x: mx.array) -> DispatchPlan:
    """The dispatch plan of ``weights`` on input ``x`` (evaluates the router on the host)."""
    return DispatchPlan.from_routing(route(spec, weights.router, weights.router_bias, x))


def bypass_outputs(weights: LayerWeights, x: mx.array) -> mx.array:
    """[E, T, H]: every expert on every token, ungated (bypass routing for calibration)."""
    experts, tokens = weights.w13.experts, x.shape[0]
    token_index = mx.tile(mx.arange(tokens, dtype=mx.int32), (experts,))
    expert_index = mx.repeat(mx.arange(experts, dtype=mx.uint32), tokens)
    rows = x[token_index][:, None, :]
    hidden = swiglu(weights.w13.matmul(rows, expert_index, trainable=False))
    out = weights.w2.matmul(hidden, expert_index, trainable=False)[:, 0, :]
    return out.reshape(experts, tokens, -1)
