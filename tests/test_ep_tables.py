"""Self-tests of the expert-parallel tables (`qmoe.suite.benchmarks.ep_tables`) and their hook in the report,
on a synthetic pytest-benchmark JSON: every figure shown comes from ``extra_info``; cases of the grid without a
result are listed with the file's outcome, or as not reached."""

from __future__ import annotations

import json

from qmoe.suite import report
from qmoe.suite.benchmarks import ep_tables

SHAPE = {"shape_shape": "logbook-shared0", "shape_tokens": 32768, "shape_hidden": 2048, "shape_ffn": 2048,
         "shape_experts": 64, "shape_shared_ffn": 0, "shape_router": "softmax_topk"}


def _axes(backend: str, scheme: str, routing: str) -> dict:
    return {"kind": "expert_parallel", "ep_backend": backend, "scheme": scheme, "top_k": 8, "ep_size": 2,
            "dtype": "bfloat16", "pass_name": "forward", "routing": routing, **SHAPE}


def _torch(routing: str) -> dict:
    def side(seconds: float, dispatch_s: float, off_bytes: int, gb: float) -> dict:
        return {"seconds_median": seconds, "tokens_per_s": 32768 / seconds,
                "stage_seconds_per_rank": {"route": [0.001, 0.0011], "dispatch": [dispatch_s, dispatch_s],
                                           "experts": [0.0066, 0.0066], "combine": [0.0025, 0.0024]},
                "sent_bytes_per_rank": {"dispatch_rows": [[267829248, 536870912], [269496320, 536870912]]},
                "all_to_all_bytes_off_rank": off_bytes, "dispatch_gb_per_s": gb, "output_error_vs_one_device": 0.0,
                "routing_undecided_tokens": 0, "routing_differs_tokens": 0}

    info = {"float": side(0.01183, 0.00171, 1075700616, 157.0), "int8": side(0.01462, 0.00443, 808000000, 30.4),
            "plain_all_to_all": {"bytes_per_rank": 536870912, "seconds_median": 0.000973, "gb_per_s": 275.8},
            "one_device": {"seconds_median": 0.01591, "tokens_per_s": 32768 / 0.01591},
            "speedup_vs_one_device": 0.01591 / 0.01183,
            "int8_dispatch_saving": {"bytes": 0.2493, "dispatch_seconds": -1.588, "layer_seconds": -0.2357},
            "int8_check": {"int8_dispatch_check": "sqnr", "int8_dispatch_sqnr_db": 37.08,
                           "int8_dispatch_floor_db": 29.0},
            **_axes("torch_triton", "none", routing)}
    return {"name": f"test_expert_parallel[torch_triton-none-top8-logbook-shared0-forward-ep2-{routing}]",
            "extra_info": info, "stats": {"median": 0.01183}}


def _jax() -> dict:
    info = {"float": {"seconds_median": 0.01007, "tokens_per_s": 32768 / 0.01007, "stage_seconds_per_rank": None,
                      "all_to_all_bytes_off_rank": 1208549376, "output_error_vs_one_device": 5.86e-4},
            "plain_all_to_all": {"bytes_per_rank": 604569600, "seconds_median": 0.001446, "gb_per_s": 209.0},
            "one_device": {"seconds_median": 0.01397, "tokens_per_s": 32768 / 0.01397},
            "speedup_vs_one_device": 0.01397 / 0.01007, "int8_dispatch": "not offered",
            **_axes("jax_prequant", "none", "balanced")}
    return {"name": "test_expert_parallel[jax_prequant-none-top8-logbook-shared0-forward-ep2-balanced]",
            "extra_info": info, "stats": {"median": 0.01007}}


FIXTURE = {
    "datetime": "2026-11-30T15:34:59",
    "qmoe": {"command": "pytest -m benchmark suite/benchmarks/test_expert_parallel.py",
             "date_utc": "2026-11-30 15:34 UTC", "device": "NVIDIA H200",
             "not_run": [{"test": "t[jax_prequant-none-top8-logbook-shared0-forward-ep2-zipf]",
                          "outcome": "failed (call)", "reason": "AssertionError: differs by 4.654e-02"}]},
    "benchmarks": [_torch("balanced"), _torch("zipf"), _jax(),
                   {"name": "test_throughput[x]", "extra_info": {"kind": "other"}, "stats": {}}],
}


def test_render_takes_every_figure_from_extra_info():
    text = ep_tables.render([dict(FIXTURE, _path="ep.json")], notes=("ep4 not run: 2 GPUs",))
    assert text.startswith("# Expert parallel: logbook-shared0 (T 32768, H 2048, F 2048, E 64, shared 0), bfloat16")
    assert "- note: ep4 not run: 2 GPUs" in text and "NVIDIA H200" in text
    # layer time: sharded ms, tokens/s, one device, speed-up, error
    assert "| torch_triton | none     | 8       | forward | 2   | balanced  | 11.83" in text
    assert "15.91" in text and "1.34x" in text and "2.77M" in text and "5.9e-04" in text
    # stages per rank, float and int8 dispatch
    assert "1.71 / 1.71" in text and "4.43 / 4.43" in text and "6.60 / 6.60" in text
    # the exchange: dispatch and plain GB/s and their ratio (157 / 275.8)
    assert "| 157 " in text and "| 276 " in text and "0.57" in text and "| 268 " in text
    # int8 dispatch's savings (negative: slower) and its check
    assert "+24.9%" in text and "-158.8%" in text and "-23.6%" in text and "SQNR 37.1 dB >= 29.0" in text
    # the grid: jax's zipf failed (the file's reason); nothing else is missing
    missing = text.split("## Cases of the run's grid without a result", 1)[1]
    assert "jax_prequant-none-top8-logbook-shared0-forward-ep2-zipf | failed (call)" in missing
    assert "4.654e-02" in missing and missing.count("| jax_prequant") == 1


def test_grid_cases_absent_from_the_file_are_not_reached():
    doc = dict(FIXTURE, benchmarks=[_torch("balanced"), _torch("zipf"), _jax()], qmoe={})
    gaps = ep_tables.missing([doc], [b["extra_info"] for b in ep_tables.entries([doc])])
    assert gaps == [["jax_prequant-none-top8-logbook-shared0-forward-ep2-zipf", "no result",
                     "not in the file: the run ended (or was stopped) before it"]]


def test_report_writes_expert_parallel_md_for_an_expert_parallel_file(tmp_path):
    source = tmp_path / "ep.json"
    source.write_text(json.dumps(FIXTURE))
    out = tmp_path / "out"
    assert report.main(["--benchmark-json", str(source), "--out", str(out), "--no-plots"]) == 0
    assert (out / "expert_parallel.md").read_text().startswith("# Expert parallel")
    assert not (out / "throughput.md").exists()  # no throughput rows in the file
    assert json.loads((out / "benchmarks.json").read_text())["benchmarks"][0]["name"].startswith("test_expert")
