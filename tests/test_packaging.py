"""qmoe as a user gets it: the wheel built from this checkout, installed in a fresh virtualenv outside the
checkout together with the out-of-tree example backend (`examples/my_backend`), runs the conformance
suite against that backend; and the pytest plugin it installs stays inert in an unrelated project.

The wheel's file list is checked in every run (a build from a copy of the sources, a few seconds). The
virtualenv tests install numpy, pytest, hypothesis, pytest-benchmark and tabulate from the package index
(no torch, jax or mlx) and take about a minute: they run when ``CI`` is set or ``QMOE_PACKAGING_TEST=1``.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_backend"
BUILTIN_BACKENDS = ("torch_eager", "torch_triton", "mlx_layerwise", "jax_prequant")
FRAMEWORKS = ("torch", "triton", "jax", "jaxlib", "mlx")
#: What the installed qmoe consists of: subpackage of the namespace package qmoe -> folder of this checkout.
PACKAGE_DIRS = {"reference": "reference", "implementations": "implementations", "suite": "suite"}

SLOW_ENABLED = bool(os.environ.get("CI")) or os.environ.get("QMOE_PACKAGING_TEST") == "1"
slow = pytest.mark.skipif(
    not SLOW_ENABLED,
    reason="installs the qmoe wheel and examples/my_backend into a fresh virtualenv from the package index "
           "(about a minute, needs the network); runs when CI is set or QMOE_PACKAGING_TEST=1")

#: Variables the outer run may carry (tests/conftest.py activates the plugin, which sets the frameworks'
#: ones) and that would make the subprocesses not what a user gets.
_CLEARED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
                "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT",
                "TRITON_INTERPRET", "XLA_FLAGS", "NVIDIA_TF32_OVERRIDE", "JAX_DEFAULT_MATMUL_PRECISION",
                "XLA_PYTHON_CLIENT_PREALLOCATE", "HYPOTHESIS_PROFILE", "QMOE_GRID", "JAX_COMPILATION_CACHE_DIR",
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def _env(bin_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(bin_dir.parent)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


def _package_dirs() -> dict[str, str]:
    """``[tool.setuptools.package-dir]`` of pyproject.toml (the built-in table where tomllib is missing)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return dict(PACKAGE_DIRS)
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("qmoe."): folder for name, folder in table.items()}


def _copy_sources(dest: Path) -> Path:
    """The files a build reads, copied away from the checkout: no stale build/ or egg-info gets into the
    wheel, and a concurrent run in the checkout is not disturbed."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in _package_dirs().values():
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _local_setuptools() -> bool:
    """True when this interpreter has setuptools>=68, the only build requirement: then the wheel is built
    with it, offline (--no-build-isolation); otherwise pip fetches it into an isolated build environment."""
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 68
    except (metadata.PackageNotFoundError, ValueError):
        return False


def _build_wheel(source: Path, out: Path) -> Path:
    isolation = ["--no-build-isolation"] if _local_setuptools() else []
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", out, source]
    _check(_run(args, cwd=source, env=_env(), timeout=300), f"building the wheel of {source}")
    wheels = sorted(out.glob("qmoe-*.whl"))
    assert len(wheels) == 1, f"expected one qmoe wheel in {out}, found {[w.name for w in wheels]}"
    return wheels[0]


@pytest.fixture(scope="module")
def qmoe_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _local_setuptools() and not SLOW_ENABLED:
        pytest.skip("building the wheel needs setuptools>=68 here, or the package index for an isolated build "
                    "(runs when CI is set or QMOE_PACKAGING_TEST=1)")
    tmp = tmp_path_factory.mktemp("qmoe_wheel")
    return _build_wheel(_copy_sources(tmp / "src"), tmp / "dist")


def test_wheel_contents(qmoe_wheel: Path):
    """One namespace package qmoe (no qmoe/__init__.py), holding every module of the three folders and
    their py.typed markers and nothing else; the pytest plugin and the report script as entry points."""
    with zipfile.ZipFile(qmoe_wheel) as wheel:
        names = [n for n in wheel.namelist() if not n.endswith("/")]
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        top_level = wheel.read(f"{dist_info}/top_level.txt").decode() if f"{dist_info}/top_level.txt" in names else None
    assert dist_info.startswith("qmoe-"), dist_info
    stray = [n for n in names if not (n.startswith("qmoe/") or n.startswith(f"{dist_info}/"))]
    assert not stray, f"files outside qmoe/ and {dist_info}/ (they would land at the top of site-packages): {stray}"
    if top_level is not None:
        assert top_level.split() == ["qmoe"], f"top_level.txt: {top_level!r}"
    # Namespace package by design: the checkout's folders are mapped into qmoe, which has no __init__.py.
    assert "qmoe/__init__.py" not in names, "qmoe is meant to be a namespace package: no qmoe/__init__.py"

    expected = set()
    for sub, folder in _package_dirs().items():
        base = ROOT / folder
        for path in base.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed"):
                expected.add(f"qmoe/{sub}/{path.relative_to(base).as_posix()}")
        assert f"qmoe/{sub}/py.typed" in names, f"qmoe/{sub}/py.typed is missing from the wheel"
        assert f"qmoe/{sub}/__init__.py" in names, f"qmoe/{sub}/__init__.py is missing from the wheel"
    in_wheel = {n for n in names if n.startswith("qmoe/")}
    missing = sorted(expected - in_wheel)
    assert not missing, ("files of the checkout missing from the wheel (a subpackage not listed in "
                         f"[tool.setuptools] packages of pyproject.toml?): {missing}")
    extra = sorted(in_wheel - expected)
    assert not extra, f"files in the wheel that the checkout does not have (a stale build?): {extra}"
    # Every folder with modules is a regular package (has __init__.py) inside the namespace.
    folders = {n.rsplit("/", 1)[0] for n in in_wheel if n.endswith(".py")} - {"qmoe"}
    no_init = sorted(f for f in folders if f"{f}/__init__.py" not in in_wheel)
    assert not no_init, f"folders with modules but no __init__.py: {no_init}"

    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    parser.read_string(entry_points)
    assert parser.has_section("pytest11") and parser["pytest11"].get("qmoe", "").strip() == "qmoe.suite.plugin", \
        f"entry point pytest11 qmoe = qmoe.suite.plugin missing:\n{entry_points}"
    assert parser.has_section("console_scripts") and \
        parser["console_scripts"].get("qmoe-report", "").strip() == "qmoe.suite.report:main", \
        f"console script qmoe-report = qmoe.suite.report:main missing:\n{entry_points}"


# -- a fresh virtualenv outside the checkout ---------------------------------------------------------

@dataclass
class Venv:
    root: Path
    workdir: Path  # empty, outside the checkout

    @property
    def bin(self) -> Path:
        return self.root / ("Scripts" if os.name == "nt" else "bin")

    @property
    def python(self) -> Path:
        return self.bin / ("python.exe" if os.name == "nt" else "python")

    def env(self) -> dict[str, str]:
        return _env(self.bin)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, qmoe_wheel: Path) -> Venv:
    tmp = tmp_path_factory.mktemp("qmoe_venv")
    assert ROOT not in tmp.resolve().parents, f"the temporary directory {tmp} is inside the checkout"
    env = Venv(tmp / "venv", tmp / "work")
    env.workdir.mkdir()
    _check(_run([sys.executable, "-m", "venv", env.root], cwd=tmp, env=_env(), timeout=300), "python -m venv")
    # Non-editable, from a copy: the example's build leaves nothing in the checkout.
    example = tmp / "my_backend"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    _check(_run([env.python, "-m", "pip", "install", "-q", qmoe_wheel, example], cwd=tmp, env=env.env(), timeout=900),
           "pip install of the qmoe wheel and examples/my_backend")
    return env


@dataclass
class Outcome:
    output: str
    passed: list[str]
    failed: list[str]
    skipped: list[str]

    @property
    def ids(self) -> list[str]:
        return self.passed + self.failed + self.skipped


def _conformance(venv: Venv, *options: str, name: str) -> Outcome:
    junit = venv.workdir.parent / f"{name}.xml"
    proc = _run([venv.python, "-m", "pytest", "--pyargs", "qmoe.suite", "-m", "conformance", *options,
                 "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}"],
                cwd=venv.workdir, env=venv.env(), timeout=600)
    output = _check(proc, f"pytest --pyargs qmoe.suite -m conformance {' '.join(options)}")
    passed, failed, skipped = [], [], []
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        (failed if kinds & {"failure", "error"} else skipped if "skipped" in kinds else passed).append(test_id)
    return Outcome(output, passed, failed, skipped)


def _assert_only_my_backend(outcome: Outcome) -> None:
    assert outcome.passed, f"no test passed:\n{outcome.output[-4000:]}"
    assert not outcome.failed, f"failed: {outcome.failed}\n{outcome.output[-4000:]}"
    leaked = [i for i in outcome.ids if any(b in i for b in BUILTIN_BACKENDS)]
    assert not leaked, f"built-in backends ran though only my_backend was selected: {leaked[:10]}"
    assert any("my_backend-none-" in i for i in outcome.passed), \
        f"no grid test of my_backend passed: {outcome.passed[:20]}"
    assert "my_backend: schemes none" in outcome.output, outcome.output[-4000:]


@slow
@pytest.mark.parametrize("options", [
    pytest.param(("--backend-module", "mypkg.moe:MyBackend", "--backend", "my_backend"), id="module-and-name"),
    pytest.param(("--backend-module", "mypkg.moe:MyBackend"), id="module-alone"),
    pytest.param(("--backend", "my_backend"), id="entry-point"),
])
def test_conformance_of_installed_example(venv: Venv, options: tuple[str, ...], request: pytest.FixtureRequest):
    """The installed suite runs against the out-of-tree backend, selected by class, by class alone
    (only it runs), or by the name its entry point registers."""
    _assert_only_my_backend(_conformance(venv, *options, name=request.node.callspec.id))


@slow
def test_conformance_default_selection(venv: Venv):
    """With no backend option every known backend is selected: the entry point's my_backend runs, and the
    built-ins, whose frameworks this environment lacks, are skipped with the reason (not errors)."""
    probe = f"import importlib.util as u; print([m for m in {FRAMEWORKS!r} if u.find_spec(m)])"
    missing = _run([venv.python, "-c", probe], cwd=venv.workdir, env=venv.env(), timeout=60)
    assert _check(missing, "framework probe").strip() == "[]", "the example's environment has a framework installed"
    outcome = _conformance(venv, name="default")
    assert not outcome.failed, f"failed: {outcome.failed}\n{outcome.output[-4000:]}"
    assert any("my_backend-none-" in i for i in outcome.passed), outcome.output[-4000:]
    for builtin in BUILTIN_BACKENDS:
        ran = [i for i in outcome.passed if builtin in i]
        assert not ran, f"{builtin} passed tests without its framework: {ran[:5]}"
        assert f"{builtin}: unavailable" in outcome.output, \
            f"{builtin} not reported unavailable:\n{outcome.output[-4000:]}"


#: hypothesis' current profile, as the inert test and its baseline (plain Python, no pytest) see it.
PROFILE_SOURCE = '''\
from hypothesis import settings


def _profile():
    get = getattr(settings, "get_current_profile_name", None)
    name = get() if get else settings._current_profile
    d = settings.default
    return [name, d.max_examples, d.derandomize, repr(d.deadline), d.print_blob]
'''

INERT_TEST = '''\
import json
import os
import sys

{profile}

EXPECTED_PROFILE = json.loads({expected!r})
ENVIRONMENT = set(json.loads({environment!r}))


def test_qmoe_plugin_is_inert(request):
    assert request.config.pluginmanager.hasplugin("qmoe"), "the qmoe plugin was not loaded at all"
    for name in ("TRITON_INTERPRET", "XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "QMOE_GRID",
                 "JAX_COMPILATION_CACHE_DIR"):
        assert name not in os.environ, f"{{name}}={{os.environ[name]!r}} was set"
    added = sorted(k for k in set(os.environ) - ENVIRONMENT if not k.startswith("PYTEST_"))
    assert not added, "environment variables set: " + ", ".join(f"{{k}}={{os.environ[k]!r}}" for k in added)
    assert _profile() == EXPECTED_PROFILE, f"hypothesis profile changed: {{_profile()}} != {{EXPECTED_PROFILE}}"
    frameworks = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "jax", "jaxlib", "mlx"))
    assert not frameworks, f"frameworks imported: {{frameworks[:10]}}"
'''


@slow
def test_plugin_is_inert_in_another_project(venv: Venv, tmp_path: Path):
    """In a project with no qmoe test and no qmoe option, the installed plugin sets no environment
    variable, loads no hypothesis profile and imports no framework."""
    project = tmp_path / "project"
    project.mkdir()
    env = venv.env()
    # hypothesis' own default in this environment (it loads its own "ci" profile when CI is set).
    baseline = _run([venv.python, "-c", PROFILE_SOURCE + "\nimport json\nprint(json.dumps(_profile()))"],
                    cwd=project, env=env, timeout=60)
    expected = _check(baseline, "hypothesis baseline").strip()
    (project / "test_plain.py").write_text(INERT_TEST.format(profile=PROFILE_SOURCE, expected=expected,
                                                             environment=json.dumps(sorted(env))))
    proc = _run([venv.bin / "pytest", "-q", "-p", "no:cacheprovider"], cwd=project, env=env, timeout=300)
    output = _check(proc, "plain pytest in an unrelated project")
    assert "1 passed" in output, output[-4000:]


BENCH_TEST = '''\
import pytest


@pytest.mark.benchmark(group="theirs")
def test_their_benchmark(benchmark):
    assert benchmark(sum, range(100)) == 4950
'''


@slow
def test_plugin_leaves_another_projects_benchmarks_alone(venv: Venv, tmp_path: Path):
    """Another project's pytest-benchmark tests (``@pytest.mark.benchmark(...)``, the ``benchmark``
    fixture) run as they would without qmoe installed: not deselected, their JSON without qmoe's keys."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_bench.py").write_text(BENCH_TEST)
    proc = _run([venv.bin / "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-json=bench.json"],
                cwd=project, env=venv.env(), timeout=300)
    output = _check(proc, "pytest of another project's benchmark")
    assert "1 passed" in output and "deselected" not in output, \
        f"the other project's benchmark did not run as without qmoe:\n{output[-4000:]}"
    saved = json.loads((project / "bench.json").read_text())
    assert "qmoe" not in saved and "qmoe" not in saved.get("machine_info", {}), \
        f"qmoe's keys in another project's benchmark JSON: {sorted(saved)}, {sorted(saved.get('machine_info', {}))}"
