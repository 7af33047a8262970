"""The SwiGLU expert h = silu(x W1) * (x W3), y = h W2, with fused W13 = [W1 | W3].

Forward and backward take the already-dequantized weights; the activation rule says whether
the inputs of each projection are quantized per token, and the backward rule says how the
quantizers are differentiated (see `qmoe.reference.schemes.Scheme.backward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quantization import fake_quant_activations
from .routing import sigmoid


def silu(z: np.ndarray) -> np.ndarray:
    return z * sigmoid(z)


def silu_grad(z: np.ndarray) -> np.ndarray:
    s = sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@dataclass
class MLPCache:
    """What the backward needs from one expert's forward."""

    x: np.ndarray    # float input rows
    xq: np.ndarray   # input rows as the first projection saw them
    a: np.ndarray    # [rows, 2F] pre-activations
    h: np.ndarray    # float hidden
    hq: np.ndarray   # hidden as the second projection saw it
    w13: np.ndarray  # effective weights
    w2: np.ndarray
    activations: str


def mlp_forward(x: np.ndarray, w13: np.ndarray, w2: np.ndarray, activations: str) -> tuple[np.ndarray, MLPCache]:
    """y = Q(silu(Q(x) W1) * (Q(x) W3)) W2, with Q per-token quantization or identity."""
    ffn = w13.shape[-1] // 2
    xq = fake_quant_activations(x, activations)
    a = xq @ w13
    h = silu(a[:, :ffn]) * a[:, ffn:]
    hq = fake_quant_activations(h, activations)
    return hq @ w2, MLPCache(x, xq, a, h, hq, w13, w2, activations)


def mlp_backward(cache: MLPCache, g: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dW13, dW2) for output cotangent g.

    exact / ste: the float graph at the values the forward used, quantizers as identity.
    prequant_vjp (JAX logbook MOE-I8-024): each projection's input gradient is Q(g) W^T with the
    cotangent quantized per token, and its weight gradient is the float surrogate lhs^T g, lhs the
    un-quantized input rows.
    """
    ffn = cache.w13.shape[-1] // 2
    gate, up = cache.a[:, :ffn], cache.a[:, ffn:]
    if rule == "prequant_vjp":
        d_w2 = cache.h.T @ g
        d_h = fake_quant_activations(g, "per_token") @ cache.w2.T
    else:
        d_w2 = cache.hq.T @ g
        d_h = g @ cache.w2.T
    d_a = np.concatenate([d_h * up * silu_grad(gate), d_h * silu(gate)], axis=-1)
    if rule == "prequant_vjp":
        d_w13 = cache.x.T @ d_a
        d_x = fake_quant_activations(d_a, "per_token") @ cache.w13.T
    else:
        d_w13 = cache.xq.T @ d_a
        d_x = d_a @ cache.w13.T
    return d_x, d_w13, d_w2
