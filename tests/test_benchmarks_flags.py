"""pytest-benchmark's own flags run qmoe's benchmarks; plain and conformance runs leave them out.

End to end in this checkout (subprocesses; one tiny case runs, the rest only collects), plus the rule as a
unit: which flags ask for benchmarks, and when they select the benchmarks alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmoe.suite.benchmarks import plugin

ROOT = Path(__file__).resolve().parent.parent
#: The cheapest real case of the default preset: the bf16/float GEMM bound, top-1, forward (sub-millisecond).
TINY_CASE = "gemm_bound-none-top1-cpu-small-fwd-balanced"


def _pytest(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--bench-threads", "1", *args],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=timeout)


def test_benchmark_json_alone_runs_and_writes_the_benchmark(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out.json"
    result = _pytest(f"--benchmark-json={out}", "-k", TINY_CASE, "-q")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert [b["extra_info"]["backend"] for b in benchmarks] == ["gemm_bound"]
    assert benchmarks[0]["extra_info"]["tflops"] > 0 and benchmarks[0]["name"].endswith(f"[{TINY_CASE}]")
    assert not Path(f"{out}{plugin.PARTIAL_SUFFIX}").exists()  # the JSON has every result: no partial file left


def test_another_projects_benchmark_json_run_gets_no_partial_file(tmp_path):
    """qmoe installed as a plugin leaves a project's own pytest-benchmark run alone: no file of ours."""
    (tmp_path / "test_theirs.py").write_text("def test_theirs(benchmark):\n    benchmark(sum, [1, 2])\n")
    out = tmp_path / "theirs.json"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--benchmark-json={out}",
                             "-q", "test_theirs.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(out.read_text())["benchmarks"] and not Path(f"{out}{plugin.PARTIAL_SUFFIX}").exists()
    assert "qmoe" not in json.loads(out.read_text())  # and the session was not a qmoe run (what the rule keys on)


def test_benchmark_json_run_that_dies_keeps_its_results_in_the_partial_file(tmp_path):
    """pytest-benchmark writes --benchmark-json at the session's end; a run killed before (here: a plugin that
    ends the process once the case is reported) keeps each finished result in JSON.partial.jsonl."""
    pytest.importorskip("torch")
    (tmp_path / "die_at_finish.py").write_text(
        "import os\n\n\ndef pytest_runtest_logfinish(nodeid, location):\n    os._exit(3)\n")
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "die_at_finish",
                             "--bench-threads", "1", f"--benchmark-json={out}", "-k", TINY_CASE, "-q"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert not out.exists() or out.read_text() == ""  # what pytest-benchmark alone would have left
    lines = Path(f"{out}{plugin.PARTIAL_SUFFIX}").read_text().splitlines()
    assert [json.loads(line)["extra_info"]["backend"] for line in lines] == ["gemm_bound"]


def _collected(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_conformance_collects_no_benchmark_and_flags_alone_collect_only_benchmarks():
    conformance = _pytest("-m", "conformance", "--collect-only", "-q")
    assert conformance.returncode == 0, conformance.stdout[-2000:] + conformance.stderr[-2000:]
    ids = _collected(conformance)
    assert ids and not [i for i in ids if "benchmarks/" in i], "conformance must not collect a benchmark"
    assert "benchmark test(s) deselected" in conformance.stdout

    flags = _pytest("--benchmark-autosave", "--collect-only", "-q", "suite")
    ids = _collected(flags)
    assert any("test_throughput[" in i for i in ids), flags.stdout[-2000:]
    assert not [i for i in ids if "test_level" in i], "benchmark flags without -m select the benchmarks alone"
    assert "not marked benchmark deselected" in flags.stdout

    skipped = _pytest("-m", "benchmark", "--benchmark-skip", "--collect-only", "-q", "suite/benchmarks")
    assert not [i for i in _collected(skipped) if "test_throughput[" in i]


def test_a_scheme_selection_keeps_the_native_peers_baseline():
    """--bench-scheme without `none` keeps the native peers' `none` cases (every ratio is to them; a selection once
    lost them silently), not the backends' `none` nor the bf16 GEMM bound's; --bench-no-peers drops them."""
    grid = ("-m", "benchmark", "--collect-only", "-q", "suite/benchmarks/test_throughput.py", "--backend",
            "torch_eager", "--bench-scheme", "int8_routed", "--bench-top-k", "2")
    ids = _collected(_pytest(*grid))
    assert [i for i in ids if "[torch._grouped_mm.compiled-none-top2" in i], ids
    assert [i for i in ids if "[torch_eager-int8_routed-top2" in i], ids
    assert not [i for i in ids if "[torch_eager-none" in i or "[gemm_bound-none" in i], ids
    assert not [i for i in _collected(_pytest(*grid, "--bench-no-peers")) if "-none-" in i]


@pytest.mark.parametrize("options, requested, alone", [
    ({"benchmark_json": Path("x.json")}, True, True),
    ({"benchmark_autosave": "tag"}, True, True),
    ({"benchmark_compare": True}, True, True),
    ({"benchmark_save": "name"}, True, True),
    ({"benchmark_only": True}, True, True),
    ({"benchmark_compare": []}, False, False),                                 # pytest-benchmark's default
    ({"benchmark_json": Path("x.json"), "markexpr": "conformance or benchmark"}, True, False),
    ({"markexpr": "benchmark"}, True, False),
    ({"markexpr": "benchmark", "benchmark_skip": True}, False, False),
    ({"benchmark_json": Path("x.json"), "benchmark_skip": True}, False, False),
    ({"markexpr": "conformance"}, False, False),
    ({}, False, False),
])
def test_which_flags_ask_for_benchmarks_and_when_they_select_them_alone(options, requested, alone):
    config = SimpleNamespace(getoption=lambda name, default=None: options.get(name, default))
    assert plugin.benchmarks_requested(config) is requested
    assert plugin.benchmarks_only(config) is alone
