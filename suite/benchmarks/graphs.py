"""CUDA-graph capture of a benchmark step (``--bench-cuda-graph``, and the int8 GEMM bound always on CUDA).

A captured step replays its recorded kernels with one launch: what remains is device time, not the host's
launch overhead (many small kernels, a loop over experts). Capture needs a step whose work is all on the
device: no host synchronization, no data-dependent host decision, static shapes. A step offers its body
without the final synchronization as ``step.graph_body`` (`implementations.base.synchronized_step`); a step
without one is tried as it is, with ``torch.cuda.synchronize`` made a no-op during capture only (illegal
while capturing, and the replay synchronizes anyway). Whatever cannot be captured runs as it is, and the
reason is recorded (`Captured.reason`), never hidden.

The replayed step returns the captured outputs: tensors the graph overwrites on its next replay, so each
distinct input gets its own graph (the harness rotates inputs) and its outputs stay those of its last call.

A graph records device addresses, not tensors: memory allocated during capture stays in the graph's pool,
but the tensors the body reads that were made before capture (its inputs, the int8 bound's codes) live only
as long as Python holds them. The replaying step therefore holds the original step and its body (and so
every tensor their closures hold): without that, the harness's ``steps = [replays]`` freed them, the
allocator handed their memory to the next buffer (the L2 flush, the next case), and the replay read garbage
(the H200 run of 2026-11-30: ``gemm_bound_int8`` forward's exactness check failed at top-k 2 and 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmoe.implementations.base import synchronized_step

#: Eager calls on a side stream before capture (autograd, cuBLAS workspaces and compiled code settle first).
WARMUP_CALLS = 3


@dataclass
class Captured:
    """The step to time (a replay, or the original step when capture failed) and what happened."""

    step: Callable[[], Any]
    captured: bool
    reason: str | None = None


def capture(step: Callable[[], Any]) -> Captured:
    """Record ``step`` (its ``graph_body`` if it has one) into a CUDA graph; returns the replaying step."""
    import torch

    if not torch.cuda.is_available():
        return Captured(step, False, "no CUDA device")
    body = getattr(step, "graph_body", None) or step
    real_sync = torch.cuda.synchronize
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                body()
        torch.cuda.current_stream().wait_stream(side)
        real_sync()
        torch.cuda.synchronize = _no_sync  # type: ignore[assignment]
        with torch.cuda.graph(graph):
            out = body()
    except Exception as exc:  # not capturable: timed as it is, with the reason recorded
        torch.cuda.synchronize = real_sync
        _discard(graph)
        return Captured(step, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
    finally:
        torch.cuda.synchronize = real_sync

    return Captured(replaying(graph, out, real_sync, keep_alive=(step, body)), True)


def replaying(graph, out: Any, sync: Callable[[], None], keep_alive: tuple = ()) -> Callable[[], Any]:
    """The step that replays ``graph`` and returns ``out`` (what the captured call returned). It holds the
    graph (and its memory pool) and ``keep_alive`` (the captured step and body, whose closures hold the
    tensors the graph reads): a replay must never outlive its inputs."""
    def replay_body():
        graph.replay()  # into torch's current stream: the replay is timed stream-ordered
        return out

    replay = synchronized_step(replay_body, sync, torch_stream=True)
    replay.graph = graph  # type: ignore[attr-defined]
    replay.keep_alive = keep_alive  # type: ignore[attr-defined]
    return replay


def _no_sync(*args, **kwargs) -> None:
    return None


def _discard(graph) -> None:
    """Leave a failed capture cleanly (a capture that raised may leave the stream in capture mode)."""
    import torch

    try:
        graph.reset()
    except Exception:  # nothing was recorded
        pass
    try:
        torch.cuda.synchronize()
    except Exception:  # the failed capture's error state; the next real call reports it
        pass
