"""Self-tests of the benchmarks' baselines and columns (fast, tiny shapes, no timing thresholds).

The strongest native peer per framework (compiled and eager rows; ``x native peer`` against the fastest),
``x best bf16`` (the fastest float row of any framework), the int8 GEMM bound and ``% of bound`` by operand
type, the peak-memory column, the fit estimate that skips a real model's layer with its reason, the
reference check of a layer too large for float64 (built from the checked rows' experts only), and the
CUDA-graph capture's refusal where there is no CUDA device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference.schemes import SCHEMES
from qmoe.reference.spec import MoESpec, SpecError
from qmoe.suite import report
from qmoe.suite.benchmarks import graphs, harness, memory, metrics, outputs, shapes, tables, workload
from qmoe.suite.benchmarks.peers import PEERS, GemmBound, balanced_expert_ids

from .test_benchmarks import FakeBenchmark
from .test_benchmarks import _gemm_bound_or_skip as _torch_or_skip


# -- the int8 GEMM bound --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["int_mm", "triton_grouped"])
@pytest.mark.parametrize("pass_id", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shared", [0, 24])
def test_int8_bound_runs_through_the_harness_with_its_output_checked(pass_id, shared, variant, monkeypatch):
    """int8 codes, the suite's FLOPs, balanced rows whatever the routing, bounds the int8 rows, and its
    dequantized output agrees with the scheme's reference (the check would fail a skipped or wrong GEMM),
    whichever of its two ways of running the GEMMs is timed; both are compared, the faster one kept."""
    _torch_or_skip()
    from qmoe.suite.benchmarks import int8_bound
    from qmoe.suite.benchmarks.int8_bound import BOUND_SCHEME, GemmBoundInt8

    if GemmBoundInt8.unavailable_reason():
        pytest.skip(GemmBoundInt8.unavailable_reason())
    import torch

    monkeypatch.setattr(int8_bound, "CPU_TRITON_VARIANT", True)  # benchmark runs leave it out on CPU
    grouped, refusal = int8_bound.triton_grouped_gemm(torch.device("cpu"))
    if grouped is None:
        pytest.skip(refusal)
    compare = int8_bound.faster_variant

    def pick(bodies, sync):
        _, seconds = compare(bodies, sync)
        return variant, seconds

    monkeypatch.setattr(int8_bound, "faster_variant", pick)
    shape = shapes.BenchShape("t", tokens=64, hidden=32, ffn=16, experts=4, top_ks=(2,), shared_ffn=shared)
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2)
    harness.clear_caches()
    case = harness.BenchCase(GemmBoundInt8.name, BOUND_SCHEME, shape, 2, pass_id, "zipf", is_peer=True)
    info = harness.run_case(FakeBenchmark(), case, GemmBoundInt8, options)
    assert info["output_check"]["inputs"] == 2 and info["output_check"]["min_sqnr_db"] > outputs.OUTPUT_CHECK_FLOOR_DB
    assert info["bound"] and info["bound_operand"] == "int8" and info["peak_operand"] == "int8"
    assert info["routing_fixed"] and info["load_imbalance"] == 1.0
    assert info["flops"] == metrics.flops(shape.spec(2), 64, case.pass_name)
    assert info["bound_variant"] == variant and set(info["bound_variant_s"]) == {"int_mm", "triton_grouped"}


def test_int8_bound_leaves_the_interpreted_triton_variant_out_of_cpu_runs():
    """On CPU the triton_grouped variant would run in Triton's interpreter: never the faster one, and comparing
    it took most of a CPU benchmark run. Benchmark runs leave it out, saying why; CUDA keeps it."""
    _torch_or_skip()
    import torch

    from qmoe.suite.benchmarks import int8_bound

    grouped, refusal = int8_bound.triton_grouped_gemm(torch.device("cpu"))
    assert grouped is None and "left out on CPU" in str(refusal)


def test_int8_bound_refuses_unequal_or_too_small_blocks_and_catches_a_skipped_gemm():
    _torch_or_skip()
    import torch

    from qmoe.suite.benchmarks import int8_bound

    assert int8_bound.block_rows(64, 2, 4) == 32
    with pytest.raises(SpecError, match="divisible"):
        int8_bound.block_rows(63, 2, 4)
    with pytest.raises(SpecError, match="> 16"):
        int8_bound.block_rows(32, 2, 4)
    h32 = torch.ones(2, 24, 8, dtype=torch.int32)
    out = {"h": torch.zeros_like(h32), "y": torch.zeros(2, 24, 4, dtype=torch.int32)}
    with pytest.raises(outputs.WrongOutputError, match="did not do"):
        int8_bound._finish_forward(out, h32, torch.ones(2, 24), torch.ones(2), None, 2, 24)
    untimed = torch.ones(48, 8)
    with pytest.raises(outputs.WrongOutputError, match="did not do"):  # the triton_grouped variant's check
        int8_bound._finish_rows("up-projection", torch.zeros_like(untimed), untimed, torch.ones(48, 4), None, 2, 24)


# -- the compiled peers ---------------------------------------------------------------------------------------------
def test_every_framework_lists_its_compiled_peer_first_and_keeps_the_eager_row():
    names = {framework: [cls.name for cls in classes] for framework, classes in PEERS.items()}
    assert names["torch"] == ["torch._grouped_mm.compiled", "torch._grouped_mm.eager"]
    assert names["mlx"] == ["mx.gather_mm.compiled", "mx.gather_mm.eager"]
    assert names["jax"] == ["jax.lax.ragged_dot"]


def test_torch_compile_refusal_names_the_dtype_it_cannot_trace():
    _torch_or_skip()
    from qmoe.suite.benchmarks.peers import torch_compile_refusal

    assert torch_compile_refusal("bfloat16", "cpu") is None
    refusal = torch_compile_refusal("float32", "cpu")
    assert refusal is None or "cannot trace torch._grouped_mm in float32" in refusal


def test_the_torch_peer_layer_traces_as_one_graph_under_torch_compile():
    """fullgraph=True: the whole layer (routing, sort, grouped GEMMs, combine, and autograd's backward) is one
    graph, no break back to Python. Traced with the aot_eager backend (dynamo + AOTAutograd, no codegen) to
    stay fast here; the benchmark uses inductor."""
    _torch_or_skip()
    import torch

    from qmoe.suite.benchmarks.peers import TorchGroupedMMCompiledPeer, torch_moe_layer

    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,), shared_ffn=16)
    spec = shape.spec(2)
    params = workload.make_params(shape, "balanced", "bfloat16")
    prepared = TorchGroupedMMCompiledPeer("cpu").prepare(spec, params, "none", "bfloat16")
    compiled = torch.compile(lambda w, x: torch_moe_layer(spec, w, x), fullgraph=True, backend="aot_eager")
    x = torch.tensor(workload.make_inputs(shape, "bfloat16", 1)[0].x, dtype=torch.bfloat16, requires_grad=True)
    leaves = {n: t.detach().requires_grad_(n != "router_bias") for n, t in prepared.arrays.items()}
    y = compiled(leaves, x)[0]
    eager = torch_moe_layer(spec, prepared.arrays, x.detach())[0]
    torch.testing.assert_close(y.detach(), eager)
    (dx,) = torch.autograd.grad(y, [x], grad_outputs=torch.ones_like(y))
    assert dx.shape == x.shape and torch.isfinite(dx.float()).all()


@pytest.mark.parametrize("pass_id", ["fwd", "fwd_bwd"])
def test_the_mlx_compiled_peer_runs_through_the_harness(pass_id):
    pytest.importorskip("mlx.core")
    from qmoe.suite.benchmarks.peers import MlxGatherMMCompiledPeer

    if MlxGatherMMCompiledPeer.unavailable_reason():
        pytest.skip(MlxGatherMMCompiledPeer.unavailable_reason())
    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,))
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2)
    harness.clear_caches()
    case = harness.BenchCase(MlxGatherMMCompiledPeer.name, "none", shape, 2, pass_id, "balanced", is_peer=True)
    info = harness.run_case(FakeBenchmark(), case, MlxGatherMMCompiledPeer, options)
    assert info["output_check"]["min_sqnr_db"] > 100 and info["framework"] == "mlx"
    assert info["peak_memory_source"] == "mx.get_peak_memory" and info["peak_memory_bytes"] > 0


# -- the derived columns --------------------------------------------------------------------------------------------
def _row(backend, tflops, **info):
    info = {"backend": backend, "tflops": tflops, "shape": "s", "top_k": 2, "pass": "forward", "dtype": "bfloat16",
            **info}
    return tables.ResultRow(f"test_throughput[{backend}-{info.get('scheme')}]", info, 1e-3 / tflops, 1e-3 / tflops)


def _derived(rows):
    return {(r.get("backend"), r.get("scheme")): r.derived for r in tables.derive(rows)}


def test_x_native_peer_is_against_the_strongest_peer_of_the_framework():
    common = dict(peer=True, framework="torch", scheme="none")
    for compiled, eager, expected in ((3.0, 2.0, "torch._grouped_mm.compiled"), (1.0, 2.0, "torch._grouped_mm.eager")):
        derived = _derived([_row("torch_triton", 3.0, framework="torch", scheme="int8_routed_prequant"),
                            _row("torch._grouped_mm.compiled", compiled, **common),
                            _row("torch._grouped_mm.eager", eager, **common),
                            _row("jax.lax.ragged_dot", 9.0, peer=True, framework="jax", scheme="none")])
        row = derived[("torch_triton", "int8_routed_prequant")]
        assert row["peer"] == expected and row["x_peer"] == pytest.approx(3.0 / max(compiled, eager))


def test_x_best_is_against_the_fastest_float_row_of_any_framework():
    derived = _derived([_row("torch_triton", 5.0, framework="torch", scheme="int8_routed_prequant"),
                        _row("torch_triton", 3.0, framework="torch", scheme="none"),
                        _row("jax.lax.ragged_dot", 4.0, peer=True, framework="jax", scheme="none"),
                        _row("gemm_bound", 8.0, peer=True, bound=True, framework="torch", scheme="none")])
    int8 = derived[("torch_triton", "int8_routed_prequant")]
    assert int8["best"] == "jax.lax.ragged_dot" and int8["x_best"] == pytest.approx(1.25)  # the bound is no row
    assert derived[("jax.lax.ragged_dot", "none")]["x_best"] == pytest.approx(1.0)


def test_percent_of_bound_uses_the_bound_of_the_rows_operand_type():
    bounds = [_row("gemm_bound", 10.0, peer=True, bound=True, bound_operand="bfloat16", scheme="none"),
              _row("gemm_bound_int8", 20.0, peer=True, bound=True, bound_operand="int8",
                   scheme="int8_routed_prequant")]
    derived = _derived([*bounds, _row("b", 5.0, scheme="int8_routed_prequant", peak_operand="int8"),
                        _row("b", 4.0, scheme="int8_dense", peak_operand="bfloat16")])
    assert derived[("b", "int8_routed_prequant")]["bound"] == "gemm_bound_int8"
    assert derived[("b", "int8_routed_prequant")]["x_bound"] == pytest.approx(0.25)
    assert derived[("b", "int8_dense")]["x_bound"] == pytest.approx(0.4)
    alone = _derived([bounds[0], _row("b", 5.0, scheme="int8_routed_prequant", peak_operand="int8")])
    assert "x_bound" not in alone[("b", "int8_routed_prequant")], "an int8 row is never held to a bf16 bound"
    assert tables.fmt_share(0.734) == "73.4%" and tables.fmt_bytes(3 << 29) == "1.50 GiB"
    assert tables.fmt_bytes(None) == "" and tables.best_label([_row("b", 1.0)]) == "x best bf16"


def _bench(backend, scheme, tflops, **extra):
    seconds = 1e-3 / tflops
    info = {"backend": backend, "scheme": scheme, "pass": "forward_backward", "top_k": 8, "routing": "balanced",
            "dtype": "bfloat16", "shape": "logbook-shared0", "tokens": 32768, "hidden": 2048, "ffn": 2048,
            "experts": 64, "shared_ffn": 0, "router": "softmax_topk", "device_name": "NVIDIA H200",
            "framework": "torch", "tflops": tflops, "peak_operand": metrics.peak_operand(scheme, "bfloat16"),
            "output_check": {"min_sqnr_db": 40.0, "floor_db": 20.0}, "load_imbalance": 1.1, **extra}
    return {"name": f"test_throughput[{backend}-{scheme}]", "extra_info": info,
            "stats": {"median": seconds, "mean": seconds}}


def test_report_shows_compiled_peer_bound_share_best_and_memory(tmp_path: Path):
    """The issue's H200 numbers: int8 542, compiled peer 509, eager peer 346 TF/s."""
    doc = {"qmoe": {"command": "pytest -m benchmark", "cuda_graph": False, "not_run": []}, "benchmarks": [
        _bench("torch_triton", "int8_routed_prequant", 542.0, peak_memory_bytes=20 << 30, cuda_graph=True),
        _bench("torch_triton", "none", 400.0, peak_memory_bytes=30 << 30),
        _bench("torch._grouped_mm.compiled", "none", 509.0, peer=True, peak_memory_bytes=31 << 30),
        _bench("torch._grouped_mm.eager", "none", 346.0, peer=True),
        _bench("gemm_bound", "none", 700.0, peer=True, bound=True, bound_operand="bfloat16"),
        _bench("gemm_bound_int8", "int8_routed_prequant", 1084.0, peer=True, bound=True, bound_operand="int8")]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    assert report.main(["--benchmark-json", str(path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "throughput.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| torch_triton ") and "int8_routed_prequant" in ln
                and "|      8 |" not in ln and "GiB" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = next(ln for ln in text.splitlines() if ln.startswith("| backend") and "x native peer" in ln)
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = dict(zip(columns, cells))
    assert row["x native peer"] == "1.06" and row["x best bf16"] == "1.06"   # 542 / 509: the compiled peer
    assert row["% of bound"] == "50.0%" and row["peak memory"] == "20.00 GiB"  # 542 / 1084: the int8 bound
    assert "torch._grouped_mm.compiled (peer)" in text and "gemm_bound_int8 (bound)" in text
    assert "CUDA graphs: off" in text and "captured: torch_triton" in text


# -- memory: the column and the fit estimate ------------------------------------------------------------------------
def test_peak_memory_says_why_when_the_framework_cannot_report():
    calls = []
    peak = memory.measure_peak("torch", "cpu", lambda: calls.append(1))
    assert peak.bytes is None and "CUDA" in peak.note and calls == [1]
    assert memory.measure_peak(None, "cpu", lambda: None).as_info()["peak_memory_bytes"] is None


def test_deepseek_fits_the_h200_host_and_device_and_a_smaller_host_refuses_it_with_the_estimate():
    (deepseek,) = shapes.preset("deepseek-v3")
    spec = deepseek.spec(8)
    need = memory.estimate(spec, deepseek.tokens, "bfloat16", "forward_backward", outputs.BACKWARD_CHECK_BYTES)
    gib = 2 ** 30
    assert 80 * gib < need.host_bytes < 100 * gib  # float32 parameters (45 GB) and one upload transient
    assert memory.fit_refusal(need, 128 * gib, 139 * gib, "cuda") is None
    refusal = memory.fit_refusal(need, 64 * gib, 139 * gib, "cuda")
    assert refusal and "GiB of host memory" in refusal and "of 64 GiB" in refusal
    assert "device memory" in memory.fit_refusal(need, 512 * gib, 40 * gib, "cuda")


@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("fixed", [False, True])
def test_a_layer_too_large_for_float64_is_checked_on_its_rows_experts_alone(pass_, fixed):
    """The check of a big layer (forced here with a tiny budget) equals the full layer's on the rows it keeps."""
    shape = shapes.BenchShape("t", tokens=24, hidden=32, ffn=16, experts=8, top_ks=(2,), shared_ffn=8,
                              router="sigmoid_topk")
    spec = shape.spec(2)
    params = workload.make_params(shape, "zipf", "float32")
    item = workload.make_inputs(shape, "float32", 1)[0]
    rows = outputs.check_rows(24, 6)
    ids = balanced_expert_ids(24, 2, 8) if fixed else None
    budget = 3 * 8 * 3 * 32 * 16
    small = outputs.check_layer(spec, params, "int8_routed", item.x, rows, ids, budget_bytes=budget)
    assert small.spec.experts <= 4 and 1 <= small.rows.size < rows.size
    full = outputs.check_layer(spec, params, "int8_routed", item.x, small.rows, ids, budget_bytes=1 << 40)
    assert full.spec.experts == 8

    def expected(layer):
        if ids is None:
            return outputs.expected_rows(layer.spec, layer.effective, "int8_routed", pass_, item.x, item.dy,
                                         layer.rows)[1]
        return outputs.fixed_routing_rows(layer.spec, layer.effective, "int8_routed", pass_, item.x, item.dy,
                                          layer.rows, layer.expert_ids)

    np.testing.assert_allclose(expected(small), expected(full), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_kept_expert_weights_give_the_same_check_layer_as_quantizing_again(scheme):
    """`outputs.ExpertEffective` serves each expert's effective weights from earlier checks, bit for bit the
    sub-layer's own quantization, through evictions and sub-layers smaller than top-k."""
    shape = shapes.BenchShape("t", tokens=40, hidden=64, ffn=64, experts=8, top_ks=(1, 2, 4), shared_ffn=64,
                              router="sigmoid_topk")
    params = workload.make_params(shape, "zipf", "float32")
    inputs = workload.make_inputs(shape, "float32", 2)
    per_expert = 8 * 3 * 64 * 64
    cache = outputs.ExpertEffective(scheme, max_bytes=5 * per_expert)
    for k in (2, 4, 1, 2):
        spec = shape.spec(k)
        for item in inputs:
            kept = outputs.check_layer(spec, params, scheme, item.x, np.arange(0, 40, 3), budget_bytes=6 * per_expert,
                                       cache=cache)
            again = outputs.check_layer(spec, params, scheme, item.x, np.arange(0, 40, 3), budget_bytes=6 * per_expert)
            assert [n for n, _ in kept.effective.items()] == [n for n, _ in again.effective.items()]
            for (name, a), (_, b) in zip(kept.effective.items(), again.effective.items()):
                np.testing.assert_array_equal(a, b, err_msg=f"{scheme} top{k} {name}")
            assert len(cache._experts) <= max(5, kept.spec.experts)


def test_the_check_refuses_a_big_layer_whose_gates_see_every_expert():
    spec = MoESpec(hidden=32, ffn=16, experts=8, top_k=2, renormalize=False)
    params = reference.MoEParams.random(spec, 0)
    with pytest.raises(outputs.CheckTooLargeError, match="whole layer in float64"):
        outputs.check_layer(spec, params, "none", np.ones((4, 32)), np.arange(2), budget_bytes=1)


# -- CUDA graphs --------------------------------------------------------------------------------------------------
def test_capture_without_cuda_times_the_step_as_it_is_and_says_why():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path is the CPU's")

    def step():
        return 1

    captured = graphs.capture(step)
    assert captured.step is step and not captured.captured and captured.reason == "no CUDA device"
    assert harness.BenchOptions(device="cpu", dtype="float32").cuda_graph is False


def test_table_header_records_the_cuda_graph_mode():
    rows = [tables.ResultRow("a", {"backend": "x", "cuda_graph": False, "cuda_graph_reason": "RuntimeError: sync",
                                   "cuda_graph_option": True}, 1.0, 1.0),
            tables.ResultRow("b", {"backend": "y", "cuda_graph": True}, 1.0, 1.0)]
    mode = report._graph_mode([{"qmoe": {"cuda_graph": True}}], rows)
    assert mode.startswith("on (--bench-cuda-graph)") and "captured: y" in mode and "x (RuntimeError: sync)" in mode
    assert report._graph_mode([{}], []).startswith("off")


class _FakeGraph:
    """Records nothing and holds nothing, as a real CUDA graph holds device addresses, not tensors."""

    def replay(self):
        pass

    def reset(self):
        pass


def test_a_captured_step_keeps_the_tensors_its_graph_reads_alive(monkeypatch):
    """The H200 run's gemm_bound_int8 forward failure: the harness replaces each step by its replay, and a
    replay that did not hold the step freed the step's inputs (the int8 codes) while the graph still read
    their addresses. On CPU, with CUDA's capture API faked, the inputs must outlive the original step."""
    import contextlib
    import gc
    import weakref

    torch = pytest.importorskip("torch")
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    for name, value in {"is_available": lambda: True, "CUDAGraph": _FakeGraph, "Stream": stream,
                        "stream": lambda s: contextlib.nullcontext(), "current_stream": stream,
                        "synchronize": lambda: None, "graph": lambda g: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)

    class Codes:  # stands for the int8 codes the bound's body reads
        pass

    def make_step():
        codes, result = Codes(), ["the int32 output buffer"]

        def body():
            assert codes is not None  # the body reads the codes; it returns its output buffer
            return result

        def step():
            return body()

        step.graph_body = body
        return step, weakref.ref(codes)

    step, codes = make_step()
    captured = graphs.capture(step)
    assert captured.captured and captured.step is not step
    del step
    gc.collect()
    assert codes() is not None, "the replay let the captured body's inputs be freed"
    assert captured.step() == ["the int32 output buffer"]
    assert captured.step.stream_body() == ["the int32 output buffer"]  # a replay goes to torch's current stream


# -- one GPU, several frameworks --------------------------------------------------------------------------------
def test_jax_cases_run_after_the_others_and_a_torch_case_counts_what_jax_holds():
    """The H200 run: JAX's pool (~80 GiB, never given back) starved a later torch case the estimate
    admitted against the whole device; JAX's cases now come last, and a torch case's estimate subtracts
    what the process holds outside torch's allocator."""
    from qmoe.suite.benchmarks import plugin
    from qmoe.suite.benchmarks.int8_bound import GemmBoundInt8
    from qmoe.suite.benchmarks.peers import JaxRaggedDotPeer, TorchGroupedMMPeer

    entries = [(cls.name, cls) for cls in (JaxRaggedDotPeer, TorchGroupedMMPeer, GemmBound, GemmBoundInt8)]
    first, last = plugin.jax_last(entries + [("unloadable", None)])
    assert [e[0] for e in last] == ["jax.lax.ragged_dot"]
    assert [e[0] for e in first] == ["torch._grouped_mm.eager", "gemm_bound", "gemm_bound_int8", "unloadable"]
    gib = 2 ** 30
    need = memory.Estimate(host_bytes=gib, device_bytes=60 * gib)
    assert memory.fit_refusal(need, 512 * gib, 140 * gib, "cuda") is None
    refusal = memory.fit_refusal(need, 512 * gib, 140 * gib, "cuda", held_elsewhere=80 * gib)
    assert refusal and "less 80 GiB held outside torch's allocator" in refusal
    assert memory.held_by_other_frameworks("jax", "cuda") == 0 and memory.held_by_other_frameworks("torch", "cpu") == 0


@pytest.mark.parametrize("device, preset, expected", [("cuda", None, "false"), ("gpu", None, "false"),
                                                      ("cpu", None, None), ("cuda", "true", "true")])
def test_gpu_runs_turn_jax_preallocation_off_unless_the_user_set_it(monkeypatch, device, preset, expected):
    from qmoe.suite.benchmarks import plugin

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    if preset is not None:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", preset)
    config = type("Config", (), {"getoption": lambda self, name: device})()
    plugin.share_gpu_with_jax(config)
    import os

    assert os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == expected


# -- the CUDA-event clock -----------------------------------------------------------------------------------------
def test_the_cuda_event_clock_keeps_microseconds_late_in_a_session(monkeypatch):
    """elapsed_time is float32 milliseconds: measured from the session's first event it steps by 31.25 us after
    262 s (the H200 run's 'harness overhead' of 31.25 us). Consecutive events keep the device's resolution."""
    torch = pytest.importorskip("torch")
    from qmoe.suite.benchmarks import timing

    device_s = [0.0]

    class Event:  # CUDA's: a device timestamp per record, float32 milliseconds between two
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = device_s[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return float(np.float32((end.t - self.t) * 1e3))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    clock = timing.CudaEventClock()
    device_s[0] = 300.0  # five minutes into the session
    start = clock()
    device_s[0] += 12.3456e-6
    end = clock()
    assert end - start == pytest.approx(12.3456e-6, abs=1e-9)
    device_s[0] += 2.8437e-3
    assert clock() - end == pytest.approx(2.8437e-3, rel=1e-6)


# -- a bound a layer beats is not a bound -------------------------------------------------------------------------
def test_a_bound_times_the_faster_of_its_variants_and_a_row_above_it_is_flagged():
    import time

    from qmoe.suite.benchmarks.peers import faster_variant

    calls = {"eager": 0, "compiled": 0}

    def body(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)
        return run

    chosen, seconds = faster_variant({"eager": body("eager", 0.004), "compiled": body("compiled", 0.0005)},
                                     lambda: None)
    assert chosen == "compiled" and seconds["compiled"] < seconds["eager"]
    assert calls == {"eager": 5, "compiled": 5}  # two warm-up (compiling) calls and three compared, untimed
    assert tables.fmt_share(1.012) == "101.2%" + tables.ABOVE_BOUND and tables.fmt_share(0.991) == "99.1%"


def test_the_float_bound_says_which_variant_it_timed_and_why_not_compiled():
    """On CPU in float32 torch.compile cannot trace torch._grouped_mm: the bound times eager and says why."""
    _torch_or_skip()
    from qmoe.suite.benchmarks.peers import torch_compile_refusal

    shape = shapes.BenchShape("t", tokens=64, hidden=32, ffn=16, experts=4, top_ks=(2,), shared_ffn=0)
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2)
    harness.clear_caches()
    case = harness.BenchCase(GemmBound.name, "none", shape, 2, "fwd_bwd", "balanced", is_peer=True)
    info = harness.run_case(FakeBenchmark(), case, GemmBound, options)
    refusal = torch_compile_refusal("float32", "cpu")
    assert info["bound_variant"] in info["bound_variant_s"]
    if refusal:
        assert info["bound_variant"] == "eager" and info["bound_variant_note"] == refusal
    else:
        assert set(info["bound_variant_s"]) == {"eager", "compiled"}


def test_a_result_whose_check_failed_is_nobodys_bound():
    """pytest-benchmark saves the timings of a test that then failed its output check: such an entry has no
    output_check and must neither be a row nor bound the others (the H200's gemm_bound_int8 forward)."""
    work = {"shape": "s", "top_k": 2, "pass": "forward", "routing": "balanced", "dtype": "bfloat16",
            "device_name": "gpu"}

    def entry(backend, tflops, checked=True, **info):
        extra = {"backend": backend, "tflops": tflops, **work, **info}
        if checked:
            extra["output_check"] = {"min_sqnr_db": 40.0}
        return {"name": backend, "extra_info": extra, "stats": {"median": 1.0, "mean": 1.0}}

    rows = tables.rows_from_json([
        entry("layer", 500.0, scheme="int8_routed_prequant", peak_operand="int8"),
        entry("failed_bound", 600.0, checked=False, bound=True, bound_operand="int8"),
        entry("noop", None, checked=False, harness_only=True)])
    assert [r.get("backend") for r in rows] == ["layer", "noop"]
    assert "x_bound" not in rows[0].derived
