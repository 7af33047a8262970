"""The registry: built-ins by name, entry points, command-line classes, and clear errors."""

from __future__ import annotations

import pytest

from qmoe.implementations import registry
from qmoe.implementations.registry import BackendLoadError, UnknownBackendError, get_backend_class, load_class


def test_builtin_resolves_without_importing_its_framework():
    assert "torch_eager" in registry.backend_names()
    assert get_backend_class("torch_eager").name == "torch_eager"


def test_entry_point_backend_is_listed_and_loaded(monkeypatch):
    monkeypatch.setattr(registry, "_entry_points", lambda: {"ep_backend": "tests.mutants:MutantControl"})
    assert "ep_backend" in registry.backend_names()
    assert get_backend_class("ep_backend").name == "mutant_control"


@pytest.mark.parametrize("reference,match", [
    ("no_colon", "must look like 'package.module:ClassName'"),
    ("nonexistent_pkg.mod:Cls", "cannot import backend module 'nonexistent_pkg.mod'"),
    ("tests.mutants:Nope", "has no attribute 'Nope'"),
    ("tests.test_registry:test_builtin_resolves_without_importing_its_framework", "is not a subclass"),
])
def test_bad_backend_reference(reference, match):
    with pytest.raises(BackendLoadError, match=match):
        load_class(reference)


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownBackendError, match="known backends: torch_eager"):
        get_backend_class("nope")


def test_device_names_reach_each_backend_in_its_spelling_and_undeclared_ones_fail():
    from qmoe.implementations.mlx_layerwise import MLXLayerwiseBackend
    from qmoe.implementations.torch_eager import TorchEagerBackend
    from qmoe.reference import SpecError

    assert MLXLayerwiseBackend("cuda").device == "gpu"  # MLX's name; no GPU is touched at construction
    assert TorchEagerBackend("cpu").device == "cpu"
    with pytest.raises(SpecError, match="runs on cpu, cuda, not 'metal'"):
        TorchEagerBackend("metal")


def test_a_backends_own_tests_follow_the_backend_selection(tmp_path):
    """Tests marked ``backend(name)`` run where the run selects that backend (or names none) and are left out,
    counted as not applicable, where it selects others: ``-m conformance --backend jax_prequant`` does not run
    torch_triton's own kernel tests."""
    import subprocess
    import sys

    (tmp_path / "test_owned.py").write_text(
        "import pytest\n\n\n@pytest.mark.backend('torch_eager')\ndef test_eager_own():\n    pass\n\n\n"
        "def test_anyones():\n    pass\n")

    def collect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                               "test_owned.py", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    def collected(*args: str) -> tuple[list[str], str]:
        result = collect(*args)
        return sorted(line.split("::")[-1] for line in result.stdout.splitlines() if "::" in line), result.stdout

    assert collected("--backend", "torch_eager")[0] == ["test_anyones", "test_eager_own"]
    assert collected()[0] == ["test_anyones", "test_eager_own"]
    names, output = collected("--backend", "mlx_layerwise")
    assert names == ["test_anyones"], output
    assert "torch_eager: 1 not applicable: its own tests, backend not selected" in output, output
    (tmp_path / "test_owned.py").write_text("import pytest\n\n\n@pytest.mark.backend\ndef test_nameless():\n    pass\n")
    result = collect("--backend", "torch_eager")
    assert result.returncode != 0 and "pytest.mark.backend needs the backend's name" in result.stderr + result.stdout
