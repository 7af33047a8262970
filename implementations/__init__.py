"""Backends under test: the interface, the registry and one module per backend.

Public names: `Backend`, `Capabilities`, `get_backend`, `available_backends`, `register`.
"""

from .base import Backend, Capabilities
from .registry import (
    BUILTIN_BACKENDS,
    ENTRY_POINT_GROUP,
    BackendLoadError,
    UnknownBackendError,
    available_backends,
    backend_names,
    get_backend,
    get_backend_class,
    load_class,
    register,
)

__all__ = [
    "BUILTIN_BACKENDS", "ENTRY_POINT_GROUP", "Backend", "BackendLoadError", "Capabilities", "UnknownBackendError",
    "available_backends", "backend_names", "get_backend", "get_backend_class", "load_class", "register",
]
