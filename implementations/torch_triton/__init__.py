"""torch_triton: PyTorch + Triton MoE — grouped GEMMs over expert-sorted rows, int8 kernels, QAT.

Schemes (`qmoe.reference.schemes`), each without a Python loop over experts:

* ``none``: `torch._grouped_mm` forward and backward (runs on CPU in torch >= 2.8 as well).
* ``int8_routed`` / ``int8_routed_prequant``: a Triton grouped int8 x int8 GEMM with int32
  accumulation and the per-token x per-expert scale in the epilogue, over token rows sorted by expert
  with no padding to a fixed capacity (an expert with zero rows owns zero tiles); per-token int8 of
  the activations and the fused SwiGLU + int8 of the hidden are Triton kernels too. ``int8_routed``
  re-quantizes the weights on every call and has the straight-through backward; the prequant scheme
  quantizes them once in `prepare` and has the JAX logbook's custom VJP (input gradients through the
  int8 kernel with the transposed codes and a per-token-quantized gradient, weight gradients as float
  grouped matmuls).
* ``qat_int8_row``: training forward on weights fake-quantized by a fused Triton per-row kernel with
  the exporter's exact rule (scale = max(clip_abs / 127, 1/127), optional clip quantile, tensors of
  <= 65,536 elements left float), straight-through backward; master-float SGD in `update`.

On CPU the kernels run in Triton's interpreter, which must be chosen before the kernel modules are
imported: ``TRITON_INTERPRET=1`` in the environment (the suite's plugin sets it for CPU runs). On CUDA
they are compiled (the int8 GEMM autotunes its tiles on first use per shape).

Backend extras (QAT, beyond `Backend`; suite/test_qat.py checks them where a backend has them):

* ``forward`` is the *training* forward (fake quantization on), as the scheme's reference defines it.
* ``eval_forward(prepared, x)``: evaluation on the master float weights — never fake-quantizes
  (review finding 1). For the int8 schemes, whose quantization is the inference computation itself,
  it equals ``forward``.
* ``export_int8(prepared) -> dict``: the exporter: for each projection with more than 65,536 elements
  ``"{name}.int8"`` (codes, [.., in, out]) and ``"{name}.scale"`` (float32, input axis kept as 1);
  every other parameter as float under its own name. Applies the QAT rule to the master weights
  whatever scheme was prepared (so a float-trained model exports by post-training quantization).
* ``load_exported(spec, exported, dtype="float32") -> prepared``: a model whose weights are the
  dequantized export and whose forward does not fake-quantize again (not quantized twice).
* ``prepare`` also takes a `qmoe.reference.schemes.Scheme` object (e.g. ``qat_int8_row`` with a clip
  quantile), so the clip rule can be checked in training and export alike.

Inputs may be ``bfloat16`` on CUDA for benchmarks; conformance declares float32 only (the CPU
interpreter is kept small).

Expert parallelism (`expert_parallel`): ``prepare(..., ep_size=N)`` in each of N processes of a
torch.distributed group (torchrun, or `TorchTritonBackend.join_expert_parallel`) gives the rank its
experts; ``forward`` / ``backward`` are then collective calls that every rank makes with the same batch
and that return the whole layer's values. ``TorchTritonBackend(device, ep_dispatch="int8")`` sends the
dispatched rows as int8 codes and scales instead of float rows.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qmoe.reference.layer import ForwardResult
from qmoe.reference.schemes import Scheme, get_scheme
from qmoe.reference.spec import MoEParams, MoESpec, SpecError, validate_input

from ..base import Backend, Capabilities, synchronized_step

if TYPE_CHECKING:  # torch and triton are imported lazily: the module must import without them
    import torch

    from . import layer

SCHEMES = ("none", "int8_routed", "int8_routed_prequant", "qat_int8_row")
#: Projections the QAT exporter may store as int8 (the router always stays float).
EXPORTABLE = ("w13", "w2", "shared_w13", "shared_w2")
TRAINABLE = ("router", "w13", "w2", "shared_w13", "shared_w2")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def _torch():
    import torch

    return torch


def _layer() -> layer:
    """The torch/Triton layer module; importing it builds the kernels (interpreted or compiled)."""
    from . import layer

    return layer


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", _torch().float64).numpy()


@dataclass
class TritonPrepared:
    """What `prepare` returns: master weights on the device and, for prequant, the int8 experts.

    ``fake_quant`` is False for a model loaded from an int8 export: its weights already are the
    dequantized values, and quantizing them again is the review's "quantized twice" bug.
    """

    spec: MoESpec
    scheme: Scheme
    dtype: str
    device: torch.device
    weights: Any              # layer.LayerWeights
    int8_experts: Any = None  # layer.Int8Experts | None
    fake_quant: bool = True
    shard: Any = None         # expert_parallel.ExpertShard when prepared with ep_size > 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(_torch(), self.dtype)


class TorchTritonBackend(Backend):
    """PyTorch layer around Triton kernels: grouped int8 GEMM, per-token quantizers, fused QAT fake quant."""

    name = "torch_triton"
    capabilities = Capabilities(
        schemes=SCHEMES,
        passes=("forward", "backward"),
        dtypes=("float32",),
        devices=("cpu", "cuda"),
        quantizer=True,
        bypass=True,
        update="master_float",
        qat_export=True,
        expert_parallel=(2, 4, 8),
        expert_parallel_processes=True,
    )

    def __init__(self, device: str | None = None, ep_dispatch: str = "float") -> None:
        """``ep_dispatch``: how expert parallelism sends token rows, ``float`` (the compute dtype) or
        ``int8`` (per-token codes and a float32 scale)."""
        super().__init__(device)
        self.ep_dispatch = ep_dispatch
        if self.device == "cuda" and not _torch().cuda.is_available():
            raise RuntimeError(f"{self.name}: device 'cuda' requested but torch.cuda.is_available() is False")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        try:
            import triton
        except ImportError:
            return "triton is not installed"
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
        try:
            import triton.tools.tensor_descriptor  # noqa: F401
        except ImportError:
            return f"triton {triton.__version__} has no host-side tensor descriptors (needs triton >= 3.4)"
        return None

    @classmethod
    def join_expert_parallel(cls, rank: int, world_size: int, init_method: str, device: str | None = None) -> None:
        """Join the torch.distributed group (NCCL on CUDA, gloo on CPU) that ``prepare(ep_size=N)`` uses."""
        from . import expert_parallel

        expert_parallel.join(rank, world_size, init_method, cls.declared_device(device) or cls.capabilities.devices[0])

    @classmethod
    def versions(cls) -> dict[str, str]:
        import triton

        from .kernels import grouped_gemm

        mode = "interpreter" if grouped_gemm.INTERPRETED else "compiled"
        # which int8 GEMM ran, for the A/B of $QMOE_TRITON_INT8_GEMM (`grouped_gemm.int8_kernel`)
        int8 = {"auto": "Gluon warp-specialized where sm_90, else Triton",
                "triton": "Triton"}[grouped_gemm.int8_kernel()]
        if grouped_gemm.INTERPRETED:
            int8 = "Triton"
        return {"torch": _torch().__version__, "triton": f"{triton.__version__} ({mode})", "triton_int8_gemm": int8}

    def device_count(self) -> int | None:
        """GPUs torch sees on CUDA (one rank each); None on CPU, where ranks are processes."""
        return _torch().cuda.device_count() if self.device == "cuda" else None

    # -- prepare -----------------------------------------------------------------------------------
    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str | Scheme, dtype: str, ep_size: int = 1
                ) -> TritonPrepared:
        """Masters on the device (router float32, projections in ``dtype``); prequant codes once."""
        scheme_ = self._declared_scheme(scheme)
        if dtype not in _DTYPES or (dtype not in self.capabilities.dtypes and self.device != "cuda"):
            raise SpecError(f"{self.name} computes in {', '.join(self.capabilities.dtypes)} "
                            f"(bfloat16 on cuda), not {dtype!r}")
        if not isinstance(ep_size, int) or ep_size < 1:
            raise SpecError(f"ep_size must be a positive integer, got {ep_size!r}")
        params.validate(spec)
        self._check_kernel_mode()
        torch = _torch()
        device = torch.device(self.device)
        compute = getattr(torch, dtype)
        shard = None
        if ep_size > 1:
            from . import expert_parallel

            shard = expert_parallel.make_shard(spec, scheme_, ep_size, self.ep_dispatch)
            params = MoEParams(**expert_parallel.local_expert_weights(spec, shard, dict(params.items())))

        def tensor(name: str, value: np.ndarray) -> torch.Tensor:
            kind = torch.float32 if name in ("router", "router_bias") else compute
            return torch.tensor(np.asarray(value), dtype=kind, device=device)

        present = {name: tensor(name, value) for name, value in params.items()
                   if name != "router_bias" or spec.router == "sigmoid_topk"}
        prepared = self.prepare_tensors(spec, scheme_, dtype, device, _layer().LayerWeights(**present))
        prepared.shard = shard
        return prepared

    def prepare_tensors(self, spec: MoESpec, scheme: Scheme, dtype: str, device: torch.device,
                        weights: Any, fake_quant: bool = True) -> TritonPrepared:
        """`prepare` from torch tensors already on the device (a `layer.LayerWeights`), for
        scripts that build seed-shape weights there instead of passing gigabytes through NumPy."""
        with _torch().no_grad():
            int8_experts = _layer().prepare_int8(scheme, weights)
        return TritonPrepared(spec, scheme, dtype, device, weights, int8_experts, fake_quant)

    def _declared_scheme(self, scheme: str | Scheme) -> Scheme:
        resolved = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
        if resolved.name not in self.capabilities.schemes:
            raise SpecError(f"{self.name} does not implement scheme {resolved.name!r}; "
                            f"it declares {', '.join(self.capabilities.schemes)}")
        return resolved

    def _check_kernel_mode(self) -> None:
        """CPU tensors need the interpreter; it cannot be switched on after the kernels were built."""
        from .kernels import grouped_gemm

        if self.device == "cpu" and not grouped_gemm.INTERPRETED:
            raise RuntimeError(f"{self.name} on cpu needs TRITON_INTERPRET=1 in the environment before the "
                               "Triton kernels are imported (the qmoe pytest plugin sets it for cpu runs)")

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, prepared: TritonPrepared, x: np.ndarray) -> ForwardResult:
        """The training forward: fake quantization on for ``qat_int8_row`` (the scheme's definition)."""
        return self._forward(prepared, x, fake_quant=prepared.fake_quant)

    def eval_forward(self, prepared: TritonPrepared, x: np.ndarray) -> ForwardResult:
        """Evaluation: master float weights, no fake quantization (the int8 schemes compute as in `forward`)."""
        return self._forward(prepared, x, fake_quant=False)

    def _forward(self, prepared: TritonPrepared, x: np.ndarray, fake_quant: bool) -> ForwardResult:
        torch = _torch()
        x_t = self._to_device(prepared, x)
        if prepared.shard is not None:
            from . import expert_parallel

            y, ids, gates, balance = expert_parallel.sharded_forward(prepared, x_t, fake_quant)
            return ForwardResult(_numpy(y), ids.cpu().numpy(), _numpy(gates), balance)
        with torch.no_grad():
            out = self._run(prepared, prepared.weights, x_t, fake_quant)
        routing = out.routing
        return ForwardResult(_numpy(out.y), routing.expert_ids.cpu().numpy(), _numpy(routing.gate_weights),
                             float(routing.balance_loss))

    def _run(self, prepared: TritonPrepared, weights: Any, x: torch.Tensor, fake_quant: bool):
        return _layer().layer_forward(prepared.spec, prepared.scheme, weights, x, prepared.int8_experts, fake_quant)

    # -- backward ----------------------------------------------------------------------------------
    def backward(self, prepared: TritonPrepared, x: np.ndarray, dy: np.ndarray, balance_coeff: float = 0.0
                 ) -> dict[str, np.ndarray]:
        """Gradients of sum(y * dy) + balance_coeff * balance_loss with respect to x and the masters."""
        grads = self._gradients(prepared, self._to_device(prepared, x), self._cotangent(prepared, x, dy),
                                balance_coeff)
        return {name: _numpy(g) for name, g in grads.items()}

    def _gradients(self, prepared: TritonPrepared, x: torch.Tensor, dy: torch.Tensor, balance_coeff: float
                   ) -> dict[str, torch.Tensor]:
        """Autograd at fresh leaves; the quantizers are straight-through, prequant has its custom VJP."""
        torch = _torch()
        if prepared.shard is not None:
            from . import expert_parallel

            return expert_parallel.sharded_gradients(prepared, x, dy, balance_coeff, TRAINABLE)
        leaves = prepared.weights.map(
            lambda name, w: w.detach().clone().requires_grad_(name in TRAINABLE))
        x = x.detach().clone().requires_grad_()
        with torch.enable_grad():
            out = self._run(prepared, leaves, x, prepared.fake_quant)
            loss = torch.sum(out.y.to(torch.float32) * dy.to(torch.float32)) + balance_coeff * out.routing.balance_loss
            wanted = [x] + [getattr(leaves, name) for name in TRAINABLE if getattr(leaves, name) is not None]
            found = torch.autograd.grad(loss, wanted, allow_unused=True)
        names = ["x"] + [name for name in TRAINABLE if getattr(leaves, name) is not None]
        # A parameter the graph never reached (no routed token at all) has an exactly zero gradient.
        return {name: (torch.zeros_like(like) if g is None else g) for name, g, like in zip(names, found, wanted)}

    # -- effective weights, quantizer, bypass ------------------------------------------------------
    def effective_weights(self, prepared: TritonPrepared) -> dict[str, np.ndarray]:
        """The values the (training) forward multiplies with: codes * scale where int8, fake-quantized
        values where QAT quantizes, else the masters."""
        used = _layer().effective_layer_weights(prepared.scheme, prepared.weights, prepared.int8_experts,
                                                prepared.fake_quant)
        if prepared.shard is not None:  # the experts under the whole tensor's QAT rule, gathered from every rank
            from . import expert_parallel

            experts = _layer().effective_layer_weights(prepared.shard.expert_scheme, prepared.weights,
                                                       prepared.int8_experts, prepared.fake_quant)
            gathered = {name: expert_parallel.gather_experts(prepared.shard, getattr(experts, name))
                        for name in expert_parallel.EXPERT_WEIGHTS}
            used = dataclasses.replace(used, **gathered)
        return {name: _numpy(value) for name, value in used.items()}

    def quantize_int8(self, values: np.ndarray, axis: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The Triton per-row quantizer on float32 ``values``: the reduced axes are moved last and
        flattened into rows. Returns int8 codes and float scales (keepdims)."""
        torch = _torch()
        from .kernels.quant import quantize_rows

        self._check_kernel_mode()
        v = torch.tensor(np.asarray(values), dtype=torch.float32, device=self.device)
        reduced = sorted({a % v.dim() for a in ((axis,) if isinstance(axis, int) else axis)})
        kept = [a for a in range(v.dim()) if a not in reduced]
        moved = v.permute(*kept, *reduced)
        rows = moved.reshape(int(np.prod([v.shape[a] for a in kept], dtype=np.int64)), -1)
        codes, scale = quantize_rows(rows)
        inverse = np.argsort(kept + reduced)
        codes = codes.reshape(moved.shape).permute(*inverse)
        scale_shape = [1 if a in reduced else v.shape[a] for a in range(v.dim())]
        return codes.cpu().numpy(), scale.reshape(scale_shape).to(torch.float64).cpu().numpy()

    def expert_outputs(self, prepared: TritonPrepared, x: np.ndarray) -> np.ndarray:
        """Bypass routing: every expert on every token, [E, T, H], through the same kernels."""
        torch = _torch()
        if prepared.shard is not None:
            raise SpecError(f"{self.name} offers expert_outputs on one device only (prepare with ep_size=1)")
        x_t = self._to_device(prepared, x)
        with torch.no_grad():
            out = _layer().bypass_expert_outputs(prepared.spec, prepared.scheme, prepared.weights, x_t,
                                                 prepared.int8_experts, prepared.fake_quant)
        return _numpy(out)

    # -- update ------------------------------------------------------------------------------------
    def update(self, prepared: TritonPrepared, x: np.ndarray, dy: np.ndarray, lr: float) -> TritonPrepared:
        """Master-float SGD on sum(y * dy): W <- W - lr * g (straight-through g), router included;
        ``router_bias`` unchanged. Prequant codes are re-made from the new masters."""
        if prepared.shard is not None:
            raise SpecError(f"{self.name} offers update on one device only (prepare with ep_size=1)")
        grads = self._gradients(prepared, self._to_device(prepared, x), self._cotangent(prepared, x, dy), 0.0)
        with _torch().no_grad():
            stepped = prepared.weights.map(
                lambda name, w: (w - lr * grads[name]).to(w.dtype) if name in grads else w.clone())
        return self.prepare_tensors(prepared.spec, prepared.scheme, prepared.dtype, prepared.device,
                                           stepped, prepared.fake_quant)

    # -- QAT export --------------------------------------------------------------------------------
    def export_int8(self, prepared: TritonPrepared) -> dict[str, np.ndarray]:
        """The QAT exporter on the master weights (see the module docstring for the keys)."""
        layer = _layer()
        qat = dataclasses.replace(get_scheme("qat_int8_row"), qat_clip_quantile=prepared.scheme.qat_clip_quantile)
        exported: dict[str, np.ndarray] = {}
        for name, value in prepared.weights.items():
            if name in EXPORTABLE and layer.qat_quantized(value, qat):
                _, codes, scale = layer.qat_export_rows(value, qat, write_values=False, write_codes=True)
                exported[f"{name}.int8"] = codes.cpu().numpy()
                exported[f"{name}.scale"] = scale.cpu().numpy()
            else:
                exported[name] = value.detach().to("cpu", _torch().float32).numpy()
        return exported

    def load_exported(self, spec: MoESpec, exported: dict[str, np.ndarray], dtype: str = "float32"
                      ) -> TritonPrepared:
        """A ``qat_int8_row`` model on the dequantized export (codes * scale), fake quantization off."""
        torch = _torch()
        self._check_kernel_mode()
        device = torch.device(self.device)
        compute = getattr(torch, _DTYPES[dtype])
        weights = {}
        for key, value in exported.items():
            name, _, part = key.partition(".")
            if part == "scale":
                continue
            if part == "int8":
                codes = torch.tensor(value, device=device).to(torch.float32)
                scale = torch.tensor(exported[f"{name}.scale"], dtype=torch.float32, device=device)
                weights[name] = (codes * scale).to(compute)
            else:
                kind = torch.float32 if name in ("router", "router_bias") else compute
                weights[name] = torch.tensor(value, dtype=kind, device=device)
        prepared = self.prepare_tensors(spec, get_scheme("qat_int8_row"), dtype, device,
                                               _layer().LayerWeights(**weights), fake_quant=False)
        MoEParams(**{k: _numpy(v) for k, v in prepared.weights.items()}).validate(spec)
        return prepared

    # -- benchmark step ----------------------------------------------------------------------------
    def benchmark_step(self, prepared: TritonPrepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        """Forward, or forward + backward (``pass_`` "backward"), on device-resident copies made here."""
        x_t = self._to_device(prepared, x)
        if dy is None:
            dy = np.random.default_rng(0).standard_normal(x.shape)
        dy_t = self._cotangent(prepared, x, dy)
        return self.device_step(prepared, x_t, pass_, dy_t)

    def device_step(self, prepared: TritonPrepared, x: torch.Tensor, pass_: str, dy: torch.Tensor | None = None
                    ) -> Callable[[], Any]:
        """`benchmark_step` on tensors already on the device (for scripts that build them there)."""
        torch = _torch()
        if pass_ not in ("forward", "backward"):
            raise SpecError(f"unknown pass {pass_!r}; {self.name} offers forward, backward")
        synchronize = torch.cuda.synchronize if prepared.device.type == "cuda" else (lambda: None)
        if prepared.shard is not None:  # this rank's part of the global batch x, no gather (a collective step)
            from . import expert_parallel

            return expert_parallel.local_step(prepared, x, pass_, dy, TRAINABLE, synchronize)
        if dy is not None:
            # The cotangent in y's dtype, as a training loop's upstream gradient comes and as the torch peers and
            # the expert-parallel step take it: given in float32, autograd would cast it inside every timed call
            # (0.09 ms of a logbook top-8 step on the H200).
            dy = dy.to(x.dtype)
        leaves = prepared.weights.map(lambda name, w: w.detach().requires_grad_(name in TRAINABLE))
        trainable = [getattr(leaves, n) for n in TRAINABLE if getattr(leaves, n) is not None]
        wanted = [x.detach().requires_grad_(), *trainable]

        def forward_body() -> Any:
            with torch.no_grad():
                return self._run(prepared, prepared.weights, x, prepared.fake_quant).y

        def backward_body() -> Any:
            with torch.enable_grad():
                y = self._run(prepared, leaves, wanted[0], prepared.fake_quant).y
                return torch.autograd.grad(y, wanted, grad_outputs=dy, allow_unused=True)

        # every kernel (Triton's and torch's) goes to the current stream: stream-ordered timing applies
        return synchronized_step(forward_body if pass_ == "forward" else backward_body, synchronize,
                                 torch_stream=prepared.device.type == "cuda")

    def stage_times(self, prepared: TritonPrepared, x: np.ndarray, repeats: int = 5) -> dict[str, float]:
        """Median seconds of each forward stage run on its own on device-resident data (`layer.LayerStages`):
        ``pack`` (routing, dispatch plan, rows in expert order: gathered, or int8 per token), ``up`` (w13 grouped
        GEMM + SwiGLU, Q(h) fused for int8), ``down`` (w2 grouped GEMM), ``combine`` (gate-weighted sum), and
        ``shared`` when the layer has a shared expert. Each stage reruns on the previous stage's outputs, made once
        here. One device only: in expert parallelism the stages interleave with the all-to-alls."""
        torch = _torch()
        if prepared.shard is not None:
            raise ValueError("stage_times runs on one device (prepare with ep_size=1)")
        x_t = self._to_device(prepared, x)
        stages = _layer().LayerStages(prepared.spec, prepared.scheme, prepared.weights, prepared.int8_experts,
                                      prepared.fake_quant)
        with torch.no_grad():
            _, runs = stages.run(x_t)
            return {name: _median_seconds(run, repeats, prepared.device) for name, run in runs.items()}

    # -- boundary ----------------------------------------------------------------------------------
    def _to_device(self, prepared: TritonPrepared, x: np.ndarray, what: str = "x") -> torch.Tensor:
        validate_input(prepared.spec, x, what)
        return _torch().tensor(x, dtype=prepared.torch_dtype, device=prepared.device)

    def _cotangent(self, prepared: TritonPrepared, x: np.ndarray, dy: np.ndarray) -> torch.Tensor:
        if np.shape(dy) != np.shape(x):
            raise SpecError(f"dy has shape {np.shape(dy)}, expected the output's shape {np.shape(x)}")
        validate_input(prepared.spec, np.asarray(dy), "dy")
        return _torch().tensor(np.asarray(dy), dtype=_torch().float32, device=prepared.device)


def _median_seconds(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls after one warm-up call (Triton compiles and
    autotunes on first use). On CUDA a pair of events brackets each call on the current stream, so the
    calls queue back to back and one synchronisation at the end reads them all; on CPU, wall time."""
    torch = _torch()
    run()
    if device.type != "cuda":
        seconds = []
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)
    events = []
    for _ in range(max(repeats, 1)):
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        run()
        end_event.record()
        events.append((start_event, end_event))
    events[-1][1].synchronize()
    return statistics.median([start.elapsed_time(end) / 1e3 for start, end in events])
