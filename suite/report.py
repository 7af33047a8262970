"""``python -m qmoe.suite.report`` (or ``qmoe-report``): results tables and plots from saved runs.

Reads pytest-benchmark JSON (default: the newest file under ``.benchmarks/``, as
``--benchmark-autosave`` writes it) and, if given, the conformance outcomes that
``pytest -m conformance --conformance-json PATH`` wrote. Writes to ``results/<dir>/``:

* ``throughput.md``: per shape, pass, routing pattern and dtype, backend x scheme x top_k with TF/s,
  tokens/s, GB/s, the delta vs the backend's own ``none``, the ratio to its framework's strongest native
  peer (``x native peer``), the ratio to the fastest float row of any framework (``x best bf16``), the share
  of the GEMM bound of its operand type (``% of bound``), the peak device memory of one call, % of the
  device's peak where known and the output check; a header with the command, date, device, versions and
  CUDA-graph mode; the harness overhead; the cases that did not run, with their reasons.
* ``throughput_<shape>_<pass>_<routing>.png``: TF/s vs top_k, one line per backend and scheme.
* ``conformance.md``: backend x level (pass / fail / skip counts), skip reasons, failures, and the
  fidelity (SQNR in dB against the float reference) per backend, scheme and dtype.
* ``benchmarks.json``: the benchmark JSON read (raw data for the tables), unless it already lies in the
  output directory.

Tables are made with tabulate, plots with matplotlib (imported only to draw).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from qmoe.reference.schemes import SCHEMES
from qmoe.suite.benchmarks import memory
from qmoe.suite.benchmarks.tables import (
    ABOVE_BOUND,
    ResultRow,
    best_label,
    fmt,
    fmt_bytes,
    fmt_pct,
    fmt_share,
    fmt_si,
    overhead_line,
    overhead_ratios,
    rows_from_json,
)

FLOP_NOTE = ("FLOPs = 6 T H (k F + S) forward, 3x that for forward+backward (the JAX logbook's count: routed "
             "and shared SwiGLU projections, router excluded); TF/s and tokens/s from the median timed round; "
             "GB/s from the compulsory bytes (weights with scales, activations, gradients: a lower bound).")


# -- loading --------------------------------------------------------------------------------------------------
def newest_benchmark_json(root: Path = Path(".benchmarks")) -> Path:
    files = sorted(root.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no pytest-benchmark JSON under {root}/: run `pytest -m benchmark --benchmark-autosave` "
                         "first, or pass --benchmark-json PATH")
    return files[-1]


def load_benchmarks(paths: list[Path]) -> tuple[list[ResultRow], list[dict]]:
    """Result rows of every file and each file's JSON (for its header)."""
    docs, benches = [], []
    for path in paths:
        text = Path(path).read_text()
        if str(path).endswith(".jsonl"):  # --bench-jsonl: one benchmark entry per line, no run header
            doc = {"benchmarks": [json.loads(line) for line in text.splitlines() if line.strip()]}
        else:
            doc = json.loads(text)
        doc["_path"] = str(path)
        docs.append(doc)
        benches.extend(doc.get("benchmarks", []))
    # The same case measured in several files (a rerun): the later file's result stands.
    latest = {bench.get("name"): bench for bench in benches}
    return rows_from_json(list(latest.values())), docs


def device_slug(rows: list[ResultRow]) -> str:
    """results/<dir>: the GPU model (h100, h200, ...) or ``cpu``."""
    names = {r.get("device_name", "") for r in rows}
    for name in sorted(names):
        match = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name or "")
        if match and r"GPU" not in match.group(1):
            return match.group(1).lower()
    return "cpu"


# -- throughput.md ----------------------------------------------------------------------------------------------
def _header(docs: list[dict], rows: list[ResultRow]) -> list[str]:
    lines = []
    for doc in docs:
        q = doc.get("qmoe") or {}
        machine = doc.get("machine_info", {})
        lines += [f"- command: `{q.get('command', '(not recorded)')}`",
                  f"- date: {q.get('date_utc') or doc.get('datetime', '?')}",
                  f"- device: {q.get('device') or (machine.get('qmoe') or {}).get('device', '?')}"
                  f" (host {machine.get('node', '?')}, {machine.get('cpu', {}).get('count', '?')} CPUs)",
                  f"- source: `{doc['_path']}`"]
    versions: dict[str, set] = defaultdict(set)
    for row in rows:
        for key, value in (row.get("versions") or {}).items():
            versions[key].add(str(value))
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items())))
    dtypes = sorted({str(r.get("dtype")) for r in rows})
    def timer(row) -> str:
        flush = row.get("l2_flush_bytes")
        return f"{row.get('timer')}" + (f" + L2 flush {flush >> 20} MiB" if flush else "")

    timers = sorted({timer(r) for r in rows})
    threads = sorted({str(r.get("threads") or "framework default") for r in rows})
    def inputs(count) -> str:
        return "1 input" if count == 1 else f"{count} distinct inputs rotated"

    def round_counts(group: list) -> str:
        counts = sorted({int(r.get("rounds") or 0) for r in group})
        least = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        min_time = group[0].get("min_time_s")
        return least + (f" (short calls: as many as add up to {min_time:g} s)" if min_time and len(counts) > 1 else "")

    by_setting: dict[tuple, list] = defaultdict(list)
    for r in rows:
        by_setting[(r.get("warmup_rounds"), r.get("inputs"), r.get("warmup_s"))].append(r)
    rounds = sorted(f"{round_counts(group)} rounds after {warmup} warm-up"
                    + (f" (and untimed calls for the first {warmup_s:g} s)" if warmup_s else "")
                    + f", {inputs(count)}" for (warmup, count, warmup_s), group in by_setting.items())
    lines += [f"- dtype: {', '.join(dtypes)}; timer: {', '.join(timers)}; threads: {', '.join(threads)}",
              f"- CUDA graphs: {_graph_mode(docs, rows)}",
              f"- rounds: {'; '.join(rounds)}",
              f"- {FLOP_NOTE}",
              "- every result's timed outputs were checked against the float64 reference (SQNR column: the worst "
              f"input, floor {rows[0].get('output_check', {}).get('floor_db', '?') if rows else '?'} dB); a "
              "result whose check failed is not in the table."]
    modes: dict[str, set[str]] = {}  # timing mode -> the backends timed so
    for r in rows:
        if r.get("timing") and not r.get("harness_only"):
            modes.setdefault(str(r.get("timing")), set()).add(str(r.get("backend")))
    if modes.get("stream_ordered"):
        sentence = (f"- timing: `stream_ordered` rows ({', '.join(sorted(modes['stream_ordered']))}) are timed between "
                    "CUDA events on torch's stream around work that goes to that stream alone, no host wait inside "
                    "(triton's do_bench)")
        if modes.get("synchronized"):
            sentence += (f"; `synchronized` rows ({', '.join(sorted(modes['synchronized']))}) wait for the start "
                         "event and end with their own device synchronization (JAX's and MLX's streams are not "
                         "ordered by torch's events), so each round holds a host round trip, spread over the calls "
                         "of the round (extra_info `calls_per_round`)")
        lines.append(sentence)
    for ratio, noop, fastest in overhead_ratios(rows):
        lines.append("- " + overhead_line(ratio, noop, fastest, _label(fastest)))
    return lines


def _graph_mode(docs: list[dict], rows: list[ResultRow]) -> str:
    """The run's CUDA-graph mode (``--bench-cuda-graph``) and which rows were captured."""
    asked = any((doc.get("qmoe") or {}).get("cuda_graph") for doc in docs) or any(
        r.get("cuda_graph_option") for r in rows)
    captured = sorted({str(r.get("backend")) for r in rows if r.get("cuda_graph") is True})
    failed = sorted({f"{r.get('backend')} ({r.get('cuda_graph_reason')})" for r in rows
                     if r.get("cuda_graph") is False})
    mode = ("on (--bench-cuda-graph)" if asked
            else "off (eager launches; the int8 GEMM bound is always captured on CUDA)")
    parts = [mode]
    if captured:
        parts.append("captured: " + ", ".join(captured))
    if failed:
        parts.append("not capturable, timed eagerly: " + "; ".join(failed))
    return "; ".join(parts)


def _label(row: ResultRow) -> str:
    return (f"{row.get('backend')} {row.get('scheme')} top{row.get('top_k')} {row.get('shape')} {row.get('pass')} "
            f"{row.get('routing')}")


def _scheme_order(row: ResultRow) -> tuple:
    schemes = list(SCHEMES)
    scheme = row.get("scheme")
    return (bool(row.get("peer")), row.get("backend"), schemes.index(scheme) if scheme in schemes else 99,
            row.get("top_k"))


def _groups(rows: list[ResultRow]) -> dict[tuple, list[ResultRow]]:
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for row in rows:
        if not row.get("harness_only"):
            groups[(row.get("shape"), row.get("pass"), row.get("routing"), row.get("dtype"))].append(row)
    return groups


def throughput_tables(rows: list[ResultRow]) -> list[str]:
    from tabulate import tabulate

    out = []
    shapes_seen = {}
    for (shape, pass_, routing, dtype), group in _groups(rows).items():
        first = group[0]
        shapes_seen[shape] = first
        out += [f"## {shape} · {pass_} · {routing} routing · {dtype}", "",
                f"T {first.get('tokens')}, H {first.get('hidden')}, F {first.get('ffn')}, E {first.get('experts')}, "
                f"shared {first.get('shared_ffn')}, router {first.get('router')}, {first.get('dtype')}; "
                "max/mean rows per expert: " + ", ".join(
                    f"top{k} {fmt(next(r.get('load_imbalance') for r in group if r.get('top_k') == k), '.2f')}"
                    for k in sorted({r.get("top_k") for r in group})), ""]
        top_ks = sorted({r.get("top_k") for r in group})
        pivot = defaultdict(dict)
        for row in group:
            pivot[(row.get("backend"), row.get("scheme"), bool(row.get("peer")))][row.get("top_k")] = row
        table = []
        for (_, scheme, _), by_k in sorted(pivot.items(), key=lambda kv: (kv[0][2], kv[0][0],
                                                                          list(SCHEMES).index(kv[0][1]))):
            table.append([_row_name(next(iter(by_k.values()))), scheme]
                         + [fmt(by_k[k].get("tflops"), ".3g") if k in by_k else "" for k in top_ks])
        out += ["TF/s by top_k:", "",
                tabulate(table, headers=["backend", "scheme", *[f"top{k}" for k in top_ks]], tablefmt="github"), ""]
        detail = []
        for row in sorted(group, key=_scheme_order):
            check = (row.get("output_check") or {}).get("min_sqnr_db")
            detail.append([_row_name(row), row.get("scheme"),
                           row.get("top_k"), fmt(row.median_s * 1e3, ".3f"), fmt(row.get("tflops"), ".3g"),
                           fmt_si(row.get("tokens_per_s")), fmt(row.get("gb_per_s"), ".1f"),
                           fmt_pct(row.derived.get("delta_vs_none")), fmt(row.derived.get("x_peer"), ".2f"),
                           fmt(row.derived.get("x_best"), ".2f"), fmt_share(row.derived.get("x_bound")),
                           _memory_cell(row), fmt(row.get("pct_peak"), ".1f"), fmt(check, ".1f")])
        out += [tabulate(detail, headers=["backend", "scheme", "top_k", "ms", "TF/s", "tokens/s", "GB/s",
                                          "vs own none", "x native peer", best_label(group), "% of bound",
                                          "peak memory", "% peak", "check dB"],
                         tablefmt="github", disable_numparse=True), ""]
        notes = sorted({str(r.get("peak_memory_note")) for r in group if r.get("peak_memory_note")})
        if notes:
            out += ["Peak memory not reported: " + "; ".join(notes) + ".", ""]
        out += [line + "\n" for line in _weak_peer_notes(group, best_label(group))]
    if shapes_seen:
        out += ["## Shapes", ""]
        from qmoe.suite.benchmarks.shapes import all_shapes

        known = all_shapes()
        for shape in shapes_seen:
            source = known[shape].source if shape in known else "(unknown preset)"
            note = known[shape].note if shape in known else ""
            out.append(f"- `{shape}`: {source}" + (f"; {note}" if note else ""))
        out.append("")
    return out


#: A native peer slower than this share of the best float row of the same case makes a weak baseline: its
#: rows' ``x native peer`` then says more about the peer than about them (JAX on GPUs: `jax.lax.ragged_dot`
#: lowers to a dense masked dot; results/h200/models, 2026-12-01: 5-95 TF/s, 0.02-0.18x the best bf16 row).
WEAK_PEER_SHARE = 0.5


def _weak_peer_notes(group: list[ResultRow], best_column: str = "x best") -> list[str]:
    """One line per framework whose native peer, on some case of the table, runs below `WEAK_PEER_SHARE` of
    that case's best float row: its rows' ``x native peer`` is against a weak baseline, so the table says so."""
    tflops = {(r.get("backend"), r.get("top_k")): r.get("tflops") for r in group if r.get("scheme") == "none"}
    weak: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in group:
        peer, best = row.derived.get("peer"), row.derived.get("best")
        peer_tf, best_tf = tflops.get((peer, row.get("top_k"))), tflops.get((best, row.get("top_k")))
        if peer_tf and best_tf and peer_tf < WEAK_PEER_SHARE * best_tf:
            weak[(str(row.get("framework")), str(peer))].append((peer_tf, peer_tf / best_tf))
    lines = []
    for (framework, peer), seen in sorted(weak.items()):
        speeds, shares = sorted({tf for tf, _ in seen}), sorted({share for _, share in seen})
        lines.append(f"`x native peer` of the {framework} rows: their native peer, {peer}, runs at "
                     f"{_span(speeds, '.3g')} TF/s here, {_span(shares, '.2f')}x the best float row of the same "
                     f"case, a weak baseline (no faster native {framework} layer is in the run): `{best_column}` "
                     "compares them with the fastest float layer of any framework.")
    return lines


def _span(values: list[float], spec: str) -> str:
    low, high = format(values[0], spec), format(values[-1], spec)
    return low if low == high else f"{low}-{high}"


def _row_name(row: ResultRow) -> str:
    """A backend's name, marked ``(bound)`` or ``(peer)``."""
    return str(row.get("backend")) + (" (bound)" if row.get("bound") else " (peer)" if row.get("peer") else "")


def _memory_cell(row: ResultRow) -> str:
    return fmt_bytes(row.get("peak_memory_bytes"))


def stage_times(rows: list[ResultRow]) -> list[str]:
    """The forward stages' times of the rows that measured them (``--bench-stage-times``): each stage run alone
    on the previous stage's outputs, in ms, with their sum against the timed call's median (a sum above the call:
    the separate programs lose the whole forward's fusion and overlap, so read the stages' shares, not their sum)."""
    from tabulate import tabulate

    timed = [r for r in rows if r.get("stage_times_s")]
    if not timed:
        return []
    names: list[str] = []
    for row in timed:
        names += [n for n in row.get("stage_times_s") if n not in names]
    table = []
    for row in sorted(timed, key=lambda r: (r.get("shape"), r.get("routing"), r.get("top_k"), r.get("backend"),
                                            r.get("scheme"))):
        stages = row.get("stage_times_s")
        total = sum(stages.values())
        table.append([row.get("shape"), row.get("routing"), row.get("top_k"), row.get("backend"), row.get("scheme"),
                      *(f"{1e3 * stages[n]:.2f}" if n in stages else "" for n in names),
                      f"{1e3 * total:.2f}", f"{1e3 * row.median_s:.2f}", f"{total / row.median_s:.2f}"])
    headers = ["shape", "routing", "top_k", "backend", "scheme", *(f"{n} ms" for n in names), "sum ms",
               "call ms", "sum / call"]
    return ["## Forward stage times (--bench-stage-times)", "",
            "Each stage run alone on the previous stage's outputs (the backend's `stage_times`, medians); `call ms` "
            "is the timed forward of the same case.", "",
            tabulate(table, headers=headers, tablefmt="github", disable_numparse=True), ""]


def not_run(docs: list[dict], rows: list[ResultRow]) -> list[str]:
    """Cases without a result, with their reasons; a later file's outcome for the same case replaces an
    earlier one's, and a case that has a result in any file is not listed."""
    from tabulate import tabulate

    measured = {row.name.split("[", 1)[-1].rstrip("]") for row in rows}
    latest: dict[str, dict] = {}
    for doc in docs:
        for item in (doc.get("qmoe") or {}).get("not_run", []):
            latest[item["test"].split("[", 1)[-1].rstrip("]")] = item
    table = [[case, item["outcome"], item["reason"]] for case, item in latest.items() if case not in measured]
    if not table:
        return []
    return ["## Cases that did not produce a result", "",
            tabulate(table, headers=["case", "outcome", "reason"], tablefmt="github"), ""]


#: How each ``peak_memory_source`` a result can carry is described in the tables' column note.
MEMORY_SOURCE_TEXT = {
    "torch.cuda.max_memory_allocated": "torch.cuda.max_memory_allocated",
    "mx.get_peak_memory": "mx.get_peak_memory",
    memory.JAX_COMPILED_SOURCE: "JAX: the compiled program's footprint from XLA's memory_analysis, arguments + "
                                "outputs + temporaries - aliased, a static per-program figure, per device in "
                                "expert parallelism (XLA's runtime peak is process-wide with no reset)",
    memory.JAX_RUNTIME_SOURCE: "JAX: XLA's process-wide peak_bytes_in_use where the call raised it, else empty "
                               "(it has no reset)",
}


def _memory_sources(rows: list[ResultRow]) -> str:
    """The column note's list of sources: those the rows' figures actually came from (a run made before the
    JAX compiled analysis existed has runtime figures, and its table must say so)."""
    seen = {str(r.get("peak_memory_source")) for r in rows if r.get("peak_memory_bytes") is not None}
    texts = [text for source, text in MEMORY_SOURCE_TEXT.items() if any(s.startswith(source) for s in seen)]
    texts += sorted(s for s in seen if not any(s.startswith(source) for source in MEMORY_SOURCE_TEXT))
    return "; ".join(texts) or "no framework reported one"


def write_throughput(out_dir: Path, rows: list[ResultRow], docs: list[dict], notes: tuple[str, ...] = ()) -> Path:
    device = next((r.get("device_name") for r in rows if r.get("device_name")), "?")
    lines = [f"# Throughput: {device}", "", *_header(docs, rows), *[f"- note: {note}" for note in notes], "",
             "Columns: `vs own none` = TF/s against the same backend's unquantized `none` on the same case; "
             "`x native peer` = TF/s over the fastest native layer of its framework on the same case, run the way "
             "its users run it (torch: `torch._grouped_mm.compiled`, the layer under torch.compile, or the eager "
             "row if faster; JAX: jitted `jax.lax.ragged_dot`; MLX: `mx.gather_mm` under mx.compile or eager); "
             "`x best bf16` (at the table's dtype) = TF/s over the fastest unquantized row of any framework on "
             "the same case; `% of bound` = TF/s as a share of the GEMM-only bound of the row's operand type "
             "(`gemm_bound`: the layer's grouped GEMMs alone, torch._grouped_mm on pre-sorted, perfectly balanced "
             "rows, eager or under torch.compile, whichever is faster; `gemm_bound_int8` for rows whose routed "
             "experts run int8 x int8: the same GEMM sizes, the faster of torch._int_mm per expert (CUDA-graph "
             "captured) and torch_triton's grouped int8 kernel, quantization, scale epilogue and SwiGLU left out, "
             "so an upper bound; see "
             "suite/benchmarks/int8_bound.py; a share above 100% is marked "
             f"`{ABOVE_BOUND.strip()}`: the row beat the bound on that case, so it bounds nothing there); "
             f"`peak memory` = peak device memory of one call ({_memory_sources(rows)}), weights and inputs "
             "included; `% peak` = of the device's dense tensor-core peak for the scheme's operand type "
             "(int8 where routed experts run int8 x int8), where known.", ""]
    lines += throughput_tables(rows)
    lines += stage_times(rows)
    lines += not_run(docs, rows)
    path = out_dir / "throughput.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def write_plots(out_dir: Path, rows: list[ResultRow]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    several_dtypes = len({r.get("dtype") for r in rows if not r.get("harness_only")}) > 1
    for (shape, pass_, routing, dtype), group in _groups(rows).items():
        series = defaultdict(list)
        for row in group:
            if row.get("tflops") is not None:
                series[(row.get("backend"), row.get("scheme"), bool(row.get("peer")))].append(
                    (row.get("top_k"), row.get("tflops")))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for (backend, scheme, peer), points in sorted(series.items()):
            points.sort()
            ax.plot([k for k, _ in points], [t for _, t in points], marker="o", linestyle="--" if peer else "-",
                    label=f"{backend} · {scheme}" + (" (peer)" if peer else ""))
        ax.set_xlabel("top_k")
        ax.set_ylabel("TF/s")
        ax.set_title(f"{shape} · {pass_} · {routing} · {dtype}")
        ax.set_xticks(sorted({k for pts in series.values() for k, _ in pts}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        suffix = f"_{dtype}" if several_dtypes else ""  # one run, one dtype: the names stay as they were
        path = out_dir / f"throughput_{_slug(shape)}_{pass_}_{routing}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-")


# -- conformance.md ----------------------------------------------------------------------------------------------
_LEVEL_FILE = re.compile(r"test_level(\d)_(\w+)\.py")


def parse_nodeid(nodeid: str) -> dict:
    """level (from the file), backend, scheme, dtype (from the test id ``backend-scheme-case-dtype``)."""
    path, _, rest = nodeid.partition("::")
    match = _LEVEL_FILE.search(path)
    if match:
        level = f"L{match.group(1)} {match.group(2).replace('_', ' ')}"
    else:
        level = Path(path).stem.removeprefix("test_").replace("_", " ")
    param = rest.split("[", 1)[1].rstrip("]") if "[" in rest else ""
    backend, scheme, dtype = param or None, None, None
    for name in sorted(SCHEMES, key=len, reverse=True):
        marker = f"-{name}-"
        if marker in f"{param}-":
            backend, _, tail = f"{param}-".partition(marker)
            scheme = name
            tail = tail.rstrip("-")
            dtype = tail.rsplit("-", 1)[-1] if tail.rsplit("-", 1)[-1] in ("float32", "bfloat16") else None
            break
    if backend and not scheme and "-" in backend:
        backend = backend.split("-", 1)[0]
    return {"level": level, "backend": backend or "(reference)", "scheme": scheme, "dtype": dtype}


def write_conformance(out_dir: Path, path: Path | None) -> Path:
    from tabulate import tabulate

    target = out_dir / "conformance.md"
    if path is None or not Path(path).exists():
        target.write_text("# Conformance\n\nNo conformance outcomes were given: run `pytest -m conformance "
                          "--conformance-json PATH` and pass `--conformance-json PATH` to the report.\n")
        return target
    data = json.loads(Path(path).read_text())
    tests = data.get("tests", [])
    parsed = [parse_nodeid(test["nodeid"]) for test in tests]
    # A backend is a registered name, or one the conformance suite (suite/) ran with a scheme; any other
    # parameter id (a case of the project's own self-tests in tests/) is not a backend.
    known = set(_registered_backends()) | {meta["backend"] for test, meta in zip(tests, parsed)
                                           if meta["scheme"] and not test["nodeid"].startswith("tests/")}
    for test, meta in zip(tests, parsed):
        if meta["backend"] not in known:
            meta["backend"] = "(self-tests)" if test["nodeid"].startswith("tests/") else "(reference)"
    # files from before "finished" was recorded: the file's mtime, which a checkout resets
    written = (datetime.datetime.fromisoformat(data["finished"]) if "finished" in data
               else datetime.datetime.fromtimestamp(Path(path).stat().st_mtime, datetime.timezone.utc))
    command = data.get("command", "pytest -m conformance --conformance-json")
    counts: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    reasons: dict[tuple, int] = defaultdict(int)
    failures = []
    fidelity: dict[tuple, dict[str, float]] = defaultdict(dict)
    levels, backends = [], []
    for test, meta in zip(tests, parsed):
        key = (meta["backend"], meta["level"])
        counts[key][test["outcome"]] += 1
        for collection, value in ((levels, meta["level"]), (backends, meta["backend"])):
            if value not in collection:
                collection.append(value)
        if test["outcome"] == "skipped":
            reasons[(meta["backend"], meta["level"], test.get("reason") or "")] += 1
        elif test["outcome"] == "failed":
            failures.append([test["nodeid"], test.get("message") or ""])
        for figure in test.get("figures", []):
            what = figure.get("what", "")
            if what.endswith(" vs float") and figure.get("sqnr_db") is not None and meta["scheme"]:
                kind = _fidelity_kind(what)
                slot = fidelity[(meta["backend"], meta["scheme"], meta["dtype"] or "")]
                slot[kind] = min(slot.get(kind, math.inf), float(figure["sqnr_db"]))

    def cell(backend, level):
        c = counts.get((backend, level))
        if not c:
            return ""
        parts = [f"{c[o]} {label}" for o, label in (("passed", "pass"), ("failed", "FAIL"), ("skipped", "skip"))
                 if c.get(o)]
        return ", ".join(parts)

    total = defaultdict(int)
    for c in counts.values():
        for outcome, n in c.items():
            total[outcome] += n
    lines = ["# Conformance", "",
             f"- source: `{path}` (written {written:%Y-%m-%d %H:%M} UTC by `{command}`)",
             f"- outcomes: {total.get('passed', 0)} passed, {total.get('failed', 0)} failed, "
             f"{total.get('skipped', 0)} skipped", "",
             "## Backend x level", "",
             tabulate([[b, *[cell(b, lv) for lv in levels]] for b in backends], headers=["backend", *levels],
                      tablefmt="github"), ""]
    if fidelity:
        kinds = ["y", "dx", "router", "weights"]
        table = [[b, s, d, *[fmt(v.get(k), ".1f") for k in kinds]] for (b, s, d), v in sorted(fidelity.items())]
        lines += ["## Fidelity against the float reference (worst case, SQNR dB)", "",
                  tabulate(table, headers=["backend", "scheme", "dtype", "y", "dx", "router grad", "weight grads"],
                           tablefmt="github", disable_numparse=True), ""]
    if failures:
        lines += ["## Failures", "", tabulate(failures, headers=["test", "message"], tablefmt="github"), ""]
    if reasons:
        table = [[b, lv, r, n] for (b, lv, r), n in sorted(reasons.items())]
        lines += ["## Skips and their reasons", "",
                  tabulate(table, headers=["backend", "level", "reason", "tests"], tablefmt="github"), ""]
    target.write_text("\n".join(lines).rstrip() + "\n")
    return target


def _registered_backends() -> list[str]:
    try:
        from qmoe.implementations.registry import backend_names

        return backend_names()
    except Exception:  # the report must render without the registry's entry points
        return []


def _fidelity_kind(what: str) -> str:
    name = what.removesuffix(" vs float")
    if name.startswith("forward.y") or name == "y":
        return "y"
    if name.endswith(".x"):
        return "dx"
    if name.endswith(".router"):
        return "router"
    return "weights"


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmoe.suite.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark-json", action="append", type=Path, default=[], metavar="PATH",
                        help="pytest-benchmark JSON, or --bench-jsonl lines (repeatable; default: the newest "
                             "under .benchmarks/)")
    parser.add_argument("--conformance-json", type=Path, default=None, metavar="PATH",
                        help="outcomes written by `pytest -m conformance --conformance-json PATH`")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: results/<device>, e.g. results/cpu, results/h100)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--note", action="append", default=[], help="a line for the header (repeatable)")
    args = parser.parse_args(argv)

    paths = args.benchmark_json or [newest_benchmark_json()]
    rows, docs = load_benchmarks(paths)
    from qmoe.suite.benchmarks import ep_tables  # expert-parallel results: their own tables

    if not rows and not ep_tables.entries(docs):
        raise SystemExit(f"no qmoe benchmark results in {', '.join(map(str, paths))}")
    out_dir = args.out or Path("results") / device_slug(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_throughput(out_dir, rows, docs, tuple(args.note))] if rows else []
    if ep_tables.entries(docs):
        written.append(ep_tables.write_expert_parallel(out_dir, docs, tuple(args.note)))
    if args.conformance_json is not None:
        written.append(write_conformance(out_dir, args.conformance_json))
    if not args.no_plots and rows:
        written += write_plots(out_dir, rows)
    raw = out_dir / "benchmarks.json"
    inside = all(out_dir.resolve() in Path(p).resolve().parents for p in paths)
    if inside:
        pass  # the raw JSON already lies in the output directory
    elif len(paths) == 1:
        shutil.copyfile(paths[0], raw)
        written.append(raw)
    else:
        raw.write_text(json.dumps([{k: v for k, v in d.items() if k != "_path"} for d in docs], indent=1))
        written.append(raw)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
