"""Memory: the peak device memory of one benchmark call, and whether a case fits before it is built.

Peak (a column of the tables, so int8's saving shows beside its speed): one untimed call after the timed
rounds, with the framework's own allocator statistics:

* torch (CUDA): ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated`` after the
  call, less the harness's L2-flush buffer (not the layer's);
* MLX: ``mx.reset_peak_memory`` then ``mx.get_peak_memory``;
* JAX: XLA keeps one process-wide ``peak_bytes_in_use`` and offers no reset, so after the first case of a
  run almost no call raises it and the runtime figure cannot be attributed to the call (on the H200 nearly
  every JAX row was empty). A JAX step therefore offers its jitted program's compiled memory analysis
  (``step.memory_analysis``, `CompiledMemory`; `implementations.base.async_step`), and the column holds
  that program's device footprint while it runs: arguments + outputs + temporaries - aliased
  (`JAX_COMPILED_SOURCE`; per device for an expert-parallel program). It is a static per-program figure:
  the same for every call, on CPU as on GPU, comparable between the JAX rows of a table, and without
  what the process holds beside the program (other inputs, the allocator's pool). The runtime peak is
  kept beside it (``peak_memory_runtime_bytes``) when the call raised it; a step without the hook, or
  whose analysis XLA does not give, gets the runtime figure alone, empty with the reason where there is
  none.

The peak includes what is resident during the call: the prepared weights (codes and scales), the inputs,
and for forward+backward the gradients. torch on CPU reports nothing: empty, with the reason.

Fit (a real model's layer must run or be skipped with its estimate as the reason): `estimate` counts the
host bytes the harness and a backend's prepare need (the float32 parameters, one float32 transient of a
backend's upload, the reference check's sub-layer) and the device bytes of weights, gradients and the
routed activations; `fit_refusal` compares them with the machine's host memory and the device's, less
what another framework in the same process holds (`held_by_other_frameworks`): on the H200 (2026-11-30) JAX's
allocator kept ~80 GiB after the JAX cases (its pool grows on demand and is never given back), and a torch
case the estimate admitted against the whole device died out of memory. JAX cases therefore run after the
others of their shape (`plugin.bench_grid`), and what JAX still holds is subtracted for a torch case.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from qmoe.reference.spec import MoESpec

from .metrics import DTYPE_BYTES

#: Shares of host and device memory a case may plan to use (the rest: the interpreter, the frameworks'
#: own pools and fragmentation).
HOST_SHARE = 0.85
DEVICE_SHARE = 0.90


#: ``peak_memory_source`` of a JAX figure from the compiled program's memory analysis (`compiled_footprint`).
JAX_COMPILED_SOURCE = "jax compiled memory_analysis (arguments + outputs + temporaries - aliased)"
#: ``peak_memory_source`` of a JAX figure from the allocator's process-wide peak, raised by this call.
JAX_RUNTIME_SOURCE = "jax memory_stats peak_bytes_in_use"


class CompiledMemory(Protocol):
    """What ``step.memory_analysis()`` returns: XLA's ``CompiledMemoryStats`` of the step's compiled
    program (``jax.jit(f).lower(*args).compile().memory_analysis()``), per device, in bytes."""

    argument_size_in_bytes: int
    output_size_in_bytes: int
    temp_size_in_bytes: int
    alias_size_in_bytes: int


@dataclass(frozen=True)
class Peak:
    """Peak bytes of one call (None when the framework cannot say), where it came from, and why not.
    ``runtime_bytes``: the allocator's figure when ``bytes`` is another one (JAX's compiled analysis)."""

    bytes: int | None
    source: str
    note: str | None = None
    runtime_bytes: int | None = None

    def as_info(self) -> dict:
        info: dict = {"peak_memory_bytes": self.bytes, "peak_memory_source": self.source}
        if self.note:
            info["peak_memory_note"] = self.note
        if self.runtime_bytes is not None:
            info["peak_memory_runtime_bytes"] = self.runtime_bytes
        return info


def measure_peak(framework: str | None, device: str | None, step: Callable[[], Any],
                 exclude_bytes: int = 0) -> Peak:
    """Run ``step`` once and return the peak device memory its framework saw during the call."""
    if framework == "torch":
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or device not in ("cuda", "gpu"):
            step()
            return Peak(None, "torch", "torch reports allocator peaks on CUDA only")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return Peak(max(0, int(torch.cuda.max_memory_allocated()) - exclude_bytes), "torch.cuda.max_memory_allocated")
    if framework == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
        step()
        return Peak(int(mx.get_peak_memory()), "mx.get_peak_memory")
    if framework == "jax":
        return _jax_peak(device, step)
    step()
    return Peak(None, str(framework), "no allocator statistics for this framework")


def _jax_peak(device: str | None, step: Callable[[], Any]) -> Peak:
    """The compiled program's footprint where the step offers its analysis (the runtime peak beside it when
    this call raised it), else the runtime peak alone (module docstring)."""
    runtime = _jax_runtime_peak(device, step)
    analysis = getattr(step, "memory_analysis", None)
    if analysis is None:
        return runtime
    footprint, why_not = _jax_compiled_peak(analysis)
    if footprint is None:
        note = runtime.note and f"{runtime.note}; the compiled memory analysis: {why_not}"
        return Peak(runtime.bytes, runtime.source, note)
    return Peak(footprint, JAX_COMPILED_SOURCE, runtime_bytes=runtime.bytes)


def _jax_runtime_peak(device: str | None, step: Callable[[], Any]) -> Peak:
    """Run ``step`` once; XLA's process-wide peak if this call raised it, else None with the reason."""
    import jax

    try:
        dev = jax.devices("gpu" if device in ("cuda", "gpu") else "cpu")[0]
    except RuntimeError as exc:
        step()
        return Peak(None, "jax", f"no JAX device: {exc}")
    before = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    step()
    after = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    if after is None:
        return Peak(None, "jax", f"JAX reports no memory statistics on {dev.platform}")
    if before is not None and after <= before:
        return Peak(None, "jax", "JAX's peak is process-wide with no reset, and this call did not raise it")
    return Peak(int(after), JAX_RUNTIME_SOURCE)


def _jax_compiled_peak(analysis: Callable[[], CompiledMemory | None]) -> tuple[int | None, str | None]:
    """(footprint bytes, None), or (None, why not) where XLA gives no analysis of the program."""
    try:
        stats = analysis()
    except Exception as exc:  # the figure is optional: a platform or program without it must not fail the case
        return None, f"{type(exc).__name__}: {exc}"
    if stats is None:
        return None, "XLA gives none for this program on this platform"
    footprint = compiled_footprint(stats)
    if footprint is None:
        return None, f"XLA's analysis lacks the argument/output/temporary/alias sizes: {stats!r}"
    return footprint, None


def compiled_footprint(stats: CompiledMemory) -> int | None:
    """A compiled program's device bytes while it runs: its arguments, outputs and temporaries, less the
    outputs that reuse (alias) an argument's buffer. None when ``stats`` lacks one of the four sizes."""
    sizes = [getattr(stats, f"{name}_size_in_bytes", None) for name in ("argument", "output", "temp", "alias")]
    if any(size is None for size in sizes):
        return None
    argument, output, temp, alias = (int(size) for size in sizes)
    return argument + output + temp - alias


# -- will the case fit ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    host_bytes: int
    device_bytes: int


def estimate(spec: MoESpec, tokens: int, dtype: str, pass_: str, check_bytes: int) -> Estimate:
    """Host and device bytes one case needs (see the module docstring); an estimate, not a measurement."""
    weights = spec.experts * 3 * spec.hidden * spec.ffn + 3 * spec.hidden * spec.shared_ffn
    router = spec.hidden * spec.experts
    width = DTYPE_BYTES[dtype]
    host = 2 * 4 * (weights + router) + check_bytes
    rows = tokens * spec.top_k
    activations = rows * (2 * spec.hidden + 3 * spec.ffn) * width + 4 * tokens * spec.hidden * width
    device = weights * width + router * 4
    if pass_ == "forward_backward":
        device += weights * width + router * 4 + 2 * activations  # weight gradients, saved activations
    return Estimate(host, device + activations)


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory_bytes(device: str | None) -> int | None:
    """Total memory of the GPU (torch's view, else JAX's), None on CPU or when no framework can say."""
    if device not in ("cuda", "gpu"):
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:
        pass
    try:
        import jax

        return int((jax.devices("gpu")[0].memory_stats() or {}).get("bytes_limit") or 0) or None
    except Exception:  # no JAX GPU either: nothing to compare with
        return None


def held_by_other_frameworks(framework: str | None, device: str | None) -> int:
    """Device bytes this process holds outside ``framework``'s own allocator: for a torch case, everything in
    use on the GPU that torch did not reserve (JAX's pool, the CUDA contexts); 0 for other frameworks, on
    CPU, or where torch cannot say (JAX's own limit is `peers.JaxRaggedDotPeer.benchmark_limit`'s)."""
    if framework != "torch" or device not in ("cuda", "gpu"):
        return 0
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return max(0, int(total - free - torch.cuda.memory_reserved()))


def fit_refusal(need: Estimate, host_total: int | None, device_total: int | None, device: str | None,
                held_elsewhere: int = 0) -> str | None:
    """Why a case with this estimate is not built here, or None. On CPU the device is the host.
    ``held_elsewhere``: device bytes another framework holds (`held_by_other_frameworks`), not available."""
    gib = 2 ** 30
    if device not in ("cuda", "gpu"):
        need = Estimate(need.host_bytes + need.device_bytes, 0)
    if host_total and need.host_bytes > HOST_SHARE * host_total:
        return (f"needs ~{need.host_bytes / gib:.0f} GiB of host memory (float32 parameters, one upload transient, "
                f"the check's sub-layer) > {HOST_SHARE:.0%} of {host_total / gib:.0f} GiB")
    if device_total and need.device_bytes > DEVICE_SHARE * device_total - held_elsewhere:
        others = (f" less {held_elsewhere / gib:.0f} GiB held outside torch's allocator (JAX's pool, CUDA contexts)"
                  if held_elsewhere else "")
        return (f"needs ~{need.device_bytes / gib:.0f} GiB of device memory (weights, gradients, activations) "
                f"> {DEVICE_SHARE:.0%} of {device_total / gib:.0f} GiB{others}")
    return None
