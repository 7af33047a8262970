"""Symmetric int8 quantizers and the int8 dense matmul with its straight-through VJP, in JAX.

Rules (DESIGN.md): ``scale = amax / 127`` over the named axes, 1 where amax = 0 (zero rows give zero
codes, never NaN); ``q = clip(round_half_even(v / scale), -127, 127)``. Computed in float32 whatever
the compute dtype, because the scale of a bfloat16 row must not itself be rounded to bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .env import precision_for

INT8_MAX = 127


def scale_from_amax(amax: jax.Array) -> jax.Array:
    """The symmetric scale of float32 ``amax``: amax / 127, or 1 where amax = 0."""
    return jnp.where(amax > 0, amax / INT8_MAX, jnp.float32(1.0))


def codes_at(values: jax.Array, scale: jax.Array, rint=jnp.round) -> jax.Array:
    """int8 codes of float32 ``values`` at ``scale``: clip(rint(v / s), -127, 127). ``rint`` rounds half to
    even (a Pallas kernel passes its own: Triton's lowering has no ``round``)."""
    return jnp.clip(rint(values / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def quantize_symmetric(values: jax.Array, axis: int | tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(codes int8, scale float32 with kept dims): q = clip(rint(v / s), -127, 127), s = amax / 127 or 1."""
    v = values.astype(jnp.float32)
    scale = scale_from_amax(jnp.max(jnp.abs(v), axis=axis, keepdims=True))
    return codes_at(v, scale), scale


def quantize_rows(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token (row) of [rows, features]: scale [rows, 1]."""
    return quantize_symmetric(values, axis=-1)


def quantize_per_expert(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One scale per expert matrix of [E, in, out]: scale [E, 1, 1]."""
    return quantize_symmetric(weights, axis=(-2, -1))


def quantize_columns(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One scale per output channel of a dense [in, out] weight: scale [1, out]."""
    return quantize_symmetric(weights, axis=-2)


def dequantize(codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """codes * scale, in ``dtype``."""
    return (codes.astype(jnp.float32) * scale).astype(dtype)


@functools.cache
def int8_dense_dot(dtype_name: str):
    """y = (q_x q_w) * s_x * s_w for a dense [in, out] weight with per-output-channel scales.

    Arguments ``(x, x_codes, x_scale, w, w_codes, w_scale)``, float ones in ``dtype_name``: the float
    input and weight receive the straight-through gradients ``dx = g (s_w q_w)^T`` and
    ``dw = (s_x q_x)^T g``; codes and scales receive none (they are the quantizers, identity in the
    backward). Backward products run in ``dtype_name`` with float32 accumulation.
    """
    dtype = jnp.dtype(dtype_name)

    @jax.custom_vjp
    def dot(x, x_codes, x_scale, w, w_codes, w_scale):
        acc = jnp.dot(x_codes, w_codes, preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * (x_scale * w_scale)).astype(dtype)

    def forward(x, x_codes, x_scale, w, w_codes, w_scale):
        return dot(x, x_codes, x_scale, w, w_codes, w_scale), (x_codes, x_scale, w_codes, w_scale)

    def backward(residuals, g):
        x_codes, x_scale, w_codes, w_scale = residuals
        scaled_g = (g.astype(jnp.float32) * w_scale).astype(dtype)
        dx = jnp.dot(scaled_g, w_codes.astype(dtype).T, precision=precision_for(dtype),
                     preferred_element_type=jnp.float32)
        x_deq = dequantize(x_codes, x_scale, dtype)
        # dW leaves its GEMM in the weights' dtype: no float32 weight-sized temporary (grouped_weight_grad)
        dw = jnp.dot(x_deq.T, g.astype(dtype), precision=precision_for(dtype), preferred_element_type=dtype)
        return dx.astype(dtype), None, None, dw, None, None

    dot.defvjp(forward, backward)
    return dot
