"""A bfloat16 `jax_prequant` step must run its backward GEMMs in bfloat16.

Autodiff of a dot with a float32 result gives the transposed dots a float32 cotangent; on a GPU those
become float32 GEMMs. On the H200 (2026-12-01, logbook-shared5632) that made forward+backward of every
scheme with a float shared expert 2.6-5.4x slower than three times its forward (95-200 TF/s against 478-534 for
the schemes whose shared expert is int8, with a hand-written VJP). The test reads the compiled program's
jaxpr: every dot_general that touches an expert's or the shared expert's width runs on bfloat16 (or int8)
operands; only the router's dot (width: the expert count) is float32 by design.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qmoe.implementations.jax_prequant import JaxPrequantBackend  # noqa: E402
from qmoe.implementations.jax_prequant import programs as _programs  # noqa: E402
from qmoe.implementations.jax_prequant.layer import float_dense_dot  # noqa: E402
from qmoe.reference import MoEParams, MoESpec  # noqa: E402

# Widths no other tensor of the step has: a float32 dot over any of them is an expert's GEMM.
SPEC = MoESpec(hidden=24, ffn=40, experts=4, top_k=2, shared_ffn=56)
EXPERT_WIDTHS = {SPEC.ffn, 2 * SPEC.ffn, SPEC.shared_ffn, 2 * SPEC.shared_ffn}
FLOAT_SHARED_SCHEMES = ("none", "int8_routed", "int8_routed_prequant")


def _dots(jaxpr) -> list:
    """Every dot_general equation, nested jaxprs (custom VJPs, pjit, scans) included."""
    found, stack = [], [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        stack.append(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        stack.append(sub.jaxpr)
    return found


def _float32_expert_dots(scheme: str) -> list[str]:
    backend = JaxPrequantBackend("cpu")
    params = MoEParams.random(SPEC, seed=0)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 16, SPEC.hidden))
    prepared = backend.prepare(SPEC, params, scheme, "bfloat16")
    x_dev = backend._put_tokens(prepared, x)
    plan = backend._plan_for(prepared, x_dev)
    args = (prepared.params, prepared.frozen, x_dev, backend._put_tokens(prepared, dy), np.float32(0.0))
    jaxpr = jax.make_jaxpr(lambda *a: _programs.forward_backward(*a, plan=plan))(*args).jaxpr
    bad = []
    for eqn in _dots(jaxpr):
        shapes = [v.aval.shape for v in eqn.invars]
        dtypes = [v.aval.dtype for v in eqn.invars]
        touches_expert = any(set(shape) & EXPERT_WIDTHS for shape in shapes)
        if touches_expert and any(d == jnp.float32 for d in dtypes):
            bad.append(f"{[str(d) for d in dtypes]} {shapes}")
    return bad


@pytest.mark.parametrize("scheme", FLOAT_SHARED_SCHEMES)
def test_bfloat16_backward_has_no_float32_expert_gemm(scheme: str) -> None:
    bad = _float32_expert_dots(scheme)
    assert not bad, f"{scheme}: float32 GEMMs in the bfloat16 forward+backward program: {bad}"


def test_float_dense_dot_gradient_is_the_dot_gradient_in_float32() -> None:
    """In float32 the custom VJP is autodiff's: the same dx and dW to rounding."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    ours = jax.vjp(float_dense_dot, x, w)[1](g)
    plain = jax.vjp(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST), x, w)[1](g)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
