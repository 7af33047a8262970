"""torch_triton's router kernels (`implementations/torch_triton/kernels/router.py`) against float64.

The bfloat16 path splits each float32 operand into three exact bfloat16 parts and runs tensor-core dots;
these tests hold its logits and both gradients to a float32 GEMM's rounding (u = 2^-24 relative to the sum
of magnitudes, with a small factor for the accumulation order; a lost low part is 2^-9 or 2^-17 off), and
the top-k kernel and the expert histogram to their torch definitions. Run under the Triton interpreter on
CPU (the plugin sets it) and compiled on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch_triton needs torch")
pytest.importorskip("triton", reason="torch_triton needs triton")

import torch  # noqa: E402

from qmoe.implementations.torch_triton import TorchTritonBackend  # noqa: E402

pytestmark = [pytest.mark.conformance, pytest.mark.backend("torch_triton")]

#: float32's unit roundoff. A float32 dot of n terms errs by at most n u sum|terms| and, its roundings
#: being independent, typically by ~sqrt(n) u sum|terms|: `dot_error` allows 4 sqrt(n) u (observed under the
#: interpreter: 6.7 u at n = 37, the router gradient), far below the 2^-9 of a lost low part.
U = 2.0 ** -24


def dot_error(n: int) -> float:
    return 4 * math.sqrt(n) * U


@pytest.fixture(scope="module")
def router(request):
    reason = TorchTritonBackend.unavailable_reason()
    if reason:
        pytest.skip(f"torch_triton unavailable: {reason}")
    from qmoe.implementations.torch_triton.kernels import router as router_kernels

    device = TorchTritonBackend.declared_device(request.config.getoption("--device") or "cpu")
    if device == "cpu" and not router_kernels.INTERPRETED:
        pytest.skip("CPU run without TRITON_INTERPRET=1 at kernel import")
    return router_kernels, torch.device(device)


def _operands(device, tokens=37, hidden=70, experts=9, seed=0):
    """bfloat16 x with an outlier row, a float32 router with magnitudes over many binades."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    x[3] *= 300.0
    r = (rng.standard_normal((hidden, experts)) * np.exp2(rng.integers(-12, 4, (hidden, experts)))).astype(np.float32)
    return torch.tensor(x).to(torch.bfloat16).to(device), torch.tensor(r).to(device)


@pytest.mark.parametrize("experts", [5, 9, 64])
def test_logits_carry_a_float32_gemms_rounding(router, experts):
    kernels, device = router
    x, r = _operands(device, experts=experts)
    logits = kernels.logits_bf16(x, r)
    exact = x.double() @ r.double()
    magnitude = x.double().abs() @ r.double().abs()
    error = (logits.double() - exact).abs()
    assert logits.dtype == torch.float32 and logits.shape == exact.shape
    bound = dot_error(x.shape[1]) * magnitude
    assert bool((error <= bound).all()), float((error / magnitude).max() / U)
    # A split that lost its low parts (x hi only: ~2^-9 relative) or its last one (x (hi + mid): ~2^-17)
    # would fall outside the bound.
    hi = r.to(torch.bfloat16)
    mid = (r - hi.float()).to(torch.bfloat16)
    for lossy in (hi.double(), hi.double() + mid.double()):
        assert bool(((x.double() @ lossy - exact).abs() > bound).any())


@pytest.mark.parametrize("experts", [9, 64])  # 64: the GPU's full tiles (six operand tiles in shared memory)
def test_gradients_carry_a_float32_gemms_rounding(router, experts):
    kernels, device = router
    x, r = _operands(device, hidden=140, experts=experts)
    rng = np.random.default_rng(2)
    d = torch.tensor((rng.standard_normal((x.shape[0], r.shape[1])) * 1e-3).astype(np.float32), device=device)
    dx = kernels.input_grad(d, r, torch.bfloat16)
    exact_dx = d.double() @ r.double().T
    # dx is rounded once to bfloat16: within one bfloat16 ulp (<= 2^-7 relative) of a value within float32
    # rounding of exact (half an ulp compiled; the interpreter's float32 -> bfloat16 conversion truncates).
    slack = dot_error(d.shape[1]) * (d.double().abs() @ r.double().abs().T) + 2.0**-7 * exact_dx.abs()
    assert dx.dtype == torch.bfloat16
    assert bool(((dx.double() - exact_dx).abs() <= slack).all())
    dr = kernels.router_grad(x, d)
    exact_dr = x.double().T @ d.double()
    error = (dr.double() - exact_dr).abs()
    assert dr.dtype == torch.float32
    assert bool((error <= dot_error(x.shape[0]) * (x.double().abs().T @ d.double().abs())).all())


def test_router_grad_sums_every_split(router):
    """More tokens than one split holds: a split dropped or counted twice moves dR by a whole share."""
    kernels, device = router
    x, r = _operands(device, tokens=300, hidden=40, experts=6, seed=3)
    d = torch.ones((300, 6), dtype=torch.float32, device=device)
    assert torch.allclose(kernels.router_grad(x, d).double(), x.double().T @ d.double(), rtol=1e-6, atol=0)


def test_layer_routes_bfloat16_through_the_kernels_with_float32_gradients(router):
    """`layer.router_logits` on bfloat16 x: the kernels' launches, and gradients that match autograd's
    through the float32 copy (x.float() @ R) to a float32 GEMM's rounding."""
    from qmoe.implementations.torch_triton import common, layer

    _, device = router
    x, r = _operands(device)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    before = dict(common.LAUNCHES)
    weights = torch.linspace(-1.0, 1.0, r.shape[1], device=device)
    (layer.router_logits(x1, r1) * weights).sum().backward()
    launched = {k for k, v in common.LAUNCHES.items() if v != before.get(k, 0)}
    assert {"router_logits", "router_input_grad", "router_weight_grad"} <= launched, launched
    ((x2.float() @ r2) * weights).sum().backward()
    assert x1.grad.dtype == torch.bfloat16
    assert torch.allclose(x1.grad.double(), x2.grad.double(), rtol=2.0**-7, atol=0)
    assert torch.allclose(r1.grad.double(), r2.grad.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_is_a_stable_descending_sorts_first_k(router, dtype):
    kernels, device = router
    rng = np.random.default_rng(4)
    special = np.array([0.0, -0.0, 1.0, -1.0, 2.5, 1e-300, -1e-300, 3e38, -3e38, np.inf, -np.inf])
    values = rng.choice(special, size=(50, 13))
    values[::5] = rng.standard_normal((10, 13))
    values[2] = -np.inf  # a row of equal -inf: lowest indices first
    table = torch.tensor(values, dtype=dtype, device=device)
    stable = torch.sort(table.cpu(), dim=-1, descending=True, stable=True).indices
    for k in (1, 2, 8, 13):
        assert torch.equal(kernels.top_k_lower_index_first(table, k).cpu(), stable[:, :k]), f"top-{k}"


def test_counts_per_expert_is_a_histogram(router):
    from qmoe.implementations.torch_triton import layer

    _, device = router
    ids = torch.tensor(np.random.default_rng(5).integers(0, 7, 999), device=device)
    ids[:10] = 6  # the last bin, whose upper edge histc includes
    counts = layer.counts_per_expert(ids, 8)
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), torch.bincount(ids.cpu(), minlength=8))
