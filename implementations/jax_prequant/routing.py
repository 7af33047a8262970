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


#: How the router's logits x R are multiplied (`router_logits`): ``float32`` (float32 GEMMs at HIGHEST precision) or
#: ``bf16_split`` (bfloat16 layers: tensor-core products of bfloat16 parts, `split_logits`).
ROUTER_PRODUCTS: tuple[str, ...] = ("float32", "bf16_split")


def route(spec: MoESpec, x: jax.Array, router: jax.Array, router_bias: jax.Array | None,
          products: str = "float32") -> RoutingOut:
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
    logits = router_logits(x, router, products)
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


def router_logits(x: jax.Array, router: jax.Array, products: str = "float32") -> jax.Array:
    """x R in float32 (`ROUTER_PRODUCTS`). ``bf16_split`` takes x's values as bfloat16 ones: a bfloat16 layer's
    tokens are (the backend interface's promise; `env.select_router` offers it to those layers only)."""
    if products == "float32":
        return jnp.dot(x.astype(jnp.float32), router, precision=FLOAT_PRECISION)
    if products != "bf16_split":
        raise ValueError(f"router products {products!r}: one of {', '.join(ROUTER_PRODUCTS)}")
    return split_logits(x, router.astype(jnp.float32))


def bf16_parts(v: jax.Array, parts: int) -> list[jax.Array]:
    """``parts`` bfloat16 arrays whose float32 sum is ``v`` (float32): each the leading 8 significant bits of what
    the ones before left, cut by masking the bit pattern, so 3 parts hold a normal float32 exactly. Masks, not
    casts: XLA may drop a float32 -> bfloat16 -> float32 round trip as an excess-precision no-op
    (``xla_allow_excess_precision``), which would lose the lower parts."""
    out, rest = [], v
    for _ in range(parts):
        high = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
        out.append(high.astype(jnp.bfloat16))  # exact: high has a bfloat16's bits
        rest = rest - high  # exact: the bits below high's
    return out


def _part_dot(lhs_parts: list[jax.Array], rhs_parts: list[jax.Array], dims) -> jax.Array:
    """sum_i lhs_parts[i] . rhs_parts[i] as one bfloat16 GEMM with float32 accumulation: the parts are
    concatenated along the contraction (``dims``: the lhs and rhs contracting axes)."""
    (lc,), (rc,) = dims
    lhs = jnp.concatenate(lhs_parts, axis=lc)
    rhs = jnp.concatenate(rhs_parts, axis=rc)
    return jax.lax.dot_general(lhs, rhs, (dims, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def split_logits(x: jax.Array, router: jax.Array) -> jax.Array:
    """x R for x [T, H] holding bfloat16 values (in any float dtype) and float32 R [H, E] as tensor-core products:
    R = R1 + R2 + R3 in bfloat16 parts (`bf16_parts`), so x R = x R1 + x R2 + x R3 with every product exact and
    float32 sums, the accuracy of a float32 GEMM (up to summation order) in one bfloat16 GEMM over a 3H-deep
    contraction. dx comes back in x's dtype from float32 sums, as the float32 router's does.

    Why (issue 15, H200, logbook top-8): the router's three float32 GEMMs ran as SIMT FFMA kernels, 0.77 ms of a
    ~30 ms step (the forward ~13 TF/s). Backward: dR = x^T dL with dL in three parts (x is exact already), and
    dx = dL R^T from the six part products down to 2^-24 of the largest (dL1 R1..R3, dL2 R1..R2, dL3 R1)."""
    parts = bf16_parts(router, 3)
    return _part_dot([x.astype(jnp.bfloat16)] * 3, parts, ((1,), (0,)))


def _split_logits_forward(x, router):
    return split_logits(x, router), (x, router)


def _split_logits_backward(residuals, g):
    x, router = residuals
    g_parts, r_parts = bf16_parts(g, 3), bf16_parts(router, 3)
    pairs = [(a, b) for a in range(3) for b in range(3) if a + b <= 2]
    dx = _part_dot([g_parts[a] for a, _ in pairs], [r_parts[b] for _, b in pairs], ((1,), (1,)))
    d_router = _part_dot([x.astype(jnp.bfloat16)] * 3, g_parts, ((0,), (0,)))
    return dx.astype(x.dtype), d_router.astype(router.dtype)


split_logits.defvjp(_split_logits_forward, _split_logits_backward)


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
