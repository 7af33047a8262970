"""Self-tests of the benchmark machinery (fast; no timing thresholds; torch only for the GEMM bound).

The FLOP formula against the JAX logbook's own numbers, the presets' sources, the byte model, the
output check (a fast wrong answer fails, the right one passes, the dx sub-layer equals the full
layer, the fixed-routing reference of the GEMM bound), the GEMM bound end to end through the harness,
the harness's rounds (inputs rotate, outputs kept) and the do-nothing backend, the deselection rule,
the comparison refusal across devices and shapes (unit and end to end), the terminal table, the CPU
name from pytest-benchmark's machine_info, the thread limit, and the bfloat16 rounding against ml_dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference.schemes import SCHEMES
from qmoe.reference.spec import MoESpec
from qmoe.suite.benchmarks import harness, memory, metrics, outputs, plugin, shapes, tables, timing, workload
from qmoe.suite.benchmarks.peers import GemmBound, NoopBackend, balanced_expert_ids

ROOT = Path(__file__).resolve().parent.parent


# -- FLOPs and bytes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared, seconds, logbook_tflops", [(0, 0.027644, 238.640), (5632, 0.033482, 264.767)],
                         ids=["MOE-I8-007-shared0", "MOE-I8-007-shared5632"])
def test_flops_reproduce_the_logbook(shared, seconds, logbook_tflops):
    """MOE-I8-007 (forward, T 32768, H 2048, F 2048, E 64, k 8): its TF/s are our FLOPs / its time."""
    spec = MoESpec(hidden=2048, ffn=2048, experts=64, top_k=8, shared_ffn=shared)
    ours = metrics.tflops(metrics.flops(spec, 32768, "forward"), seconds)
    assert ours == pytest.approx(logbook_tflops, rel=2e-4)


def test_forward_backward_is_three_forwards_and_router_is_free():
    spec = MoESpec(hidden=64, ffn=32, experts=4, top_k=2, shared_ffn=16)
    fwd = metrics.flops(spec, 10, "forward")
    assert fwd == 6 * 10 * 64 * (2 * 32 + 16)
    assert metrics.flops(spec, 10, "forward_backward") == 3 * fwd
    assert metrics.flops(spec.replace(experts=64), 10, "forward") == fwd  # router and expert count excluded
    with pytest.raises(ValueError, match="unknown pass"):
        metrics.flops(spec, 10, "backward_only")


def test_every_scheme_has_a_weight_storage_rule():
    assert set(metrics.WEIGHT_STORAGE) == set(SCHEMES)


def test_byte_model_orders_the_schemes():
    """Stored int8 moves fewer weight bytes than bf16; quantizing every call moves more (MOE-I8-017)."""
    spec = MoESpec(hidden=2048, ffn=2048, experts=64, top_k=2)

    def weights(scheme):
        return metrics.bytes_moved(spec, 32768, scheme, "bfloat16", "forward").weights

    assert weights("int8_routed_prequant") < weights("none") < weights("int8_routed")
    assert weights("int8_routed_prequant") == pytest.approx(weights("none") / 2, rel=0.01)
    fb = metrics.bytes_moved(spec, 32768, "none", "bfloat16", "forward_backward")
    assert fb.gradients > 0 and fb.total > 2 * metrics.bytes_moved(spec, 32768, "none", "bfloat16", "forward").total


def test_percent_of_peak_uses_the_scheme_operand():
    assert metrics.peak_operand("int8_routed_prequant", "bfloat16") == "int8"
    assert metrics.peak_operand("none", "bfloat16") == "bfloat16"
    assert metrics.percent_of_peak(494.7, "NVIDIA H100 80GB HBM3", "none", "bfloat16") == pytest.approx(50, rel=1e-3)
    assert metrics.percent_of_peak(1.0, "AMD EPYC (2 cores)", "none", "float32") is None


# -- shapes -----------------------------------------------------------------------------------------------------
def test_logbook_preset_is_the_logbook_shape():
    (s0, s1) = shapes.preset("logbook")
    for s in (s0, s1):
        assert (s.tokens, s.hidden, s.ffn, s.experts, s.top_ks) == (32768, 2048, 2048, 64, (1, 2, 4, 6, 8))
    assert (s0.shared_ffn, s1.shared_ffn) == (0, 5632)


@pytest.mark.parametrize("shape", shapes.MODELS, ids=lambda s: s.name)
def test_model_shapes_cite_their_config(shape):
    assert shape.source.startswith("https://huggingface.co/") and "config.json" in shape.source
    for value in (shape.hidden, shape.ffn, shape.experts):
        assert str(value) in shape.source, f"{shape.name}: {value} is not in the cited config excerpt"


@pytest.mark.parametrize("shape", list(shapes.all_shapes().values()), ids=lambda s: s.name)
def test_output_shape_is_unambiguous(shape):
    """The output check finds y / dx as the [T, H] array: no 2-d parameter gradient may share that shape."""
    h, e, s = shape.hidden, shape.experts, shape.shared_ffn
    two_d = {(h, e)} | ({(h, 2 * s), (s, h)} if s else set())
    assert (shape.tokens, h) not in two_d
    assert max(shape.top_ks) <= shape.experts


def test_unknown_preset_lists_the_presets():
    with pytest.raises(shapes.UnknownPresetError, match="cpu-small"):
        shapes.preset("nope")


# -- workload ---------------------------------------------------------------------------------------------------
def test_inputs_are_dtype_exact_and_routing_patterns_differ():
    shape = shapes.CPU_SMALL[0]
    x = workload.make_inputs(shape, "bfloat16", 2)
    assert not np.array_equal(x[0].x, x[1].x)
    assert np.all(x[0].x.view(np.uint32) & 0xFFFF == 0), "bfloat16 values must have empty low mantissa bits"
    spec = shape.spec(1)
    balanced = workload.load_imbalance(workload.expert_loads(spec, workload.make_params(shape, "balanced", "float32"),
                                                            x[0].x))
    skewed = workload.load_imbalance(workload.expert_loads(spec, workload.make_params(shape, "zipf", "float32"),
                                                          x[0].x))
    assert skewed > balanced + 0.5


# -- output check -----------------------------------------------------------------------------------------------
def _layer_case(shared=0):
    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,), shared_ffn=shared)
    spec = shape.spec(2)
    params = workload.make_params(shape, "balanced", "float32")
    inputs = workload.make_inputs(shape, "float32", 2)
    return spec, params, inputs


def test_output_check_passes_the_right_answer_and_fails_fast_wrong_ones():
    spec, params, inputs = _layer_case()
    rows = outputs.check_rows(40, 8)
    good = reference.forward(spec, params, inputs[0].x).y
    assert outputs.check_output((good, "ids"), spec, params, "none", "forward", inputs[0].x, inputs[0].dy, rows,
                                "t").sqnr_db > 100
    stale = reference.forward(spec, params, inputs[1].x).y  # another input's output: a cached result
    for wrong in (np.zeros_like(good), stale, good * 0.5):
        with pytest.raises(outputs.WrongOutputError, match="SQNR"):
            outputs.check_output(wrong, spec, params, "none", "forward", inputs[0].x, inputs[0].dy, rows, "t")
    with pytest.raises(outputs.OutputNotFoundError, match="no y of shape"):
        outputs.check_output({"y": good[:5]}, spec, params, "none", "forward", inputs[0].x, inputs[0].dy, rows, "t")


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax", "mlx"])
def test_checked_rows_are_taken_before_the_copy_and_equal_the_whole_arrays_rows(framework):
    values = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        array = torch.from_numpy(values).to(torch.bfloat16)
    elif framework == "jax":
        jnp = pytest.importorskip("jax.numpy")
        array = jnp.asarray(values, dtype=jnp.bfloat16)
    elif framework == "mlx":
        mx = pytest.importorskip("mlx.core")
        array = mx.array(values).astype(mx.bfloat16)
    else:
        array = values
    rows = np.array([0, 7, 49])
    taken = outputs.take_rows(array, rows)
    assert taken.dtype == np.float64
    np.testing.assert_array_equal(taken, outputs.to_numpy(array)[rows])


def test_find_output_prefers_names_then_shape():
    a, b = np.zeros((4, 3)), np.ones((4, 3))
    assert outputs.find_output({"w": a, "grads": {"x": b}}, (4, 3), ("dx", "x")) is b
    assert outputs.find_output((np.zeros((3, 3)), a, b), (4, 3), ("dx", "x")) is a
    assert outputs.find_output(SimpleNamespace(plan=None, grads={"router": a}), (9, 9), ("x",)) is None


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_backward_sublayer_gives_the_full_layers_dx(router):
    shape = shapes.BenchShape("t", tokens=24, hidden=32, ffn=16, experts=8, top_ks=(2,), router=router)
    spec = shape.spec(2)
    eff = reference.effective_params(spec, workload.make_params(shape, "zipf", "float32"), "int8_routed")
    x, dy = (np.asarray(a, np.float64) for a in (workload.make_inputs(shape, "float32", 1)[0].x,
                                                 workload.make_inputs(shape, "float32", 1)[0].dy))
    rows, experts = outputs.backward_rows(spec, eff, x, np.arange(24), budget_bytes=3 * 8 * 3 * 32 * 16)
    assert 1 <= rows.size < 24 and experts.size <= 3 or rows.size == 1
    sub_spec, sub = outputs.sublayer(spec, eff, experts)
    full = reference.backward(spec, eff, x[rows], dy[rows], "int8_routed", weights_are_effective=True)["x"]
    part = reference.backward(sub_spec, sub, x[rows], dy[rows], "int8_routed", weights_are_effective=True)["x"]
    np.testing.assert_allclose(part, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tokens, top_k, experts", [(256, 2, 8), (40, 3, 6), (7, 4, 4), (10, 1, 16)])
def test_balanced_rows_are_sorted_balanced_and_distinct_per_token(tokens, top_k, experts):
    ids = balanced_expert_ids(tokens, top_k, experts)
    assert ids.shape == (tokens, top_k)
    rows = ids.T.reshape(-1)  # row j T + t is token t's j-th
    assert np.all(np.diff(rows) >= 0), "the k T rows must be sorted by expert"
    counts = np.bincount(rows, minlength=experts)
    assert counts.max() - counts.min() <= 1 and counts.sum() == tokens * top_k
    assert all(len(set(row)) == top_k for row in ids.tolist()), "a token's k experts must differ"


@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
def test_fixed_routing_reference_is_the_sum_of_the_chosen_experts(pass_):
    """y_t = sum_j expert_{e(t, j)}(x_t) + shared(x_t), checked against the bypass outputs; dx against a
    central difference of that forward along a random direction."""
    spec, params, inputs = _layer_case(shared=24)
    x, dy = (np.asarray(a, np.float64) for a in (inputs[0].x, inputs[0].dy))
    ids = balanced_expert_ids(40, spec.top_k, spec.experts)
    rows = outputs.check_rows(40, 8)

    def forward(x_):
        every = reference.expert_outputs(spec, params, x_)  # [E, T, H]
        y = sum(every[ids[:, j], np.arange(x_.shape[0])] for j in range(spec.top_k))
        h = x_ @ params.shared_w13
        return y + (h[:, :24] / (1 + np.exp(-h[:, :24])) * h[:, 24:]) @ params.shared_w2

    got = outputs.fixed_routing_rows(spec, params, "none", pass_, x, dy, rows, ids)
    if pass_ == "forward":
        np.testing.assert_allclose(got, forward(x)[rows], rtol=1e-12, atol=1e-12)
    else:
        v = np.random.default_rng(5).standard_normal(x.shape)
        eps = 1e-6
        numeric = np.sum(((forward(x + eps * v) - forward(x - eps * v)) / (2 * eps) * dy), axis=1)
        np.testing.assert_allclose(np.sum(got * v[rows], axis=1), numeric[rows], rtol=1e-6, atol=1e-8)


def _gemm_bound_or_skip():
    pytest.importorskip("torch")
    reason = GemmBound.unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("pass_id", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shared", [0, 24])
def test_gemm_bound_runs_through_the_harness_with_its_output_checked(pass_id, shared):
    """The GEMM bound's timed output passes the check against the fixed-routing reference, counts the suite's
    FLOPs (shared expert included), is perfectly balanced whatever the case's routing pattern, and is a bound."""
    _gemm_bound_or_skip()
    shape = shapes.BenchShape("t", tokens=48, hidden=32, ffn=16, experts=6, top_ks=(2,), shared_ffn=shared)
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2)
    harness.clear_caches()
    case = harness.BenchCase(GemmBound.name, "none", shape, 2, pass_id, "zipf", is_peer=True)
    info = harness.run_case(FakeBenchmark(), case, GemmBound, options)
    assert info["output_check"]["inputs"] == 2 and info["output_check"]["min_sqnr_db"] > 100
    assert info["bound"] and info["peer"] and info["routing_fixed"] and info["load_imbalance"] == 1.0
    assert info["flops"] == metrics.flops(shape.spec(2), 48, case.pass_name)
    assert {"inputs", "prepare", "rounds", "check"} <= set(info["phase_s"])
    totals = plugin.phase_totals([info, info])
    assert totals["rounds"] == 2 * info["phase_s"]["rounds"] and list(totals.values()) == sorted(totals.values())[::-1]


class _BoundWithoutSharedExpert(GemmBound):
    """Leaves the shared expert out of its output (as a deleted script left it out of its FLOPs): wrong."""

    name = "bound_without_shared"

    def benchmark_step(self, prepared, x, pass_, dy=None):
        step = super().benchmark_step(prepared, x, pass_, dy)

        def wrong():
            return step() - self._shared_only(prepared, x)

        return wrong

    def _shared_only(self, prepared, x):
        import torch

        w = prepared.arrays
        with torch.no_grad():
            h = self._put(prepared, x) @ w["shared_w13"]
            s = prepared.spec.shared_ffn
            return (torch.nn.functional.silu(h[:, :s]) * h[:, s:]) @ w["shared_w2"]


def test_gemm_bound_output_check_catches_a_dropped_shared_expert():
    _gemm_bound_or_skip()
    shape = shapes.BenchShape("t", tokens=48, hidden=32, ffn=16, experts=6, top_ks=(2,), shared_ffn=96)
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=1, warmup=1, inputs=1)
    harness.clear_caches()
    right = harness.BenchCase(GemmBound.name, "none", shape, 2, "fwd", "balanced", is_peer=True)
    harness.run_case(FakeBenchmark(), right, GemmBound, options)  # the reference output is now cached
    case = dataclasses.replace(right, backend=_BoundWithoutSharedExpert.name)
    with pytest.raises(outputs.WrongOutputError, match="SQNR"):
        harness.run_case(FakeBenchmark(), case, _BoundWithoutSharedExpert, options)


def test_the_reference_output_is_computed_once_for_all_backends_that_did_the_same_work():
    shape = shapes.BenchShape("t", tokens=48, hidden=32, ffn=16, experts=6, top_ks=(2,))
    rows, made = np.arange(3), []
    harness.clear_caches()

    def expected(tag: str):
        return lambda: made.append(tag) or outputs.Expected(rows, np.full((3, 32), float(len(made))))

    first = harness.BenchCase("a", "none", shape, 2, "fwd", "balanced")
    cached = harness.reference_expected(first, "float32", rows, 0, None, expected("first"))
    again = dataclasses.replace(first, backend="b")
    assert harness.reference_expected(again, "float32", rows, 0, None, expected("again")) is cached
    fixed = np.zeros((48, 2), dtype=np.int64)
    different = [(dataclasses.replace(first, scheme="int8_routed"), 0, None),
                 (dataclasses.replace(first, top_k=1), 0, None),
                 (dataclasses.replace(first, pass_id="fwd_bwd"), 0, None),
                 (dataclasses.replace(first, routing="zipf"), 0, None), (first, 1, None), (first, 0, fixed),
                 (first, 0, fixed + 1)]
    for i, (case, input_index, ids) in enumerate(different):
        harness.reference_expected(case, "float32", rows, input_index, ids, expected(str(i)))
    assert made == ["first"] + [str(i) for i in range(len(different))]


def test_sublayer_is_refused_where_gates_see_all_experts():
    assert not outputs.sublayer_valid(MoESpec(hidden=8, ffn=8, experts=4, top_k=2, renormalize=False))
    assert outputs.sublayer_valid(MoESpec(hidden=8, ffn=8, experts=4, top_k=2, router="sigmoid_topk",
                                          renormalize=False))


# -- harness rounds and the overhead backend ---------------------------------------------------------------------
class FakeBenchmark:
    """pytest-benchmark's pedantic contract, timed with perf_counter (no plugin needed)."""

    def __init__(self, timer=None):
        import time

        self.extra_info, self._time, self.durations = {}, timer or time.perf_counter, []

    def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
        assert iterations == 1
        for _ in range(warmup_rounds):  # timed but not recorded, as pytest-benchmark's warm-up rounds are
            args, kwargs = setup()
            self._time()
            target(*args, **kwargs)
            self._time()
        for _ in range(rounds):
            args, kwargs = setup()
            start = self._time()
            target(*args, **kwargs)
            self.durations.append(self._time() - start)
        d = sorted(self.durations)
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=d[len(d) // 2], mean=sum(d) / len(d), min=d[0]))


def test_rounds_rotate_inputs_and_keep_each_output():
    seen = []
    steps = [lambda i=i: seen.append(i) or f"out{i}" for i in range(3)]
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=4, warmup=1, inputs=3, warmup_s=0,
                                   min_time_s=0)
    timed = harness.time_rounds(FakeBenchmark(), steps, options)
    assert seen == [0, 1, 2, 0, 1, 2, 0]  # 3 warm-up (one per input), then 4 timed: never the same twice running
    assert timed.results == ["out0", "out1", "out2"] and timed.timer == "perf_counter"


class _Output:
    """A step's output that can be watched (weakref) for when the harness lets go of it."""


def test_a_call_runs_without_the_previous_output_of_its_input_alive():
    """The previous output of an input is dropped before its next call, not replaced after it: a kept output
    adds a whole output (a forward+backward's weight gradients) to the call's live memory. Failed before the
    fix: every call after the first found its predecessor alive."""
    last: list = [None, None]
    alive_at_call: list[bool] = []

    def step(i: int):
        def call():
            alive_at_call.append(last[i] is not None and last[i]() is not None)
            out = _Output()
            last[i] = weakref.ref(out)
            return out

        return call

    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=6, warmup=2, inputs=2, warmup_s=0,
                                   min_time_s=0)
    timed = harness.time_rounds(FakeBenchmark(), [step(0), step(1)], options)
    assert len(alive_at_call) == 8 and not any(alive_at_call)
    assert all(isinstance(out, _Output) for out in timed.results)  # each input's last output stays for the check


def test_short_calls_get_rounds_adding_up_to_the_minimum_time():
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=5, min_time_s=0.1)
    assert harness.rounds_for(options, 0.003) == 34  # a 3 ms call: 34 rounds make 0.1 s
    assert harness.rounds_for(options, 0.035) == 5  # a long call keeps --bench-rounds
    assert harness.rounds_for(options, 1e-7) == harness.MAX_ROUNDS  # a do-nothing call is capped
    assert harness.rounds_for(options, None) == 5  # no estimate (the warm-up was off)
    assert harness.rounds_for(dataclasses.replace(options, min_time_s=0), 0.003) == 5


def test_a_compiling_first_call_does_not_use_up_the_warm_up():
    """The warm-up's clock starts after one call per input: a first call that compiles (seconds, on the GPU)
    is followed by warm calls, whose fastest sizes the rounds, instead of ending the warm-up by itself."""
    import time

    calls: list[None] = []

    def step():
        calls.append(None)
        time.sleep(0.15 if len(calls) == 1 else 0.001)

    count, fastest = harness.warm_up([step], lambda: None, seconds=0.02)
    assert count >= 5 and fastest is not None and fastest < 0.01


def test_the_timed_warm_up_keeps_a_warming_step_out_of_the_rounds():
    """A step that is slow for its first calls (clocks ramping, allocator growing, lazy autotuning: 2-4 ms
    cases on the H200 were still getting faster over 5 rounds after one warm-up round) is timed once warm:
    the untimed calls of ``warmup_s`` come first. Without them, the same rounds' median is the cold time."""
    import time

    def warming_step():
        calls = []

        def step():
            calls.append(None)
            time.sleep(0.006 if len(calls) <= 12 else 0.001)
            return "out"

        return step

    cold = harness.BenchOptions(device="cpu", dtype="float32", rounds=5, warmup=1, inputs=1, warmup_s=0,
                                min_time_s=0)
    bench = FakeBenchmark()
    harness.time_rounds(bench, [warming_step()], cold)
    assert bench.stats.stats.median > 0.005
    warm = dataclasses.replace(cold, warmup_s=0.1, min_time_s=0.02)
    bench = FakeBenchmark()
    timed = harness.time_rounds(bench, [warming_step()], warm)
    assert bench.stats.stats.median < 0.003 and timed.warmup_calls >= 12
    assert timed.rounds == len(bench.durations) and timed.rounds >= 10  # 1 ms calls: rounds to add up to 0.02 s


class _ReferenceStep(NoopBackend):
    """A tiny NumPy backend for the harness: its timed step computes the reference forward (or dx)."""

    name = "reference_step"
    harness_only = False

    def prepare(self, spec, params, scheme, dtype, ep_size=1):
        return spec, params

    def effective_weights(self, prepared):
        return prepared[1].as_dict()

    def benchmark_step(self, prepared, x, pass_, dy=None):
        spec, params = prepared
        if pass_ == "forward":
            return lambda: reference.forward(spec, params, x).y
        return lambda: reference.backward(spec, params, x, dy)  # a dict holding dx under "x"


class _ForgetsItsOutput(_ReferenceStep):
    """The same work, but the timed step returns None: nothing the output check could compare."""

    name = "forgets_its_output"

    def benchmark_step(self, prepared, x, pass_, dy=None):
        compute = super().benchmark_step(prepared, x, pass_, dy)

        def step():
            compute()  # the work is done, its result dropped

        return step


@pytest.mark.parametrize("pass_id", ["fwd", "fwd_bwd"])
def test_a_step_whose_output_cannot_be_checked_fails_the_benchmark(pass_id):
    """The timed output is checked against the reference; a step returning None (or nothing with the
    output's shape) fails the benchmark, saying so, instead of recording an unchecked timing."""
    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,))
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2)
    harness.clear_caches()
    good = harness.BenchCase(_ReferenceStep.name, "none", shape, 2, pass_id, "balanced")
    info = harness.run_case(FakeBenchmark(), good, _ReferenceStep, options)
    assert info["output_check"]["inputs"] == 2 and info["output_check"]["min_sqnr_db"] > 100
    bad = harness.BenchCase(_ForgetsItsOutput.name, "none", shape, 2, pass_id, "balanced")
    target = "y" if pass_id == "fwd" else "dx"
    with pytest.raises(outputs.OutputNotFoundError, match=f"returned None, so the timed output cannot be checked"
                                                          f".*return {target}"):
        harness.run_case(FakeBenchmark(), bad, _ForgetsItsOutput, options)


class _WatchedOutputs(_ReferenceStep):
    """The reference forward, each output watched by a weakref."""

    name = "watched_outputs"
    outputs: list = []

    def benchmark_step(self, prepared, x, pass_, dy=None):
        compute = super().benchmark_step(prepared, x, pass_, dy)

        def step():
            out = compute()
            type(self).outputs.append(weakref.ref(out))
            return out

        return step


def test_the_peak_is_measured_with_the_timed_outputs_released(monkeypatch):
    """torch's peak counts from what is allocated when it is reset: a kept timed output (at forward+backward,
    the weight gradients) would be counted beside the measured call's own. Failed before the fix (the peak
    was measured while the outputs waited for their check)."""
    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,))
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2, warmup_s=0)
    harness.clear_caches()
    _WatchedOutputs.outputs = []
    held_at_peak: list[int] = []

    def peak(framework, device, step, exclude_bytes=0):
        held_at_peak.append(sum(ref() is not None for ref in _WatchedOutputs.outputs))
        return memory.Peak(None, "test")

    monkeypatch.setattr(memory, "measure_peak", peak)
    case = harness.BenchCase(_WatchedOutputs.name, "none", shape, 2, "fwd", "balanced")
    info = harness.run_case(FakeBenchmark(), case, _WatchedOutputs, options)
    assert info["output_check"]["inputs"] == 2  # both outputs were checked first
    assert held_at_peak == [0]


class _FailsInItsStep(_ReferenceStep):
    """Prepares a watched object, then fails in its timed step, as an out-of-memory call does."""

    name = "fails_in_its_step"
    prepared: list = []

    def prepare(self, spec, params, scheme, dtype, ep_size=1):
        made = _Output()
        type(self).prepared.append(weakref.ref(made))
        return made

    def benchmark_step(self, prepared, x, pass_, dy=None):
        def step():
            raise RuntimeError("out of memory (planted)")

        return step


def test_a_failed_case_lets_go_of_its_prepared_arrays():
    """pytest keeps a failure's traceback until the next failure; its frames must not keep the case's device
    arrays, which the next case would find still allocated (2026-12-01, deepseek-v3 on the H200: one
    out-of-memory failure, then four more). Failed before the fix."""
    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,))
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=1, warmup=1, inputs=1, warmup_s=0)
    harness.clear_caches()
    _FailsInItsStep.prepared = []
    case = harness.BenchCase(_FailsInItsStep.name, "none", shape, 2, "fwd", "balanced")
    with pytest.raises(RuntimeError, match="planted") as failure:
        harness.run_case(FakeBenchmark(), case, _FailsInItsStep, options)
    assert failure.traceback  # the traceback itself is kept, for the report
    assert len(_FailsInItsStep.prepared) == 1 and _FailsInItsStep.prepared[0]() is None


def test_an_input_whose_step_never_ran_is_told_apart_from_a_none_output():
    """``--benchmark-disable`` runs one round: the other inputs' steps never ran (not the same as None)."""
    steps = [lambda: "out0", lambda: "out1"]
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=1, warmup=0, inputs=2)

    class OneCall(FakeBenchmark):
        def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
            args, kwargs = setup()
            target(*args, **kwargs)

    assert harness.time_rounds(OneCall(), steps, options).results == ["out0", harness.NOT_RUN]


def test_device_names_follow_each_backends_spelling():
    from qmoe.implementations.torch_eager import TorchEagerBackend
    from qmoe.suite.benchmarks.peers import JaxRaggedDotPeer

    assert TorchEagerBackend.declared_device("gpu") == "cuda"
    assert JaxRaggedDotPeer.declared_device("cuda") == "gpu"
    assert JaxRaggedDotPeer.declared_device("cpu") == "cpu" and NoopBackend.declared_device(None) is None


def test_noop_backend_measures_the_harness_and_the_ratio_is_computed():
    bench = FakeBenchmark()
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=3)
    info = harness.run_overhead(bench, options, shapes.CPU_SMALL[0])
    assert info["harness_only"] and info["backend"] == NoopBackend.name and info["seconds_median"] >= 0
    assert NoopBackend("cpu").benchmark_step(None, np.zeros((2, 2)), "forward")() is None
    rows = tables.derive([tables.ResultRow("noop", {"harness_only": True}, 2e-7, 2e-7),
                          tables.ResultRow("a", {"tflops": 1.0}, 4e-4, 4e-4),
                          tables.ResultRow("b", {"tflops": 1.0}, 2e-3, 2e-3)])
    ((ratio, noop, fastest),) = tables.overhead_ratios(rows)
    assert ratio == pytest.approx(5e-4) and fastest.name == "a"  # recorded, never asserted against a threshold


def test_each_timing_mode_gets_its_own_overhead_against_its_own_fastest_case():
    stream, sync = {"timing": "stream_ordered"}, {"timing": "synchronized"}
    rows = tables.derive([tables.ResultRow("noop", {"harness_only": True, **sync}, 20e-6, 20e-6),
                          tables.ResultRow("noop.stream", {"harness_only": True, **stream}, 2e-6, 2e-6),
                          tables.ResultRow("torch", {"tflops": 1.0, **stream}, 1e-3, 1e-3),
                          tables.ResultRow("jax", {"tflops": 1.0, **sync}, 4e-3, 4e-3)])
    found = {noop.name: (ratio, fastest.name) for ratio, noop, fastest in tables.overhead_ratios(rows)}
    assert found == {"noop": (pytest.approx(5e-3), "jax"), "noop.stream": (pytest.approx(2e-3), "torch")}
    (stream_ratio,) = [r for r in tables.overhead_ratios(rows) if r[1].name == "noop.stream"]
    line = tables.overhead_line(*stream_ratio, "torch")
    assert "(stream_ordered timing)" in line and "0.200% of the fastest such case" in line


def test_amortized_rounds_charge_the_harness_once_per_round_to_the_row_it_weighs_on_most():
    """Synchronized rows with several calls per round: the do-nothing round (0.35 us x 100 calls = 35 us)
    is paid once per round, so a 2.8 ms case with 8 calls per round bears 35 / (8 x 2800) = 0.156%, and a
    30 ms case with one call 0.117%: the line names the former, not the faster-per-call one."""
    sync = {"timing": "synchronized"}
    rows = tables.derive([
        tables.ResultRow("noop", {"harness_only": True, "calls_per_round": 100, **sync}, 0.35e-6, 0.35e-6),
        tables.ResultRow("jax_fast", {"tflops": 1.0, "calls_per_round": 8, **sync}, 2.8e-3, 2.8e-3),
        tables.ResultRow("jax_slow", {"tflops": 1.0, "calls_per_round": 1, **sync}, 30e-3, 30e-3)])
    ((ratio, noop, worst),) = tables.overhead_ratios(rows)
    assert worst.name == "jax_fast" and ratio == pytest.approx(35e-6 / (8 * 2.8e-3))
    line = tables.overhead_line(ratio, noop, worst, "jax_fast")
    assert "35.00 us (100 calls)" in line and "0.156%" in line and "8 calls per round" in line


class _FakeEvent:
    """A CUDA event on a fake device timeline (milliseconds, advanced by the test)."""

    now = 0.0

    def __init__(self, log):
        self.log, self.at = log, None

    def record(self):
        self.at = _FakeEvent.now
        self.log.append("record")

    def synchronize(self):
        self.log.append("wait")

    def elapsed_time(self, end):
        return end.at - self.at


def test_the_cuda_clock_times_a_round_between_its_armed_start_and_end_with_or_without_waiting():
    log: list[str] = []
    clock = timing.CudaEventClock(event=lambda: _FakeEvent(log))
    log.clear()
    expected_waits = ((True, ["record", "wait", "record", "wait"]), (False, ["record", "record", "wait"]))
    for synchronize_start, waits in expected_waits:
        _FakeEvent.now += 7.0  # untimed setup (the flush) on the device
        clock.arm(synchronize_start)
        start = clock()
        _FakeEvent.now += 2.5  # the step's device time
        assert clock() - start == pytest.approx(2.5e-3) and log == waits
        log.clear()
    before = clock()  # an unarmed reading (calibration) counts from the previous event
    _FakeEvent.now += 1.0
    assert clock() - before == pytest.approx(1e-3)


def _check_stream_order(body_us: list[float], step_us: list[float]) -> None:
    """`harness.check_stream_order` on a fake device clock: each call of the body (stream-ordered) or the step
    (synchronized) advances it by the next of its durations, in microseconds."""
    queue = {"body": [t / 1e6 for t in body_us], "step": [t / 1e6 for t in step_us]}
    device = {"now": 0.0}

    class Clock:
        def arm(self, synchronize_start=True):
            pass

        def __call__(self):
            return device["now"]

    def call(name):
        return lambda: device.__setitem__("now", device["now"] + queue[name].pop(0))

    harness.check_stream_order(call("step"), call("body"), Clock(), lambda: None, samples=len(body_us))


@pytest.mark.parametrize("ordered_us, synchronized_us, refused", [
    (1000.0, 1022.0, False), (2.0, 22.0, False),  # a real step, the do-nothing one: the host round trip alone
    (3.0, 1020.0, True), (400.0, 1020.0, True)])   # work on another stream: (most of) it missed
def test_a_step_whose_work_is_not_on_torchs_stream_is_refused_stream_ordered_timing(ordered_us, synchronized_us,
                                                                                 refused):
    samples = harness.STREAM_ORDER_SAMPLES
    if refused:
        with pytest.raises(harness.StreamOrderError, match="not ordered on that stream"):
            _check_stream_order([ordered_us] * samples, [synchronized_us] * samples)
    else:
        _check_stream_order([ordered_us] * samples, [synchronized_us] * samples)


def test_one_stalled_synchronized_call_does_not_refuse_a_step_on_torchs_stream():
    """H200, 2026-12-01: one synchronized call of 15.4 ms against 7.0 ms stream-ordered refused a correct
    step. The check keeps the fastest of its samples; a body whose work is elsewhere stays refused."""
    _check_stream_order([7001.1, 7002.0, 7000.5], [15424.7, 7025.0, 7030.0])  # the stall of one call: accepted
    with pytest.raises(harness.StreamOrderError, match="fastest of 3 calls"):
        _check_stream_order([3.0, 3.1, 2.9], [15424.7, 7025.0, 7030.0])  # the work was never on the stream


def test_steps_on_torchs_stream_are_timed_stream_ordered_and_the_rest_synchronized(monkeypatch):
    from qmoe.implementations.base import synchronized_step

    armed: list[bool] = []
    clock = SimpleNamespace(arm=lambda synchronize_start=True, calls=1: armed.append(synchronize_start))
    monkeypatch.setattr(timing, "clock_for", lambda device: (time.perf_counter, "cuda_events"))
    monkeypatch.setattr(timing, "cuda_clock", lambda: clock)
    monkeypatch.setattr(harness, "check_stream_order", lambda *args: None)  # its own test: the one above
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=1, warmup_s=0,
                                   min_time_s=0)  # the rounds alone: the timed warm-up has its own test
    calls: list[str] = []
    on_stream = synchronized_step(lambda: calls.append("body") or "y", lambda: calls.append("sync"), torch_stream=True)
    elsewhere = synchronized_step(lambda: calls.append("body") or "y", lambda: calls.append("sync"))
    timed = harness.time_rounds(FakeBenchmark(), [on_stream], options)
    assert timed.timing == "stream_ordered" and calls == ["body"] * 3 and armed == [False] * 3
    calls.clear(), armed.clear()
    timed = harness.time_rounds(FakeBenchmark(), [elsewhere], options)
    assert timed.timing == "synchronized" and calls == ["body", "sync"] * 3 and armed == [True] * 3
    assert timed.results == ["y"]


class _FakeJaxStep:
    """A step in the shape of `implementations.base.async_step` on the fake device timeline (`_FakeEvent.now`,
    ms): each call adds ``call_ms`` of device time (the first ``first_ms``: it compiled) and returns which call
    it was; the wait adds the host's round trip ``wait_ms``."""

    def __init__(self, name: str, call_ms: float, wait_ms: float, first_ms: float | None = None):
        self.name, self.call_ms, self.wait_ms, self.first_ms = name, call_ms, wait_ms, first_ms
        self.calls: list[str] = []
        self.waited: list[str] = []

    def async_body(self) -> str:
        _FakeEvent.now += self.first_ms if not self.calls and self.first_ms else self.call_ms
        self.calls.append(f"{self.name}-call{len(self.calls)}")
        return self.calls[-1]

    def wait(self, output: str) -> None:
        _FakeEvent.now += self.wait_ms
        self.waited.append(output)

    def __call__(self) -> str:
        out = self.async_body()
        self.wait(out)
        return out


def _time_on_fake_device(monkeypatch, steps, rounds: int = 4, may_repeat: bool = True,
                         round_s: float = timing.TARGET_ROUND_S):
    """`harness.time_rounds` over ``steps`` with a `timing.CudaEventClock` on the fake timeline as the timer."""
    clock = timing.CudaEventClock(event=lambda: _FakeEvent([]))
    monkeypatch.setattr(timing, "clock_for", lambda device: (clock, "cuda_events"))
    monkeypatch.setattr(timing, "cuda_clock", lambda: clock)
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=rounds, warmup=1, inputs=len(steps),
                                   warmup_s=0, min_time_s=0,  # host-clock warm-up and rounds: their own tests
                                   round_s=round_s)
    bench = FakeBenchmark(timer=clock)
    return harness.time_rounds(bench, steps, options, may_repeat), bench


def test_a_short_asynchronous_step_runs_several_calls_per_round_and_its_times_stay_per_call(monkeypatch):
    """3 ms calls (the very first 50 ms: it compiled) and no round trip: n is chosen from the fastest warm-up
    call so that a round lasts the target, every timed round reads 3 ms per call, and each input's output is
    the last call's, the one its wait waited for."""
    steps = [_FakeJaxStep("x0", call_ms=3.0, wait_ms=0.0, first_ms=50.0), _FakeJaxStep("x1", call_ms=3.0, wait_ms=0.0)]
    timed, bench = _time_on_fake_device(monkeypatch, steps)
    n = timing.calls_per_round(3e-3)
    assert timed.timing == "synchronized" and timed.calls_per_round == n == 7  # ceil(20 ms / 3 ms)
    assert bench.durations == [pytest.approx(3e-3)] * 4
    assert [len(step.calls) for step in steps] == [1 + 2 * n] * 2  # one warm-up call, then two rounds of n
    assert timed.results == [step.calls[-1] for step in steps] == [step.waited[-1] for step in steps]
    assert all(len(step.waited) == 3 for step in steps)  # one wait per round, not per call


def test_a_longer_round_target_gives_a_long_step_several_calls_per_round(monkeypatch):
    """``--bench-round-s``: a 30 ms call keeps one call per round at the 20 ms default and gets ceil(150 / 30) = 5 at
    a 150 ms target, its time still per call and its round trip (1 ms here) spread over the 5."""
    default, _ = _time_on_fake_device(monkeypatch, [_FakeJaxStep("x", call_ms=30.0, wait_ms=1.0)])
    longer, bench = _time_on_fake_device(monkeypatch, [_FakeJaxStep("x", call_ms=30.0, wait_ms=1.0)], round_s=0.15)
    assert default.calls_per_round == 1 and longer.calls_per_round == 5
    assert bench.durations == [pytest.approx(30.2e-3)] * 4


def test_the_round_trip_is_spread_over_the_calls_of_a_round(monkeypatch):
    """A do-nothing asynchronous step whose wait costs 35 us: timed with n calls per round it reads 35/n us
    per call; the same step without ``async_body`` runs one call per round and reads the whole 35 us."""
    amortized, bench_amortized = _time_on_fake_device(monkeypatch, [_FakeJaxStep("noop", call_ms=0.0, wait_ms=0.035)])
    one_by_one = _FakeJaxStep("noop", call_ms=0.0, wait_ms=0.035)
    single, bench_single = _time_on_fake_device(monkeypatch, [lambda: one_by_one()])
    n = amortized.calls_per_round
    assert n == timing.MAX_CALLS_PER_ROUND and single.calls_per_round == 1 and single.timing == "synchronized"
    assert bench_single.durations == [pytest.approx(35e-6)] * 4
    assert bench_amortized.durations == [pytest.approx(35e-6 / n)] * 4
    # a row with 8 calls per round of 2.8 ms pays the do-nothing row's whole round once per 8 of its calls
    per_call = bench_amortized.durations[0]
    assert timing.overhead_share(per_call, n, 2.8e-3, 8) == pytest.approx(35e-6 / 8 / 2.8e-3)
    assert timing.overhead_share(35e-6, 1, 2.8e-3, 1) == pytest.approx(35e-6 / 2.8e-3)  # older rows: one call


def test_a_step_without_async_body_or_too_small_to_evict_l2_keeps_one_call_per_round(monkeypatch):
    """A synchronizing step that cannot enqueue without waiting, and an asynchronous one whose call moves
    fewer bytes than the L2 flush (``may_repeat=False``: a repeat would find a warm cache), run one call per
    round: the round trip stays in their times."""
    plain = _FakeJaxStep("plain", call_ms=1.0, wait_ms=0.035)
    timed, bench = _time_on_fake_device(monkeypatch, [lambda: plain()])
    assert timed.calls_per_round == 1 and bench.durations == [pytest.approx(1.035e-3)] * 4
    assert timed.results == [plain.calls[-1]]
    small = _FakeJaxStep("small", call_ms=1.0, wait_ms=0.035)
    timed, bench = _time_on_fake_device(monkeypatch, [small], may_repeat=False)
    assert timed.calls_per_round == 1 and len(small.calls) == len(small.waited) == 5


def test_calls_per_round_fill_the_target_within_their_bounds():
    assert timing.calls_per_round(2.797e-3) == 8  # the H200's fastest synchronized case: 22 ms rounds
    assert timing.calls_per_round(timing.TARGET_ROUND_S) == 1
    assert timing.calls_per_round(30e-3, target_s=0.15) == 5
    assert timing.calls_per_round(1.0) == 1  # a long step keeps one call
    assert timing.calls_per_round(1e-7) == timing.calls_per_round(0.0) == timing.MAX_CALLS_PER_ROUND


def test_the_cuda_clock_reports_a_round_of_n_calls_per_call():
    clock = timing.CudaEventClock(event=lambda: _FakeEvent([]))
    clock.arm(True, calls=4)
    start = clock()
    _FakeEvent.now += 10.0
    assert clock() - start == pytest.approx(2.5e-3) and clock.last_call_s == pytest.approx(2.5e-3)
    clock.arm(True)
    start = clock()
    _FakeEvent.now += 10.0
    assert clock() - start == pytest.approx(10e-3)  # the next round is one call again unless armed otherwise


def test_the_synchronized_noop_and_jax_steps_offer_their_asynchronous_body(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    from qmoe.suite.benchmarks.peers import JaxRaggedDotPeer, NoopStreamBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    x = np.zeros((4, 8))
    synchronized = NoopBackend("cuda").benchmark_step(None, x, "forward")
    stream = NoopStreamBackend("cuda").benchmark_step(None, x, "forward")
    assert synchronized.async_body() is None and not hasattr(synchronized, "stream_body")
    assert hasattr(stream, "stream_body") and not hasattr(stream, "async_body")
    shape = shapes.BenchShape("t", tokens=4, hidden=8, ffn=8, experts=4, top_ks=(2,))
    peer = JaxRaggedDotPeer("cpu")
    prepared = peer.prepare(shape.spec(2), workload.make_params(shape, "balanced", "float32"), "none", "float32")
    step = peer.benchmark_step(prepared, np.ones((4, 8)), "forward")
    y = step.async_body()
    step.wait(y)
    assert np.asarray(y[0]).shape == (4, 8) and np.allclose(np.asarray(step()[0]), np.asarray(y[0]))


@pytest.mark.parametrize("peer_name", ["jax.lax.ragged_dot", "mx.gather_mm", "jax_prequant"])
def test_a_forward_backward_step_computes_the_layers_output(peer_name):
    """A training step's loss reads y, so its forward+backward computes the combine no gradient needs; a JAX or MLX
    step that only returns gradients lets XLA (dead code) or MLX (lazy graph) skip it and times less work than a
    torch layer's step (`Backend.benchmark_step`). The step's output must hold the forward's y."""
    if peer_name == "mx.gather_mm":
        pytest.importorskip("mlx.core", reason="the MLX peer needs mlx")
        from qmoe.suite.benchmarks.peers import MlxGatherMMPeer as Peer
    elif peer_name == "jax.lax.ragged_dot":
        pytest.importorskip("jax", reason="the JAX peer needs jax")
        from qmoe.suite.benchmarks.peers import JaxRaggedDotPeer as Peer
    else:
        pytest.importorskip("jax", reason="jax_prequant needs jax")
        from qmoe.implementations.jax_prequant import JaxPrequantBackend as Peer
    shape = shapes.BenchShape("t", tokens=6, hidden=8, ffn=8, experts=4, top_ks=(2,))
    backend = Peer("cpu")
    prepared = backend.prepare(shape.spec(2), workload.make_params(shape, "balanced", "float32"), "none", "float32")
    inputs = workload.make_inputs(shape, "float32", 1)[0]
    y = np.asarray(backend.forward(prepared, inputs.x).y)
    leaves = [outputs.to_numpy(leaf) for _, leaf in
              outputs.array_leaves(backend.benchmark_step(prepared, inputs.x, "backward", inputs.dy)())]
    assert any(leaf.shape == y.shape and np.allclose(leaf, y, rtol=1e-5, atol=1e-6) for leaf in leaves), \
        f"{peer_name}: no output of its forward+backward step equals its forward's y"


# -- deselection and comparison ----------------------------------------------------------------------------------
@pytest.mark.parametrize("markexpr, only, wanted", [("benchmark", False, True), ("benchmark and not slow", False, True),
                                                    ("conformance", False, False), ("not benchmark", False, False),
                                                    ("", False, False), ("", True, True)])
def test_benchmarks_run_only_when_asked(markexpr, only, wanted):
    options = {"markexpr": markexpr, "benchmark_only": only}
    config = SimpleNamespace(getoption=lambda name, default=None: options.get(name, default))
    assert plugin.benchmarks_requested(config) is wanted


def test_compare_refuses_another_device_and_mismatched_shapes():
    from qmoe.suite import plugin as suite_plugin

    config = SimpleNamespace(stash={plugin._REFUSALS: [], suite_plugin._SELECTION: suite_plugin.Selection()})
    session = SimpleNamespace(logger=SimpleNamespace(warning=lambda message: None))
    saved = {"machine_info": {"qmoe": {"device": "NVIDIA H100 80GB HBM3"}}, "benchmarks": [{"fullname": "t"}]}
    plugin.pytest_benchmark_compare_machine_info(config, session, {"qmoe": {"device": "AMD EPYC (2 cores)"}}, saved)
    assert saved["benchmarks"] == [] and "another device" in config.stash[plugin._REFUSALS][0]
    same = {"machine_info": {"qmoe": {"device": "X"}}, "benchmarks": [{"fullname": "t"}]}
    plugin.pytest_benchmark_compare_machine_info(config, session, {"qmoe": {"device": "X"}}, same)
    assert same["benchmarks"] == [{"fullname": "t"}]

    mapping = {"0001_run.json": {"t": {"extra_info": {"shape": "cpu-small", "tokens": 256}},
                                 "u": {"extra_info": {"shape": "cpu-small", "tokens": 256}}}}
    current = [SimpleNamespace(fullname="t", extra_info={"shape": "cpu-small", "tokens": 512}),
               SimpleNamespace(fullname="u", extra_info={"shape": "cpu-small", "tokens": 256})]
    messages = plugin.refuse_mismatched(mapping, current)
    assert list(mapping["0001_run.json"]) == ["u"] and "tokens 256 -> 512" in messages[0]


_E2E_TEST = textwrap.dedent('''
    import time
    import pytest

    @pytest.mark.benchmark
    def test_sleep(benchmark):
        benchmark.extra_info.update(backend="b", shape="s", tokens=1)
        benchmark.pedantic(time.sleep, args=(0.002,), rounds=3, iterations=1)
''')


def _saved_run(tmp: Path, device: str, mean: float) -> None:
    folder = tmp / ".benchmarks" / "saved"
    folder.mkdir(parents=True)
    stats = {k: mean for k in ("min", "max", "mean", "median")}
    stats.update(stddev=0.0, rounds=3, iqr=0.0, q1=mean, q3=mean, iqr_outliers=0, stddev_outliers=0, outliers="0;0",
                 ld15iqr=mean, hd15iqr=mean, ops=1 / mean, total=3 * mean, iterations=1)
    doc = {"machine_info": {"qmoe": {"device": device}}, "commit_info": {}, "datetime": "2026-01-01T00:00:00",
           "version": "5.3.1",
           "benchmarks": [{"group": None, "name": "test_sleep", "fullname": "test_e2e.py::test_sleep", "params": None,
                           "param": None, "extra_info": {"backend": "b", "shape": "s", "tokens": 1}, "options": {},
                           "stats": stats}]}
    (folder / "0001_saved.json").write_text(json.dumps(doc))


def _run_e2e(tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "test_e2e.py").write_text(_E2E_TEST)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-m", "benchmark", "test_e2e.py", f"--benchmark-storage=file://{tmp / '.benchmarks'}",
                           "--benchmark-compare=saved/0001", "--benchmark-compare-fail=mean:10%", "-q",
                           "--device", "cpu"],  # a qmoe option: this run is a qmoe run (the plugin is inert otherwise)
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=120)


def test_compare_fail_catches_a_regression_on_the_same_device(tmp_path):
    from qmoe.suite.benchmarks.timing import device_name

    _saved_run(tmp_path, device_name(None), mean=1e-5)  # "saved" 1e-5 s; a 2 ms sleep is a regression
    result = _run_e2e(tmp_path)
    assert result.returncode != 0 and "Performance has regressed" in result.stdout + result.stderr


def test_compare_refuses_a_run_from_another_device(tmp_path):
    _saved_run(tmp_path, "Some Other Accelerator", mean=1e-5)
    result = _run_e2e(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "not comparing with a saved run from another device" in output and "Some Other Accelerator" in output


# -- the terminal table, the CPU name, the thread limit -----------------------------------------------------------
def _result(backend, tflops, **info):
    info = {"backend": backend, "tflops": tflops, "shape": "s", "top_k": 2, "pass": "forward", **info}
    stats = SimpleNamespace(median=1e-3 / tflops, mean=1e-3 / tflops)
    return SimpleNamespace(name=f"test_throughput[{backend}-none]", fullname=f"t::{backend}", extra_info=info,
                           stats=stats)


def test_the_bound_is_nobodys_peer_and_every_row_gets_its_ratio_to_it():
    results = [_result("torch_eager", 1.0, framework="torch", scheme="none", peak_memory_bytes=3 << 30),
               _result("gemm_bound", 4.0, framework="torch", peer=True, bound=True),
               _result("torch._grouped_mm.eager", 2.0, framework="torch", peer=True, scheme="none")]
    rows = {r.get("backend"): r for r in tables.rows_from_session(results)}
    assert rows["torch_eager"].derived["peer"] == "torch._grouped_mm.eager"
    assert rows["torch_eager"].derived["x_peer"] == pytest.approx(0.5)
    assert rows["torch_eager"].derived["x_bound"] == pytest.approx(0.25)
    assert rows["torch_eager"].derived["x_best"] == pytest.approx(0.5)
    assert rows["torch._grouped_mm.eager"].derived["x_bound"] == pytest.approx(0.5)
    assert "x_bound" not in rows["gemm_bound"].derived and "x_peer" not in rows["gemm_bound"].derived
    assert "x_best" not in rows["gemm_bound"].derived

    lines = tables.terminal_rows(results, {})
    header = lines[0].split()
    assert header[:3] == ["benchmark", "median", "TF/s"] and "bound" in header and "peer" in header
    eager = next(line for line in lines if line.startswith("torch_eager-none"))
    for column, value in (("TF/s", "1.000"), ("x peer", "0.50"), ("x best", "0.50"), ("% bound", "25.0%"),
                          ("peak mem", "3.00 GiB")):  # right-aligned under the header
        assert eager[:lines[0].index(column) + len(column)].endswith(value), (column, lines[0], eager)


def test_cpu_name_comes_from_pytest_benchmarks_machine_info(monkeypatch):
    import pytest_benchmark.plugin

    from qmoe.suite.benchmarks import timing

    monkeypatch.setattr(pytest_benchmark.plugin, "get_cpu_info", lambda: {"brand_raw": "Test CPU 9000"})
    timing.cpu_name.cache_clear()
    try:
        assert timing.cpu_name().startswith("Test CPU 9000 (") and timing.cpu_name().endswith(" cores)")
    finally:
        timing.cpu_name.cache_clear()


def test_thread_limit_reaches_the_loaded_blas_and_openmp_pools():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=None):  # restores every pool's size on exit
        pools = plugin.limit_thread_pools(1)
        assert pools, "NumPy's BLAS at least is loaded"
        assert all(pool["num_threads"] == 1 for pool in pools)


# -- bfloat16 rounding ----------------------------------------------------------------------------------------------
def test_bfloat16_rounding_is_ml_dtypes_on_every_number():
    """The hand-written round-to-nearest-even of `cases.round_to_dtype` and `workload.round_to_dtype` gives
    ml_dtypes' bfloat16, bit for bit, on 2^20 random float32 bit patterns plus the edge cases (zeros,
    subnormals, ties, the largest finite values and their overflow to inf, inf). NaN inputs are left out:
    ml_dtypes makes every NaN the canonical quiet NaN, the hand-written code keeps the payload's top bits
    and carries some payloads into inf or -0.0."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from qmoe.suite.cases import round_to_dtype

    rng = np.random.default_rng(0)
    edges = np.array([0, 0x80000000, 1, 0x8000, 0x7FFF, 0x8001, 0x18000, 0x7FFFFF, 0x807FFFFF, 0x800000,
                      0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x3F808000,
                      0x3F818000, 0x3F808001, 0x3F807FFF], dtype=np.uint32)
    subnormals = rng.integers(1, 1 << 23, 1 << 16).astype(np.uint32)
    bits = np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32), edges,
                           subnormals, subnormals | np.uint32(0x80000000)])
    values = bits.view(np.float32)
    values = values[~np.isnan(values)]
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        from_cases = round_to_dtype(values, "bfloat16")
        from_workload = workload.round_to_dtype(values.copy(), "bfloat16")
    assert from_cases.dtype == np.float64
    np.testing.assert_array_equal(from_cases.astype(np.float32).view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(from_workload.view(np.uint32), expected.view(np.uint32))
