"""The peak-memory column for JAX steps (`suite.benchmarks.memory`): XLA's runtime peak is process-wide with
no reset, so a JAX step offers its compiled program's memory analysis (``step.memory_analysis``) and the
column holds that program's footprint; a step without it keeps the runtime figure. CPU, tiny shapes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from qmoe.implementations.base import async_step
from qmoe.reference import MoEParams, MoESpec
from qmoe.suite.benchmarks import harness, memory, shapes

from .test_benchmarks import FakeBenchmark

jax = pytest.importorskip("jax", reason="the JAX peak-memory figure needs jax")

SPEC = MoESpec(hidden=24, ffn=40, experts=4, top_k=2)
TOKENS = 12


def _jax_step(pass_: str, scheme: str = "int8_routed_prequant", ep_size: int = 1):
    """(benchmark step, prepared layer) of jax_prequant on CPU for SPEC."""
    from qmoe.implementations.jax_prequant import JaxPrequantBackend

    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((TOKENS, SPEC.hidden)), rng.standard_normal((TOKENS, SPEC.hidden))
    backend = JaxPrequantBackend("cpu")
    prepared = backend.prepare(SPEC, MoEParams.random(SPEC, seed=0), scheme, "float32", ep_size=ep_size)
    return backend.benchmark_step(prepared, x, pass_, dy), prepared


def _compiled_peak(step) -> memory.Peak:
    """The step's peak, skipping where this jax's XLA gives no compiled memory analysis on CPU."""
    if step.memory_analysis() is None:
        pytest.skip(f"jax {jax.__version__} gives no compiled memory analysis on CPU")
    return memory.measure_peak("jax", "cpu", step)


def test_jax_memory_comes_from_the_compiled_program_and_holds_the_prepared_weights():
    step, prepared = _jax_step("forward")
    peak = _compiled_peak(step)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves((prepared.params, prepared.frozen)))
    assert peak.source == memory.JAX_COMPILED_SOURCE and peak.note is None
    assert peak.bytes is not None and peak.bytes >= weights
    info = peak.as_info()
    assert info["peak_memory_bytes"] == peak.bytes and "peak_memory_runtime_bytes" not in info  # CPU: no runtime


def test_jax_memory_of_forward_backward_exceeds_the_forward_one():
    forward, _ = _jax_step("forward")
    forward_backward, _ = _jax_step("backward")
    assert _compiled_peak(forward_backward).bytes > _compiled_peak(forward).bytes


def test_jax_memory_on_an_expert_parallel_plan_is_per_device():
    one, _ = _jax_step("forward", scheme="none")
    two, _ = _jax_step("forward", scheme="none", ep_size=2)
    sharded = _compiled_peak(two)
    assert sharded.source == memory.JAX_COMPILED_SOURCE
    assert 0 < sharded.bytes < _compiled_peak(one).bytes  # each device holds half the experts


def test_jax_memory_of_the_ragged_dot_peer_comes_from_its_compiled_program():
    from qmoe.suite.benchmarks.peers import JaxRaggedDotPeer

    if JaxRaggedDotPeer.unavailable_reason():
        pytest.skip(JaxRaggedDotPeer.unavailable_reason())
    peer = JaxRaggedDotPeer("cpu")
    prepared = peer.prepare(SPEC, MoEParams.random(SPEC, seed=0), "none", "float32")
    x = np.random.default_rng(0).standard_normal((TOKENS, SPEC.hidden))
    forward = _compiled_peak(peer.benchmark_step(prepared, x, "forward"))
    forward_backward = _compiled_peak(peer.benchmark_step(prepared, x, "backward"))
    assert forward.source == forward_backward.source == memory.JAX_COMPILED_SOURCE
    assert forward_backward.bytes > forward.bytes >= sum(a.nbytes for a in prepared.arrays.values())


def test_a_jax_step_without_the_hook_keeps_the_runtime_figure():
    calls = []
    peak = memory.measure_peak("jax", "cpu", lambda: calls.append(1))
    assert calls == [1] and peak.bytes is None and peak.source == "jax" and "no memory statistics" in peak.note


def test_the_compiled_figure_is_arguments_plus_outputs_plus_temporaries_less_aliased():
    stats = SimpleNamespace(argument_size_in_bytes=1000, output_size_in_bytes=300, temp_size_in_bytes=50,
                            alias_size_in_bytes=200, generated_code_size_in_bytes=7)
    calls = []
    step = async_step(lambda: calls.append(1), lambda out: None, lambda: stats)
    peak = memory.measure_peak("jax", "cpu", step)
    assert calls == [1] and peak == memory.Peak(1150, memory.JAX_COMPILED_SOURCE)


@pytest.mark.parametrize("analysis, reason", [(lambda: None, "XLA gives none"),
                                              (lambda: 1 / 0, "ZeroDivisionError"),
                                              (lambda: SimpleNamespace(argument_size_in_bytes=1), "lacks")])
def test_without_a_compiled_analysis_the_column_stays_empty_and_says_why(analysis, reason):
    peak = memory.measure_peak("jax", "cpu", async_step(lambda: None, lambda out: None, analysis))
    assert peak.bytes is None and peak.source == "jax"
    assert "no memory statistics" in peak.note and reason in peak.note


def test_the_harness_records_the_compiled_jax_figure():
    from qmoe.implementations.jax_prequant import JaxPrequantBackend

    shape = shapes.BenchShape("t", tokens=40, hidden=32, ffn=16, experts=6, top_ks=(2,))
    options = harness.BenchOptions(device="cpu", dtype="float32", rounds=2, warmup=1, inputs=2)
    harness.clear_caches()
    case = harness.BenchCase(JaxPrequantBackend.name, "int8_routed_prequant", shape, 2, "fwd", "balanced")
    info = harness.run_case(FakeBenchmark(), case, JaxPrequantBackend, options)
    if info["peak_memory_bytes"] is None:  # this jax gives no analysis on CPU: the reason instead
        assert "compiled memory analysis" in info["peak_memory_note"]
    else:
        assert info["peak_memory_source"] == memory.JAX_COMPILED_SOURCE and info["peak_memory_bytes"] > 0
