"""Where backends come from: built-ins by name, the ``qmoe.backends`` entry-point group, and
classes named on the command line (``--backend-module pkg.module:Class``).

Nothing here imports a framework: a backend module is imported only when its backend is asked for.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from .base import Backend

ENTRY_POINT_GROUP = "qmoe.backends"

#: Built-in backends: name -> "module:Class". Imported lazily.
BUILTIN_BACKENDS: dict[str, str] = {
    "torch_eager": "qmoe.implementations.torch_eager:TorchEagerBackend",
    "torch_triton": "qmoe.implementations.torch_triton:TorchTritonBackend",
    "mlx_layerwise": "qmoe.implementations.mlx_layerwise:MLXLayerwiseBackend",
    "jax_prequant": "qmoe.implementations.jax_prequant:JaxPrequantBackend",
}

_extra: dict[str, type[Backend]] = {}


class UnknownBackendError(LookupError):
    """A backend name that no built-in, entry point or registered class provides."""


class BackendLoadError(ImportError):
    """A backend reference ("module:Class") that cannot be imported or is not a Backend."""


def load_class(reference: str) -> type[Backend]:
    """Import "package.module:ClassName" and check that it is a Backend subclass with a name."""
    module_name, sep, class_name = reference.partition(":")
    if not sep or not module_name or not class_name:
        raise BackendLoadError(f"backend reference {reference!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendLoadError(f"cannot import backend module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BackendLoadError(f"module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendLoadError(f"{reference} is not a subclass of qmoe.implementations.Backend")
    if not isinstance(getattr(cls, "name", None), str) or not hasattr(cls, "capabilities"):
        raise BackendLoadError(f"{reference} must set the class attributes 'name' and 'capabilities'")
    return cls


def register(cls: type[Backend]) -> type[Backend]:
    """Make ``cls`` available under ``cls.name`` for this process (also usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{cls!r} is not a Backend subclass")
    _extra[cls.name] = cls
    return cls


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every known backend name: built-ins, entry points, then registered classes."""
    names = list(BUILTIN_BACKENDS)
    for name in [*_entry_points(), *_extra]:
        if name not in names:
            names.append(name)
    return names


def get_backend_class(name: str) -> type[Backend]:
    """The class behind ``name``. Importing a backend module must not need its framework."""
    if name in _extra:
        return _extra[name]
    reference = BUILTIN_BACKENDS.get(name) or _entry_points().get(name)
    if reference is None:
        raise UnknownBackendError(f"unknown backend {name!r}; known backends: {', '.join(backend_names())}")
    return load_class(reference)


def get_backend(name: str, device: str | None = None) -> Backend:
    """An instance of backend ``name`` (raises with the reason if it is unavailable here)."""
    cls = get_backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise RuntimeError(f"backend {name!r} is unavailable here: {reason}")
    return cls(device)


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    usable = []
    for name in backend_names():
        try:
            if get_backend_class(name).unavailable_reason() is None:
                usable.append(name)
        except BackendLoadError:
            continue
    return usable
