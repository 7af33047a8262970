"""The pytest plugin: options, backend selection, parametrization, report header, results JSON.

Loaded by the root ``conftest.py`` (or ``-p suite.plugin`` from elsewhere). Nothing here imports a
framework: backends are resolved by name in ``pytest_configure`` and imported only when selected.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from implementations.registry import (BackendLoadError, UnknownBackendError, backend_names, get_backend_class,
                                      load_class, register)
from reference import SCHEMES

from . import checks
from .cases import CASES, Case
from .strategies import register_profiles
from .tolerances import DTYPES

_SELECTION = pytest.StashKey["Selection"]()
_RESULTS = pytest.StashKey[list]()


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


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qmoe", "qmoe conformance and benchmarks")
    group.addoption("--backend", action="append", default=[], metavar="NAME",
                    help="run only these backends (repeat or comma-separate); default: every known backend")
    group.addoption("--backend-module", action="append", default=[], metavar="PKG.MODULE:CLASS",
                    help="load an out-of-tree Backend class and select it")
    group.addoption("--device", default=None, help="device for every backend (cpu, cuda, gpu); default: its first")
    group.addoption("--conformance-json", default=None, metavar="PATH",
                    help="write every conformance outcome with its error figures to PATH (for the report)")


def _parse_names(values: list[str]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--device")
    # Before any framework import: Triton kernels run interpreted on CPU; JAX gets 4 host devices for
    # expert-parallel tests; TF32 stays off and JAX matmuls stay full precision so float32 means float32.
    if device in (None, "cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    register_profiles()
    if not config.getoption("--hypothesis-profile", None):
        from hypothesis import settings

        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

    selection = Selection(device=device)
    module_names = []
    for reference in config.getoption("--backend-module"):
        try:
            cls = register(load_class(reference))
        except BackendLoadError as exc:
            raise pytest.UsageError(str(exc)) from None
        module_names.append(cls.name)
    wanted = _parse_names(config.getoption("--backend")) or [*backend_names()]
    for name in module_names:
        if name not in wanted and not config.getoption("--backend"):
            wanted.append(name)
    known = backend_names()
    for name in wanted:
        if name not in known:
            raise pytest.UsageError(f"unknown backend {name!r}; known backends: {', '.join(known)}")
        selection.backends.append(_resolve(name))
    config.stash[_SELECTION] = selection
    config.stash[_RESULTS] = []


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
    return config.stash[_SELECTION]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"qmoe: python {platform.python_version()}, device {selection(config).device or 'backend default'}"]
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

def _skip_reason(entry: BackendEntry, scheme: str | None, case: Case | None, dtype: str | None,
                 requires: tuple[str, ...]) -> str | None:
    """Why a (backend, scheme, case, dtype) combination is skipped, from capabilities only."""
    if entry.load_error:
        return None  # not a skip: the backend fixture raises the load error
    if entry.unavailable:
        return f"{entry.name} unavailable: {entry.unavailable}"
    caps = entry.cls.capabilities
    if scheme is not None and case is not None:
        why = caps.unsupported(case.spec, scheme)
        if why:
            return f"{entry.name} {why}"
    elif scheme is not None and scheme not in caps.schemes:
        return f"{entry.name} does not declare scheme {scheme}"
    if dtype is not None and dtype not in caps.dtypes:
        return f"{entry.name} does not declare dtype {dtype}"
    for requirement in requires:
        if not REQUIREMENTS[requirement](caps):
            return f"{entry.name} does not declare {requirement}"
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

    A test module narrows the grid with module attributes: ``CASE_NAMES`` (default: all cases),
    ``SCHEMES_UNDER_TEST`` (default: all schemes), ``DTYPES_UNDER_TEST`` and ``REQUIRES`` (capability
    names from `REQUIREMENTS`, e.g. ``("backward",)``). Skips carry the capability they lack.
    """
    module = metafunc.module
    requires = getattr(module, "REQUIRES", ())
    sel = selection(metafunc.config)
    if "target" in metafunc.fixturenames:
        case_names = getattr(module, "CASE_NAMES", tuple(CASES))
        schemes = getattr(module, "SCHEMES_UNDER_TEST", tuple(SCHEMES))
        dtypes = getattr(module, "DTYPES_UNDER_TEST", DTYPES)
        params = []
        for entry in sel.backends:
            for scheme in schemes:
                for case_name in case_names:
                    for dtype in dtypes:
                        target = Target(entry.name, scheme, CASES[case_name], dtype)
                        reason = _skip_reason(entry, scheme, target.case, dtype, requires)
                        marks = [pytest.mark.skip(reason=reason)] if reason else []
                        params.append(pytest.param(target, id=target.id, marks=marks))
        metafunc.parametrize("target", params)
    elif "backend" in metafunc.fixturenames:
        params = []
        for entry in sel.backends:
            reason = _skip_reason(entry, None, None, None, requires)
            params.append(pytest.param(entry.name, id=entry.name,
                                       marks=[pytest.mark.skip(reason=reason)] if reason else []))
        metafunc.parametrize("backend", params, indirect=True)


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


@pytest.fixture
def prepared(backend, target: Target, data):
    return backend.prepare(data.spec, data.params, target.scheme, target.dtype)


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
    Path(path).write_text(json.dumps({"tests": rows}, indent=1))
