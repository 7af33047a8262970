"""``expert_parallel.md``: the expert-parallel benchmark's results, rendered from its pytest-benchmark JSON.

`qmoe.suite.report` calls `write_expert_parallel` when a file holds entries of
`qmoe.suite.benchmarks.expert_parallel` (``extra_info.kind == "expert_parallel"``). Every figure comes from
``extra_info`` (see that module's docstring for what each one measures):

* layer time: the sharded layer (slowest rank, float dispatch) and the same layer on one device on the same
  global batch, tokens/s of each, the speed-up, and the sharded output's distance from the one-device one;
* stage times per rank (process-group backends: route, dispatch, experts, combine, backward; jax_prequant:
  its forward's separately timed stage programs, one figure per stage for all devices), float and int8
  dispatch;
* all-to-all: bytes each rank sends to the other ranks, the dispatch's achieved GB/s against a plain
  all-to-all of the same size in the same processes;
* int8 dispatch: its saving in bytes, dispatch seconds and layer seconds (negative: slower), and its check;
* the cases of the run's grid (every combination of the axes seen in the file) without a result, with the
  outcome the file records or, where it records none, that the run ended before them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from .tables import fmt, fmt_pct, fmt_si

KIND = "expert_parallel"
#: The axes of a measurement, in the order of its id.
AXES = ("ep_backend", "scheme", "top_k", "pass_name", "ep_size", "routing")


def entries(docs: list[dict]) -> list[dict]:
    """The expert-parallel benchmarks of every file (a later file's result for the same case stands)."""
    latest: dict[str, dict] = {}
    for doc in docs:
        for bench in doc.get("benchmarks", []):
            if (bench.get("extra_info") or {}).get("kind") == KIND:
                latest[bench.get("name", "")] = bench
    return list(latest.values())


def _key(info: dict) -> tuple:
    return tuple(info.get(axis) for axis in AXES)


def _label(info: dict) -> list:
    return [info["ep_backend"], info["scheme"], info["top_k"], info["pass_name"].replace("forward_backward", "fwd+bwd"),
            info["ep_size"], info["routing"]]


LABEL_HEADERS = ["backend", "scheme", "top-k", "pass", "N", "routing"]


def _ms(seconds) -> str:
    return fmt(None if seconds is None else 1e3 * seconds, ".2f")


def _gb(value) -> str:
    return fmt(None if value is None else value / 1e9, ".1f")


def layer_table(infos: list[dict]) -> list[list]:
    table = []
    for info in infos:
        sharded, one = info["float"], info["one_device"]
        undecided = sharded.get("routing_undecided_tokens")
        table.append([*_label(info), _ms(sharded["seconds_median"]), fmt_si(sharded["tokens_per_s"]),
                      _ms(one["seconds_median"]), fmt_si(one["tokens_per_s"]),
                      "one device: out of memory" if info["speedup_vs_one_device"] is None
                      else fmt(info["speedup_vs_one_device"], ".2f") + "x",
                      fmt(sharded.get("output_error_vs_one_device"), ".1e"),
                      "" if undecided is None else str(undecided)])
    return table


def stage_table(infos: list[dict]) -> tuple[list[str], list[list]]:
    """Median ms per stage, ``rank 0 / rank 1 / ...``, for entries that record stages."""
    stages: list[str] = []
    for info in infos:
        for name in (info["float"].get("stage_seconds_per_rank") or {}):
            if name not in stages:
                stages.append(name)
    table = []
    for info in infos:
        for dispatch in ("float", "int8"):
            per_rank = (info.get(dispatch) or {}).get("stage_seconds_per_rank")
            if not per_rank:
                continue
            cells = [" / ".join(_ms(s) for s in per_rank[name]) if name in per_rank else "" for name in stages]
            table.append([*_label(info), dispatch, *cells, _ms(info[dispatch]["seconds_median"])])
    return [*LABEL_HEADERS, "dispatch", *stages, "layer (slowest rank)"], table


def exchange_table(infos: list[dict]) -> list[list]:
    table = []
    for info in infos:
        sharded, plain = info["float"], info["plain_all_to_all"]
        rows = (sharded.get("sent_bytes_per_rank") or {}).get("dispatch_rows")
        dispatch_off = max(off for off, _ in rows) if rows else None
        n = info["ep_size"]
        plain_off = plain["bytes_per_rank"] * (n - 1) / n
        ratio = (sharded["dispatch_gb_per_s"] / plain["gb_per_s"]
                 if sharded.get("dispatch_gb_per_s") and plain.get("gb_per_s") else None)
        table.append([*_label(info), fmt(None if dispatch_off is None else dispatch_off / 1e6, ".0f"),
                      fmt(sharded["all_to_all_bytes_off_rank"] / 1e6, ".0f"),
                      fmt(sharded.get("dispatch_gb_per_s"), ".0f"), fmt(plain_off / 1e6, ".0f"),
                      _ms(plain["seconds_median"]), fmt(plain.get("gb_per_s"), ".0f"),
                      fmt(ratio, ".2f")])
    return table


def int8_table(infos: list[dict]) -> list[list]:
    table = []
    for info in infos:
        saving, check = info.get("int8_dispatch_saving"), info.get("int8_check") or {}
        if not saving:
            continue
        if check.get("int8_dispatch_check") == "tight":
            verdict = f"tight: {fmt(check['int8_dispatch_error'], '.1e')} <= {check['int8_dispatch_bound']:g}"
        else:
            verdict = (f"SQNR {fmt(check.get('int8_dispatch_sqnr_db'), '.1f')} dB >= "
                       f"{fmt(check.get('int8_dispatch_floor_db'), '.1f')}")
        table.append([*_label(info), fmt(info["float"]["all_to_all_bytes_off_rank"] / 1e6, ".0f"),
                      fmt(info["int8"]["all_to_all_bytes_off_rank"] / 1e6, ".0f"), fmt_pct(saving["bytes"]),
                      fmt(info["float"].get("dispatch_gb_per_s"), ".0f"),
                      fmt(info["int8"].get("dispatch_gb_per_s"), ".0f"),
                      fmt_pct(saving["dispatch_seconds"]), fmt_pct(saving["layer_seconds"]), verdict])
    return table


def missing(docs: list[dict], infos: list[dict]) -> list[list]:
    """Cases of the run's grid without a result: the file's own record of them, else "not reached"."""
    recorded: dict[str, dict] = {}
    for doc in docs:
        for item in (doc.get("qmoe") or {}).get("not_run", []):
            recorded[item["test"].split("[", 1)[-1].rstrip("]")] = item
    measured = {_key(info) for info in infos}
    values = [sorted({info[axis] for info in infos}, key=str) for axis in AXES]
    shape = infos[0]["shape_shape"] if infos else ""
    table = []
    for combo in itertools.product(*values):
        if combo in measured:
            continue
        backend, scheme, top_k, pass_, n, routing = combo
        case = f"{backend}-{scheme}-top{top_k}-{shape}-{pass_}-ep{n}-{routing}"
        item = recorded.get(case)
        table.append([case, item["outcome"] if item else "no result",
                      item["reason"] if item else "not in the file: the run ended (or was stopped) before it"])
    return table


def _section(title: str, prose: str | None, rows: list, headers: list[str], numparse: bool = False) -> list[str]:
    """Markdown lines of one section: its heading, what its columns mean, its table."""
    from tabulate import tabulate

    return [f"## {title}", "", *([prose, ""] if prose else []),
            tabulate(rows, headers=headers, tablefmt="github", disable_numparse=not numparse), ""]


def render(docs: list[dict], notes: tuple[str, ...] = ()) -> str:
    infos = sorted((b["extra_info"] for b in entries(docs)), key=lambda i: [str(v) for v in _key(i)])
    if not infos:
        return "# Expert parallel\n\nNo expert-parallel results in the given files.\n"
    first = infos[0]
    lines = [f"# Expert parallel: {first['shape_shape']} (T {first['shape_tokens']}, H {first['shape_hidden']}, "
             f"F {first['shape_ffn']}, E {first['shape_experts']}, shared {first['shape_shared_ffn']}), "
             f"{first['dtype']}", ""]
    for doc in docs:
        q = doc.get("qmoe") or {}
        lines += [f"- command: `{q.get('command', '(not recorded)')}`",
                  f"- date: {q.get('date_utc') or doc.get('datetime', '?')}; device: {q.get('device', '?')}",
                  f"- source: `{doc.get('_path', '?')}`"]
    lines += [*(f"- note: {note}" for note in notes), "",
              "Generated by `qmoe-report` (suite/benchmarks/ep_tables.py) from the JSON's `extra_info`; what each "
              "figure measures: suite/benchmarks/expert_parallel.py.", ""]
    lines += _section(
        "Layer time: sharded over N devices vs one device",
        "Sharded: median over rounds of the slowest rank's time (float dispatch); one device: the same layer "
        "on the whole global batch on one device. `error vs one` = worst relative row error of the sharded "
        "output against the one-device output over the checked routing-decided rows; `undecided` = tokens "
        "whose top-k boundary lies within float32 router rounding, left out of that bound (blank: not "
        "recorded by this run's code).",
        layer_table(infos), [*LABEL_HEADERS, "sharded ms", "tokens/s", "one device ms", "tokens/s (one)", "speed-up",
                             "error vs one", "undecided"])
    headers, stages = stage_table(infos)
    if stages:
        lines += _section(
            "Stage times per rank (ms, median over rounds; rank 0 / rank 1)",
            "`dispatch` = counts exchange + row all-to-all; `combine` = reverse all-to-all + gate-weighted "
            "sum (it includes waiting for the slower rank's experts); `backward` = the whole backward with "
            "both reverse exchanges. jax_prequant (one figure per stage, all devices together: the slowest "
            "device): its forward cut at its all-to-alls into separately jitted programs over the same mesh "
            "(route + the dispatch's placement and payload at the source, dispatch, experts, combine + the "
            "shared expert's output, shared), each timed alone; the layer column stays the one fused "
            "program, which the stages' sum exceeds by their launches and materialized intermediates "
            "(forward stages only, no backward split).",
            stages, headers)
    lines += _section(
        "All-to-all: bytes and achieved bandwidth (float dispatch)",
        "`dispatch MB` = the largest off-rank dispatch-row bytes of a rank; `exchanged MB` = off-rank bytes "
        "of the forward's exchanges (dispatch rows + metadata + combine; jax_prequant: the all-to-all "
        "operands of its compiled program, the backward's included in fwd+bwd rows), all ranks (torch: "
        "the backward's not counted); `dispatch GB/s` = off-rank dispatch "
        "bytes per rank over the slowest rank's dispatch time; the plain all-to-all sends the dispatch's "
        "bytes in equal blocks (off-rank MB per rank shown) in the same processes; `ratio` = dispatch "
        "GB/s / plain GB/s.",
        exchange_table(infos), [*LABEL_HEADERS, "dispatch MB", "exchanged MB", "dispatch GB/s", "plain MB",
                                "plain ms", "plain GB/s", "ratio"])
    int8 = int8_table(infos)
    if int8:
        lines += _section(
            "Int8 dispatch (rows sent as int8 codes + a float32 scale)",
            "Savings are 1 - int8 / float: bytes of the forward's exchanges (dispatch rows + metadata + "
            "combine, all ranks; torch's backward exchanges are not counted, jax_prequant's are), the dispatch "
            "stage's time (slowest rank), the layer's time; negative = int8 dispatch is slower. Check: "
            "under schemes that quantize routed activations per token the output must equal float "
            "dispatch's (tight); otherwise an SQNR floor.",
            int8, [*LABEL_HEADERS, "float MB", "int8 MB", "bytes saved", "float GB/s", "int8 GB/s",
                   "dispatch time saved", "layer time saved", "check"])
    gaps = missing(docs, infos)
    if gaps:
        lines += _section("Cases of the run's grid without a result", None, gaps, ["case", "outcome", "reason"],
                          numparse=True)
    return "\n".join(lines).rstrip() + "\n"


def write_expert_parallel(out_dir: Path, docs: list[dict], notes: tuple[str, ...] = ()) -> Path:
    path = Path(out_dir) / "expert_parallel.md"
    path.write_text(render(docs, notes))
    return path
