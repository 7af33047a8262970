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
