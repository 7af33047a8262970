"""N worker processes that form one expert-parallel group, for backends whose N devices are N processes
(``capabilities.expert_parallel_processes``: torch.distributed). Level 6 and the expert-parallel
benchmark hand them work; the frameworks' own launchers (torchrun) do the same for users.

One pool per (group-joining class, N, device) for the whole pytest session: spawning and importing a
framework costs seconds, so the processes are started once and fed tasks over queues. Each task is a
function named ``"module:function"`` called on every rank with the same payload; its per-rank results
come back in rank order. Nothing waits without a limit: a rank that raises sends its traceback and the
pool is torn down (the other ranks may be blocked in a collective), a rank that dies or stays silent past
the timeout fails the call with its exit code, and the next call starts a fresh pool.

The workers' environment is explicit (`worker_environment`): on CPU ``TRITON_INTERPRET=1`` (the path
the conformance run uses for Triton kernels there) and one thread per process (N processes share the
cores); on GPUs ``NCCL_NVLS_ENABLE=0``.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import queue
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

#: Seconds for a worker to start (spawn, import the framework, join the group) and for one task.
START_TIMEOUT_S = float(os.environ.get("QMOE_EP_START_TIMEOUT_S", "180"))
TASK_TIMEOUT_S = float(os.environ.get("QMOE_EP_TASK_TIMEOUT_S", "300"))


class WorkerError(RuntimeError):
    """A rank failed (its traceback is in the message), died, or did not answer in time."""


def reference_of(obj: Any) -> str:
    """``"module:qualname"`` of a class or function, importable in a fresh process."""
    return f"{obj.__module__}:{obj.__qualname__}"


def load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    value: Any = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


def joining_class(cls: type) -> type:
    """The class in ``cls``'s MRO that defines `join_expert_parallel`: subclasses of one backend (mutants,
    controls) share its pool."""
    return next(c for c in cls.__mro__ if "join_expert_parallel" in c.__dict__)


def worker_environment(device: str | None) -> dict[str, str]:
    """What every worker's environment sets, beyond the parent's."""
    if device in ("cuda", "gpu"):
        return {"NCCL_NVLS_ENABLE": "0"}
    return {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _worker(rank: int, size: int, join_ref: str, init_method: str, device: str | None, requests, replies) -> None:
    try:
        import torch  # noqa: F401  (the workers are torch.distributed ranks; torch also sets its threads here)

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        load(join_ref).join_expert_parallel(rank, size, init_method, device)
    except BaseException:
        replies.put((rank, "start", "error", traceback.format_exc()))
        return
    replies.put((rank, "start", "ok", os.getpid()))
    parent = multiprocessing.parent_process()
    while True:
        try:
            item = requests.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the session is gone: do not linger
            continue
        if item is None:
            return
        task_id, fn_ref, payload = item
        try:
            result = load(fn_ref)(payload)
        except BaseException:
            replies.put((rank, task_id, "error", traceback.format_exc()))
            continue
        replies.put((rank, task_id, "ok", result))


class WorkerPool:
    """``size`` spawned ranks of one process group; `call` runs a task on all of them."""

    def __init__(self, join_cls: type, size: int, device: str | None) -> None:
        self.join_ref = reference_of(join_cls)
        self.size = size
        self.device = device
        self.processes: list = []
        self.requests: list = []
        self.replies = None
        self._rendezvous = os.path.join(tempfile.gettempdir(), f"qmoe-ep-{uuid.uuid4().hex}")
        self._tasks = 0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.replies = context.Queue()
        init_method = f"file://{self._rendezvous}"
        saved = dict(os.environ)
        os.environ.update(worker_environment(self.device))  # a spawned child starts with this environment
        try:
            for rank in range(self.size):
                requests = context.Queue()
                process = context.Process(target=_worker, name=f"qmoe-ep-rank{rank}", daemon=True,
                                          args=(rank, self.size, self.join_ref, init_method, self.device, requests,
                                                self.replies))
                process.start()
                self.processes.append(process)
                self.requests.append(requests)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._collect("start", START_TIMEOUT_S)

    def _collect(self, task_id: Any, timeout: float) -> list:
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.size:
            remaining = deadline - time.monotonic()
            try:
                rank, got_id, status, value = self.replies.get(timeout=max(0.05, min(remaining, 1.0)))
            except queue.Empty:
                dead = [(p.name, p.exitcode) for p in self.processes if p.exitcode is not None]
                if dead or remaining <= 0:
                    self.close()
                    what = f"ranks exited: {dead}" if dead else f"no answer from ranks " \
                        f"{sorted(set(range(self.size)) - set(results))} within {timeout:g} s"
                    where = f"{self.join_ref}, {self.device or 'cpu'}"
                    raise WorkerError(f"expert-parallel group of {self.size} ({where}): task {task_id!r}: {what}"
                                      ) from None
                continue
            if got_id != task_id:
                continue  # a late answer to an abandoned task
            if status == "error":
                self.close()  # the other ranks may wait in a collective that will never complete
                raise WorkerError(f"rank {rank} of {self.size} failed in task {task_id!r}:\n{value}")
            results[rank] = value
        return [results[r] for r in range(self.size)]

    def call(self, fn: Callable | str, payload: Any, timeout: float = TASK_TIMEOUT_S) -> list:
        """``fn(payload)`` on every rank (a collective task); the results in rank order."""
        if not self.alive:
            raise WorkerError("the worker pool was closed after an earlier failure")
        self._tasks += 1
        task_id = self._tasks
        fn_ref = fn if isinstance(fn, str) else reference_of(fn)
        for requests in self.requests:
            requests.put((task_id, fn_ref, payload))
        return self._collect(task_id, timeout)

    @property
    def alive(self) -> bool:
        return bool(self.processes) and all(p.is_alive() for p in self.processes)

    def close(self) -> None:
        """Stop the ranks this pool started: ask, then terminate those still running."""
        for requests in self.requests:
            try:
                requests.put(None)
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(timeout=5)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self.processes, self.requests = [], []
        if os.path.exists(self._rendezvous):
            os.unlink(self._rendezvous)


_pools: dict[tuple, WorkerPool] = {}


def pool(backend_cls: type, size: int, device: str | None) -> WorkerPool:
    """The session's pool for ``backend_cls``'s process group of ``size`` ranks (started on first use, and
    again after a failure closed it)."""
    join_cls = joining_class(backend_cls)
    key = (reference_of(join_cls), size, device)
    current = _pools.get(key)
    if current is None or not current.alive:
        _pools[key] = WorkerPool(join_cls, size, device)
    return _pools[key]


@atexit.register
def close_all() -> None:
    for worker_pool in _pools.values():
        worker_pool.close()
    _pools.clear()


# -- tasks (run in the workers) ----------------------------------------------------------------------------------
_instances: dict[tuple, Any] = {}


def backend_in_worker(reference: str, device: str | None, **options) -> Any:
    key = (reference, device, tuple(sorted(options.items())))
    if key not in _instances:
        _instances[key] = load(reference)(device, **options)
    return _instances[key]


def run_layer(payload: dict) -> dict:
    """Task: prepare the layer sharded over the group and run forward and/or backward on the whole batch
    (every rank gets the whole result; rank 0's is compared, the others' must equal it)."""
    backend = backend_in_worker(payload["backend"], payload["device"])
    prepared = backend.prepare(payload["spec"], payload["params"], payload["scheme"], payload["dtype"],
                               ep_size=payload["ep_size"])
    out: dict = {}
    if "forward" in payload["passes"]:
        out["forward"] = backend.forward(prepared, payload["x"])
    if "backward" in payload["passes"]:
        out["backward"] = backend.backward(prepared, payload["x"], payload["dy"],
                                           balance_coeff=payload["balance_coeff"])
    return out
