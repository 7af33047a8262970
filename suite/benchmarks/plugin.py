"""pytest hooks of the benchmarks: options, deselection, run metadata, safe comparison, terminal table.

Load it beside the suite's plugin (root ``conftest.py``: ``pytest_plugins = ["qmoe.suite.plugin",
"qmoe.suite.benchmarks.plugin"]``, or ``-p qmoe.suite.benchmarks.plugin``).

* Deselection: qmoe's tests marked ``benchmark`` run only when asked for: ``-m benchmark`` (or any ``-m``
  expression naming ``benchmark`` positively), or pytest-benchmark's own flags (`BENCHMARK_FLAGS`:
  ``--benchmark-only``, ``--benchmark-json=PATH``, ``--benchmark-autosave``, ``--benchmark-save``,
  ``--benchmark-compare``, ``--benchmark-compare-fail``). Those flags without ``-m`` select the benchmarks
  alone (every test not marked ``benchmark`` is deselected, as ``--benchmark-only`` skips them), so
  ``pytest --benchmark-compare`` runs the throughput suite and nothing else. ``--benchmark-skip``
  deselects them. Otherwise they are deselected at collection and the summary says why, so ``pytest``,
  ``pytest tests`` and ``pytest -m conformance`` stay fast.
* Run metadata: ``machine_info["qmoe"]`` (device name, preset, dtype) and ``qmoe`` in the saved JSON
  (command, UTC date, device) for the report's header.
* Comparison (``--benchmark-compare``): pytest-benchmark compares saved and current results by test
  name. A saved run from another device is refused as a whole (its benchmarks are dropped from the
  comparison, with a warning naming both devices); a saved result whose shape, dtype or routing
  differs under the same name is dropped alone, and the summary lists each refusal. Nothing is ever
  compared silently across devices or shapes, and ``--benchmark-compare-fail`` only judges what was
  compared.
* Terminal table: pytest-benchmark shows times only; after its table a qmoe table (tabulate) gives
  TF/s, tokens/s, GB/s, % of peak, the ratios to the native peer and to the GEMM bound and the output
  check beside the median time of every result, and the harness overhead when the do-nothing backend ran.
* Threads (``--bench-threads N``): the environment variables frameworks read when they load, and
  threadpoolctl's limit on every BLAS/OpenMP pool already loaded (at configure and before each benchmark).
* One GPU, several frameworks (``--device cuda``/``gpu``): ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set at
  configure, before any framework loads, unless the environment sets it (JAX would otherwise take 75% of the
  device at first use, and torch's cases would run out of memory beside it); JAX's cases run after the
  others of a shape, since its pool, once grown, is never given back (`share_gpu_with_jax`, `bench_grid`).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import time

import pytest

from . import harness, shapes, timing, workload
from .metrics import PASSES

_REFUSALS = pytest.StashKey[list]()
_NOT_RUN = pytest.StashKey[list]()
_DESELECTED = pytest.StashKey[int]()
_OTHERS_DESELECTED = pytest.StashKey[int]()
_BENCH_MARK = "benchmark"
#: extra_info keys that must agree for two results to be compared.
SIGNATURE = ("shape", "tokens", "hidden", "ffn", "experts", "shared_ffn", "router", "top_k", "pass", "routing",
             "dtype", "scheme", "backend", "device_name")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qmoe-bench", "qmoe benchmarks (pytest -m benchmark)")
    group.addoption("--bench-shape", default=shapes.DEFAULT_PRESET, metavar="PRESET",
                    help=f"shape preset: {', '.join(shapes.PRESETS)} (default {shapes.DEFAULT_PRESET})")
    group.addoption("--bench-top-k", default=None, metavar="K,K",
                    help="only these top-k values of the preset's sweep (comma-separated)")
    group.addoption("--bench-pass", default=None, metavar="PASS",
                    help=f"only these passes: {', '.join(PASSES)} (comma-separated; default both)")
    group.addoption("--bench-routing", default=None, metavar="PATTERN",
                    help=f"only these routing patterns: {', '.join(workload.ROUTINGS)} (default both)")
    group.addoption("--bench-scheme", default=None, metavar="SCHEME",
                    help="only these schemes (comma-separated; default every scheme a backend declares); the native "
                         "peers' none cases stay, as every ratio is to them (--bench-no-peers drops them)")
    group.addoption("--bench-dtype", default=None, help="compute dtype (default: float32 on cpu, bfloat16 on GPUs)")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark (default 5)")
    group.addoption("--bench-warmup", type=int, default=1,
                    help="warm-up rounds (default 1; at least one per distinct input is always run)")
    group.addoption("--bench-warmup-s", type=float, default=0.05, metavar="SECONDS",
                    help="untimed calls for at least this long before the warm-up rounds (default 0.05)")
    group.addoption("--bench-round-s", type=float, default=timing.TARGET_ROUND_S, metavar="SECONDS",
                    help="target length of a synchronized round: a step that can enqueue calls without waiting "
                         "(JAX's) runs ceil(this / call) of them per round and waits once (default %(default)s)")
    group.addoption("--bench-min-time-s", type=float, default=0.1, metavar="SECONDS",
                    help="more timed rounds for short calls, until they add up to this (default 0.1; at most "
                         f"{harness.MAX_ROUNDS} rounds; --bench-rounds stays the least)")
    group.addoption("--bench-inputs", type=int, default=2,
                    help="distinct inputs the rounds rotate through (default 2)")
    group.addoption("--bench-check-rows", type=int, default=32,
                    help="token rows of each timed output checked against the reference (default 32)")
    group.addoption("--bench-stage-times", action="store_true",
                    help="also record stage times of backends that offer stage_times() (forward only)")
    group.addoption("--bench-no-peers", action="store_true",
                    help="do not add the native peers (torch._grouped_mm compiled and eager, jax.lax.ragged_dot, "
                         "mx.gather_mm compiled and eager) nor the GEMM bounds (gemm_bound, gemm_bound_int8: the "
                         "layer's grouped GEMMs alone)")
    group.addoption("--bench-max-call-s", type=float, default=None, metavar="SECONDS",
                    help="skip a case (with its measured time as the reason) whose first call takes longer "
                         f"(default: {shapes.PRESET_CALL_BUDGET_S} per preset, else none; 0 = no limit)")
    group.addoption("--bench-session-budget-s", type=float, default=None, metavar="SECONDS",
                    help="skip (with that reason) the benchmarks that would start after this many seconds of the "
                         "session, so a run under a wall-clock limit still ends normally and saves its results")
    group.addoption("--bench-jsonl", default=None, metavar="PATH",
                    help="also append every result to PATH as it finishes (one JSON object per line, the "
                         "benchmark entries of pytest-benchmark's JSON): partial results survive a killed run; "
                         f"default with --benchmark-json=JSON: JSON{PARTIAL_SUFFIX}, removed once JSON is written")
    group.addoption("--bench-cuda-graph", action="store_true",
                    help="capture each step in a CUDA graph before timing where it can be captured (static "
                         "shapes, no host synchronization); the table header and each result say which were")
    group.addoption("--bench-threads", type=int, default=None, metavar="N",
                    help="CPU threads per framework: OMP/MKL/OpenBLAS/XLA environment set before any framework "
                         "loads, and every BLAS/OpenMP pool already loaded limited (threadpoolctl) before each "
                         "benchmark; on a shared machine 1 avoids oversubscribed thread pools "
                         "(default: the frameworks' own)")


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


#: Where results stream when only --benchmark-json names a file: pytest-benchmark writes that file at the
#: session's end, so a run killed before (a device call's time limit, a hung kernel) would keep nothing.
PARTIAL_SUFFIX = ".partial.jsonl"


def jsonl_path(config: pytest.Config) -> str | None:
    """--bench-jsonl, else --benchmark-json's partial file in a qmoe run (another project's benchmarks in a
    session where qmoe is only installed get no file of ours), else None."""
    explicit = config.getoption("--bench-jsonl")
    if explicit:
        return explicit
    if not _active(config):
        return None
    json_path = config.getoption("benchmark_json", None)
    if hasattr(json_path, "write"):  # pytest-benchmark versions that open the file as they parse the option
        json_path = json_path.name
    return f"{os.fspath(json_path)}{PARTIAL_SUFFIX}" if json_path else None


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove --benchmark-json's partial file once the JSON holds the run (it then has every result)."""
    if config.getoption("--bench-jsonl", None):
        return
    partial = jsonl_path(config)
    if not partial or not os.path.exists(partial):
        return
    json_path = partial.removesuffix(PARTIAL_SUFFIX)
    try:
        with open(json_path) as fh:
            complete = "benchmarks" in json.load(fh)
    except (OSError, ValueError):
        complete = False
    if complete:
        os.remove(partial)


@pytest.hookimpl(tryfirst=True)  # before the suite's plugin imports any framework (thread settings)
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REFUSALS] = []
    config.stash[_NOT_RUN] = []
    _state["config"] = config
    budget = config.getoption("--bench-session-budget-s")
    _state["deadline"] = time.monotonic() + budget if budget else None
    config.stash[_DESELECTED] = 0
    share_gpu_with_jax(config)
    threads = config.getoption("--bench-threads")
    if threads:
        # Read by each library when it loads (frameworks load lazily, after this hook) ...
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(threads)
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                       f"intra_op_parallelism_threads={threads}").strip()
        # ... and the pools already loaded (NumPy's BLAS, a framework an earlier plugin imported) are
        # limited now, and again before each benchmark (`pytest_runtest_setup`).
        limit_thread_pools(threads)
    try:
        shapes.preset(config.getoption("--bench-shape"))
    except shapes.UnknownPresetError as exc:
        raise pytest.UsageError(str(exc)) from None


def share_gpu_with_jax(config: pytest.Config) -> None:
    """On GPU runs (``--device cuda``/``gpu``) torch, Triton and JAX share one device in one process: JAX must
    not preallocate 75% of it at first use, so ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set before any
    framework loads, unless the user set it. Warns when JAX was imported earlier (another plugin), as then
    the setting may come too late."""
    import sys
    import warnings

    try:
        device = config.getoption("--device")
    except ValueError:  # the suite's plugin is absent: no qmoe device
        return
    if device not in ("cuda", "gpu"):
        return
    if "XLA_PYTHON_CLIENT_PREALLOCATE" in os.environ:
        return
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if "jax" in sys.modules and "jax._src.xla_bridge" in sys.modules:
        warnings.warn("qmoe: jax was imported before the benchmark plugin set XLA_PYTHON_CLIENT_PREALLOCATE=false; "
                      "if its GPU backend is already up it holds 75% of the device: set the variable in the "
                      "environment", stacklevel=1)


def limit_thread_pools(threads: int) -> list[dict]:
    """Limit every BLAS and OpenMP thread pool loaded in this process to ``threads`` (threadpoolctl);
    returns the pools as threadpoolctl describes them, limited."""
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(limits=threads)
    return threadpool_info()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """With --bench-threads: limit the pools loaded since (a framework imported by the previous case)."""
    threads = item.config.getoption("--bench-threads", None)
    if threads and item.get_closest_marker(_BENCH_MARK):
        limit_thread_pools(threads)


#: pytest-benchmark's options (their ``dest``) that ask for benchmark results: each selects the benchmarks.
BENCHMARK_FLAGS = ("benchmark_only", "benchmark_json", "benchmark_autosave", "benchmark_save", "benchmark_compare",
                   "benchmark_compare_fail")


def benchmark_flags(config: pytest.Config) -> list[str]:
    """The pytest-benchmark flags of `BENCHMARK_FLAGS` this command gave, as typed (``--benchmark-json``)."""
    return ["--" + name.replace("_", "-") for name in BENCHMARK_FLAGS if config.getoption(name, None)]


def _markexpr(config: pytest.Config) -> str:
    return config.getoption("markexpr", "") or ""


def benchmarks_requested(config: pytest.Config) -> bool:
    """True when the command asks for benchmarks: ``-m`` naming ``benchmark`` (not negated) or one of
    pytest-benchmark's result flags; ``--benchmark-skip`` (without ``--benchmark-only``) says no."""
    if config.getoption("benchmark_skip", False) and not config.getoption("benchmark_only", False):
        return False
    if benchmark_flags(config):
        return True
    return re.search(r"(?<!not )\bbenchmark\b", _markexpr(config)) is not None


def benchmarks_only(config: pytest.Config) -> bool:
    """True when pytest-benchmark's flags ask for benchmarks and no ``-m`` says what else to run."""
    return benchmarks_requested(config) and bool(benchmark_flags(config)) and not _markexpr(config).strip()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """qmoe's benchmarks are deselected unless asked for (another project's benchmarks are its own); asked
    for by pytest-benchmark's flags alone, they are all that runs."""
    if benchmarks_requested(config):
        if not benchmarks_only(config) or not _active(config):
            return
        kept, dropped = [], []
        for item in items:
            (kept if item.get_closest_marker(_BENCH_MARK) else dropped).append(item)
        key = _OTHERS_DESELECTED
    else:
        from ..plugin import is_qmoe_path

        kept, dropped = [], []
        for item in items:
            (dropped if item.get_closest_marker(_BENCH_MARK) and is_qmoe_path(item.path) else kept).append(item)
        key = _DESELECTED
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
        config.stash[key] = len(dropped)


# -- options and the grid --------------------------------------------------------------------------------------
def _selected_device(config: pytest.Config) -> str | None:
    """The suite's ``--device`` (None: each backend's default); None when the suite's plugin is absent."""
    try:
        from qmoe.suite.plugin import selection

        return selection(config).device
    except (ImportError, KeyError):
        return None


def bench_options(config: pytest.Config) -> harness.BenchOptions:
    device = _selected_device(config)
    budget = config.getoption("--bench-max-call-s")
    if budget is None:
        budget = shapes.PRESET_CALL_BUDGET_S.get(config.getoption("--bench-shape"))
    return harness.BenchOptions(
        device=device, dtype=config.getoption("--bench-dtype") or harness.default_dtype(device),
        rounds=config.getoption("--bench-rounds"), warmup=config.getoption("--bench-warmup"),
        warmup_s=config.getoption("--bench-warmup-s"), min_time_s=config.getoption("--bench-min-time-s"),
        inputs=config.getoption("--bench-inputs"), check_rows=config.getoption("--bench-check-rows"),
        stage_times=config.getoption("--bench-stage-times"), max_call_s=budget or None,
        threads=config.getoption("--bench-threads"), deadline=_state.get("deadline"),
        cuda_graph=config.getoption("--bench-cuda-graph"), round_s=config.getoption("--bench-round-s"))


def _devices_match(declared: tuple[str, ...], device: str | None) -> bool:
    if device is None:
        return True
    gpu = {"cuda", "gpu"}
    return device in declared or (device in gpu and bool(gpu & set(declared)))


def bench_grid(config: pytest.Config) -> list:
    """pytest params of `harness.BenchCase`: shape > routing > scheme > backend > top_k > pass, so that
    a prepared layer is reused across passes and the reference's effective weights across backends."""
    from qmoe.reference.schemes import SCHEMES
    from qmoe.suite.plugin import selection

    from .int8_bound import GemmBoundInt8
    from .peers import PEERS, GemmBound, framework_of

    sel = selection(config)
    preset = shapes.preset(config.getoption("--bench-shape"))
    top_ks = [int(k) for k in _csv(config.getoption("--bench-top-k")) or []]
    passes = _csv(config.getoption("--bench-pass")) or list(PASSES)
    routings = _csv(config.getoption("--bench-routing")) or list(workload.ROUTINGS)
    schemes = _csv(config.getoption("--bench-scheme")) or list(SCHEMES)
    for name, allowed, given in (("pass", PASSES, passes), ("routing", workload.ROUTINGS, routings),
                                 ("scheme", tuple(SCHEMES), schemes)):
        unknown = [g for g in given if g not in allowed]
        if unknown:
            raise pytest.UsageError(f"--bench-{name}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    pass_ids = [pid for pid, (pname, _) in harness.PASS_IDS.items() if pname in passes]

    entries = [(e.name, e.cls, e.unavailable, e.load_error, False) for e in sel.backends]
    baselines: set[str] = set()  # the native peers: their `none` cases stay whatever --bench-scheme selects
    if not config.getoption("--bench-no-peers"):
        frameworks = []
        for _, cls, unavailable, error, _ in entries:
            framework = framework_of(cls) if cls is not None and not unavailable and not error else None
            if framework and framework not in frameworks:
                frameworks.append(framework)
        for framework in frameworks:
            for cls in PEERS[framework]:
                entries.append((cls.name, cls, cls.unavailable_reason(), None, True))
                baselines.add(cls.name)
        if entries:  # the device's bounds for this work (bf16 and int8 GEMMs), whatever framework the backends use
            for cls in (GemmBound, GemmBoundInt8):
                entries.append((cls.name, cls, cls.unavailable_reason(), None, True))

    from .timing import clock_for

    timer, timer_name = clock_for(sel.device)
    bench_mark = {"timer": timer} if timer_name != "perf_counter" else {}
    params, reported = [], set()
    # Every ratio in a table is to the native peer of the same run: a --bench-scheme that leaves `none` out keeps
    # the peers' `none` cases (not the backends', nor the bf16 GEMM bound's); --bench-no-peers or -k drops them.
    grid_schemes = schemes if "none" in schemes or not baselines else ["none", *schemes]
    for shape in preset:
        ks = [k for k in shape.top_ks if not top_ks or k in top_ks]
        for group, routing, scheme in itertools.product(jax_last(entries), routings, grid_schemes):
            for name, cls, unavailable, error, is_peer in group:
                if scheme not in schemes and name not in baselines:
                    continue
                caps = cls.capabilities if cls is not None else None
                if caps is not None and scheme not in caps.schemes:
                    continue  # a scheme a backend does not declare is not a case at all
                for k in ks:
                    for pass_id in pass_ids:
                        case = harness.BenchCase(name, scheme, shape, k, pass_id, routing, is_peer)
                        reason = _skip_reason(name, cls, unavailable, error, case, sel.device)
                        if reason and (name, reason) in reported and (unavailable or error):
                            continue  # one skipped test says an unavailable backend is unavailable
                        if reason:
                            reported.add((name, reason))
                        marks = [pytest.mark.benchmark(group=case.group, **bench_mark)]
                        if reason:
                            marks.append(pytest.mark.skip(reason=reason))
                        params.append(pytest.param((case, cls, error), id=case.id, marks=marks))
    return params


def jax_last(entries: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """Grid entries (name, class, ...) split into those not on JAX and those on JAX, each in its order: JAX's
    allocator keeps what it grew to (never given back), so its cases run after the others of a shape."""
    from .peers import framework_of

    def on_jax(entry: tuple) -> bool:
        return entry[1] is not None and framework_of(entry[1]) == "jax"

    return [e for e in entries if not on_jax(e)], [e for e in entries if on_jax(e)]


def _skip_reason(name, cls, unavailable, error, case: harness.BenchCase, device) -> str | None:
    if error:
        return None  # not a skip: the test fails with the load error
    if unavailable:
        return f"{name} unavailable: {unavailable}"
    caps = cls.capabilities
    if not _devices_match(caps.devices, device):
        return f"{name} declares devices {', '.join(caps.devices)}, not {device}"
    why = caps.unsupported(case.shape.spec(case.top_k), case.scheme)
    if why:
        return f"{name} {why}"
    if harness.PASS_IDS[case.pass_id][1] not in caps.passes:
        return f"{name} does not declare the {case.pass_name} pass"
    return None


_state: dict = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember benchmark cases that gave no result (skipped with a reason, or failed), for the report."""
    config = _state.get("config")
    if config is None or _BENCH_MARK not in report.keywords or not _active(config):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        config.stash[_NOT_RUN].append({"test": report.nodeid, "outcome": "skipped", "reason": reason})
    elif report.failed:
        lines = str(report.longrepr).strip().splitlines()
        message = next((ln for ln in reversed(lines) if ln.startswith("E ")), lines[-1] if lines else "")
        config.stash[_NOT_RUN].append({"test": report.nodeid, "outcome": f"failed ({report.when})",
                                       "reason": message.removeprefix("E").strip()[:300]})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Append the finished benchmark (name, stats, extra_info) to `jsonl_path`'s file, if any."""
    outcome = yield
    report = outcome.get_result()
    path = jsonl_path(item.config)
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if not path or report.when != "call" or not report.passed or fixture is None:
        return
    meta = getattr(fixture, "stats", None)
    if not meta:
        return
    stats = meta.stats
    entry = {"name": fixture.name, "fullname": fixture.fullname, "group": fixture.group,
             "extra_info": fixture.extra_info,
             "stats": {k: getattr(stats, k) for k in ("min", "max", "mean", "stddev", "median", "rounds")}}
    with open(path, "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


# -- pytest-benchmark hooks -----------------------------------------------------------------------------------------
def _device_label(config: pytest.Config) -> str:
    from .timing import device_name

    return device_name(_selected_device(config))


def _active(config: pytest.Config) -> bool:
    from ..plugin import is_active

    return is_active(config)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    if not _active(config):
        return
    options = bench_options(config)
    machine_info["qmoe"] = {"device": _device_label(config), "device_option": options.device or "default",
                            "preset": config.getoption("--bench-shape"), "dtype": options.dtype,
                            "threads": options.threads}


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    from ..plugin import run_command

    if not _active(config):
        return
    output_json["qmoe"] = {
        "command": run_command(config),
        "cuda_graph": config.getoption("--bench-cuda-graph"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_label(config), "preset": config.getoption("--bench-shape"),
        "not_run": list(config.stash.get(_NOT_RUN, [])),
    }


def pytest_benchmark_compare_machine_info(config: pytest.Config, benchmarksession, machine_info: dict,
                                          compared_benchmark: dict) -> None:
    """Refuse a saved run from another device: drop its benchmarks from the comparison, loudly."""
    if not _active(config):
        return
    current = (machine_info.get("qmoe") or {}).get("device")
    saved = (compared_benchmark.get("machine_info", {}).get("qmoe") or {}).get("device")
    if current != saved:
        count = len(compared_benchmark.get("benchmarks", []))
        message = ("qmoe: not comparing with a saved run from another device: "
                   f"saved on {saved or 'an unknown device'}, "
                   f"running on {current}; its {count} result(s) are left out of --benchmark-compare "
                   "(and of --benchmark-compare-fail)")
        compared_benchmark["benchmarks"] = []
        config.stash[_REFUSALS].append(message)
        benchmarksession.logger.warning(message)


def refuse_mismatched(compared_mapping: dict, current: list) -> list[str]:
    """Drop saved results whose signature differs from the current result of the same name; say which."""
    messages = []
    by_name = {bench.fullname: bench for bench in current}
    for path, saved_by_name in compared_mapping.items():
        for fullname in list(saved_by_name):
            bench = by_name.get(fullname)
            if bench is None:
                continue
            saved = saved_by_name[fullname].get("extra_info", {})
            mine = bench.extra_info
            diff = [f"{key} {saved.get(key)!r} -> {mine.get(key)!r}" for key in SIGNATURE
                    if key in mine and key in saved and saved.get(key) != mine.get(key)]
            if diff:
                del saved_by_name[fullname]
                messages.append(f"qmoe: not comparing {fullname} with {os.path.basename(str(path))}: "
                                + "; ".join(diff))
    return messages


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and bs.compared_mapping and _active(session.config):
        session.config.stash[_REFUSALS].extend(refuse_mismatched(bs.compared_mapping, [b for b in bs.benchmarks if b]))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config):
    try:
        yield
    finally:
        _qmoe_summary(terminalreporter, config)


def _qmoe_summary(tr, config: pytest.Config) -> None:
    from .tables import terminal_rows

    if not _active(config):
        return
    others = config.stash.get(_OTHERS_DESELECTED, 0)
    if others:
        tr.write_line(f"qmoe: {others} test(s) not marked benchmark deselected: {', '.join(benchmark_flags(config))} "
                      "without -m runs the benchmarks alone (add -m 'benchmark or conformance' for both)")
    deselected = config.stash.get(_DESELECTED, 0)
    if deselected:
        tr.write_line(f"qmoe: {deselected} benchmark test(s) deselected: run them with `pytest -m benchmark` "
                      "(they are kept out of plain and conformance runs)")
    for message in config.stash.get(_REFUSALS, []):
        tr.write_line(message, yellow=True)
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return
    results = [b for b in bs.benchmarks if b and "backend" in b.extra_info]
    if not results:
        return
    tr.write_sep("-", "qmoe throughput (median round; TF/s = logbook FLOPs / time)")
    for line in terminal_rows(results, bs.compared_mapping or {}):
        tr.write_line(line)
    spent = phase_totals(b.extra_info for b in results)
    if spent:
        tr.write_line("qmoe: wall time of the results' phases (not throughput): " +
                      ", ".join(f"{name} {seconds:.0f} s" for name, seconds in spent.items()))


def phase_totals(infos) -> dict[str, float]:
    """Seconds per phase (extra_info ``phase_s``, `harness._PhaseClock`) summed over results, largest first."""
    totals: dict[str, float] = {}
    for info in infos:
        for name, seconds in (info.get("phase_s") or {}).items():
            totals[name] = totals.get(name, 0.0) + float(seconds)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
