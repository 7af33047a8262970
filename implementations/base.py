"""The backend interface: one class per backend, declared capabilities, NumPy at the boundary.

A backend converts NumPy inputs to its own arrays in `prepare`/`forward`/`backward` and returns
NumPy; conformance never times anything, so those copies are free to happen. Benchmarks use
`benchmark_step`, which works on device-resident data only.

Write a backend by subclassing `Backend`, filling in `name` and `capabilities`, and
implementing the abstract methods; optional methods are gated by capabilities, so the suite
never calls one that is not declared.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from qmoe.reference.layer import ForwardResult
from qmoe.reference.spec import ROUTER_FAMILIES, MoEParams, MoESpec, SpecError

Pass = Literal["forward", "backward"]
UpdateKind = Literal["master_float", "requantize"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers; the suite asks these, never the backend's name.

    ``schemes``: scheme names from `qmoe.reference.schemes.SCHEMES` it implements.
    ``passes``: ``forward`` and/or ``backward``.
    ``dtypes``: compute dtypes (``float32``, ``bfloat16``, ...). Inputs are given in float64 holding
    values exactly representable in that dtype.
    ``devices``: where it can run (``cpu``, ``cuda``, ``gpu``, ``metal``).
    ``routers``: router families. ``capacity``: supports ``capacity_factor``.
    ``shared_expert``: supports ``shared_ffn > 0``.
    ``quantizer``: offers `Backend.quantize_int8` (conformance level 1).
    ``bypass``: offers `Backend.expert_outputs` (every expert on every token).
    ``update``: ``master_float`` or ``requantize`` when `Backend.update` is offered (level 5).
    ``layerwise_trainer``: offers `Backend.train_stack` (level 5, block-coordinate descent).
    ``qat_export``: offers `Backend.eval_forward`, `export_int8` and `load_exported` (the QAT checks).
    ``expert_parallel``: device counts N for which `prepare(..., ep_size=N)` shards experts (level 6).
    ``expert_parallel_processes``: the N devices are N processes, one device each (torch.distributed):
    every rank joins a group with `Backend.join_expert_parallel` and then calls prepare / forward /
    backward collectively with the same arguments; False: one process sees all N devices (JAX).
    ``min_multiple``: per scheme, a size that hidden and ffn must be multiples of (e.g. MLX groups).
    """

    schemes: tuple[str, ...]
    passes: tuple[str, ...] = ("forward", "backward")
    dtypes: tuple[str, ...] = ("float32",)
    devices: tuple[str, ...] = ("cpu",)
    routers: tuple[str, ...] = ROUTER_FAMILIES
    capacity: bool = True
    shared_expert: bool = True
    quantizer: bool = False
    bypass: bool = False
    update: UpdateKind | None = None
    layerwise_trainer: bool = False
    qat_export: bool = False
    expert_parallel: tuple[int, ...] = ()
    expert_parallel_processes: bool = False
    min_multiple: dict[str, int] = field(default_factory=dict)

    def unsupported(self, spec: MoESpec, scheme: str) -> str | None:
        """Why this backend cannot run ``spec`` under ``scheme``, or None if it can."""
        if scheme not in self.schemes:
            return f"does not declare scheme {scheme}"
        if spec.router not in self.routers:
            return f"does not declare router {spec.router}"
        if spec.capacity_factor is not None and not self.capacity:
            return "does not declare capacity (token dropping)"
        if spec.shared_ffn and not self.shared_expert:
            return "does not declare a shared expert"
        multiple = self.min_multiple.get(scheme)
        if multiple and (spec.hidden % multiple or spec.ffn % multiple):
            return f"needs hidden and ffn multiples of {multiple} for {scheme}"
        return None


#: The frameworks' names for an NVIDIA GPU (torch: cuda; JAX, MLX: gpu).
_GPU_NAMES = ("cuda", "gpu")


class Backend(abc.ABC):
    """A MoE layer implementation under test. Instances are cheap; state lives in `prepare`'s result."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, device: str | None = None) -> None:
        self.device = self.declared_device(device) or self.capabilities.devices[0]
        if self.device not in self.capabilities.devices:
            raise SpecError(f"{self.name} runs on {', '.join(self.capabilities.devices)}, not {self.device!r}")

    @classmethod
    def declared_device(cls, device: str | None) -> str | None:
        """``device`` as this backend spells it: a CUDA GPU is ``cuda`` to torch, ``gpu`` to JAX and MLX,
        and either name reaches a backend that declares the other."""
        declared = cls.capabilities.devices
        if device in _GPU_NAMES and device not in declared:
            return next((name for name in _GPU_NAMES if name in declared), device)
        return device

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when usable here; otherwise why not (a missing package, no device). Must not raise."""
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        """Framework versions, for the report header and benchmark metadata."""
        return {}

    def device_count(self) -> int | None:
        """How many devices of its kind this backend sees (expert parallelism needs ``ep_size`` of them);
        None when it cannot run short of them (CPU processes, simulated devices set up by the suite)."""
        return None

    # -- required -----------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> Any:
        """Move parameters to the device and quantize whatever the scheme quantizes once."""

    @abc.abstractmethod
    def forward(self, prepared: Any, x: np.ndarray) -> ForwardResult:
        """y [T, H], expert_ids [T, k], gate_weights [T, k], balance_loss, as NumPy."""

    @abc.abstractmethod
    def effective_weights(self, prepared: Any) -> dict[str, np.ndarray]:
        """The float (dequantized) weights the forward actually computes with, by parameter name."""

    # -- optional, gated by capabilities --------------------------------------------------------
    def backward(self, prepared: Any, x: np.ndarray, dy: np.ndarray, balance_coeff: float = 0.0
                 ) -> dict[str, np.ndarray]:
        """Gradients of ``sum(y * dy) + balance_coeff * balance_loss``: ``x`` and every parameter."""
        raise NotImplementedError(f"{self.name} does not offer backward")

    def quantize_int8(self, values: np.ndarray, axis: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric int8 codes and scales (keepdims) of ``values`` reduced over ``axis``."""
        raise NotImplementedError(f"{self.name} does not offer quantize_int8")

    def expert_outputs(self, prepared: Any, x: np.ndarray) -> np.ndarray:
        """Bypass routing: every expert's output on every token, [E, T, H], unweighted."""
        raise NotImplementedError(f"{self.name} does not offer expert_outputs")

    def update(self, prepared: Any, x: np.ndarray, dy: np.ndarray, lr: float) -> Any:
        """One SGD step on the loss ``sum(y * dy)``; returns the new prepared state."""
        raise NotImplementedError(f"{self.name} does not offer update")

    def train_stack(self, spec: MoESpec, layers: list[MoEParams], x: np.ndarray, target: np.ndarray,
                    scheme: str, dtype: str, lr: float, group_size: int) -> list[dict[str, np.ndarray]]:
        """One pass of block-coordinate descent over a residual stack; returns effective weights per layer."""
        raise NotImplementedError(f"{self.name} does not offer train_stack")

    def eval_forward(self, prepared: Any, x: np.ndarray) -> ForwardResult:
        """QAT: the evaluation forward, on the master weights, never fake-quantized."""
        raise NotImplementedError(f"{self.name} does not offer eval_forward")

    def export_int8(self, prepared: Any) -> dict[str, np.ndarray]:
        """QAT: the checkpoint: ``{name}.int8`` codes and ``{name}.scale`` for quantized tensors, ``{name}``
        otherwise."""
        raise NotImplementedError(f"{self.name} does not offer export_int8")

    def load_exported(self, spec: MoESpec, exported: dict[str, np.ndarray]) -> Any:
        """QAT: a prepared layer computing with the checkpoint's values, not quantized again."""
        raise NotImplementedError(f"{self.name} does not offer load_exported")

    @classmethod
    def join_expert_parallel(cls, rank: int, world_size: int, init_method: str, device: str | None = None) -> None:
        """Multi-process expert parallelism (``capabilities.expert_parallel_processes``): join the process
        group of ``world_size`` ranks at ``init_method`` (a ``file://`` or ``tcp://`` rendezvous) as ``rank``."""
        raise NotImplementedError(f"{cls.name} does not offer multi-process expert parallelism")

    def benchmark_step(self, prepared: Any, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        """A zero-argument callable running one ``pass_`` on device-resident copies of ``x``/``dy``.

        It returns only after the device finished. Host-device copies happen here, outside it. A ``backward``
        (forward+backward) call computes the layer's output y as well as every gradient, as a training step
        whose loss reads y does, and keeps y live (returns it, or waits on it): a lazy or dead-code-eliminating
        framework otherwise skips the forward's combine, which no gradient needs, and times less work than a
        torch layer's forward+backward (jax_prequant's and the JAX and MLX peers' steps did until 2026-12-01).
        Optional: a CUDA step whose device work all goes to torch's current stream may carry
        ``step.stream_body``, the same work without the final synchronization (`synchronized_step` makes
        both); the benchmarks then time it between two CUDA events on that stream, with no host round trip
        inside the timed interval, as triton's ``do_bench`` does.

        Optional for any other step: ``step.async_body`` enqueues one call and returns its output without
        waiting, and ``step.wait(output)`` blocks until that output is ready (`async_step` makes the step
        from both). The output of the last of several ``async_body`` calls being ready must mean that all of
        them finished: their work runs in order on the same stream(s), as a JAX program's does. The benchmarks
        then run several calls per synchronized round and wait once, so the host's round trip is spread over
        them (`suite.benchmarks.harness.time_rounds`).

        Optional for a JAX step: ``step.memory_analysis()`` returns XLA's memory analysis of the compiled
        program one call runs (``jitted.lower(*args).compile().memory_analysis()``, or None where XLA gives
        none), which `suite.benchmarks.memory` reports as the call's device footprint: XLA's runtime peak
        is process-wide with no reset, so it rarely belongs to one call. `async_step` attaches it.

        Optional for any step: ``step.extra_info``, a dict of what the step says of itself (the variant or
        formulation that runs), which the benchmarks add to the case's record (pytest-benchmark's extra_info).
        """
        raise NotImplementedError(f"{self.name} does not offer benchmark_step")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}>"


def synchronized_step(body: Callable[[], Any], synchronize: Callable[[], None], *, torch_stream: bool = False
                      ) -> Callable[[], Any]:
    """The benchmark step ``body`` then ``synchronize`` (`Backend.benchmark_step`). ``step.graph_body`` is
    ``body``, for CUDA-graph capture. ``torch_stream``: ``body`` enqueues every piece of its device work on
    torch's current CUDA stream (no side stream, no other framework's stream, no collective), so the step
    also offers ``step.stream_body`` (= ``body``) for stream-ordered timing; host synchronizations inside
    ``body`` (a ``.tolist()`` of group sizes) are allowed, they only cost their time."""
    def step() -> Any:
        out = body()
        synchronize()
        return out

    step.graph_body = body  # type: ignore[attr-defined]
    if torch_stream:
        step.stream_body = body  # type: ignore[attr-defined]
    return step


def async_step(body: Callable[[], Any], wait: Callable[[Any], Any],
               memory_analysis: Callable[[], Any] | None = None) -> Callable[[], Any]:
    """The benchmark step ``body`` then ``wait(output)``, returning ``body``'s output
    (`Backend.benchmark_step`). It offers ``step.async_body`` (= ``body``) and ``step.wait`` (= ``wait``), so
    a synchronized round may enqueue several calls and wait for the last one alone. ``wait`` gets the output
    because some frameworks wait for an array, not for a device (``jax.block_until_ready``).
    ``memory_analysis``: offered as ``step.memory_analysis`` when given (a JAX program's compiled memory
    analysis, `Backend.benchmark_step`)."""
    def step() -> Any:
        out = body()
        wait(out)
        return out

    step.async_body = body  # type: ignore[attr-defined]
    step.wait = wait  # type: ignore[attr-defined]
    if memory_analysis is not None:
        step.memory_analysis = memory_analysis  # type: ignore[attr-defined]
    return step
