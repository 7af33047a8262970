"""MLX backend: int8 affine experts through `mx.gather_qmm`, trainable, with the layerwise trainer.

The MoE8 runtime report (seeds/mlx-int8-moe-layerwise-trainer-report.txt) stored LFM2.5's routed
experts as MLX affine int8 and kept everything else float, then found that stock `mx.gather_qmm`
cannot be trained (``[GatherQMM::vjp] no gradient wrt the quantized weights``). This backend is that
layer with the missing primitive supplied:

* scheme ``int8_affine_g64``: expert projections only via ``mx.quantize(w, group_size=64, bits=8)``
  along the contraction axis; router (float32 always), shared expert and the rest float;
* forward through `mx.gather_qmm`; backward through `trainable_gather_qmm` (straight-through VJP,
  weight gradients for the experts that received tokens only);
* `update`: dequantize, SGD step, requantize, one expert projection at a time;
* `train_stack`: the report's layerwise / grouped block-coordinate trainer over a residual stack.

mlx is imported lazily: importing this module needs only NumPy.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe.reference.layer import ForwardResult
from qmoe.reference.schemes import get_scheme
from qmoe.reference.spec import MoEParams, MoESpec, SpecError, validate_input

from ..base import Backend, Capabilities

QUANTIZED_SCHEME = "int8_affine_g64"


@dataclass(frozen=True)
class MLXPrepared:
    """One layer resident on the MLX device (``weights`` is a `layer.LayerWeights`)."""

    spec: MoESpec
    scheme: str
    dtype: str
    weights: Any


def _mx():
    import mlx.core as mx

    return mx


def _compute_dtype(dtype: str):
    mx = _mx()
    return {"float32": mx.float32, "bfloat16": mx.bfloat16}[dtype]


def _to_device(values: np.ndarray, dtype: str):
    """NumPy (float64 holding dtype-exact values) -> MLX array in ``dtype``, via float32 (no float64 on GPU)."""
    mx = _mx()
    return mx.array(np.asarray(values, dtype=np.float32)).astype(_compute_dtype(dtype))


def _to_numpy(values) -> np.ndarray:
    mx = _mx()
    return np.array(values.astype(mx.float32), dtype=np.float64)


def layer_weights_on_device(spec: MoESpec, params: MoEParams, scheme: str, dtype: str):
    """`LayerWeights` for ``params``: router float32; experts quantized under ``int8_affine_g64``."""
    from .experts import make_experts
    from .layer import LayerWeights

    params.validate(spec)
    quantized = scheme == QUANTIZED_SCHEME
    optional = {name: _to_device(getattr(params, name), dtype)
                for name in ("shared_w13", "shared_w2") if getattr(params, name) is not None}
    bias = None if params.router_bias is None or spec.router != "sigmoid_topk" else _to_device(params.router_bias,
                                                                                               "float32")
    return LayerWeights(router=_to_device(params.router, "float32"),
                        w13=make_experts(_to_device(params.w13, dtype), quantized),
                        w2=make_experts(_to_device(params.w2, dtype), quantized),
                        router_bias=bias, **optional)


def effective_weights_of(weights) -> dict[str, np.ndarray]:
    """float64 NumPy copies of the weights a layer computes with (experts dequantized, qmoe layout)."""
    out = {"router": _to_numpy(weights.router)}
    if weights.router_bias is not None:
        out["router_bias"] = _to_numpy(weights.router_bias)
    out["w13"] = _to_numpy(weights.w13.dequantized())
    out["w2"] = _to_numpy(weights.w2.dequantized())
    for name in ("shared_w13", "shared_w2"):
        if getattr(weights, name) is not None:
            out[name] = _to_numpy(getattr(weights, name))
    return out


class MLXLayerwiseBackend(Backend):
    """MLX (Linux CPU, Apple silicon): `gather_qmm` experts, straight-through VJP, re-quantizing trainer."""

    name = "mlx_layerwise"
    capabilities = Capabilities(
        schemes=("none", QUANTIZED_SCHEME),
        passes=("forward", "backward"),
        dtypes=("float32", "bfloat16"),
        devices=("cpu", "gpu"),
        capacity=True,
        shared_expert=True,
        quantizer=False,  # MLX's grid is affine, not the symmetric int8 rule level 1 compares
        bypass=True,
        update="requantize",
        layerwise_trainer=True,
        min_multiple={QUANTIZED_SCHEME: 64},
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            if importlib.util.find_spec("mlx") is None:
                return "mlx is not installed (pip install 'mlx[cpu]' on Linux, 'mlx' on macOS)"
            import mlx.core as mx

            if not hasattr(mx, "gather_qmm") or not hasattr(mx, "segmented_mm"):
                return f"mlx {getattr(mx, '__version__', '?')} lacks gather_qmm/segmented_mm (need >= 0.29)"
        except Exception as exc:  # a broken install must read as unavailable, not crash collection
            return f"mlx cannot be imported: {type(exc).__name__}: {exc}"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        try:
            import mlx.core as mx

            return {"mlx": mx.__version__, "platform": platform.machine()}
        except Exception:
            return {}

    # -- helpers --------------------------------------------------------------------------------------
    def _stream(self):
        mx = _mx()
        return mx.stream(mx.gpu if self.device == "gpu" else mx.cpu)

    def _check(self, spec: MoESpec, scheme: str, dtype: str) -> None:
        get_scheme(scheme)  # an unknown name raises UnknownSchemeError listing the known ones
        why = self.capabilities.unsupported(spec, scheme)
        if why:
            raise SpecError(f"mlx_layerwise {why}")
        if dtype not in self.capabilities.dtypes:
            raise SpecError(f"mlx_layerwise does not declare dtype {dtype}; it offers {self.capabilities.dtypes}")

    # -- required -----------------------------------------------------------------------------------
    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> MLXPrepared:
        if ep_size != 1:
            raise SpecError("mlx_layerwise does not offer expert parallelism")
        self._check(spec, scheme, dtype)
        with self._stream():
            weights = layer_weights_on_device(spec, params, scheme, dtype)
            _mx().eval(weights.arrays())
        return MLXPrepared(spec, scheme, dtype, weights)

    def forward(self, prepared: MLXPrepared, x: np.ndarray) -> ForwardResult:
        from .layer import forward_static

        validate_input(prepared.spec, x)
        with self._stream():
            y, routing = forward_static(prepared.spec, prepared.weights, _to_device(x, prepared.dtype))
            _mx().eval(y, routing.expert_ids, routing.gate_weights, routing.balance_loss)
        return ForwardResult(_to_numpy(y), np.array(routing.expert_ids).astype(np.int64),
                             _to_numpy(routing.gate_weights), float(routing.balance_loss.item()))

    def effective_weights(self, prepared: MLXPrepared) -> dict[str, np.ndarray]:
        with self._stream():
            return effective_weights_of(prepared.weights)

    # -- optional -----------------------------------------------------------------------------------
    def backward(self, prepared: MLXPrepared, x: np.ndarray, dy: np.ndarray, balance_coeff: float = 0.0
                 ) -> dict[str, np.ndarray]:
        """Straight-through gradients; experts with no token get exact zeros (filled in at the NumPy boundary:
        on the device only the used experts' gradients ever exist)."""
        from .training import layer_gradients

        spec = prepared.spec
        validate_input(spec, x)
        validate_input(spec, dy, "dy")
        with self._stream():
            _, gradients = layer_gradients(spec, prepared.weights, _to_device(x, prepared.dtype),
                                           _to_device(dy, "float32"), balance_coeff)
            _mx().eval(gradients.grads)
        out = {}
        for name, grad in gradients.grads.items():
            if name in ("w13", "w2"):
                dense = np.zeros((spec.experts, *grad.shape[1:]), dtype=np.float64)
                dense[gradients.plan.used] = _to_numpy(grad)
                out[name] = dense
            else:
                out[name] = _to_numpy(grad)
        return out

    def expert_outputs(self, prepared: MLXPrepared, x: np.ndarray) -> np.ndarray:
        from .layer import bypass_outputs

        validate_input(prepared.spec, x)
        with self._stream():
            return _to_numpy(bypass_outputs(prepared.weights, _to_device(x, prepared.dtype)))

    def update(self, prepared: MLXPrepared, x: np.ndarray, dy: np.ndarray, lr: float) -> MLXPrepared:
        """W' = deq(Q(W - lr g)) per expert projection that received tokens; float params W - lr g."""
        from .training import layer_gradients, sgd_step

        validate_input(prepared.spec, x)
        validate_input(prepared.spec, dy, "dy")
        with self._stream():
            _, gradients = layer_gradients(prepared.spec, prepared.weights, _to_device(x, prepared.dtype),
                                           _to_device(dy, "float32"))
            weights = sgd_step(prepared.weights, gradients, float(lr))
        return MLXPrepared(prepared.spec, prepared.scheme, prepared.dtype, weights)

    def train_stack(self, spec: MoESpec, layers: list[MoEParams], x: np.ndarray, target: np.ndarray,
                    scheme: str, dtype: str, lr: float, group_size: int) -> list[dict[str, np.ndarray]]:
        """`qmoe.reference.updates.block_coordinate_descent` with the requantize rule, on the device."""
        from .training import block_coordinate_descent

        self._check(spec, scheme, dtype)
        if not layers:
            raise SpecError("a stack needs at least one layer")
        validate_input(spec, x)
        if np.shape(target) != x.shape:
            raise SpecError(f"target has shape {np.shape(target)}, expected the input's shape {x.shape}")
        with self._stream():
            device_layers = [layer_weights_on_device(spec, layer, scheme, dtype) for layer in layers]
            trained = block_coordinate_descent(spec, device_layers, _to_device(x, dtype),
                                               _to_device(target, "float32"), float(lr), group_size)
            return [effective_weights_of(weights) for weights in trained]

    def benchmark_step(self, prepared: MLXPrepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        """Forward: the fixed-shape dispatch; backward: plan + straight-through gradients. `mx.eval` inside."""
        from .layer import forward_static
        from .training import layer_gradients

        mx = _mx()
        with self._stream():
            x_dev = _to_device(x, prepared.dtype)
            dy_dev = _to_device(dy if dy is not None else np.ones_like(x), "float32")
            mx.eval(x_dev, dy_dev)
        device = mx.gpu if self.device == "gpu" else mx.cpu

        if pass_ == "forward":
            def step():
                with mx.stream(device):
                    y, _ = forward_static(prepared.spec, prepared.weights, x_dev)
                    mx.eval(y)
                return y
        elif pass_ == "backward":
            def step():
                with mx.stream(device):
                    loss, gradients = layer_gradients(prepared.spec, prepared.weights, x_dev, dy_dev)
                    mx.eval(loss, gradients.grads)  # the loss reads y (`Backend.benchmark_step`)
                return gradients
        else:
            raise ValueError(f"pass_ must be 'forward' or 'backward', got {pass_!r}")
        return step
