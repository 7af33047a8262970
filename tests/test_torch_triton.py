"""torch_triton specifics the shared conformance suite does not see.

* The Triton path really ran (under the interpreter on CPU), not a torch fallback: the kernel
  wrappers count their launches, and the counts follow the scheme's dataflow (the prequant backward
  goes through the int8 kernel twice more, the straight-through backward does not).
* The grouped int8 GEMM on ragged groups: experts with zero rows (first, middle, last, all), groups on
  tile boundaries (31, 32, 33 rows against 32-row tiles), capacity-dropped rows.
* The persistent grouped GEMM (few programs, each looping over work items) gives the one-tile kernel's
  output bit for bit on the same ragged groups, and runs (and is recorded) when asked for or tuned in.
* The warp-specialized Gluon int8 GEMM of Hopper builds for sm_90a here, with either epilogue (its PTX checked
  without a GPU) and, on a Hopper GPU, gives the Triton kernel's output bit for bit.
* Each finding of the QAT review, planted as a bug in this backend, fails its check in
  suite/test_qat.py (the checks have teeth).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch_triton needs torch")
pytest.importorskip("triton", reason="torch_triton needs triton")

from qmoe.implementations.torch_triton import TorchTritonBackend  # noqa: E402
from qmoe.suite import test_qat  # noqa: E402
from qmoe.suite.cases import CASES  # noqa: E402
from qmoe.suite.checks import ConformanceError  # noqa: E402

pytestmark = [pytest.mark.conformance, pytest.mark.backend("torch_triton")]


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, imported in whatever mode the session chose (the plugin sets the interpreter on CPU)."""
    reason = TorchTritonBackend.unavailable_reason()
    if reason:
        pytest.skip(f"torch_triton unavailable: {reason}")
    from qmoe.implementations.torch_triton import common as _triton_common
    from qmoe.implementations.torch_triton.kernels import grouped_gemm as _triton_grouped_gemm
    from qmoe.implementations.torch_triton.kernels import quant as _triton_quant

    return _triton_common, _triton_grouped_gemm, _triton_quant


@pytest.fixture
def triton_backend(request, kernels):
    device = TorchTritonBackend.declared_device(request.config.getoption("--device") or "cpu")
    if device == "cpu" and not kernels[1].INTERPRETED:
        pytest.skip("CPU run without TRITON_INTERPRET=1 at kernel import")
    return TorchTritonBackend(device)


def _launches(kernels, run) -> dict[str, int]:
    """Kernel launches made by ``run()``, by kernel name."""
    counter = kernels[0].LAUNCHES
    before = dict(counter)
    run()
    return {name: count - before.get(name, 0) for name, count in counter.items() if count != before.get(name, 0)}


# -- the Triton path ran ----------------------------------------------------------------------------

def test_kernels_run_in_the_interpreter_on_cpu(triton_backend, kernels):
    if triton_backend.device != "cpu":
        pytest.skip("compiled on CUDA; this test is about the CPU interpreter")
    _, gemm, quant = kernels
    assert gemm.INTERPRETED and quant.INTERPRETED
    assert type(gemm._grouped_gemm_kernel).__name__ == "InterpretedFunction"
    assert "interpreter" in TorchTritonBackend.versions()["triton"]


@pytest.mark.parametrize("scheme,forward_gemms,backward_gemms", [
    ("int8_routed", 2, 0),            # straight-through backward: float grouped matmuls only
    ("int8_routed_prequant", 2, 2),   # custom VJP: d_h and d_x through the int8 kernel
])
def test_int8_schemes_launch_the_int8_kernel(triton_backend, kernels, scheme, forward_gemms, backward_gemms):
    data = CASES["empty_experts"].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, scheme, "float32")
    forward = _launches(kernels, lambda: triton_backend.forward(prepared, data.x))
    assert forward.get("grouped_gemm_int8") == forward_gemms, forward
    # x quantized once, its codes written in expert order (no gather, no copy); the SwiGLU's output quantized fused
    assert forward.get("quantize_rows_scattered") == 1 and "quantize_rows" not in forward, forward
    assert forward.get("swiglu_quantize_rows") == 1, forward
    assert forward.get("combine_rows") == 1, forward  # the gate-weighted combine, fused
    both = _launches(kernels, lambda: triton_backend.backward(prepared, data.x, data.dy))
    assert both.get("grouped_gemm_int8") == forward_gemms + backward_gemms, both
    assert both.get("combine_gate_grads") == 1 and "combine_rows_backward" not in both, both
    assert both.get("combine_rows_grad") == 1, both
    if backward_gemms:  # Q(g) from dy and the gates after d_w2, Q(d_a) fused into the SwiGLU backward
        assert both.get("quantize_rows_scattered") == 2 and both.get("swiglu_backward_quantize_rows") == 1, both
        assert "quantize_rows" not in both, both
    else:  # the straight-through backward quantizes x again (per token) for Q(x)^T d_a
        assert both.get("quantize_rows_scattered") == 1 and both.get("quantize_rows") == 1, both
        assert both.get("swiglu_backward") == 1, both
        # Q(h)'s values come from the forward's SwiGLU kernel: the backward dequantizes x's codes and the two
        # projections' weights, not the hidden's codes
        assert both.get("dequantize_rows") == 3, both


def test_int8_routed_quantizes_its_weights_before_routing(triton_backend, kernels, monkeypatch):
    """int8_routed's per-call weight quantization is launched before the router's kernels, so that its device work
    runs while the host launches the routing and the dispatch plan (whose device work is short)."""
    import collections

    data = CASES["empty_experts"].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, "int8_routed", "float32")
    monkeypatch.setattr(kernels[0], "LAUNCHES", collections.Counter())
    triton_backend.forward(prepared, data.x)
    order = list(kernels[0].LAUNCHES)  # kernel names in the order of their first launch
    assert order.index("quantize_per_expert") < order.index("router_top_k") < order.index("grouped_gemm_int8"), order


def test_qat_training_launches_the_fused_fake_quant_kernel(triton_backend, kernels):
    data = CASES["wide_g64"].build("float32")  # w13 has 131,072 elements: quantized; w2 65,536: float
    prepared = triton_backend.prepare(data.spec, data.params, "qat_int8_row", "float32")
    quantizing = {"fake_quant_rows", "quantize_rows", "quantize_per_expert"}
    training = _launches(kernels, lambda: triton_backend.forward(prepared, data.x))
    assert {k: v for k, v in training.items() if k in quantizing} == {"fake_quant_rows": 1}, training
    evaluation = _launches(kernels, lambda: triton_backend.eval_forward(prepared, data.x))
    assert not quantizing & set(evaluation), evaluation


# -- ragged groups ----------------------------------------------------------------------------------

def _grouped_case(sizes: list[int], k_dim: int, n_cols: int, experts_seed: int = 0):
    """Rows of codes and scales in group order (group e: ``sizes[e]`` rows), K-major codes of E experts and their
    scales, and the groups' starts."""
    import torch

    gen = torch.Generator().manual_seed(experts_seed)
    experts, rows = len(sizes), sum(sizes)
    a_codes = torch.randint(-127, 128, (rows, k_dim), generator=gen, dtype=torch.int8)
    a_scale = torch.rand(rows, generator=gen) + 0.01
    b_codes = torch.randint(-127, 128, (experts, n_cols, k_dim), generator=gen, dtype=torch.int8).transpose(1, 2)
    b_scale = torch.rand(experts, generator=gen) + 0.01
    starts = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32)
    return a_codes, a_scale, b_codes, b_scale, starts


def _expected(a_codes, a_scale, b_codes, b_scale, sizes) -> np.ndarray:
    out, start = [], 0
    for e, size in enumerate(sizes):
        rows = np.arange(start, start + size)
        acc = a_codes.numpy()[rows].astype(np.int64) @ b_codes[e].numpy().astype(np.int64)
        out.append(acc * a_scale.numpy()[rows, None].astype(np.float64) * float(b_scale[e]))
        start += size
    return np.concatenate(out) if out else np.zeros((0, b_codes.shape[-1]))


@pytest.mark.parametrize("sizes", [
    pytest.param([0, 5, 0, 0, 3, 0], id="empty_first_middle_last"),
    pytest.param([31, 32, 33, 1], id="tile_boundaries"),
    pytest.param([0, 0, 40, 0], id="all_on_one"),
])
def test_grouped_int8_gemm_ragged_groups(triton_backend, kernels, sizes):
    import torch

    if triton_backend.device != "cpu":
        pytest.skip("kernel-level check on the interpreter; the GPU script checks the compiled kernel")
    a_codes, a_scale, b_codes, b_scale, starts = _grouped_case(sizes, k_dim=40, n_cols=36)
    out = kernels[1].grouped_gemm(a_codes, b_codes, starts, out_dtype=torch.float32, a_scale=a_scale,
                                  b_scale=b_scale)
    expected = _expected(a_codes, a_scale, b_codes, b_scale, sizes)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("k_dim", [48, 64])  # 48: the last K step half past the end (zero-filled)
@pytest.mark.parametrize("sizes", [
    pytest.param([0, 5, 0, 0, 3, 0], id="empty_first_middle_last"),
    pytest.param([31, 32, 33, 1], id="tile_boundaries"),
])
def test_grouped_int8_gemm_through_tensor_descriptors(triton_backend, kernels, sizes, k_dim):
    """Operands whose strides the tensor memory accelerator takes load through descriptors (the interpreter
    emulates them): A and B. A tile that runs past its group reads the next group's rows (never stored), past
    the last row and past K zeros; N = 36 leaves a partial B tile."""
    import torch

    a_codes, a_scale, b_codes, b_scale, starts = _grouped_case(sizes, k_dim=k_dim, n_cols=36)
    expected = _expected(a_codes, a_scale, b_codes, b_scale, sizes)
    device = triton_backend.device
    run = lambda: kernels[1].grouped_gemm(  # noqa: E731
        a_codes.to(device), b_codes.to(device), starts.to(device), out_dtype=torch.float32,
        a_scale=a_scale.to(device), b_scale=b_scale.to(device))
    out = []
    launches = _launches(kernels, lambda: out.append(run()))
    # on Hopper the Gluon kernel, unless $QMOE_TRITON_INT8_GEMM says otherwise
    choice = kernels[1].int8_kernel()
    gluon = device != "cpu" and choice == "auto" and kernels[1].gluon_gemm.ineligible(
        a_codes.to(device), b_codes.to(device), torch.float32) is None
    if gluon:
        assert launches.get("grouped_gemm_int8_gluon") == 1, launches  # Hopper: the TMA kernel of `gluon_gemm`
    elif device == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert launches.get("grouped_gemm_b_descriptor") == 1 and launches.get("grouped_gemm_a_descriptor") == 1, (
            launches)
    np.testing.assert_allclose(out[0].cpu().numpy(), expected, rtol=2e-6, atol=1e-6)


def test_grouped_int8_gemm_every_group_empty(triton_backend, kernels):
    """Rows outside every group (capacity-dropped) are zero with zero_uncovered, never NaN."""
    import torch

    if triton_backend.device != "cpu":
        pytest.skip("kernel-level check on the interpreter")
    a_codes, a_scale, b_codes, b_scale, _ = _grouped_case([2, 3], k_dim=16, n_cols=8)
    starts = torch.zeros(3, dtype=torch.int32)
    out = kernels[1].grouped_gemm(a_codes, b_codes, starts, out_dtype=torch.float32, a_scale=a_scale,
                                  b_scale=b_scale, zero_uncovered=True)
    assert out.shape == (5, 8) and not torch.any(out)


def test_the_gluon_int8_gemm_compiles_for_hopper(kernels):
    """`gluon_gemm`'s kernel builds for sm_90a against this Triton (no GPU: `tests/hopper_compile`), with either
    epilogue, and its PTX holds what makes it that kernel: int8 wgmma, one product left in flight, a register split
    between the loading warp and the consumers (warp specialization), within Hopper's shared memory; the TMA-store
    epilogue's (bfloat16) adds bulk tensor stores from shared memory, a fence before them and a wait for them to
    have read it, which the stores from registers have none of."""
    import json
    import subprocess
    import sys

    if kernels[1].gluon_gemm.GLUON_MISSING:
        pytest.skip(kernels[1].gluon_gemm.GLUON_MISSING)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "tests.hopper_compile"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(facts) == {"torch.bfloat16", "torch.float32", "torch.bfloat16+tma_store"}, facts
    for case, fact in facts.items():
        assert fact["int8_wgmma"] > 0 and fact["wait_one_in_flight"] > 0 and fact["setmaxnreg"] > 0, (case, fact)
        assert fact["shared"] <= 227 * 1024, (case, fact)
        tma = case.endswith("+tma_store")
        assert (fact["tma_store"] > 0 and fact["tma_store_wait"] > 0 and fact["fence_async_shared"] > 0) == tma, (
            case, fact)
    # the epilogue's tile: 128 x 256 bfloat16 on top of the stores' kernel
    assert facts["torch.bfloat16+tma_store"]["shared"] >= facts["torch.bfloat16"]["shared"] + 128 * 256 * 2, facts


def test_the_gluon_kernels_tile_table(triton_backend, kernels):
    """`gluon_gemm.tile_table` (a Triton kernel: the interpreter runs it on CPU): each group's rows cut into 128-row
    tiles in expert order, (expert, first row, end row) each, empty groups owning none, and the real tiles counted."""
    import torch

    if triton_backend.device != "cpu":
        pytest.skip("kernel-level check on the interpreter")
    sizes = [0, 1, 127, 128, 129, 300, 0, 1000]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    table, count = kernels[1].gluon_gemm.tile_table(torch.tensor(starts, dtype=torch.int32), int(starts[-1]))
    want = [(e, begin, int(starts[e + 1])) for e in range(len(sizes))
            for begin in range(int(starts[e]), int(starts[e + 1]), 128)]
    assert int(count) == len(want)
    assert [tuple(row) for row in table.view(-1, 3)[:len(want)].tolist()] == want


def test_the_gluon_kernel_is_offered_from_triton_3_6(kernels):
    """Releases before `gluon_gemm.MIN_TRITON` (whose Gluon took warp_specialize's arguments another way) never
    reach the Gluon kernel; local builds' suffixes do not confuse the check."""
    release = kernels[1].gluon_gemm._release
    assert release("3.5.1") < kernels[1].gluon_gemm.MIN_TRITON <= release("3.6.0") < release("3.10.0+git1a2b3c")


def test_the_int8_kernel_choice_is_checked(kernels, monkeypatch):
    """$QMOE_TRITON_INT8_GEMM takes ``auto`` or ``triton``; anything else is refused, naming them."""
    monkeypatch.setenv(kernels[1].INT8_KERNEL_ENV, "cublas")
    with pytest.raises(ValueError, match="auto, triton"):
        kernels[1].int8_kernel()
    monkeypatch.setenv(kernels[1].INT8_KERNEL_ENV, "triton")
    assert kernels[1].int8_kernel() == "triton"


@pytest.mark.parametrize("choice, to_gluon", [("auto", True), ("triton", False)])
def test_the_int8_kernel_choice_picks_the_kernel(triton_backend, kernels, monkeypatch, choice, to_gluon):
    """Where the Gluon kernel can run (a stand-in here, on any device), an int8 product goes to it under ``auto``
    (the default), with a's rows and scales as given; ``triton`` leaves it to the Triton kernel. Either way the
    product is the same."""
    import torch

    grouped = kernels[1]
    sizes = [3, 0, 5]
    device = triton_backend.device
    a_codes, a_scale, b_codes, b_scale, starts = (t.to(device) for t in _grouped_case(sizes, k_dim=32, n_cols=16))
    seen = []

    def stand_in(a, a_scale_, b, b_scale_, group_starts, c, tiles=None):
        seen.append((a.clone(), a_scale_.clone()))
        for e in range(b.shape[0]):
            rows = slice(int(group_starts[e]), int(group_starts[e + 1]))
            acc = (a[rows].double() @ b[e].double()).float()  # exact: |sums| < 2^53; CUDA has no int64 matmul
            c[rows] = (acc * a_scale_[rows, None] * b_scale_[e]).to(c.dtype)

    monkeypatch.setattr(grouped, "INTERPRETED", False)  # kernels launched still run interpreted (TRITON_INTERPRET)
    monkeypatch.setattr(grouped.gluon_gemm, "ineligible", lambda *_: None)
    monkeypatch.setattr(grouped.gluon_gemm, "grouped_int8_gemm", stand_in)
    monkeypatch.setenv(grouped.INT8_KERNEL_ENV, choice)
    out = grouped.grouped_gemm(a_codes, b_codes, starts, out_dtype=torch.float32, a_scale=a_scale, b_scale=b_scale)
    assert bool(seen) == to_gluon
    if seen:
        assert torch.equal(seen[0][0], a_codes) and torch.equal(seen[0][1], a_scale)
    want = _expected(*(t.cpu() for t in (a_codes, a_scale, b_codes, b_scale)), sizes)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-6)


def test_the_gluon_epilogue_choice_is_checked(kernels, monkeypatch):
    """$QMOE_GLUON_EPILOGUE takes ``tma`` (the default) or ``store``; anything else is refused, naming them. ``tma``
    is a preference: only a 16-bit c with 16-byte aligned rows takes it."""
    import torch

    gluon_gemm = kernels[1].gluon_gemm
    monkeypatch.delenv(gluon_gemm.EPILOGUE_ENV, raising=False)
    assert gluon_gemm.epilogue() == "tma"
    monkeypatch.setenv(gluon_gemm.EPILOGUE_ENV, "async")
    with pytest.raises(ValueError, match="tma, store"):
        gluon_gemm.epilogue()
    monkeypatch.setenv(gluon_gemm.EPILOGUE_ENV, "store")
    assert gluon_gemm.epilogue() == "store"
    assert gluon_gemm.tma_storable(torch.empty(4, 64, dtype=torch.bfloat16))
    assert not gluon_gemm.tma_storable(torch.empty(4, 64, dtype=torch.float32))
    assert not gluon_gemm.tma_storable(torch.empty(4, 36, dtype=torch.float16))  # 72-byte rows


def test_the_gluon_int8_gemm_says_why_it_cannot_run(kernels):
    """`gluon_gemm.ineligible` names the reason: a CPU tensor, or codes not stored [E, N, K]."""
    import torch

    why = kernels[1].gluon_gemm.ineligible(torch.zeros(4, 32, dtype=torch.int8),
                                           torch.zeros(2, 32, 64, dtype=torch.int8), torch.bfloat16)
    assert why and ("CUDA" in why or "Gluon" in why), why


@pytest.mark.parametrize("epilogue", ["store", "tma"])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [pytest.param((256, 384), id="K256_N384"), pytest.param((48, 36), id="K48_N36")])
def test_gluon_int8_gemm_equals_the_triton_kernel(triton_backend, kernels, monkeypatch, shape, out_dtype, epilogue):
    """On Hopper, `gluon_gemm`'s kernel gives `grouped_gemm`'s Triton kernel's output bit for bit (int32 sums are
    exact; the same epilogue): groups empty, of one row, one short of, at and one past a 128-row tile, several
    tiles; a K shorter than the kernel's K step and an N not a multiple of its 256 columns (zero-filled loads, masked
    stores); rows after the last group dropped (zero with zero_uncovered). With either epilogue: ``tma`` on bfloat16
    rows of a multiple of 16 bytes (N 384) stores the full tiles through the TMA and the groups' last tiles from
    registers (the next group's rows untouched); on the rest it falls back to the stores."""
    import torch

    if triton_backend.device == "cpu" or kernels[1].gluon_gemm.ineligible(
            torch.zeros(1, 16, dtype=torch.int8, device="cuda"),
            torch.zeros(1, 16, 16, dtype=torch.int8, device="cuda").transpose(1, 2), torch.float32):
        pytest.skip("the Gluon kernel runs on Hopper GPUs only")
    k_dim, n_cols = shape
    sizes = [0, 1, 127, 128, 129, 300, 0, 1000, 5]
    a_codes, a_scale, b_codes, b_scale, starts = _grouped_case(sizes, k_dim=k_dim, n_cols=n_cols)
    starts[-1] = starts[-2]  # the last group's 5 rows dropped
    a_codes, a_scale = a_codes.cuda(), a_scale.cuda()
    args = (a_codes, b_codes.cuda(), starts.cuda())
    kwargs = dict(out_dtype=getattr(torch, out_dtype), a_scale=a_scale, b_scale=b_scale.cuda(), zero_uncovered=True)
    monkeypatch.setenv(kernels[1].gluon_gemm.EPILOGUE_ENV, epilogue)
    gluon_out = []
    launches = _launches(kernels, lambda: gluon_out.append(kernels[1].grouped_gemm(*args, **kwargs)))
    assert launches.get("grouped_gemm_int8_gluon") == 1, launches
    tma = epilogue == "tma" and out_dtype == "bfloat16" and n_cols * 2 % 16 == 0
    assert launches.get("grouped_gemm_int8_gluon_tma_store") == (1 if tma else None), launches
    monkeypatch.setenv(kernels[1].INT8_KERNEL_ENV, "triton")
    triton_out = kernels[1].grouped_gemm(*args, **kwargs)
    assert torch.equal(gluon_out[0], triton_out)
    assert not torch.any(gluon_out[0][int(starts[-1]):])


def _both_variants(kernels, device, a, b, starts, **kwargs):
    """grouped_gemm's output with the one-tile kernel and with the persistent one (same arguments)."""
    import torch

    a, b, starts = a.to(device), b.to(device), starts.to(device)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return tuple(kernels[1].grouped_gemm(a, b, starts, persistent=p, **moved).cpu() for p in (False, True))


@pytest.mark.parametrize("k_dim", [40, 64])  # 40: not a multiple of the 32-wide K step (and no descriptors)
@pytest.mark.parametrize("sizes", [
    pytest.param([0, 5, 0, 0, 3, 0], id="empty_and_smaller_than_a_tile"),
    pytest.param([31, 32, 33, 1, 0, 70], id="straddling_tiles"),
])
def test_persistent_grouped_gemm_equals_the_one_tile_kernel(triton_backend, kernels, sizes, k_dim):
    """The persistent kernel loops each program over several work items (4 programs in the interpreter), its
    epilogue recomputing the item it stores; int32 sums are exact, so its int8 output is the one-tile
    kernel's bit for bit, on every row of every group (and the reference's to rounding)."""
    import torch

    a_codes, a_scale, b_codes, b_scale, starts = _grouped_case(sizes, k_dim=k_dim, n_cols=36)
    expected = _expected(a_codes, a_scale, b_codes, b_scale, sizes)
    one_tile, persistent = _both_variants(kernels, triton_backend.device, a_codes, b_codes, starts,
                                          out_dtype=torch.float32, a_scale=a_scale, b_scale=b_scale)
    assert torch.equal(one_tile, persistent)
    np.testing.assert_allclose(persistent.numpy(), expected, rtol=2e-6, atol=1e-6)


def test_persistent_grouped_gemm_zero_uncovered(triton_backend, kernels):
    """Rows after the last group (capacity-dropped) stay zero: the persistent loop counts only real tiles."""
    import torch

    a_codes, a_scale, b_codes, b_scale, starts = _grouped_case([3, 0, 30, 7], k_dim=48, n_cols=40)
    starts[-1] = starts[-2]  # the last group's 7 rows dropped
    one_tile, persistent = _both_variants(kernels, triton_backend.device, a_codes, b_codes, starts,
                                          out_dtype=torch.float32, a_scale=a_scale, b_scale=b_scale,
                                          zero_uncovered=True)
    assert torch.equal(one_tile, persistent)
    assert not torch.any(persistent[33:]) and torch.all(persistent[:33].abs().sum(1) > 0)


def test_persistent_grouped_gemm_float_mode(triton_backend, kernels):
    """Float operands (float32 sums over the same K steps in the same order): the same bits either way."""
    import torch

    sizes = [0, 17, 40, 0, 2]
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(sum(sizes), 40, generator=gen)
    b = torch.randn(len(sizes), 40, 24, generator=gen)
    starts = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32)
    one_tile, persistent = _both_variants(kernels, triton_backend.device, a, b, starts, out_dtype=torch.float32)
    assert torch.equal(one_tile, persistent)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    expected = np.concatenate([a[s:e].double().numpy() @ b[g].double().numpy()
                               for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
    np.testing.assert_allclose(persistent.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_persistent_true_launches_the_persistent_kernel(triton_backend, kernels):
    """``persistent=True`` runs (and records) the persistent kernel; False never does, nor does the default on
    the interpreter's or a small problem's fixed tiles."""
    import torch

    device = triton_backend.device
    a_codes, a_scale, b_codes, b_scale, starts = (
        t.to(device) for t in _grouped_case([5, 0, 9], k_dim=32, n_cols=16))

    def run(persistent):
        return lambda: kernels[1].grouped_gemm(a_codes, b_codes, starts, out_dtype=torch.float32, a_scale=a_scale,
                                               b_scale=b_scale, persistent=persistent)

    assert _launches(kernels, run(True)).get("grouped_gemm_persistent") == 1
    for choice in (False, None):
        launches = _launches(kernels, run(choice))
        assert "grouped_gemm_persistent" not in launches and launches.get("grouped_gemm_int8") == 1, launches


@pytest.mark.parametrize("persistent", [True, False])
def test_the_tuned_launch_follows_the_configs_persistent_flag(triton_backend, kernels, monkeypatch, persistent):
    """The GPU path (autotuner, grid from the config, launch record from its pick), run by the interpreter with
    one config per tuner (one config is never benchmarked): CI has no GPU, and this path is otherwise GPU-only."""
    import torch

    if triton_backend.device != "cpu":
        pytest.skip("the GPU runs this path for real")
    gemm = kernels[1]
    monkeypatch.setattr(gemm, "INTERPRETED", False)
    monkeypatch.setattr(gemm, "_AUTOTUNE_MIN_MACS", 0)
    monkeypatch.setattr(gemm, "_tma_device", lambda t: True)
    monkeypatch.setattr(gemm, "_persistent_programs", lambda t: 3)
    monkeypatch.setattr(gemm, "_GPU_CONFIGS", [gemm._tiles(32, 32, 32, 4, 3, persistent)])
    monkeypatch.setattr(gemm, "_autotuned", {})
    sizes = [0, 5, 0, 31, 33, 1, 0]
    a_codes, a_scale, b_codes, b_scale, starts = _grouped_case(sizes, k_dim=48, n_cols=36)
    expected = _expected(a_codes, a_scale, b_codes, b_scale, sizes)

    def run(choice, out):
        return lambda: out.append(gemm.grouped_gemm(a_codes, b_codes, starts, out_dtype=torch.float32,
                                                    a_scale=a_scale, b_scale=b_scale, persistent=choice))

    for choice in (None, persistent):
        out: list = []
        launches = _launches(kernels, run(choice, out))
        assert launches.get("grouped_gemm_persistent") == (1 if persistent else None), launches
        assert gemm._autotuned[True, choice].best_config.kwargs["PERSISTENT"] == persistent
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=2e-6, atol=1e-6)


def _combine_case(tokens: int, top_k: int, hidden: int, drop_every: int | None):
    """Sorted rows of a random permutation, gate weights, and (optionally) every ``drop_every``-th
    assignment dropped with NaN in its row (a dropped row holds whatever the GEMM left)."""
    import torch

    rng = np.random.default_rng([tokens, top_k, hidden])
    rows = torch.tensor(rng.standard_normal((tokens * top_k, hidden)), dtype=torch.float32)
    position = torch.tensor(rng.permutation(tokens * top_k))
    weight = torch.tensor(rng.random((tokens, top_k)), dtype=torch.float32)
    kept = None
    if drop_every:
        kept = torch.ones(tokens * top_k, dtype=torch.bool)
        kept[::drop_every] = False
        rows[position[~kept]] = float("nan")
        kept = kept.view(tokens, top_k)
    return rows, position, weight, kept


@pytest.mark.parametrize("tokens,top_k,hidden,drop_every", [
    pytest.param(5, 1, 33, None, id="top1_odd_hidden"),
    pytest.param(37, 3, 40, None, id="top3_token_tail"),
    pytest.param(37, 2, 1100, 3, id="drops_nan_rows_two_column_blocks"),
])
def test_combine_kernels_match_the_gather_sum(triton_backend, kernels, tokens, top_k, hidden, drop_every):
    """combine (y = sum of gate-weighted kept rows) and its backward (d_rows = w * dy at each kept row,
    0 at a dropped one; d_w = row . dy) against the same sums in float64 NumPy."""
    import torch

    from qmoe.implementations.torch_triton.kernels import combine as _combine

    if triton_backend.device != "cpu":
        pytest.skip("kernel-level check on the interpreter")
    rows, position, weight, kept = _combine_case(tokens, top_k, hidden, drop_every)
    keep = np.ones((tokens, top_k), bool) if kept is None else kept.numpy()
    r = rows.double().numpy()[position.numpy()].reshape(tokens, top_k, hidden)
    w = weight.double().numpy() * keep
    r = np.where(keep[..., None], r, 0.0)
    dy = np.random.default_rng(1).standard_normal((tokens, hidden))

    y = _combine.combine_rows(rows, position, top_k, weight=weight, kept=kept)
    np.testing.assert_allclose(y.numpy(), (r * w[..., None]).sum(1), rtol=1e-5, atol=1e-5)
    summed = _combine.combine_rows(rows, position, top_k, kept=kept)
    np.testing.assert_allclose(summed.numpy(), r.sum(1), rtol=1e-5, atol=1e-5)

    d_rows, d_w = _combine.combine_rows_backward(rows, torch.tensor(dy, dtype=torch.float32), position, weight,
                                                 top_k, kept=kept)
    expected_d_rows = np.empty_like(rows.double().numpy())
    expected_d_rows[position.numpy()] = (w[..., None] * dy[:, None, :]).reshape(-1, hidden)
    assert not torch.isnan(d_rows).any() and not torch.isnan(d_w).any(), "a dropped row's NaN leaked"
    np.testing.assert_allclose(d_rows.numpy(), expected_d_rows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_w.numpy(), np.where(keep, (r * dy[:, None, :]).sum(-1), 0.0), rtol=1e-5, atol=1e-4)

    # the rows' half alone, and the unweighted spread (x's token rows at their sorted rows): copies, exact
    dy32 = torch.tensor(dy, dtype=torch.float32)
    assert torch.equal(_combine.combine_rows_grad(dy32, position, weight, top_k, rows.shape[0], rows.dtype, kept),
                       d_rows)
    spread = _combine.spread_rows(dy32, position, top_k, rows.shape[0], kept)
    expected_spread = torch.zeros_like(rows)
    token_of_row = torch.empty_like(position)
    token_of_row[position] = torch.arange(tokens * top_k) // top_k
    kept_rows = torch.ones(tokens * top_k, dtype=torch.bool) if kept is None else torch.empty_like(kept.reshape(-1))
    kept_rows[position] = torch.ones_like(kept_rows) if kept is None else kept.reshape(-1)
    expected_spread[kept_rows] = dy32[token_of_row][kept_rows]
    assert torch.equal(spread, expected_spread)


@pytest.mark.parametrize("scheme", ["int8_routed_prequant", "int8_routed"])
def test_int8_backward_frees_the_hidden_activations_before_its_peak(triton_backend, scheme, monkeypatch):
    """When the rows' gradient g is made, the experts' output rows are gone; when Q(g) is made (prequant, from dy
    and the gates), the hidden h and g itself are gone (Q(g) after d_w2: the peak holds a, h and g, not Q(g) too);
    when the SwiGLU gradient runs
    the straight-through backward's float W2 is gone and its float W13 not yet made;
    (with a, the largest [N, 2F] buffer), the forward's hidden h (prequant) or Q(h)'s values (straight-through)
    and g are gone, and d_a is written over a (no second [N, 2F] buffer): the backward holds each
    activation only to its last use (issue 10: the int8 layer's forward+backward peak was 1.3x the compiled
    bf16 layer's). Checked with weak references; a second backward through the graph is refused."""
    import weakref

    import torch

    from qmoe.implementations.torch_triton import layer

    data = CASES["empty_experts"].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, scheme, "float32")
    hidden: list[weakref.ref] = []
    rows_grad: list[weakref.ref] = []
    expert_rows: list[weakref.ref] = []
    rows_alive_at_g: list[bool] = []
    at_swiglu_grad: list[tuple[bool, bool, bool]] = []
    forward, backward = layer.swiglu_forward, layer.fused_swiglu_backward
    down, rows_grad_of, quantize = layer.int8_down, layer.combine_rows_grad, layer.quantize_rows
    hidden_alive_at_q_g: list[bool] = []
    g_alive_at_q_g: list[bool] = []
    float_weights: list[weakref.ref] = []  # the straight-through backward's dequantized W2, W13
    dequantize = layer.dequantize_experts

    def recording_dequantize(*args, **kwargs):
        out = dequantize(*args, **kwargs)
        float_weights.append(weakref.ref(out))
        return out

    def recording_quantize(v, dest=None, weight=None):
        if weight is not None:  # Q(g), made from dy and the gates (`_RoutedInt8Layer.backward`), not from g
            hidden_alive_at_q_g.append(hidden[-1]() is not None)
            g_alive_at_q_g.append(rows_grad[-1]() is not None)
        return quantize(v, dest=dest, weight=weight)

    def recording_down(*args, **kwargs):
        out = down(*args, **kwargs)
        expert_rows.append(weakref.ref(out))
        return out

    def recording_forward(a, store_h=True, quantize=True, dequantized=False):
        out = forward(a, store_h=store_h, quantize=quantize, dequantized=dequantized)
        hidden.append(weakref.ref(out[0] if store_h else out[1]))
        return out

    def recording_rows_grad(*args, **kwargs):
        rows_alive_at_g.append(expert_rows[-1]() is not None)
        out = rows_grad_of(*args, **kwargs)
        rows_grad.append(weakref.ref(out))
        return out

    def checking_backward(a, d_h, quantize=False, in_place=False):
        out = backward(a, d_h, quantize=quantize, in_place=in_place)
        at_swiglu_grad.append((hidden[-1]() is not None, rows_grad[-1]() is not None,
                               out[0].data_ptr() != a.data_ptr()))
        weights_at_swiglu_grad.append([w() is not None for w in float_weights])
        return out

    monkeypatch.setattr(layer, "swiglu_forward", recording_forward)
    monkeypatch.setattr(layer, "fused_swiglu_backward", checking_backward)
    monkeypatch.setattr(layer, "int8_down", recording_down)
    monkeypatch.setattr(layer, "combine_rows_grad", recording_rows_grad)
    monkeypatch.setattr(layer, "quantize_rows", recording_quantize)
    monkeypatch.setattr(layer, "dequantize_experts", recording_dequantize)
    weights_at_swiglu_grad: list[list[bool]] = []
    x = torch.tensor(data.x, device=prepared.device, requires_grad=True)
    out = layer.layer_forward(prepared.spec, prepared.scheme, prepared.weights, x, prepared.int8_experts)
    out.y.sum().backward(retain_graph=True)
    assert rows_alive_at_g == [False], "the experts' output rows were alive when their gradient was made"
    # straight-through: W2's float copy made for d_h and gone again, W13's not made yet
    assert weights_at_swiglu_grad == ([[False]] if scheme == "int8_routed" else [[]]), weights_at_swiglu_grad
    assert hidden_alive_at_q_g == ([False] if scheme == "int8_routed_prequant" else []), (
        f"Q(g) made with the hidden alive (or made at all without the prequant VJP): {hidden_alive_at_q_g}")
    assert g_alive_at_q_g == ([False] if scheme == "int8_routed_prequant" else []), (
        f"Q(g), made from dy, with g still alive: {g_alive_at_q_g}")
    assert at_swiglu_grad == [(False, False, False)], (
        "at the SwiGLU gradient (hidden alive, rows' gradient alive, d_a a new buffer): " + str(at_swiglu_grad))
    with pytest.raises(RuntimeError, match="once per forward"):
        out.y.sum().backward()


def test_combine_backward_in_two_passes_equals_the_one_pass(triton_backend, kernels):
    """`combine_gate_grads` then `combine_rows_grad` (the int8 layer's order, which frees the rows between
    them) give the one-pass backward's d_weight and d_rows bit for bit, dropped slots too."""
    import torch

    from qmoe.implementations.torch_triton.kernels import combine as _combine

    rows, position, weight, kept = _combine_case(33, 3, 70, 4)
    device = triton_backend.device
    rows, position, weight, kept = (t.to(device) for t in (rows, position, weight, kept))
    dy = torch.tensor(np.random.default_rng(3).standard_normal((33, 70)), dtype=torch.float32, device=device)
    d_rows, d_weight = _combine.combine_rows_backward(rows, dy, position, weight, 3, kept)
    gates = _combine.combine_gate_grads(rows, dy, position, 3, kept)
    got_rows = _combine.combine_rows_grad(dy, position, weight, 3, rows.shape[0], rows.dtype, kept)
    assert torch.equal(gates, d_weight) and torch.equal(got_rows, d_rows)


def test_tuned_launches_equal_the_fixed_ones(triton_backend, monkeypatch):
    """Large problems on a GPU run the SwiGLU, combine, per-expert quantization and dequantization kernels
    autotuned over launch shapes; each shape must give the fixed shape's values bit for bit (in-place SwiGLU gradient
    included: the tuner's trial runs write over a, which it must put back), except the combine backward's
    d_w, a row sum whose order follows the tile layout: float32 rounding apart (failed bit for bit on the
    H200, 2026-12-01). The interpreter never tunes."""
    import torch

    from qmoe.implementations.torch_triton import common
    from qmoe.implementations.torch_triton.kernels import combine as _combine
    from qmoe.implementations.torch_triton.kernels import quant as _quant
    from qmoe.implementations.torch_triton.kernels import swiglu as _swiglu

    if triton_backend.device == "cpu":
        pytest.skip("the interpreter never tunes")
    generator = torch.Generator().manual_seed(5)
    rows, ffn = 2048, 2048  # 2^22 elements of h: the tuned path
    a = torch.randn(rows, 2 * ffn, generator=generator).to("cuda", torch.bfloat16)
    d_h = torch.randn(rows, ffn, generator=generator).to("cuda", torch.bfloat16)
    position = torch.randperm(rows * 2, generator=generator).to("cuda")
    weight = torch.rand(rows, 2, generator=generator).to("cuda")
    expert_rows = torch.randn(rows * 2, ffn, generator=generator).to("cuda", torch.bfloat16)
    experts_w = torch.randn(4, 1024, 1536, generator=generator).to("cuda", torch.bfloat16)  # 6 * 2^20 elements

    def run():
        return (*_swiglu.swiglu_forward(a, store_h=True, quantize=True),
                _swiglu.swiglu_forward(a, store_h=True, quantize=True, dequantized=True)[0],
                _quant.dequantize_rows(expert_rows.to(torch.int8), weight.reshape(-1), torch.bfloat16),
                *_swiglu.swiglu_backward(a.clone(), d_h, quantize=True, in_place=True),
                _combine.combine_rows(expert_rows, position, 2, weight=weight),
                *_combine.combine_rows_backward(expert_rows, d_h, position, weight, 2),
                *_quant.quantize_per_expert(experts_w, k_major=True),
                *_quant.quantize_per_expert(experts_w, k_major=False))

    tuned = run()
    monkeypatch.setattr(common, "TUNE_MIN_ELEMENTS", 2**62)
    fixed = run()
    d_weight = 10  # the combine backward's d_w: sum_h rows[pos, h] dy[t, h] over H = 2048 terms
    for i, (t, f) in enumerate(zip(tuned, fixed)):
        if i == d_weight:
            terms = (expert_rows.float().abs()[position].view(rows, 2, ffn) * d_h.float().abs()[:, None]).sum(-1)
            assert bool(((t - f).abs() <= 2 * 2.0**-24 * 64 * terms).all()), "d_w beyond float32 rounding"
        else:
            assert torch.equal(t, f), f"output {i} differs between the tuned and the fixed launch"


@pytest.mark.parametrize("ffn", [40, 1100])  # one pass; two (a row wider than one block in the interpreter)
def test_swiglu_stores_q_h_values_as_dequantize_rows_makes_them(triton_backend, ffn):
    """``dequantized``: the stored hidden is `dequantize_rows` of the kernel's own codes and scales, bit for bit
    (the straight-through backward's Q(h) for d_w2, no longer made from the codes there), and the codes and
    scales are those of the plain call."""
    import torch

    from qmoe.implementations.torch_triton.kernels.quant import dequantize_rows
    from qmoe.implementations.torch_triton.kernels.swiglu import swiglu_forward

    dtype = torch.bfloat16 if triton_backend.device == "cuda" else torch.float32
    a = torch.tensor(np.random.default_rng(4).standard_normal((9, 2 * ffn)), dtype=dtype, device=triton_backend.device)
    h, codes, scale = swiglu_forward(a)
    q_h, q_codes, q_scale = swiglu_forward(a, dequantized=True)
    assert torch.equal(q_codes, codes) and torch.equal(q_scale, scale)
    assert torch.equal(q_h, dequantize_rows(codes, scale, dtype))
    assert not torch.equal(q_h, h)  # the values were rounded to the codes' grid
    with pytest.raises(ValueError, match="needs quantize"):
        swiglu_forward(a, quantize=False, dequantized=True)


def test_swiglu_backward_in_place_equals_the_out_of_place_one(triton_backend):
    """d_a written over a is bit for bit the d_a of a fresh buffer, with and without Q(d_a)."""
    import torch

    from qmoe.implementations.torch_triton.kernels.swiglu import swiglu_backward

    rng = np.random.default_rng(7)
    for quantize in (False, True):
        a = torch.tensor(rng.standard_normal((37, 2 * 40)).astype(np.float32), device=triton_backend.device)
        d_h = torch.tensor(rng.standard_normal((37, 40)).astype(np.float32), device=triton_backend.device)
        expected = swiglu_backward(a, d_h, quantize=quantize)
        got = swiglu_backward(a, d_h, quantize=quantize, in_place=True)
        assert got[0] is a
        for e, g in zip(expected, got):
            assert (e is None and g is None) or torch.equal(e, g)


def _new_tensors(run):
    """``run()``'s result and the tensors its dispatched ops made: outputs that do not share an input's
    storage (a view such as ``detach`` allocates nothing and is not listed)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Made(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.tensors: list[torch.Tensor] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            self.tensors += [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                             if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
            return out

    with Made() as made:
        result = run()
    return result, made.tensors


def test_dequantized_expert_codes_make_no_float32_copy(triton_backend):
    """``codes * scale`` is written straight into the bf16 result: the float32 product of the whole weight
    (28 GiB for DeepSeek-V3's w13; the H200 ran out of memory there on 2026-12-01, int8_routed backward) is
    never materialised as a tensor. Checked on the ops the call dispatches (values: the two-step formula's)."""
    import torch

    from qmoe.implementations.torch_triton.kernels.quant import INTERPRETED, dequantize_experts

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (4, 48, 40), dtype=torch.int8, generator=generator)
    codes = codes.to(triton_backend.device).transpose(1, 2)
    scale = torch.rand(4, generator=generator).to(triton_backend.device) * 1e-2
    got, made = _new_tensors(lambda: dequantize_experts(codes, scale, torch.bfloat16))
    assert not any(t.dtype == torch.float32 and t.numel() == codes.numel() for t in made), \
        "a float32 tensor of the weight's size was made"
    product = codes.to(torch.float32) * scale[:, None, None]
    if INTERPRETED:  # the interpreter's float32 -> bfloat16 conversion truncates: the low 16 bits dropped
        expected = (product.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    else:
        expected = product.to(torch.bfloat16)
    # In the codes' own (K-major) layout: reading it costs no transposing copy.
    assert got.dtype == torch.bfloat16 and got.stride() == codes.stride() and torch.equal(got, expected)


def test_dequantize_rows_per_row(triton_backend):
    """``codes[r] * scale[r]`` per row (the straight-through backward's x and h), and a strided slice of codes
    (expert parallelism's packed rows): torch's float32 formula."""
    import torch

    from qmoe.implementations.torch_triton.kernels.quant import dequantize_rows

    generator = torch.Generator().manual_seed(1)
    device = triton_backend.device
    packed = torch.randint(-127, 128, (37, 70 + 4), dtype=torch.int8, generator=generator).to(device)
    codes = packed[:, :-4]
    scale = torch.rand(37, generator=generator).to(device)
    assert torch.equal(dequantize_rows(codes, scale, torch.float32), codes.float() * scale[:, None])


def test_per_expert_scale_makes_no_weight_sized_temporary():
    """The per-expert amax is one reduction: no |w| tensor of the weights' size (``abs().amax()`` wrote and
    read one every int8_routed step, as large as the layer's bf16 weights), and the scales are the same."""
    import torch

    from qmoe.implementations.torch_triton.kernels.quant import INT8_MAX, per_expert_scale

    w = torch.randn(4, 48, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[1] *= -3.0  # the largest magnitude negative
    w[2] = 0.0  # an all-zero expert: scale 1
    scale, made = _new_tensors(lambda: per_expert_scale(w))
    assert max(t.numel() for t in made) < w[0].numel(), "a tensor of an expert's size or more was made"
    expected = w.abs().amax(dim=(-2, -1)).to(torch.float32) / INT8_MAX
    assert torch.equal(scale, torch.where(expected > 0, expected, torch.ones_like(expected)))


def test_top_k_keys_order_as_a_stable_descending_sort(triton_backend):
    """The routing's top-k kernel equals a stable descending sort's first k: exact ties (all-zero
    rows, +0.0 against -0.0), denormals, huge values of both signs, every k."""
    import torch

    from qmoe.implementations.torch_triton.kernels.router import top_k_lower_index_first

    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, -1.0, 2.5, 3e-38, -3e-38, 1e-45, -1e-45, 3e38, -3e38], np.float32)
    values = rng.choice(special, size=(64, 9))
    values[::4] = rng.standard_normal((16, 9))
    values[1] = 0.0
    table = torch.tensor(values, dtype=torch.float32)
    stable = torch.sort(table.double(), dim=-1, descending=True, stable=True).indices
    for k in range(1, 10):
        got = top_k_lower_index_first(table.to(triton_backend.device), k).cpu()
        assert torch.equal(got, stable[:, :k]), f"top-{k}"


# -- forward stages (stage timing) ------------------------------------------------------------------

_STAGES = ["pack", "up", "down", "combine"]


@pytest.mark.parametrize("scheme", ["none", "int8_routed_prequant"])
@pytest.mark.parametrize("case,stages", [("empty_experts", _STAGES), ("shared_expert", [*_STAGES, "shared"])])
def test_stage_times_names_each_forward_stage(triton_backend, scheme, case, stages):
    data = CASES[case].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, scheme, "float32")
    times = triton_backend.stage_times(prepared, data.x, repeats=2)
    assert list(times) == stages
    assert all(isinstance(t, float) and np.isfinite(t) and t > 0 for t in times.values()), times


def test_stage_times_refuses_expert_parallel_layers(triton_backend):
    data = CASES["balanced"].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, "none", "float32")
    with pytest.raises(ValueError, match="one device"):
        triton_backend.stage_times(dataclasses.replace(prepared, shard=object()), data.x)


@pytest.mark.parametrize("scheme,case", [
    pytest.param(scheme, case, id=f"{scheme}-{case}")
    for scheme in ("none", "int8_routed", "int8_routed_prequant")
    for case in ("capacity_drop", "shared_sigmoid")
] + [pytest.param("qat_int8_row", "wide_g64", id="qat_int8_row-wide_g64")])  # w13 fake-quantized there
def test_stages_in_order_give_the_forwards_output(triton_backend, scheme, case):
    """The stages that stage_times times, run in order, make the backend's forward output bit for bit
    (capacity drops, a router bias, a shared expert, QAT fake quantization): they time what runs."""
    import torch

    from qmoe.implementations.torch_triton import layer

    data = CASES[case].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, scheme, "float32")
    stages = layer.LayerStages(prepared.spec, prepared.scheme, prepared.weights, prepared.int8_experts,
                               prepared.fake_quant)
    with torch.no_grad():
        y, _ = stages.run(torch.tensor(data.x, dtype=prepared.torch_dtype, device=prepared.device))
    forward = triton_backend.forward(prepared, data.x).y  # float64 copy of the float32 output: exact
    assert torch.equal(y.to("cpu", torch.float64), torch.from_numpy(forward))


# -- QAT review findings: each planted bug fails its check ------------------------------------------

class _EvalFakeQuantizes(TorchTritonBackend):
    """Finding 1: the eval path calls the training forward."""

    def eval_forward(self, prepared, x):
        return self.forward(prepared, x)


class _LoadQuantizesAgain(TorchTritonBackend):
    """Round trip: the loaded checkpoint is fake-quantized again with the training scheme."""

    def prepare(self, spec, params, scheme, dtype, ep_size=1):
        prepared = super().prepare(spec, params, scheme, dtype, ep_size)
        self._training_scheme = prepared.scheme
        return prepared

    def load_exported(self, spec, exported, dtype="float32"):
        loaded = super().load_exported(spec, exported, dtype)
        return dataclasses.replace(loaded, scheme=self._training_scheme, fake_quant=True)


def _patched_training_weights(monkeypatch, choose):
    """Replace the layer's choice of training weights by ``choose(name, w, scheme, fake_quant)``."""
    from qmoe.implementations.torch_triton import layer as _triton_layer

    monkeypatch.setattr(_triton_layer, "training_weights", lambda weights, scheme, fake_quant: weights.map(
        lambda name, w: choose(_triton_layer, name, w, scheme, fake_quant)))


def _skip_shared(layer, name, w, scheme, fake_quant):
    """Finding 2: only the routed experts are fake-quantized (the review's embedding left out)."""
    if name.startswith("shared"):
        return w
    return layer.training_weight(w, scheme.weight_quant(name), scheme, fake_quant)


def _ignore_threshold(layer, name, w, scheme, fake_quant):
    """Finding 3: every projection is fake-quantized, also those export keeps float."""
    if fake_quant and scheme.weight_quant(name) == "qat_row":
        return layer._FakeQuantRowsSTE.apply(w, scheme)
    return w


def _no_clip_in_training(layer, name, w, scheme, fake_quant):
    """Finding 4: training uses the row amax while export clips at the quantile."""
    return layer.training_weight(w, scheme.weight_quant(name), dataclasses.replace(scheme, qat_clip_quantile=None),
                                 fake_quant)


def test_the_unmodified_backend_passes_every_qat_check(triton_backend):
    for check in (test_qat.check_eval_never_fake_quantizes, test_qat.check_exported_tensors_fake_quantized,
                  test_qat.check_clip_rule_same_in_training_and_export, test_qat.check_round_trip_not_quantized_twice):
        check(triton_backend)


def test_finding_1_eval_path_fake_quantizes_is_caught(triton_backend):
    with pytest.raises(ConformanceError, match="eval_forward"):
        test_qat.check_eval_never_fake_quantizes(_EvalFakeQuantizes(triton_backend.device))


def test_finding_2_shared_expert_not_fake_quantized_is_caught(triton_backend, monkeypatch):
    _patched_training_weights(monkeypatch, _skip_shared)
    with pytest.raises(ConformanceError, match="shared_w13.*not fake-quantized in training"):
        test_qat.check_exported_tensors_fake_quantized(triton_backend)


def test_finding_3_small_tensors_fake_quantized_is_caught(triton_backend, monkeypatch):
    _patched_training_weights(monkeypatch, _ignore_threshold)
    with pytest.raises(ConformanceError, match="stays float at export, but the training weights differ"):
        test_qat.check_exported_tensors_fake_quantized(triton_backend)


def test_finding_4_clip_rule_differs_in_training_is_caught(triton_backend, monkeypatch):
    _patched_training_weights(monkeypatch, _no_clip_in_training)
    with pytest.raises(ConformanceError, match="different clip rule in training"):
        test_qat.check_clip_rule_same_in_training_and_export(triton_backend)


def test_quantized_twice_on_load_is_caught(triton_backend):
    with pytest.raises(ConformanceError, match="quantized again on load"):
        test_qat.check_round_trip_not_quantized_twice(_LoadQuantizesAgain(triton_backend.device))


@pytest.mark.parametrize("drops", [False, True])
@pytest.mark.parametrize("experts, tokens", [(6, 40), (64, 700)], ids=["6x40", "64x700"])
def test_dispatch_plan_sorts_by_expert_stably(triton_backend, drops, experts, tokens):
    """`plan_dispatch` against NumPy: token order within an expert, empty experts (first, middle, last) as
    empty ranges, capacity-dropped assignments after the last group, the inverse permutation and which rows
    are kept; 700 tokens x 2 spread the sorted rows over two programs of the index kernel."""
    import torch

    from qmoe.implementations.torch_triton import layer

    rng = np.random.default_rng(7)
    top_k = 2
    used = [e for e in range(1, experts - 1) if e != experts // 2]  # 0, the middle one and the last stay empty
    ids = np.stack([rng.choice(used, size=top_k, replace=False) for _ in range(tokens)])
    kept = rng.random((tokens, top_k)) > 0.3 if drops else None
    device = triton_backend.device
    plan = layer.plan_dispatch(torch.tensor(ids, device=device),
                               None if kept is None else torch.tensor(kept, device=device), experts)
    key = np.where(kept.reshape(-1), ids.reshape(-1), experts) if drops else ids.reshape(-1)
    order = np.argsort(key, kind="stable")
    starts = np.searchsorted(key[order], np.arange(experts + 1))
    assert plan.order.cpu().tolist() == order.tolist()
    assert plan.group_starts.cpu().tolist() == starts.tolist() and plan.group_starts.dtype == torch.int32
    assert plan.inverse.cpu().tolist() == np.argsort(order).tolist()
    assert plan.row_token.cpu().tolist() == (order // top_k).tolist()
    if drops:
        assert plan.row_valid is not None and plan.row_valid.cpu().tolist() == (key[order] < experts).tolist()
    else:
        assert plan.row_valid is None


@pytest.mark.parametrize("experts, top_k, tokens", [(6, 2, 70), (64, 8, 100), (128, 3, 33)])
def test_fused_router_equals_the_logits_then_the_top_k(triton_backend, experts, top_k, tokens):
    """`router.logits_top_k` (one kernel) gives `logits_bf16`'s logits and `top_k_lower_index_first`'s ids on them
    bit for bit, tied rows included (zero tokens: every logit 0, the lowest ids win), and per token block how many
    assignments each expert got."""
    import torch

    from qmoe.implementations.torch_triton.kernels import router

    rng = np.random.default_rng(3)
    device = triton_backend.device
    x = torch.tensor(rng.standard_normal((tokens, 96)), dtype=torch.bfloat16, device=device)
    x[::7] = 0.0
    r = torch.tensor(rng.standard_normal((96, experts)) / 8, dtype=torch.float32, device=device)
    logits, ids, counts = router.logits_top_k(x, r, top_k)
    want = router.logits_bf16(x, r)
    assert torch.equal(logits, want)
    assert torch.equal(ids, router.top_k_lower_index_first(want, top_k))
    assert torch.equal(ids[0], torch.arange(top_k, device=device))
    block = counts.block_tokens
    per_block = counts.per_block.cpu().numpy()
    assert per_block.shape[0] == -(-tokens // block) and per_block.shape[1] >= experts
    for b in range(per_block.shape[0]):
        chosen = ids[b * block:(b + 1) * block].reshape(-1).cpu().numpy()
        assert per_block[b].tolist() == np.bincount(chosen, minlength=per_block.shape[1]).tolist(), b


def test_the_fused_router_routes_and_differentiates_as_the_unfused_one(triton_backend, monkeypatch):
    """`layer.route` of bfloat16 tokens through the fused logits + top-k kernel gives the two-kernel routing's ids,
    gate weights, logits and both gradients bit for bit, and expert counts the plan places the rows from."""
    import torch

    from qmoe.implementations.torch_triton import layer
    from qmoe.implementations.torch_triton.kernels import router
    from qmoe.reference.spec import MoESpec

    rng = np.random.default_rng(5)
    device = triton_backend.device
    spec = MoESpec(hidden=64, ffn=16, experts=8, top_k=3)
    x0 = torch.tensor(rng.standard_normal((70, 64)), dtype=torch.bfloat16, device=device)
    r0 = torch.tensor(rng.standard_normal((64, 8)) / 4, dtype=torch.float32, device=device)
    g = torch.tensor(rng.standard_normal((70, 3)), dtype=torch.float32, device=device)

    def routed():
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        routing = layer.route(spec, r, None, x)
        (routing.gate_weights * g).sum().backward()
        return routing, x.grad, r.grad

    fused, fused_dx, fused_dr = routed()
    monkeypatch.setattr(router, "FUSED_TOP_K_EXPERTS", 0)
    plain, plain_dx, plain_dr = routed()
    assert fused.counts is not None and plain.counts is not None
    for name in ("expert_ids", "gate_weights", "logits"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    assert torch.equal(fused_dx, plain_dx) and torch.equal(fused_dr, plain_dr)
    plan = layer.plan_dispatch(fused.expert_ids, None, spec.experts, fused.counts)
    assert torch.equal(plan.order, layer.plan_dispatch(plain.expert_ids, None, spec.experts).order)


@pytest.mark.parametrize("experts, top_k, tokens", [(6, 2, 40), (64, 2, 700), (64, 8, 300)],
                         ids=["6x40", "64x700", "64x300top8"])
def test_counting_plan_equals_the_sorted_one(triton_backend, experts, top_k, tokens):
    """`plan_dispatch` from the router's expert counts (no sort) gives the sorted plan's rows bit for bit, with empty
    experts (first, middle, last), and the Gluon GEMM's tile table (`gluon_gemm.tile_table`) for its groups."""
    import torch

    from qmoe.implementations.torch_triton import layer
    from qmoe.implementations.torch_triton.kernels import dispatch, gluon_gemm

    rng = np.random.default_rng(11)
    used = [e for e in range(1, experts - 1) if e != experts // 2]
    ids = np.stack([rng.choice(used, size=top_k, replace=False) for _ in range(tokens)])
    block = 32
    per_block = np.stack([np.bincount(ids[b:b + block].reshape(-1), minlength=experts)
                          for b in range(0, tokens, block)]).astype(np.int32)
    device = triton_backend.device
    ids_t = torch.tensor(ids, device=device)
    counts = dispatch.ExpertCounts(torch.tensor(per_block, device=device), block)
    counted = layer.plan_dispatch(ids_t, None, experts, counts)
    sorted_plan = layer.plan_dispatch(ids_t, None, experts)
    for name in ("order", "inverse", "row_token", "group_starts"):
        assert torch.equal(getattr(counted, name), getattr(sorted_plan, name)), name
    assert counted.row_valid is None and counted.tiles is not None and sorted_plan.tiles is None
    table, count = gluon_gemm.tile_table(sorted_plan.group_starts, tokens * top_k)
    assert (counted.tiles.tile_m, counted.tiles.rows) == (gluon_gemm.BLOCK_M, tokens * top_k)
    assert int(counted.tiles.count) == int(count)
    real = 3 * int(count)
    assert torch.equal(counted.tiles.table[:real], table[:real])


def test_too_many_block_counts_are_sorted_instead(triton_backend, kernels):
    """Counts over `dispatch.MAX_COUNTS` (each program of the counting plan reads them all) send a dropless routing
    to the sort, which gives the same plan."""
    import torch

    from qmoe.implementations.torch_triton import layer
    from qmoe.implementations.torch_triton.kernels import dispatch

    device = triton_backend.device
    tokens, experts = 64, 4
    ids = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], dim=1).to(device)
    per_token = torch.nn.functional.one_hot(ids, dispatch.MAX_COUNTS).sum(dim=1).to(torch.int32)  # blocks of 1 token
    many = dispatch.ExpertCounts(per_token, 1)
    assert not dispatch.counts_fit(many)
    launched = _launches(kernels, lambda: layer.plan_dispatch(ids, None, experts, many))
    assert launched.get("dispatch_plan_indices") == 1 and "dispatch_counting_plan" not in launched, launched
    few = dispatch.ExpertCounts(per_token[:, :experts].contiguous(), 1)
    assert torch.equal(layer.plan_dispatch(ids, None, experts, many).order,
                       layer.plan_dispatch(ids, None, experts, few).order)


def test_a_dropless_routing_is_planned_without_a_sort(triton_backend, kernels):
    """A dropless routing's top-k kernel counts each token block's assignments per expert and the plan is placed
    from the counts in one kernel (no sort, no sorted index kernel); bfloat16 tokens under a softmax router (on the
    GPU) take the logits, the top-k and the counts from one kernel. With capacity drops the plan is sorted."""
    dtype = "bfloat16" if triton_backend.device == "cuda" else "float32"
    data = CASES["empty_experts"].build(dtype)
    assert data.spec.router == "softmax_topk" and data.spec.capacity_factor is None
    prepared = triton_backend.prepare(data.spec, data.params, "int8_routed_prequant", dtype)
    forward = _launches(kernels, lambda: triton_backend.forward(prepared, data.x))
    top_k = "router_logits_top_k" if dtype == "bfloat16" else "router_top_k"
    assert forward.get(top_k) == 1 and forward.get("dispatch_counting_plan") == 1, forward
    assert "dispatch_plan_indices" not in forward and "router_logits" not in forward, forward
    dropping = CASES["capacity_drop"].build(dtype)
    prepared = triton_backend.prepare(dropping.spec, dropping.params, "int8_routed_prequant", dtype)
    forward = _launches(kernels, lambda: triton_backend.forward(prepared, dropping.x))
    assert forward.get(top_k) == 1 and forward.get("dispatch_plan_indices") == 1, forward
    assert "dispatch_counting_plan" not in forward, forward


@pytest.mark.parametrize("tokens, top_k", [(40, 2), (9, 3)])
def test_quantize_rows_writes_each_tokens_codes_at_its_rows(triton_backend, tokens, top_k):
    """`quantize_rows(x, dest)`: every token's codes and scale, the same as without ``dest``, at each of its k rows
    of the expert order (the layer's `sorted_codes`); with ``weight``, the same codes and each copy's scale times
    its weight: the per-row int8 of weight * x (within half a step of it, a negative or zero weight included)."""
    import torch

    from qmoe.implementations.torch_triton import layer

    device = triton_backend.device
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(tokens, 72, generator=gen) * torch.rand(tokens, 1, generator=gen)).to(device)
    x[1] = 0.0  # an all-zero token: codes 0, scale 1
    ids = torch.stack([torch.randperm(5, generator=gen)[:top_k] for _ in range(tokens)]).to(device)
    plan = layer.plan_dispatch(ids, None, 5)
    codes, scale = layer.quantize_rows(x)
    sorted_codes, sorted_scale = layer.sorted_codes(x, plan)
    assert sorted_codes.shape == (tokens * top_k, 72) and sorted_scale.shape == (tokens * top_k,)
    assert torch.equal(sorted_codes, codes[plan.row_token]) and torch.equal(sorted_scale, scale[plan.row_token])
    # with gate weights (one negative, one zero): the int8 of gate * x[token], the backward's Q(g) from dy
    gates = torch.rand(tokens, top_k, generator=gen).to(device)
    gates[0, 0], gates[2, -1] = -0.5, 0.0
    g_codes, g_scale = layer.quantize_rows(x, dest=plan.assignment_rows, weight=gates)
    assert torch.equal(g_codes, sorted_codes)
    assert torch.equal(g_scale, sorted_scale * gates.reshape(-1)[plan.order])
    g = (gates.reshape(-1, 1).double() * x.double().repeat_interleave(top_k, 0))[plan.order]
    step = g.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((g_codes.double() * g_scale.double()[:, None] - g).abs() <= step / 2 * (1 + 1e-6))


def _unwritten_rows_op(monkeypatch, layer):
    """Make `layer._torch_grouped_mm` leave NaN, what uninitialized memory may hold, where `torch._grouped_mm` leaves
    rows unwritten: the row products' output rows past the last group, and their input gradient's too."""
    import torch

    real = layer._torch_grouped_mm

    class Unwritten(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out, valid):
            ctx.save_for_backward(valid)
            return torch.where(valid[:, None], out, float("nan"))

        @staticmethod
        def backward(ctx, grad):
            (valid,) = ctx.saved_tensors
            return torch.where(valid[:, None], grad, float("nan")), None

    def unwritten(a, b, ends):
        out = real(a, b, ends)
        if out.dim() != 2:  # the weight gradient [E, K, M]: every entry written
            return out
        valid = torch.arange(out.shape[0], device=out.device) < ends[-1]
        return Unwritten.apply(out, valid)

    monkeypatch.setattr(layer, "_torch_grouped_mm", unwritten)


def _dropping_plan(layer, device, experts: int = 4, tokens: int = 12):
    """A dispatch plan that drops every third token's second assignment."""
    import torch

    ids = torch.tensor([[t % experts, (t + 1) % experts] for t in range(tokens)], device=device)
    kept = torch.tensor([[True, t % 3 != 0] for t in range(tokens)], device=device)
    plan = layer.plan_dispatch(ids, kept, experts)
    assert plan.has_drops
    return plan


def test_grouped_mm_zeroes_the_rows_no_group_covers(triton_backend, monkeypatch):
    """`grouped_mm`'s output rows past the last group are zero whatever the raw op left there (every caller reads
    them: the float SwiGLU forward, the STE backward's SwiGLU gradient), its covered rows the raw op's."""
    import torch

    from qmoe.implementations.torch_triton import layer

    plan = _dropping_plan(layer, triton_backend.device)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(plan.order.numel(), 8, generator=generator).to(triton_backend.device)
    weights = torch.randn(4, 8, 6, generator=generator).to(triton_backend.device)
    want = layer.grouped_mm(rows, weights, plan)
    _unwritten_rows_op(monkeypatch, layer)
    got = layer.grouped_mm(rows, weights, plan)
    dropped = ~plan.row_valid
    assert dropped.any() and (got[dropped] == 0).all()
    assert torch.equal(got[plan.row_valid], want[plan.row_valid])


def test_the_swiglu_kernel_never_reads_the_gemms_unwritten_rows(triton_backend, monkeypatch):
    """`torch._grouped_mm` leaves capacity-dropped rows unwritten in its output and its input gradient. Here they
    hold NaN: the float experts' SwiGLU kernels, forward and backward, must see only zeros there, and the dropped
    rows' outputs and every gradient stay finite. Without the mask of `grouped_mm`'s output the SwiGLU forward
    computes on the NaN rows (under the interpreter, the overflow warnings of CI)."""
    import torch

    from qmoe.implementations.torch_triton import layer

    real_swiglu = layer.swiglu
    seen: list[torch.Tensor] = []

    def watched_swiglu(gate_up):
        seen.append(gate_up.detach())
        out = real_swiglu(gate_up)
        out.register_hook(lambda grad: seen.append(grad.detach()))
        return out

    _unwritten_rows_op(monkeypatch, layer)
    monkeypatch.setattr(layer, "swiglu", watched_swiglu)
    device = triton_backend.device
    experts, tokens, hidden, ffn = 4, 12, 8, 6
    plan = _dropping_plan(layer, device, experts, tokens)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_()
    w13 = torch.randn(experts, hidden, 2 * ffn, generator=generator).to(device).requires_grad_()
    w2 = torch.randn(experts, ffn, hidden, generator=generator).to(device).requires_grad_()
    rows = layer.float_experts(x, w13, w2, plan)
    rows.sum().backward()
    dropped = ~plan.row_valid
    assert len(seen) == 2, "the SwiGLU forward and its output's gradient"
    for tensor in seen:
        assert torch.isfinite(tensor).all() and (tensor[dropped] == 0).all()
    for tensor in (x.grad, w13.grad, w2.grad):
        assert torch.isfinite(tensor).all()


def test_balance_loss_is_made_when_read(triton_backend):
    """The layer's forward leaves the balance loss (and its probabilities) unmade until read: the output
    needs neither, nor do the benchmark steps (the compiled peer computes none)."""
    import torch

    from qmoe.implementations.torch_triton import layer

    data = CASES["balanced"].build("float32")
    prepared = triton_backend.prepare(data.spec, data.params, "none", "float32")
    out = layer.layer_forward(prepared.spec, prepared.scheme, prepared.weights,
                              torch.tensor(data.x, dtype=torch.float32, device=prepared.device))
    assert "balance_loss" not in vars(out.routing) and "balance_probs" not in vars(out.routing)
    loss = out.routing.balance_loss
    assert "balance_probs" in vars(out.routing) and loss is out.routing.balance_loss
