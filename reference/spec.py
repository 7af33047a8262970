"""The MoE layer's shape and options (`MoESpec`) and its parameters (`MoEParams`).

Layout (DESIGN.md): ``router [H, E]``, optional ``router_bias [E]`` (sigmoid routers only),
``w13 [E, H, 2F]`` (gate = first F columns, up = last F), ``w2 [E, F, H]``, optional shared
expert ``shared_w13 [H, 2S]`` and ``shared_w2 [S, H]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

RouterFamily = Literal["softmax_topk", "sigmoid_topk"]
RoutingMode = Literal["routed", "bypass"]
ROUTER_FAMILIES: tuple[str, ...] = ("softmax_topk", "sigmoid_topk")

#: Parameter names in a fixed order; gradients use the same names (plus ``x``).
PARAM_NAMES: tuple[str, ...] = ("router", "router_bias", "w13", "w2", "shared_w13", "shared_w2")


class SpecError(ValueError):
    """A MoE spec, parameter set or input that does not describe a valid layer."""


@dataclass(frozen=True)
class MoESpec:
    """Shape and options of one MoE layer.

    ``renormalize``: divide the selected gate weights by their sum (Mixtral, Qwen3-MoE).
    ``routed_scaling``: DeepSeek-V3's factor applied to the (normalized) sigmoid gate weights.
    ``capacity_factor``: None is dropless; otherwise each expert keeps at most
    ``ceil(capacity_factor * T * top_k / experts)`` assignments, in token order.
    """

    hidden: int
    ffn: int
    experts: int
    top_k: int
    router: RouterFamily = "softmax_topk"
    renormalize: bool = True
    routed_scaling: float = 1.0
    shared_ffn: int = 0
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn", "experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise SpecError(f"MoESpec.{name} must be a positive integer, got {value!r}")
        if self.top_k > self.experts:
            raise SpecError(
                f"MoESpec.top_k={self.top_k} is larger than experts={self.experts}: "
                "a token cannot pick more experts than exist"
            )
        if self.router not in ROUTER_FAMILIES:
            raise SpecError(f"unknown router family {self.router!r}; known: {', '.join(ROUTER_FAMILIES)}")
        if self.shared_ffn < 0:
            raise SpecError(f"MoESpec.shared_ffn must be >= 0, got {self.shared_ffn}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise SpecError(f"MoESpec.capacity_factor must be > 0 or None, got {self.capacity_factor}")

    def capacity(self, tokens: int) -> int | None:
        """Per-expert assignment limit for ``tokens`` tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return int(np.ceil(self.capacity_factor * tokens * self.top_k / self.experts))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every parameter this spec uses (absent ones are left out)."""
        h, f, e, s = self.hidden, self.ffn, self.experts, self.shared_ffn
        shapes: dict[str, tuple[int, ...]] = {"router": (h, e), "w13": (e, h, 2 * f), "w2": (e, f, h)}
        if self.router == "sigmoid_topk":
            shapes["router_bias"] = (e,)
        if s:
            shapes["shared_w13"] = (h, 2 * s)
            shapes["shared_w2"] = (s, h)
        return shapes

    def replace(self, **changes: Any) -> MoESpec:
        return dataclasses.replace(self, **changes)


@dataclass
class MoEParams:
    """NumPy parameters of one MoE layer (float64 in the reference; any float dtype accepted)."""

    router: np.ndarray
    w13: np.ndarray
    w2: np.ndarray
    router_bias: np.ndarray | None = None
    shared_w13: np.ndarray | None = None
    shared_w2: np.ndarray | None = None

    @classmethod
    def random(cls, spec: MoESpec, seed: int = 0, expert_spread: float = 4.0) -> MoEParams:
        """Seeded random parameters with 1/sqrt(fan_in) scale.

        Each expert gets its own magnitude, log-uniform over a ``expert_spread`` range, so that a
        backend using one scale for all experts (instead of one per expert) loses visible precision.
        """
        rng = np.random.default_rng(seed)
        h, f, e, s = spec.hidden, spec.ffn, spec.experts, spec.shared_ffn
        magnitude = np.exp(rng.uniform(-0.5, 0.5, size=(e, 1, 1)) * np.log(expert_spread))
        params = cls(
            router=rng.standard_normal((h, e)) / np.sqrt(h),
            w13=rng.standard_normal((e, h, 2 * f)) / np.sqrt(h) * magnitude,
            w2=rng.standard_normal((e, f, h)) / np.sqrt(f) * magnitude,
        )
        if spec.router == "sigmoid_topk":
            params.router_bias = rng.standard_normal(e) * 0.1
        if s:
            params.shared_w13 = rng.standard_normal((h, 2 * s)) / np.sqrt(h)
            params.shared_w2 = rng.standard_normal((s, h)) / np.sqrt(s)
        return params

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for every parameter that is present, in PARAM_NAMES order."""
        for name in PARAM_NAMES:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.items())

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> MoEParams:
        """A new MoEParams with ``fn`` applied to every present array."""
        return MoEParams(**{name: fn(value) for name, value in self.items()})

    def replace(self, **changes: Any) -> MoEParams:
        return dataclasses.replace(self, **changes)

    def copy(self) -> MoEParams:
        return self.map(np.array)

    def validate(self, spec: MoESpec) -> None:
        """Raise SpecError naming the first parameter whose presence, shape or dtype is wrong."""
        expected = spec.param_shapes()
        for name in PARAM_NAMES:
            value = getattr(self, name)
            if name not in expected:
                if value is not None and name != "router_bias":
                    raise SpecError(f"parameter {name} is given but the spec does not use it ({spec})")
                continue
            if value is None:
                raise SpecError(f"parameter {name} is missing; the spec needs shape {expected[name]}")
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise SpecError(f"parameter {name} must be a floating NumPy array, got {type(value).__name__}"
                                f"{'' if not isinstance(value, np.ndarray) else ' of dtype ' + str(value.dtype)}")
            if value.shape != expected[name]:
                raise SpecError(f"parameter {name} has shape {value.shape}, expected {expected[name]}")
            if not np.all(np.isfinite(value)):
                bad = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
                raise SpecError(f"parameter {name} has a non-finite value at index {bad}")


def validate_input(spec: MoESpec, x: np.ndarray, what: str = "x") -> None:
    """Raise SpecError if ``x`` is not a finite float array of shape [T, hidden] with T >= 1."""
    if not isinstance(x, np.ndarray):
        raise SpecError(f"{what} must be a NumPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise SpecError(f"{what} must have a floating dtype, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != spec.hidden:
        raise SpecError(f"{what} has shape {x.shape}, expected [tokens, hidden={spec.hidden}]")
    if x.shape[0] < 1:
        raise SpecError(f"{what} has no tokens (shape {x.shape})")
    finite = np.isfinite(x)
    if not finite.all():
        token, feature = (int(i) for i in np.argwhere(~finite)[0])
        count = int((~finite).sum())
        raise SpecError(
            f"{what} contains {count} non-finite value(s); first at token {token}, feature {feature} "
            f"(value {x[token, feature]})"
        )
