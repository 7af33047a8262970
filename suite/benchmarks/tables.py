"""Results as rows: from pytest-benchmark's JSON (saved runs) or live results, with the derived
columns (delta vs the backend's ``none``, ratio to the framework's strongest native peer, ratio to the
fastest float row of any framework, share of the GEMM bound, harness overhead).

Used by the terminal table (`terminal_rows`, drawn with tabulate) and by `qmoe.suite.report`; nothing
here imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .timing import overhead_share

#: Rows that did the same work: only they are compared (delta vs none, ratio to the peer).
WORK_KEY = ("shape", "tokens", "hidden", "ffn", "experts", "shared_ffn", "top_k", "pass", "routing", "dtype",
            "device_name")


@dataclass
class ResultRow:
    """One benchmark result, flattened."""

    name: str
    info: dict
    median_s: float
    mean_s: float
    derived: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return self.info.get(key, default)

    @property
    def work(self) -> tuple:
        return tuple(self.info.get(k) for k in WORK_KEY)


def rows_from_json(benchmarks: list[dict]) -> list[ResultRow]:
    """ResultRows from the ``benchmarks`` list of a pytest-benchmark JSON file (qmoe results only). A result
    without ``output_check`` failed its check (pytest-benchmark saves the timings of a test that then
    failed): it is no result, so neither a row nor anyone's bound, peer or fastest case (the H200 run's
    gemm_bound_int8 forward rows, whose replays read freed memory)."""
    rows = []
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        if "backend" not in info or ("output_check" not in info and not info.get("harness_only")):
            continue
        stats = bench.get("stats") or {}
        rows.append(ResultRow(bench.get("name", ""), info, float(stats.get("median", math.nan)),
                              float(stats.get("mean", math.nan))))
    return derive(rows)


def rows_from_session(results) -> list[ResultRow]:
    """ResultRows from pytest-benchmark's live `Metadata` objects."""
    rows = [ResultRow(b.name, dict(b.extra_info), float(b.stats.median), float(b.stats.mean)) for b in results]
    return derive(rows)


def _fastest(rows) -> ResultRow | None:
    return max(rows, key=lambda r: r.get("tflops"), default=None)


def derive(rows: list[ResultRow]) -> list[ResultRow]:
    """Fill ``derived`` (all on the same work: shape, top_k, pass, routing, dtype, device):

    * delta_vs_none: TF/s vs the same backend's ``none``;
    * peer, x_peer: TF/s over the fastest native peer of the row's framework (compiled or eager: the
      strongest the framework offers on this case);
    * best, x_best: TF/s over the fastest unquantized (``none``) row of any backend or peer of any framework
      (the bounds excluded): what the row gains over the best float layer in the run (the tables' ``x best
      bf16``, at the run's dtype);
    * bound, x_bound: TF/s over the GEMM bound of the row's operand type (its `metrics.peak_operand`: the
      int8 bound for rows whose routed experts run int8 x int8, the float bound otherwise), shown as
      ``% of bound``; a bound row without ``bound_operand`` (older runs) bounds every row;
    * overhead_pct: the do-nothing backend vs the fastest real case."""
    by_work: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        by_work.setdefault(row.work, []).append(row)
    for row in rows:
        same = by_work[row.work]
        tf = row.get("tflops")
        if tf is None or row.get("harness_only"):
            continue
        base = next((r for r in same if r.get("backend") == row.get("backend") and r.get("scheme") == "none"
                     and r.get("tflops")), None)
        if base is not None and row.get("scheme") != "none":
            row.derived["delta_vs_none"] = tf / base.get("tflops") - 1.0
        if not row.get("peer") and row.get("framework"):
            peer = _fastest([r for r in same if r.get("peer") and not r.get("bound")
                             and r.get("framework") == row.get("framework") and r.get("tflops")])
            if peer is not None:
                row.derived["peer"] = peer.get("backend")
                row.derived["x_peer"] = tf / peer.get("tflops")
        if row.get("bound"):
            continue
        best = _fastest([r for r in same if r.get("scheme") == "none" and not r.get("bound")
                         and not r.get("harness_only") and r.get("tflops")])
        if best is not None:
            row.derived["best"] = best.get("backend")
            row.derived["x_best"] = tf / best.get("tflops")
        operand = row.get("peak_operand")
        bound = _fastest([r for r in same if r.get("bound") and r.get("tflops")
                          and r.get("bound_operand", operand) == operand])
        if bound is not None:
            row.derived["bound"] = bound.get("backend")
            row.derived["x_bound"] = tf / bound.get("tflops")
    for ratio, noop, _ in overhead_ratios(rows):
        noop.derived["overhead_pct"] = 100.0 * ratio
    return rows


def _calls(row: ResultRow) -> int:
    """Calls per timed round (extra_info ``calls_per_round``; rows of older runs: one)."""
    return int(row.get("calls_per_round") or 1)


def overhead_ratios(rows: list[ResultRow]) -> list[tuple[float, ResultRow, ResultRow]]:
    """Per timing mode (extra_info ``timing``: stream-ordered or synchronized CUDA events, host clock; rows
    of older runs have none and form one mode): (the harness's share of one call of the row it weighs on
    most, the do-nothing row, that row). The harness costs a round what the do-nothing row's round took
    and a row pays it once per round (`timing.overhead_share`); with one call per round everywhere, that
    row is the fastest case and the share the ratio of the medians. A mode without both kinds of row is
    left out."""
    out = []
    for mode in sorted({r.get("timing") for r in rows if r.get("harness_only")}, key=str):
        noop = [r for r in rows if r.get("harness_only") and r.get("timing") == mode and math.isfinite(r.median_s)]
        real = [r for r in rows if not r.get("harness_only") and r.get("timing") == mode
                and math.isfinite(r.median_s)]
        if noop and real:
            costliest = max(noop, key=lambda r: r.median_s * _calls(r))  # several runs: the least favourable

            def share(row: ResultRow, noop_row: ResultRow = costliest) -> float:
                return overhead_share(noop_row.median_s, _calls(noop_row), row.median_s, _calls(row))

            worst = max(real, key=share)
            out.append((share(worst), costliest, worst))
    return out


def overhead_line(ratio: float, noop: ResultRow, fastest: ResultRow, label: str) -> str:
    """One harness-overhead sentence (terminal and report)."""
    mode = noop.get("timing")
    noop_calls, row_calls = _calls(noop), _calls(fastest)
    if noop_calls == 1 and row_calls == 1:
        return (f"harness overhead{f' ({mode} timing)' if mode else ''}: the do-nothing backend's timed call "
                f"{noop.median_s * 1e6:.2f} us = {100 * ratio:.3f}% of the fastest{' such' if mode else ''} case "
                f"({label}, {fastest.median_s * 1e6:.1f} us)")
    return (f"harness overhead{f' ({mode} timing)' if mode else ''}: the do-nothing backend's timed round "
            f"{noop.median_s * noop_calls * 1e6:.2f} us ({noop_calls} calls), paid once per round = "
            f"{100 * ratio:.3f}% of a call of the case it weighs on most ({label}, "
            f"{fastest.median_s * 1e6:.1f} us, {row_calls} call{'s' if row_calls > 1 else ''} per round)")


def fmt(value, spec: str = ".1f", missing: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def fmt_si(value) -> str:
    """1234567 -> '1.23M' (tokens/s)."""
    if value is None or not math.isfinite(value):
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def fmt_pct(value) -> str:
    return "" if value is None else f"{100 * value:+.1f}%"


#: Marks a ``% of bound`` above 100%: the row beat its bound, so the bound is not one on that case.
ABOVE_BOUND = " (above bound!)"


def fmt_share(value) -> str:
    """A ratio as a share: 0.734 -> '73.4%' (``% of bound``); above 1 flagged: 1.012 -> '101.2% (above bound!)'."""
    if value is None or not math.isfinite(value):
        return ""
    return f"{100 * value:.1f}%" + (ABOVE_BOUND if value > 1.0 else "")


def fmt_bytes(value) -> str:
    """Peak memory: 3.5e9 -> '3.26 GiB', 2e6 -> '1.9 MiB'; empty where the framework could not say. A JAX
    row's is its compiled program's footprint (``peak_memory_source``, `memory.JAX_COMPILED_SOURCE`)."""
    if value is None:
        return ""
    if value >= 2 ** 30:
        return f"{value / 2 ** 30:.2f} GiB"
    return f"{value / 2 ** 20:.1f} MiB"


def best_label(rows: list[ResultRow]) -> str:
    """The ``x best`` column's header: ``x best bf16`` at bfloat16 (the issue's name), else the dtype's."""
    dtypes = {r.get("dtype") for r in rows if r.get("dtype")}
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    return "x best " + "/".join(sorted(short.get(d, str(d)) for d in dtypes)) if dtypes else "x best"


#: The qmoe terminal table's columns: (header, alignment).
TERMINAL_COLUMNS = (("benchmark", "left"), ("median", "right"), ("TF/s", "right"), ("tok/s", "right"),
                    ("GB/s", "right"), ("%peak", "right"), ("vs none", "right"), ("x peer", "right"),
                    ("x best", "right"), ("% bound", "right"), ("peak mem", "right"), ("check", "right"),
                    ("vs saved", "right"))


def terminal_rows(results, compared_mapping: dict) -> list[str]:
    """Lines of the qmoe terminal table for live results (with the saved mean where compared)."""
    from tabulate import tabulate

    rows = rows_from_session(results)
    saved = {}
    for by_name in compared_mapping.values():
        for fullname, bench in by_name.items():
            saved[fullname] = bench.get("stats", {}).get("mean")
    fullnames = {b.name: b.fullname for b in results}
    table = []
    for row in rows:
        check = (row.get("output_check") or {}).get("min_sqnr_db")
        old = saved.get(fullnames.get(row.name))
        versus = f"{100 * (row.mean_s / old - 1):+.1f}%" if old else ""
        table.append([row.name.split("[", 1)[-1].rstrip("]"), f"{row.median_s * 1e3:.3f}ms",
                      fmt(row.get("tflops"), ".3f"), fmt_si(row.get("tokens_per_s")), fmt(row.get("gb_per_s"), ".1f"),
                      fmt(row.get("pct_peak"), ".1f"), fmt_pct(row.derived.get("delta_vs_none")),
                      fmt(row.derived.get("x_peer"), ".2f"), fmt(row.derived.get("x_best"), ".2f"),
                      fmt_share(row.derived.get("x_bound")), fmt_bytes(row.get("peak_memory_bytes")),
                      fmt(check, ".1f"), versus])
    lines = tabulate(table, headers=[name for name, _ in TERMINAL_COLUMNS], tablefmt="simple",
                     colalign=[align for _, align in TERMINAL_COLUMNS], disable_numparse=True).splitlines()
    for ratio, noop, fastest in overhead_ratios(rows):
        lines.append(overhead_line(ratio, noop, fastest, fastest.name.split('[', 1)[-1].rstrip(']')))
    return lines
