"""The pytest plugin (entry point ``pytest11: qmoe``): options, markers, backend selection, the
capability-driven grid, the results JSON, and the benchmark plugin (`qmoe.suite.benchmarks.plugin`).

Inert until used: loaded in every pytest run of an environment where qmoe is installed, it only
registers its options and markers. It activates — sets the environment the frameworks read at import
(Triton's interpreter and JAX's host devices on CPU, TF32 off, full-precision JAX matmuls), loads the
hypothesis profile and resolves the selected backends — when a qmoe option is given or a qmoe test
module is collected. Nothing here imports a framework: backends are imported only when selected.
"""

from __future__ import annotations

import collections
import datetime
import importlib
import json
import os
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qmoe.implementations.registry import (
    BackendLoadError,
    UnknownBackendError,
    backend_names,
    get_backend_class,
    load_class,
    register,
)
from qmoe.reference import SCHEMES

from . import checks
from .cases import BALANCE_COEFF, CASES, Case
from .strategies import PROFILES, register_profiles
from .tolerances import DTYPES

#: The directory of qmoe's conformance and benchmark modules: collecting one activates the plugin.
SUITE_DIR = Path(__file__).resolve().parent
_SELECTION = pytest.StashKey["Selection"]()
_RESULTS = pytest.StashKey[list]()
#: backend -> reason -> number of grid combinations not generated (not applicable to that backend)
_NOT_APPLICABLE = pytest.StashKey[dict]()


@dataclass
class BackendEntry:
    """A selected backend: its class, or why it cannot run here (skip) or cannot load (error)."""

    name: str
    cls: type | None = None
    unavailable: str | None = None
    load_error: str | None = None


@dataclass
class Selection:
    backends: list[BackendEntry] = field(default_factory=list)
    device: str | None = None
    #: ``full`` (every declared scheme x case x dtype) or ``covering`` (see `covering_dtype`)
    grid: str = "full"


@dataclass(frozen=True)
class Target:
    """What one parametrized conformance test runs: backend x scheme x case x dtype."""

    backend: str
    scheme: str
    case: Case
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.scheme}-{self.case.id}-{self.dtype}"


def parse_target_id(nodeid: str) -> dict[str, str] | None:
    """The parts of a grid test's id (``...[backend-scheme-topK-case-dtype]``), or None for other tests."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None
    parts = nodeid[nodeid.index("[") + 1:-1].split("-")
    if len(parts) != 5 or not parts[2].startswith("top"):
        return None
    return dict(zip(("backend", "scheme", "top_k", "case", "dtype"), parts))


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    # One entry point: the benchmark plugin's options and hooks come with this one (pytest_addoption is
    # historic, so a plugin registered here still adds its options).
    from .benchmarks import plugin as benchmarks_plugin

    if not pluginmanager.is_registered(benchmarks_plugin):
        pluginmanager.register(benchmarks_plugin, "qmoe.benchmarks")
    group = parser.getgroup("qmoe", "qmoe conformance and benchmarks")
    group.addoption("--backend", action="append", default=[], metavar="NAME",
                    help="run only these backends (repeat or comma-separate); default: every known backend")
    group.addoption("--backend-module", action="append", default=[], metavar="PKG.MODULE:CLASS",
                    help="load an out-of-tree Backend class and select it (alone, without --backend: only it)")
    group.addoption("--device", default=None, help="device for every backend (cpu, cuda, gpu); default: its first")
    group.addoption("--conformance-json", default=None, metavar="PATH",
                    help="write every conformance outcome with its error figures to PATH (for the report)")
    group.addoption("--qmoe-grid", default=None, choices=GRIDS, metavar="GRID",
                    help="full: every declared scheme x case x dtype; covering: each (case, scheme) pair in one "
                         "dtype, alternating, so every pair of the three still meets (half the targets). "
                         "Default: covering under the dev hypothesis profile, full under ci and thorough "
                         "($QMOE_GRID overrides)")


def _parse_names(values: list[str]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


#: Markers of qmoe's tests (also in the repository's pyproject.toml, for --strict-markers there).
MARKERS = (
    "conformance: compares a backend (or the reference itself) against the float reference",
    "benchmark: throughput measurements (pytest-benchmark); deselected unless benchmarks are asked for",
    "gpu: needs a CUDA/Metal device",
    "slow: long-running; excluded from the default CI run",
    "backend(name): a test of that backend's own code; left out of runs whose --backend selection lacks it",
)
#: Options whose use activates the plugin (a default value does not).
_QMOE_OPTIONS = ("--backend", "--backend-module", "--device", "--conformance-json", "--qmoe-grid")
#: Grids of the conformance targets (--qmoe-grid).
GRIDS = ("covering", "full")
#: Hypothesis profiles whose runs use the full grid by default (the others: the covering design).
FULL_GRID_PROFILES = ("ci", "thorough")
#: Where JAX keeps compiled programs between qmoe runs (JAX's persistent compilation cache): a second run
#: loads in milliseconds what took a second to compile. Off when $QMOE_JAX_CACHE is 0 or JAX's own
#: $JAX_COMPILATION_CACHE_DIR is set.
JAX_CACHE_ENV = "QMOE_JAX_CACHE"
#: Host devices JAX simulates in CPU runs (``--xla_force_host_platform_device_count``, unless XLA_FLAGS
#: already names a count): the largest N level 6 shards over.
CPU_DEVICES = 8


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin loads the profile named on the command line
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--hypothesis-profile", None) in PROFILES:
        register_profiles()  # asked for by name: qmoe's, unless the project registered its own of that name
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    config.stash[_RESULTS] = []
    config.stash[_NOT_APPLICABLE] = collections.defaultdict(collections.Counter)
    if any(config.getoption(name) for name in _QMOE_OPTIONS):
        activate(config)


def run_command(config: pytest.Config) -> str:
    """The command line of this run as a shell would take it back (recorded in the JSON files it writes)."""
    return shlex.join(["pytest", *config.invocation_params.args])


def is_active(config: pytest.Config) -> bool:
    """True once this run is a qmoe run (`activate`): the benchmark plugin's hooks wait for it too."""
    return _SELECTION in config.stash


def is_qmoe_path(path: Path) -> bool:
    """True for a file of qmoe's suite (in this checkout or installed)."""
    return SUITE_DIR in Path(path).resolve().parents


class QmoeModule(pytest.Module):
    """A qmoe test module, imported by its package name (``qmoe.suite.test_level3_forward``) wherever it
    lies: in this checkout, installed, or reached with ``--pyargs qmoe.suite``. pytest's own import by
    path would name it ``suite.test_...`` (qmoe is a namespace package), a second copy of the suite's
    modules beside the ``qmoe.suite`` ones the plugin uses."""

    def _getobj(self):
        relative = self.path.resolve().relative_to(SUITE_DIR).with_suffix("")
        name = ".".join(("qmoe", "suite", *relative.parts))
        try:
            return importlib.import_module(name)
        except pytest.skip.Exception:
            raise
        except Exception as exc:
            raise self.CollectError(f"cannot import qmoe test module {name}: {type(exc).__name__}: {exc}") from exc


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Activate before a qmoe test module is imported (and with it, perhaps, a framework); import it by its
    qmoe name."""
    if not is_qmoe_path(module_path):
        return None
    activate(parent.config)
    return QmoeModule.from_parent(parent, path=module_path)


def activate(config: pytest.Config) -> Selection:
    """Set up a qmoe run (once): the environment frameworks read at import, the hypothesis profile,
    and the selected backends. Called when a qmoe option is given or a qmoe module is collected; the
    project's own tests call it from their conftest."""
    if _SELECTION in config.stash:
        return config.stash[_SELECTION]
    device = config.getoption("--device")
    # Before any framework import: Triton kernels run interpreted on CPU; JAX gets CPU_DEVICES host devices
    # for expert-parallel tests (level 6 shards over up to 8); TF32 stays off and JAX matmuls stay full
    # precision so float32 means float32.
    if device in (None, "cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={CPU_DEVICES}").strip()
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    # Several frameworks share one GPU in a benchmark session: JAX must not grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _use_jax_compilation_cache()
    register_profiles()
    profile = config.getoption("--hypothesis-profile", None)
    if not profile:
        from hypothesis import settings

        profile = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
        settings.load_profile(profile)
    grid = config.getoption("--qmoe-grid") or os.environ.get("QMOE_GRID") or (
        "full" if profile in FULL_GRID_PROFILES else "covering")
    if grid not in GRIDS:
        raise pytest.UsageError(f"QMOE_GRID={grid!r} is not one of {', '.join(GRIDS)}")
    # Modules that choose their own configurations at import (level 6) read the resolved grid here.
    os.environ["QMOE_GRID"] = grid

    selection = Selection(device=device, grid=grid)
    module_names = []
    for reference in config.getoption("--backend-module"):
        try:
            cls = register(load_class(reference))
        except BackendLoadError as exc:
            raise pytest.UsageError(str(exc)) from None
        module_names.append(cls.name)
    # --backend-module alone selects the loaded classes; with --backend, exactly the names given.
    wanted = _parse_names(config.getoption("--backend")) or module_names or [*backend_names()]
    known = backend_names()
    for name in wanted:
        if name not in known:
            raise pytest.UsageError(f"unknown backend {name!r}; known backends: {', '.join(known)}")
        selection.backends.append(_resolve(name))
    config.stash[_SELECTION] = selection
    return selection


def jax_cache_dir() -> Path | None:
    """The directory of JAX's persistent compilation cache in qmoe runs, or None when it is off."""
    if os.environ.get(JAX_CACHE_ENV, "1") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "qmoe" / "jax"


def _use_jax_compilation_cache() -> None:
    """JAX compiles each conformance target (about a second on CPU, most of a run's time); its persistent
    cache keys programs by their HLO and compiler, so a changed backend compiles afresh. Set through the
    environment JAX reads at import; every program is kept, however quick its compilation was."""
    cache = jax_cache_dir()
    if cache is None:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _resolve(name: str) -> BackendEntry:
    try:
        cls = get_backend_class(name)
    except (BackendLoadError, UnknownBackendError) as exc:
        return BackendEntry(name, load_error=str(exc))
    try:
        reason = cls.unavailable_reason()
    except Exception as exc:  # a backend's availability probe must not take the run down
        reason = f"unavailable_reason() raised {type(exc).__name__}: {exc}"
    return BackendEntry(name, cls, unavailable=reason)


def selection(config: pytest.Config) -> Selection:
    return activate(config)


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    """The selected backends with their versions, once a qmoe run is active (after collection: the
    plugin may have activated only when it met a qmoe module)."""
    if _SELECTION not in config.stash:
        return []
    sel = selection(config)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    lines = [f"qmoe: python {platform.python_version()}, device {sel.device or 'backend default'}, grid {sel.grid}"
             + (f", jax compilation cache {cache}" if cache else "")]
    for entry in selection(config).backends:
        if entry.load_error:
            lines.append(f"  {entry.name}: CANNOT LOAD: {entry.load_error}")
        elif entry.unavailable:
            lines.append(f"  {entry.name}: unavailable ({entry.unavailable})")
        else:
            try:
                versions = ", ".join(f"{k} {v}" for k, v in entry.cls.versions().items())
            except Exception as exc:
                versions = f"versions() raised {exc}"
            lines.append(f"  {entry.name}: schemes {','.join(entry.cls.capabilities.schemes)}; {versions}")
    return lines


# -- parametrization ------------------------------------------------------------------------------

def _not_applicable(entry: BackendEntry, scheme: str | None, case: Case | None, dtype: str | None,
                    requires: tuple[str, ...], schemes: tuple[str, ...] = ()) -> str | None:
    """Why a (backend, scheme, case, dtype) combination does not apply to a backend, from its declared
    capabilities; None when it applies. ``schemes``: for backend-only tests, the schemes of which the
    backend must declare one."""
    caps = entry.cls.capabilities
    if scheme is not None and case is not None:
        why = caps.unsupported(case.spec, scheme)
        if why:
            return why
    elif scheme is not None and scheme not in caps.schemes:
        return f"does not declare scheme {scheme}"
    if schemes and not set(schemes) & set(caps.schemes):
        return f"declares none of the schemes {', '.join(schemes)}"
    if dtype is not None and dtype not in caps.dtypes:
        return f"does not declare dtype {dtype}"
    for requirement in requires:
        if not REQUIREMENTS[requirement](caps):
            return f"does not declare {requirement}"
    return None


#: Capabilities a test module can require (module attribute ``REQUIRES``), as predicates.
REQUIREMENTS = {
    "backward": lambda caps: "backward" in caps.passes,
    "quantizer": lambda caps: caps.quantizer,
    "bypass": lambda caps: caps.bypass,
    "update": lambda caps: caps.update is not None,
    "layerwise_trainer": lambda caps: caps.layerwise_trainer,
    "qat_export": lambda caps: caps.qat_export,
    "expert_parallel": lambda caps: bool(caps.expert_parallel),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``target`` (backend x scheme x case x dtype), or ``backend`` alone, from the selection.

    Only combinations a backend declares are generated; the others are counted per backend and reason
    for the terminal summary. A backend that cannot run here (a missing dependency) gets one skip per
    test, saying why. A test module narrows the grid with module attributes: ``CASE_NAMES`` (default:
    all cases), ``SCHEMES_UNDER_TEST`` (default: all schemes), ``DTYPES_UNDER_TEST``, ``REQUIRES``
    (capability names from `REQUIREMENTS`, e.g. ``("backward",)``); and ``applies_to`` (see
    `pytest_collection_modifyitems`) for what depends on a test's other parameters.
    """
    if not is_qmoe_path(metafunc.definition.path):
        return
    module = metafunc.module
    requires = getattr(module, "REQUIRES", ())
    sel = selection(metafunc.config)
    not_applicable = metafunc.config.stash[_NOT_APPLICABLE]
    grid = "target" in metafunc.fixturenames
    if not grid and "backend" not in metafunc.fixturenames:
        return
    params = []
    for entry in sel.backends:
        if entry.unavailable and not entry.load_error:
            skip = pytest.mark.skip(reason=f"{entry.name} unavailable: {entry.unavailable}")
            params.append(pytest.param(Target(entry.name, "", CASES["balanced"], "") if grid else entry.name,
                                       id=f"{entry.name}-unavailable", marks=[skip]))
            continue
        # Under pytest-xdist's --dist loadgroup, one worker runs all of a backend's tests: one process
        # compiles its programs (JAX, Triton) once and reuses them, as in a serial run.
        group = pytest.mark.xdist_group(entry.name)
        if not grid:
            reason = None if entry.load_error else _not_applicable(
                entry, None, None, None, requires, getattr(module, "SCHEMES_UNDER_TEST", ()))
            if reason:
                not_applicable[entry.name][reason] += 1
            else:
                params.append(pytest.param(entry.name, id=entry.name, marks=[group]))
            continue
        dtypes = getattr(module, "DTYPES_UNDER_TEST", DTYPES)
        for scheme in getattr(module, "SCHEMES_UNDER_TEST", tuple(SCHEMES)):
            for case_name in getattr(module, "CASE_NAMES", tuple(CASES)):
                applicable = []
                for dtype in dtypes:
                    target = Target(entry.name, scheme, CASES[case_name], dtype)
                    reason = None
                    if not entry.load_error:  # a backend that cannot load fails in its fixture, with the reason
                        reason = _not_applicable(entry, scheme, target.case, dtype, requires)
                    if reason:
                        not_applicable[entry.name][reason] += 1
                    else:
                        applicable.append(target)
                chosen = applicable
                if sel.grid == "covering" and len(applicable) > 1:
                    chosen = [covering_dtype(applicable, scheme, case_name)]
                    not_applicable[entry.name][COVERING_REASON] += len(applicable) - 1
                params.extend(pytest.param(t, id=t.id, marks=[group]) for t in chosen)
    if grid:
        metafunc.parametrize("target", params)
    else:
        metafunc.parametrize("backend", params, indirect=True)


#: The summary's reason for the targets the covering design leaves to the full grid.
COVERING_REASON = "left to the full grid (--qmoe-grid=full; ci profile)"


def covering_dtype(targets: list[Target], scheme: str, case_name: str) -> Target:
    """The covering design's target of one (case, scheme) pair: the dtypes alternate along both the cases
    and the schemes (index parity), so every case and every scheme still runs in every dtype, and every
    (case, scheme) pair runs once. The choice depends only on the names, so levels 3 and 4 pick the same
    target and share its prepared layer."""
    order = (tuple(SCHEMES).index(scheme) if scheme in SCHEMES else 0) + tuple(CASES).index(case_name)
    return targets[order % len(targets)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out (as not applicable, counted in the summary) the qmoe tests whose module's
    ``applies_to(capabilities, test_name, params)`` gives a reason: combinations that depend on more
    than the grid (a fidelity floor, an expert-parallel configuration); and the tests marked
    ``backend(name)`` where the run does not select that backend (``-m conformance --backend jax_prequant``
    on a GPU ran torch_triton's own kernel tests, ~75 of its 288 s on the H200)."""
    if _SELECTION not in config.stash:
        return
    entries = {entry.name: entry for entry in config.stash[_SELECTION].backends}
    kept, dropped = [], []
    for item in items:
        owner = _marked_backend(item)
        if owner is not None and owner not in entries:  # another backend's own test
            config.stash[_NOT_APPLICABLE][owner]["its own tests, backend not selected"] += 1
            dropped.append(item)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not is_qmoe_path(item.path) or not ({"target", "backend"} & set(params)):
            kept.append(item)
            continue
        name = getattr(params.get("target"), "backend", None) or params.get("backend")
        entry = entries.get(name) if isinstance(name, str) else None
        if entry is None:  # no selected backend applies: pytest's empty parameter set
            config.stash[_NOT_APPLICABLE]["(no selected backend)"][item.originalname] += 1
            dropped.append(item)
            continue
        rule = getattr(getattr(item, "module", None), "applies_to", None)
        reason = None
        if rule and entry.cls and not entry.unavailable:
            reason = rule(entry.cls.capabilities, item.originalname, params)
        if reason:
            config.stash[_NOT_APPLICABLE][entry.name][reason] += 1
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        items[:] = kept
        config.hook.pytest_deselected(items=dropped)


def _marked_backend(item: pytest.Item) -> str | None:
    """The backend named by the item's ``backend(name)`` marker, or None where it has none."""
    mark = item.get_closest_marker("backend")
    if mark is None:
        return None
    name = mark.args[0] if mark.args else mark.kwargs.get("name")
    if not isinstance(name, str):
        raise pytest.UsageError(f"{item.nodeid}: pytest.mark.backend needs the backend's name, "
                                f"e.g. @pytest.mark.backend('torch_triton')")
    return name


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: each worker collects the whole grid; the controller reports one worker's counts."""
    counts = getattr(node, "workeroutput", {}).get("qmoe_not_applicable")
    if counts and not node.config.stash[_NOT_APPLICABLE]:
        for backend, reasons in counts.items():
            node.config.stash[_NOT_APPLICABLE][backend].update(reasons)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """One line per backend: how many combinations did not apply to it, and why."""
    counts = config.stash.get(_NOT_APPLICABLE, {})
    if not counts:
        return
    terminalreporter.section("qmoe: not generated (not declared by the backend, left to the full grid, or another "
                             "backend's own tests)")
    for backend, reasons in counts.items():
        total = sum(reasons.values())
        detail = "; ".join(f"{reason} ({n})" for reason, n in reasons.most_common())
        terminalreporter.write_line(f"{backend}: {total} not applicable: {detail}")


# -- fixtures ---------------------------------------------------------------------------------------

_instances: dict[tuple[str, str | None], Any] = {}


def backend_instance(config: pytest.Config, name: str):
    """One instance per backend per session; a backend that cannot load fails here with the reason."""
    sel = selection(config)
    entry = next(e for e in sel.backends if e.name == name)
    if entry.load_error:
        pytest.fail(f"backend {name} cannot be loaded: {entry.load_error}", pytrace=False)
    key = (name, sel.device)
    if key not in _instances:
        _instances[key] = entry.cls(sel.device)
    return _instances[key]


@pytest.fixture
def backend(request: pytest.FixtureRequest):
    """The backend under test: from ``target`` in grid tests, else parametrized by name (indirect)."""
    if "target" in request.fixturenames:
        return backend_instance(request.config, request.getfixturevalue("target").backend)
    return backend_instance(request.config, request.param)


_case_cache: dict[tuple[str, str], Any] = {}


@pytest.fixture
def data(target: Target):
    """The case's inputs for the target's dtype (built once per session, copied per test)."""
    key = (target.case.name, target.dtype)
    if key not in _case_cache:
        _case_cache[key] = target.case.build(target.dtype)
    cached = _case_cache[key]
    return type(cached)(cached.case, cached.dtype, cached.params.copy(), cached.x.copy(), cached.dy.copy())


#: Per session and target: the prepared layer and the backend's outputs, so that the tight and the
#: fidelity test of one target (and levels 2-4) share one prepare, one forward and one backward.
_target_cache: dict[tuple[str, str | None, str], Any] = {}


def _cached(request: pytest.FixtureRequest, what: str, compute):
    key = (request.getfixturevalue("target").id, selection(request.config).device, what)
    if key not in _target_cache:
        _target_cache[key] = compute()
    return _target_cache[key]


@pytest.fixture
def prepared(request: pytest.FixtureRequest, backend, target: Target, data):
    """The backend's prepared layer for the target (once per session: tests must not mutate it)."""
    return _cached(request, "prepared", lambda: backend.prepare(data.spec, data.params, target.scheme, target.dtype))


@pytest.fixture
def backend_forward(request: pytest.FixtureRequest, backend, data, prepared):
    """``backend.forward(prepared, data.x)``, once per target and session."""
    return _cached(request, "forward", lambda: backend.forward(prepared, data.x))


@pytest.fixture
def backend_backward(request: pytest.FixtureRequest, backend, data, prepared):
    """The gradients of ``sum(y * dy) + BALANCE_COEFF * balance_loss`` as float64 NumPy, once per target and session."""
    def compute():
        grads = backend.backward(prepared, data.x, data.dy, balance_coeff=BALANCE_COEFF)
        return {name: np.asarray(value, dtype=np.float64) for name, value in grads.items()}

    return _cached(request, "backward", compute)


@pytest.fixture(autouse=True)
def _record_figures(request: pytest.FixtureRequest):
    """Route every comparison's error figures into the test's report (for --conformance-json)."""
    figures: list[tuple[str, dict]] = []
    checks.set_recorder(lambda what, f: figures.append((what, f)))
    request.node.user_properties.append(("figures", figures))
    yield
    checks.set_recorder(None)


# -- results JSON -----------------------------------------------------------------------------------

def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _pending.append(report)


_pending: list[pytest.TestReport] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its counts go to the controller's summary
        workeroutput["qmoe_not_applicable"] = {b: dict(c) for b, c in session.config.stash[_NOT_APPLICABLE].items()}
        return
    path = session.config.getoption("--conformance-json")
    if not path:
        return
    rows = []
    for report in _pending:
        if "conformance" not in report.keywords:
            continue
        reason = None
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
        figures = dict(report.user_properties).get("figures", [])
        rows.append({"nodeid": report.nodeid, "outcome": report.outcome, "reason": reason,
                     "figures": [{"what": w, **f} for w, f in figures],
                     "message": str(report.longrepr).splitlines()[-1] if report.failed else None})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # the run's own time and command: a file's mtime is its checkout's once committed
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    Path(path).write_text(json.dumps({"finished": finished, "command": run_command(session.config), "tests": rows},
                                     indent=1))
