"""The SwiGLU kernels of `jax_prequant.pallas_swiglu` (issue 15): the forward (h and Q(h)) and the backward
(d_a and Q(d_a)) against the XLA formulation they replace (`layer.swiglu`, `quant.quantize_rows`, autodiff),
float32 and bfloat16, on rows that do not fill the kernel's row block, widths that do not fill its column
block or span several, and a zero row (scale 1, zero codes). With ``--device cuda`` they run through Triton
on the GPU, else in Pallas's interpreter; their lowering for CUDA is checked without a GPU too. Then the
layer: ``swiglu="pallas"`` against ``swiglu="xla"`` through the backend, forward and backward, for both int8
schemes (both kernels) and ``none`` (the backward's kernel alone).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax_prequant backend needs jax")
pytest.importorskip("jax.experimental.pallas.triton", reason="the SwiGLU kernels need Pallas's Triton backend")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qmoe.implementations.jax_prequant import JaxPrequantBackend  # noqa: E402
from qmoe.implementations.jax_prequant import env as _jax_env  # noqa: E402, F401  (pins x64 off first)
from qmoe.implementations.jax_prequant import pallas_swiglu as ps  # noqa: E402
from qmoe.implementations.jax_prequant.layer import swiglu  # noqa: E402
from qmoe.implementations.jax_prequant.quant import quantize_rows  # noqa: E402
from qmoe.reference import MoEParams, MoESpec  # noqa: E402
from tests.pallas_lowering import verified_cuda_lowerings  # noqa: E402

pytestmark = pytest.mark.backend("jax_prequant")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: (rows, ffn): ffn below one column block (a tile wider than the row), exactly one (one sweep), and past one
#: (two sweeps, the second block partly masked); 37 rows for row blocks above one row.
SHAPES = [(37, 24), (6, 2048), (3, 2100)]


@pytest.fixture(params=[None, (4, 512)], ids=["tuned_blocks", "rows4_cols512"])
def blocks(request, monkeypatch):
    """The tuned block shape, and one of several rows (masked row blocks) and narrow columns (several sweeps per
    row at every width here). The kernels read the shape when traced, so jit's caches are cleared around it."""
    if request.param is not None:
        monkeypatch.setattr(ps, "BLOCK_ROWS", request.param[0])
        monkeypatch.setattr(ps, "BLOCK_COLS", request.param[1])
    jax.clear_caches()
    yield request.param
    monkeypatch.undo()
    jax.clear_caches()


def _pre_activations(rows: int, ffn: int, dtype) -> jax.Array:
    a = (3.0 * jax.random.normal(jax.random.key(rows * ffn), (rows, 2 * ffn))).astype(dtype)
    return a.at[1].set(0)  # a zero row: scale 1, codes 0


def _f32(v) -> np.ndarray:
    return np.asarray(v, np.float32)


@pytest.mark.parametrize("rows,ffn", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_equals_swiglu_then_quantize_rows(rows, ffn, dtype, interpret, blocks):
    """h bit for bit, and Q(h) of the values rounded to the layer's dtype (codes and scales exactly): a kernel
    quantizing h before that rounding (what XLA's excess precision does to an interpreted kernel, 184 of
    16,384 codes one apart at bfloat16) fails here."""
    a = _pre_activations(rows, ffn, DTYPES[dtype])
    h, codes, scale = ps.swiglu_quantize(a, interpret=interpret)
    expected_h = swiglu(a, DTYPES[dtype])
    expected_codes, expected_scale = quantize_rows(jax.device_put(expected_h))
    np.testing.assert_array_equal(_f32(h), _f32(expected_h))
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected_codes))
    np.testing.assert_array_equal(_f32(scale), _f32(expected_scale))
    assert codes.dtype == jnp.int8 and scale.shape == (rows, 1) and h.dtype == DTYPES[dtype]
    assert float(scale[1, 0]) == 1.0 and not np.any(np.asarray(codes[1]))


@pytest.mark.parametrize("rows,ffn", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_from_int32_sums_equals_dequantize_then_swiglu(rows, ffn, dtype, interpret, blocks):
    """From the up projection's int32 sums and each row's scale: a as XLA's dequantization makes it (the float32
    product rounded once to the dtype), bit for bit, then h and Q(h) of that a, as from a itself."""
    rng = np.random.default_rng(rows + ffn)
    acc = jnp.asarray(rng.integers(-(2**20), 2**20, (rows, 2 * ffn)), jnp.int32).at[1].set(0)
    row_scale = jnp.asarray(rng.uniform(1e-6, 1e-5, rows), jnp.float32)
    h, codes, scale, a = ps.swiglu_quantize(acc, interpret=interpret, row_scale=row_scale, dtype=DTYPES[dtype])
    expected_a = (acc.astype(jnp.float32) * row_scale[:, None]).astype(DTYPES[dtype])
    np.testing.assert_array_equal(_f32(a), _f32(expected_a))
    assert a.dtype == h.dtype == DTYPES[dtype]
    for got, expected in zip((h, codes, scale), ps.swiglu_quantize(expected_a, interpret=interpret)):
        np.testing.assert_array_equal(_f32(got), _f32(expected))
    assert float(scale[1, 0]) == 1.0 and not np.any(np.asarray(codes[1]))


@pytest.mark.parametrize("rows,ffn", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_equals_autodiff_then_quantize_rows(rows, ffn, dtype, interpret, blocks):
    """d_a within one rounding of autodiff's (the kernel writes silu' in another order of float32 operations),
    Q(d_a) exactly the quantizer of the d_a it returns, and the unquantized variant the same d_a."""
    a = _pre_activations(rows, ffn, DTYPES[dtype])
    d_h = jax.random.normal(jax.random.key(7), (rows, ffn)).astype(DTYPES[dtype])
    d_a, codes, scale = ps.swiglu_backward(a, d_h, True, interpret=interpret)
    expected = jax.vjp(lambda v: swiglu(v, DTYPES[dtype]), a)[1](d_h)[0]
    ulp = 2.0**-23 if dtype == "float32" else 2.0**-7
    largest = float(np.abs(_f32(expected)).max())
    np.testing.assert_allclose(_f32(d_a), _f32(expected), rtol=4 * ulp, atol=4 * ulp * largest)
    expected_codes, expected_scale = quantize_rows(jax.device_put(d_a))
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected_codes))
    np.testing.assert_array_equal(_f32(scale), _f32(expected_scale))
    plain, no_codes, no_scale = ps.swiglu_backward(a, d_h, False, interpret=interpret)
    assert no_codes is None and no_scale is None
    np.testing.assert_array_equal(_f32(plain), _f32(d_a))


@pytest.mark.parametrize("rows,ffn", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_from_int32_sums_equals_dequantize_then_backward(rows, ffn, dtype, interpret, blocks):
    """d_h from the int32 sums of the product that makes it and each row's scale: bit for bit the backward of
    the d_h XLA's dequantization makes (the float32 product rounded once to the dtype)."""
    a = _pre_activations(rows, ffn, DTYPES[dtype])
    rng = np.random.default_rng(rows * ffn)
    acc = jnp.asarray(rng.integers(-(2**20), 2**20, (rows, ffn)), jnp.int32)
    row_scale = jnp.asarray(rng.uniform(1e-6, 1e-5, rows), jnp.float32)
    d_h = (acc.astype(jnp.float32) * row_scale[:, None]).astype(DTYPES[dtype])
    for quantize in (True, False):
        got = ps.swiglu_backward(a, acc, quantize, interpret=interpret, row_scale=row_scale)
        expected = ps.swiglu_backward(a, d_h, quantize, interpret=interpret)
        for value, reference in zip(got, expected):
            np.testing.assert_array_equal(_f32(value) if value is not None else value,
                                          _f32(reference) if reference is not None else reference)


def test_round_half_even_at_ties():
    """The quantizer's rounding built from floor: ties to even, both signs, and off-tie values as rint."""
    values = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 126.5, -126.5, 3.0, 0.0, 0.49999997], jnp.float32)
    np.testing.assert_array_equal(np.asarray(ps.round_half_even(values)), np.rint(np.asarray(values)))


def test_shape_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"\[M, 2F\]"):
        ps.swiglu_quantize(jnp.zeros((4, 7), jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="int32 sums come with row_scale and dtype"):
        ps.swiglu_quantize(jnp.zeros((4, 8), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="row_scale has shape"):
        ps.swiglu_quantize(jnp.zeros((4, 8), jnp.int32), interpret=True, row_scale=jnp.ones(3), dtype=jnp.float32)
    with pytest.raises(ValueError, match="int32 d_h comes with row_scale"):
        ps.swiglu_backward(jnp.zeros((4, 8), jnp.float32), jnp.zeros((4, 4), jnp.int32), True, interpret=True)
    with pytest.raises(ValueError, match="d_h has shape"):
        ps.swiglu_backward(jnp.zeros((4, 8), jnp.float32), jnp.zeros((4, 3), jnp.float32), True, interpret=True)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernels_lower_through_triton_for_cuda(dtype):
    """Pallas's Triton lowering accepts both kernels (floor-built rounding, masked column blocks, two sweeps; both
    from int32 sums too) for CUDA and the modules verify, on a machine without a GPU (as
    `test_jax_pallas_grouped` checks its own)."""
    a, d_h = jax.ShapeDtypeStruct((1000, 4096), DTYPES[dtype]), jax.ShapeDtypeStruct((1000, 2048), DTYPES[dtype])
    verified = verified_cuda_lowerings(ps.swiglu_quantize, [a])
    verified += verified_cuda_lowerings(lambda v, d: ps.swiglu_backward(v, d, True), [a, d_h])
    acc, row_scale = jax.ShapeDtypeStruct((1000, 4096), jnp.int32), jax.ShapeDtypeStruct((1000,), jnp.float32)
    verified += verified_cuda_lowerings(
        lambda v, s: ps.swiglu_quantize(v, row_scale=s, dtype=DTYPES[dtype]), [acc, row_scale])
    d_h_acc = jax.ShapeDtypeStruct((1000, 2048), jnp.int32)
    verified += verified_cuda_lowerings(
        lambda v, d, s: ps.swiglu_backward(v, d, True, row_scale=s), [a, d_h_acc, row_scale])
    assert len(verified) == 4 and all(verified), "a Triton module does not verify"


@pytest.mark.parametrize("scheme", ["int8_routed_prequant", "int8_routed", "none"])
@pytest.mark.parametrize("grouped", ["padded", "ragged"])
def test_layer_with_pallas_swiglu_equals_xla_swiglu(scheme, grouped, request):
    """The backend with the fused kernels gives the XLA formulation's output and gradients (bfloat16 on CPU:
    the same roundings in the same places, but for float32 summation-order noise where the gates' gradient
    reaches; float32: within float32 summation-order noise). On a GPU XLA may
    skip a bfloat16 rounding inside its fusions (``xla_allow_excess_precision``), so its Q(h) can sit one code
    from the kernels' at some elements: there bfloat16 is held to a few codes' effect (2^-6 of the largest
    value), and the conformance suite holds both formulations to the reference."""
    device = JaxPrequantBackend.declared_device(request.config.getoption("--device") or "cpu")
    if grouped == "ragged" and device != "cpu":
        pytest.skip("ragged is the CPU formulation (XLA lowers ragged_dot densely on GPUs)")
    spec = MoESpec(hidden=64, ffn=40, experts=4, top_k=2)
    params = MoEParams.random(spec, 0)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 33, 64)).astype(np.float32)
    for dtype in ("bfloat16", "float32"):
        results = []
        for kernels in ("xla", "pallas"):
            backend = JaxPrequantBackend(device, grouped=grouped, swiglu=kernels)
            prepared = backend.prepare(spec, params, scheme, dtype)
            assert prepared.plan.swiglu == kernels
            assert prepared.plan.fused_swiglu == (kernels == "pallas" and scheme != "none")
            assert prepared.plan.fused_combine == (kernels == "pallas")
            results.append((backend.forward(prepared, x).y, backend.backward(prepared, x, dy)))
        (y0, g0), (y1, g1) = results
        tol = 1e-5 if dtype == "float32" else (0 if device == "cpu" else 2.0**-6)
        np.testing.assert_allclose(y1, y0, rtol=tol, atol=tol * float(np.abs(y0).max()))
        for name in g0:
            scale = float(np.abs(g0[name]).max())
            # The combine's kernel sums the gates' float32 gradient in another order, which reaches x and the
            # router through the routing's backward: float32 noise there, not bfloat16's.
            reached = name in ("x", "router")
            grad_tol = max(tol, 1e-5) if reached else tol
            np.testing.assert_allclose(g1[name], g0[name], rtol=grad_tol, atol=grad_tol * scale,
                                       err_msg=f"{dtype} d{name}")
