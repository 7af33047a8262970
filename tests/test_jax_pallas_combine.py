"""The combine's backward kernel of `jax_prequant.pallas_combine` (issue 15): g, Q(g) and the gates' gradient
against autodiff through `grouped.weighted_sum` followed by `quant.quantize_rows`, float32 and bfloat16, on a
padded layout with empty slots, a capacity-dropped assignment, widths below, at and above one column block.
With ``--device cuda`` through Triton on the GPU, else in Pallas's interpreter; its CUDA lowering is checked
without a GPU too. The layer-level check (the kernels against XLA's formulation through the backend) is
`test_jax_pallas_swiglu.test_layer_with_pallas_swiglu_equals_xla_swiglu`, whose int8 cases run this kernel.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")
pytest.importorskip("jax.experimental.pallas.triton", reason="the combine kernel needs Pallas's Triton backend")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qmoe.implementations.jax_prequant import env as _jax_env  # noqa: E402, F401  (pins x64 off first)
from qmoe.implementations.jax_prequant import pallas_combine as pc  # noqa: E402
from qmoe.implementations.jax_prequant.grouped import place_rows, take_rows, token_of_slot, weighted_sum  # noqa: E402
from qmoe.implementations.jax_prequant.quant import quantize_rows  # noqa: E402
from tests.pallas_lowering import verified_cuda_lowerings  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: (tokens, top_k, hidden): hidden below one column block, exactly one, and past one (two sweeps).
SHAPES = [(13, 2, 24), (9, 3, 2048), (5, 2, 2100)]
GROUPS, CAPACITY = 4, 6


def _case(tokens: int, top_k: int, hidden: int, dtype):
    """A padded placement (capacity 6 of 4 groups: empty slots, and assignments dropped where a group
    overflows), expert output rows with a zero row, gates and a cotangent."""
    rng = np.random.default_rng(tokens * hidden)
    groups = rng.integers(1, GROUPS, tokens * top_k)
    groups[: CAPACITY + 1] = 0  # one assignment more than group 0 holds: dropped
    groups = jnp.asarray(groups, jnp.int32)
    placement = place_rows(groups, jnp.ones_like(groups, bool), GROUPS, "padded", CAPACITY)
    slots = GROUPS * CAPACITY
    out = jnp.asarray(3.0 * rng.standard_normal((slots, hidden)), dtype)
    gates = jnp.asarray(rng.random((tokens, top_k)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    return placement, out, gates, dy


def _f32(v) -> np.ndarray:
    return np.asarray(v, np.float32)


@pytest.mark.parametrize("tokens,top_k,hidden", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("quantize", [True, False], ids=["quantize", "plain"])
def test_combine_backward_equals_autodiff(tokens, top_k, hidden, dtype, quantize, interpret):
    """g bit for bit (one float32 product rounded once to the dtype, zero in empty slots), Q(g) exactly the
    quantizer of that g, and the gates' gradient within float32 summation-order noise (a dropped assignment's
    exactly zero)."""
    placement, out, gates, dy = _case(tokens, top_k, hidden, DTYPES[dtype])
    _, vjp = jax.vjp(lambda o, w: weighted_sum(o, placement, w), out, gates)
    expected_g, expected_d_gates = vjp(dy)
    g, codes, scale, d_gate = pc.combine_backward(
        dy, out, token_of_slot(placement.source, tokens, top_k), take_rows(gates.reshape(-1), placement.source),
        dtype=DTYPES[dtype], quantize=quantize, interpret=interpret)
    np.testing.assert_array_equal(_f32(g), _f32(expected_g))
    assert g.dtype == DTYPES[dtype]
    if quantize:
        expected_codes, expected_scale = quantize_rows(expected_g)
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected_codes))
        np.testing.assert_array_equal(_f32(scale), _f32(expected_scale))
    else:
        assert codes is None and scale is None
    d_gates = _f32(take_rows(d_gate, placement.slot_of_row).reshape(tokens, top_k))
    dropped = np.asarray(placement.slot_of_row).reshape(tokens, top_k) >= GROUPS * CAPACITY
    assert dropped.any() and not d_gates[dropped].any(), "the case must drop an assignment, whose gradient is 0"
    # float32 sums of `hidden` products in two orders: a few ulp of the sum of magnitudes
    magnitude = float(np.abs(_f32(dy)).max() * np.abs(_f32(out)).max() * hidden)
    np.testing.assert_allclose(d_gates, _f32(expected_d_gates), rtol=0, atol=4 * 2.0**-23 * magnitude)


def test_shape_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="expected \\[T, H\\], \\[M, H\\], \\[M\\], \\[M\\]"):
        pc.combine_backward(jnp.zeros((3, 8)), jnp.zeros((5, 7)), jnp.zeros((5,), jnp.int32), jnp.zeros((5,)),
                            dtype=jnp.float32, quantize=True, interpret=True)


@pytest.mark.parametrize("quantize", [True, False], ids=["quantize", "plain"])
def test_kernel_lowers_through_triton_for_cuda(quantize):
    """Pallas's Triton lowering accepts the kernel (scalar loads of the slot's token and gate, a gathered dy
    row) for CUDA and the module verifies, on a machine without a GPU."""
    args = [jax.ShapeDtypeStruct((1000, 2048), jnp.float32), jax.ShapeDtypeStruct((3000, 2048), jnp.bfloat16),
            jax.ShapeDtypeStruct((3000,), jnp.int32), jax.ShapeDtypeStruct((3000,), jnp.float32)]
    verified = verified_cuda_lowerings(
        lambda dy, out, token, gate: pc.combine_backward(dy, out, token, gate, dtype=jnp.bfloat16, quantize=quantize),
        args)
    assert len(verified) == 1 and all(verified), "a Triton module does not verify"
