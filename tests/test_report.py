"""Self-tests of `python -m qmoe.suite.report`: it renders the tables and plots from a small fixture run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmoe.suite import report

DEVICE = "NVIDIA H100 80GB HBM3"


def _bench(backend, scheme, top_k, tflops, seconds, peer=False, framework="torch", **extra):
    info = {"backend": backend, "peer": peer, "framework": framework, "scheme": scheme, "pass": "forward",
            "top_k": top_k, "routing": "balanced", "dtype": "bfloat16", "shape": "logbook-shared0", "tokens": 32768,
            "hidden": 2048, "ffn": 2048, "experts": 64, "shared_ffn": 0, "router": "softmax_topk",
            "device_name": DEVICE, "versions": {"torch": "2.11"}, "timer": "cuda_events", "l2_flush_bytes": 256 << 20,
            "inputs": 2, "rounds": 5, "warmup_rounds": 2, "tflops": tflops, "tokens_per_s": 32768 / seconds,
            "gb_per_s": 1000.0, "pct_peak": 100 * tflops / 989.4, "load_imbalance": 1.1,
            "output_check": {"min_sqnr_db": 41.5, "floor_db": 20.0}, **extra}
    return {"name": f"test_throughput[{backend}-{scheme}-top{top_k}]", "fullname": "x", "extra_info": info,
            "stats": {"median": seconds, "mean": seconds}}


FIXTURE = {
    "machine_info": {"node": "gpu-host", "cpu": {"count": 16}, "qmoe": {"device": DEVICE}},
    "datetime": "2026-11-23T15:00:00",
    "qmoe": {"command": "pytest -m benchmark --bench-shape logbook-shared0 --device cuda",
             "date_utc": "2026-11-23 15:00 UTC", "device": DEVICE,
             "not_run": [{"test": "t[jax.lax.ragged_dot-none-top8]", "outcome": "skipped",
                          "reason": "jax.lax.ragged_dot lowers to a dense masked dot on GPU"}]},
    "benchmarks": [
        _bench("torch_x", "none", 2, 300.0, 0.0055),
        _bench("torch_x", "int8_routed_prequant", 2, 375.0, 0.0044),
        _bench("torch_x", "none", 8, 400.0, 0.0165),
        _bench("torch_x", "int8_routed_prequant", 8, 600.0, 0.011),
        _bench("torch._grouped_mm", "none", 2, 500.0, 0.0033, peer=True),
        _bench("torch._grouped_mm", "none", 8, 500.0, 0.0132, peer=True),
        {"name": "test_harness_overhead[noop]", "stats": {"median": 5e-6, "mean": 5e-6},
         "extra_info": {"backend": "noop", "harness_only": True, "device_name": DEVICE}},
    ],
}

CONFORMANCE = {"tests": [
    {"nodeid": "suite/test_level3_forward.py::test_forward[torch_x-none-top2-balanced-float32]", "outcome": "passed",
     "reason": None, "message": None,
     "figures": [{"what": "forward.y", "sqnr_db": 130.0}]},
    {"nodeid": "suite/test_level3_forward.py::test_forward_fidelity[torch_x-int8_routed-top2-balanced-float32]",
     "outcome": "passed", "reason": None, "message": None,
     "figures": [{"what": "forward.y vs float", "sqnr_db": 33.25}]},
    {"nodeid": "suite/test_level4_backward.py::test_backward[torch_x-int8_routed-top2-balanced-float32]",
     "outcome": "failed", "reason": None, "message": "ConformanceError: grad.x: worst row ...",
     "figures": [{"what": "grad.x vs float", "sqnr_db": 12.0}, {"what": "grad.w13 vs float", "sqnr_db": 28.0}]},
    {"nodeid": "suite/test_level1_quantizer.py::test_codes[torch_x-qat_int8_row-top2-balanced-float32]",
     "outcome": "skipped", "reason": "torch_x does not declare scheme qat_int8_row", "message": None, "figures": []},
]}


@pytest.fixture
def written(tmp_path: Path) -> Path:
    bench = tmp_path / "run.json"
    bench.write_text(json.dumps(FIXTURE))
    conformance = tmp_path / "conformance.json"
    conformance.write_text(json.dumps(CONFORMANCE))
    out = tmp_path / "out"
    assert report.main(["--benchmark-json", str(bench), "--conformance-json", str(conformance), "--out", str(out)]) == 0
    return out


def test_throughput_table_has_header_deltas_peers_and_overhead(written: Path):
    text = (written / "throughput.md").read_text()
    for expected in ("pytest -m benchmark --bench-shape logbook-shared0 --device cuda", "2026-11-23 15:00 UTC", DEVICE,
                     "cuda_events + L2 flush 256 MiB", "harness overhead"):
        assert expected in text
    assert "+25.0%" in text and "+50.0%" in text        # 375/300 and 600/400: delta vs the backend's none
    assert "| 0.60 " in text and "| 1.20 " in text      # 300/500 and 600/500: ratio to torch._grouped_mm
    assert "torch._grouped_mm (peer)" in text
    assert "0.152% of the fastest case" in text         # 5 us / 3.3 ms
    assert "dense masked dot" in text                   # cases that did not run keep their reason
    assert "logbook-shared0" in text and "seeds/jax-moe-ep-int8-logbook.txt" in text  # the shape's source


def test_plots_and_raw_json_are_written(written: Path):
    pytest.importorskip("matplotlib")
    plot = written / "throughput_logbook-shared0_forward_balanced.png"
    assert plot.exists() and plot.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((written / "benchmarks.json").read_text())["qmoe"]["device"] == DEVICE


def test_conformance_table_counts_levels_fidelity_and_reasons(written: Path):
    text = (written / "conformance.md").read_text()
    assert "2 passed, 1 failed, 1 skipped" in text
    assert "L3 forward" in text and "L4 backward" in text and "L1 quantizer" in text
    assert "33.2" in text and "12.0" in text and "28.0" in text   # worst SQNR per scheme and tensor kind
    assert "does not declare scheme qat_int8_row" in text and "ConformanceError" in text


def test_nodeids_parse_into_level_backend_scheme_dtype():
    meta = report.parse_nodeid("suite/test_level4_backward.py::test_backward[torch_triton-int8_routed_prequant-top2-"
                               "empty_experts-bfloat16]")
    assert meta == {"level": "L4 backward", "backend": "torch_triton", "scheme": "int8_routed_prequant",
                    "dtype": "bfloat16"}
    assert report.parse_nodeid("suite/test_errors.py::test_unknown[mlx_layerwise]")["backend"] == "mlx_layerwise"


def test_missing_inputs_explain_themselves(tmp_path: Path):
    with pytest.raises(SystemExit, match="benchmark-autosave"):
        report.newest_benchmark_json(tmp_path / ".benchmarks")


def test_timing_sentence_names_only_the_modes_present():
    """A run of torch rows alone (all stream-ordered) says so, with no empty `synchronized` list."""
    from qmoe.suite.benchmarks.tables import ResultRow

    def row(backend: str, timing: str) -> ResultRow:
        return ResultRow(f"{backend}-case", {"backend": backend, "timing": timing, "dtype": "bfloat16"}, 1e-3, 1e-3)

    torch_only = [line for line in report._header([], [row("torch_triton", "stream_ordered")]) if "timing:" in line]
    assert len(torch_only) == 1 and "(torch_triton)" in torch_only[0] and "synchronized" not in torch_only[0]
    mixed = [row("torch_triton", "stream_ordered"), row("jax_prequant", "synchronized")]
    both = [line for line in report._header([], mixed) if "timing:" in line]
    assert "`synchronized` rows (jax_prequant)" in both[0] and "calls_per_round" in both[0]


def test_conformance_header_takes_the_runs_time_and_command_not_the_files(tmp_path: Path):
    """A committed JSON's mtime is its checkout's: the header reads the time and command the run recorded."""
    bench = tmp_path / "run.json"
    bench.write_text(json.dumps(FIXTURE))
    path = tmp_path / "conformance.json"
    path.write_text(json.dumps({**CONFORMANCE, "finished": "2026-11-30T21:54:10+00:00",
                                "command": "pytest -m conformance --device cuda"}))
    out = tmp_path / "out"
    assert report.main(["--benchmark-json", str(bench), "--conformance-json", str(path), "--out", str(out),
                        "--no-plots"]) == 0
    text = (out / "conformance.md").read_text()
    assert "(written 2026-11-30 21:54 UTC by `pytest -m conformance --device cuda`)" in text


def test_conformance_json_records_when_and_how_it_was_run(tmp_path: Path):
    (tmp_path / "test_one.py").write_text("import pytest\n\n@pytest.mark.conformance\ndef test_x():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "conformance",
                           "--conformance-json=c.json", "test_one.py"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["finished"].startswith("20") and "--conformance-json=c.json" in data["command"]


def test_memory_column_note_names_the_sources_the_figures_came_from():
    """A run whose JAX figures are runtime peaks (before the compiled analysis) must not be described as
    compiled footprints, and the reverse; a source without a figure is not named."""
    from qmoe.suite.benchmarks import memory
    from qmoe.suite.benchmarks.tables import ResultRow

    def row(source: str, figure: int | None) -> ResultRow:
        return ResultRow("case", {"peak_memory_source": source, "peak_memory_bytes": figure}, 1e-3, 1e-3)

    runtime = report._memory_sources([row("torch.cuda.max_memory_allocated", 1), row(memory.JAX_RUNTIME_SOURCE, 2)])
    assert "process-wide" in runtime and "memory_analysis" not in runtime
    compiled = report._memory_sources([row(memory.JAX_COMPILED_SOURCE, 3), row("jax", None)])
    assert "memory_analysis" in compiled and "torch" not in compiled and "process-wide peak_bytes" not in compiled
    assert report._memory_sources([row("jax", None)]) == "no framework reported one"


def test_a_weak_native_peer_is_named_under_its_table(tmp_path: Path):
    """A framework whose native peer runs far below the case's best float row (JAX on GPUs: jax.lax.ragged_dot
    as a dense masked dot, 0.02-0.18x on the H200) gets a line saying its rows' `x native peer` is against a
    weak baseline; a framework whose peer is the best row gets none."""
    run = dict(FIXTURE, benchmarks=FIXTURE["benchmarks"] + [
        _bench("jax_x", "none", 8, 450.0, 0.0147, framework="jax"),
        _bench("jax_x", "int8_routed_prequant", 8, 650.0, 0.0102, framework="jax"),
        _bench("jax.lax.ragged_dot", "none", 8, 10.0, 0.66, peer=True, framework="jax")])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    assert report.main(["--benchmark-json", str(path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "throughput.md").read_text()
    assert ("`x native peer` of the jax rows: their native peer, jax.lax.ragged_dot, runs at 10 TF/s here, "
            "0.02x the best float row") in text  # 10 / 500 (torch._grouped_mm, top-8)
    assert "of the torch rows" not in text


def test_stage_times_get_their_own_table(tmp_path: Path):
    """Rows that measured their forward stages (--bench-stage-times) get a table of them in ms, with their sum
    beside the timed call; rows without them are not listed. Before, the stages were in the JSON only."""
    stages = {"pack": 0.002, "up": 0.008, "down": 0.004, "combine": 0.0005}
    run = dict(FIXTURE, benchmarks=FIXTURE["benchmarks"] + [
        _bench("jax_x", "none", 8, 450.0, 0.0147, framework="jax", stage_times_s=stages)])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    assert report.main(["--benchmark-json", str(path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "throughput.md").read_text()
    section = text.split("## Forward stage times", 1)[1].split("\n## ", 1)[0]
    header, row = (next(line for line in section.splitlines() if key in line) for key in ("| shape", "jax_x"))
    assert [c.strip() for c in header.strip("|").split("|")][5:] == [
        "pack ms", "up ms", "down ms", "combine ms", "sum ms", "call ms", "sum / call"]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:] == ["2.00", "8.00", "4.00", "0.50", "14.50", "14.70", "0.99"]
    assert "torch_x" not in section
