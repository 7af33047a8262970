"""torch_eager: a plain PyTorch MoE — a Python loop over experts, autograd for the backward.

This is the way most people first write an MoE (the loop of the nanochat devlog) and the worked
example of a qmoe backend: capabilities at the top, then prepare / forward / backward / effective
weights / update / benchmark step. Every numeric rule lives in one small method, so that
`tests/mutants.py` plants a bug by overriding one method.

Numerics (DESIGN.md, `qmoe.reference.schemes`):

- symmetric int8: scale = amax / 127 (1 where amax = 0), q = clamp(round_half_even(v / scale), -127, 127);
- routed experts (``int8_routed``, ``int8_all``): per-token activation scales, one weight scale per
  expert matrix (re-quantized from the float masters on every call), the SwiGLU hidden re-quantized
  per token before ``w2``;
- shared expert (``int8_dense``, ``int8_all``): per-token activations, per-output-channel weights;
- an int8 product is formed from the integer codes and dequantized at the output by s_x * s_w;
- the router is float32 whatever the compute dtype; the backward is the straight-through estimator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from qmoe.reference.layer import ForwardResult
from qmoe.reference.schemes import Scheme, get_scheme
from qmoe.reference.spec import MoEParams, MoESpec, SpecError, validate_input

from .base import Backend, Capabilities, synchronized_step

if TYPE_CHECKING:  # torch is imported lazily: the module must import without it
    import torch

INT8_MAX = 127
#: Largest integer up to which every float32 integer is exact (24-bit significand).
FLOAT32_EXACT_INT = 2**24


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------
# int8 building blocks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Tensor:
    """Integer codes (held in a float32 tensor, for the matmul below) and their scale: v ~ codes * scale."""

    codes: torch.Tensor
    scale: torch.Tensor  # broadcasts against codes (keepdims)

    def dequantize(self) -> torch.Tensor:
        return self.codes * self.scale

    def rows(self, index: torch.Tensor) -> Int8Tensor:
        """The codes and per-row scales of some rows (per-token quantization commutes with gathering)."""
        return Int8Tensor(self.codes[index], self.scale[index])


def exact_code_matmul(a_codes: torch.Tensor, b_codes: torch.Tensor) -> torch.Tensor:
    """sum_k a[i, k] b[k, j] over integer codes, exactly, as an int8 GEMM with int32 accumulation.

    torch has no int8 x int8 -> int32 matmul for every shape and device, so the codes are multiplied
    as floats: a product is at most 127^2 and every partial sum is an integer, exact in float32
    while K * 127^2 <= 2^24 (K <= 1040); longer contractions accumulate in float64.
    """
    torch = _torch()
    k = a_codes.shape[-1]
    accumulate = torch.float32 if k * INT8_MAX**2 <= FLOAT32_EXACT_INT else torch.float64
    return a_codes.to(accumulate) @ b_codes.to(accumulate)


@functools.cache
def _int8_matmul_ste() -> type:
    """The autograd Function for an int8 x int8 projection (built on first use: torch is lazy)."""
    torch = _torch()

    class Int8MatmulSTE(torch.autograd.Function):
        """Forward: y = (Qx Qw) * s_x * s_w from the codes, in float32 whatever the compute dtype (an
        int8 GEMM's epilogue dequantizes its int32 accumulator in float32). Backward, straight-through:
        the float matmul at the dequantized values with the quantizers as identity, dx = g Wq^T, dW = Xq^T g."""

        @staticmethod
        def forward(ctx, x, w, x_codes, x_scale, w_codes, w_scale):
            ctx.save_for_backward(x_codes * x_scale, w_codes * w_scale)
            ctx.dtypes = (x.dtype, w.dtype)
            acc = exact_code_matmul(x_codes, w_codes)
            return (acc * (x_scale * w_scale).to(acc.dtype)).float()

        @staticmethod
        def backward(ctx, g):
            x_deq, w_deq = ctx.saved_tensors
            x_dtype, w_dtype = ctx.dtypes
            g = g.float()
            dx = (g @ w_deq.T).to(x_dtype) if ctx.needs_input_grad[0] else None
            dw = (x_deq.T @ g).to(w_dtype) if ctx.needs_input_grad[1] else None
            return dx, dw, None, None, None, None

    return Int8MatmulSTE


def _straight_through(value: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward value ``quantized`` exactly, gradient to ``value`` as identity (STE fake quant)."""
    return quantized.detach() + (value - value.detach())


# ---------------------------------------------------------------------------------------------
# prepared state and routing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchEagerState:
    """What `prepare` returns: float32 master weights on the device, one tensor per expert (as an
    ``nn.ModuleList`` of experts would hold them), the scheme and the compute dtype."""

    spec: MoESpec
    scheme: Scheme
    dtype: torch.dtype
    device: torch.device
    router: torch.Tensor                 # [H, E] float32, never quantized
    router_bias: torch.Tensor | None     # [E], selection only
    w13: list                              # E x [H, 2F]
    w2: list                               # E x [F, H]
    shared_w13: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None


@dataclass
class TorchRouting:
    ids: torch.Tensor           # [T, k] int64, best first
    gates: torch.Tensor         # [T, k] float32, differentiable
    kept: torch.Tensor          # [T, k] bool, False where capacity dropped the assignment
    balance_loss: torch.Tensor  # scalar, differentiable through P only


#: Trainable parameters by name: one tensor, or one tensor per expert.
Leaves = dict[str, Union["torch.Tensor", list]]
TRAINABLE = ("router", "w13", "w2", "shared_w13", "shared_w2")


class TorchEagerBackend(Backend):
    """Plain PyTorch: float32 router, a Python loop over experts, autograd with STE quantizers."""

    name = "torch_eager"
    capabilities = Capabilities(
        schemes=("none", "int8_dense", "int8_routed", "int8_all"),
        passes=("forward", "backward"),
        dtypes=("float32", "bfloat16"),
        devices=("cpu", "cuda"),
        quantizer=True,
        bypass=True,
        update="master_float",
    )

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        if self.device == "cuda" and not _torch().cuda.is_available():
            raise RuntimeError(f"{self.name}: device 'cuda' requested but torch.cuda.is_available() is False")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"torch": _torch().__version__}

    # -- prepare -----------------------------------------------------------------------------
    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1
                ) -> TorchEagerState:
        """Float32 masters on the device; int8 weights are quantized from them on every call."""
        torch = _torch()
        scheme_ = self._declared_scheme(scheme)
        if dtype not in self.capabilities.dtypes:
            raise SpecError(f"{self.name} computes in {', '.join(self.capabilities.dtypes)}, not {dtype!r}")
        if ep_size != 1:
            raise SpecError(f"{self.name} runs on one device; expert parallel size {ep_size} is not offered")
        params.validate(spec)
        device = torch.device(self.device)

        def master(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.tensor(np.asarray(a), dtype=torch.float32, device=device)

        return TorchEagerState(
            spec, scheme_, getattr(torch, dtype), device,
            router=master(params.router),
            router_bias=master(params.router_bias) if spec.router == "sigmoid_topk" else None,
            w13=[master(w) for w in params.w13], w2=[master(w) for w in params.w2],
            shared_w13=master(params.shared_w13) if spec.shared_ffn else None,
            shared_w2=master(params.shared_w2) if spec.shared_ffn else None,
        )

    def _declared_scheme(self, name: str) -> Scheme:
        scheme = get_scheme(name)  # an unknown name raises UnknownSchemeError listing the known ones
        if scheme.name not in self.capabilities.schemes:
            raise SpecError(f"{self.name} does not implement scheme {name!r}; "
                            f"it declares {', '.join(self.capabilities.schemes)}")
        return scheme

    # -- forward -----------------------------------------------------------------------------
    def forward(self, prepared: TorchEagerState, x: np.ndarray) -> ForwardResult:
        torch = _torch()
        x_t = self._to_device(prepared, x)
        with torch.no_grad():
            y, routing = self._layer(prepared, x_t)
        return ForwardResult(_numpy(y), routing.ids.cpu().numpy(), _numpy(routing.gates),
                             float(routing.balance_loss))

    def _layer(self, state: TorchEagerState, x: torch.Tensor) -> tuple[torch.Tensor, TorchRouting]:
        """y = sum_k g_k expert_{e_k}(x) [+ shared(x)], x float32 [T, H]; y in the compute dtype.

        Float projections run in the compute dtype; int8 ones from their codes, with a float32 epilogue.
        """
        torch = _torch()
        spec, scheme = state.spec, state.scheme
        routing = self._route(state, x)
        # Quantized once per token, then gathered: per-token scales do not depend on the expert.
        x_q = self._quantize_activation(x, scheme.routed_activations)
        w13_q, w2_q = self._routed_weights(state)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(spec.experts):
            tokens, slots = self._expert_rows(spec, routing, e)
            if tokens.numel() == 0:
                # An expert with no token does not run: the nanochat devlog's FP8 amax failed on a
                # [0, H] batch, and its weights must get exactly zero gradient.
                continue
            rows_q = None if x_q is None else x_q.rows(tokens)
            out = self._mlp(x[tokens], rows_q, state.w13[e], w13_q[e], state.w2[e], w2_q[e],
                            scheme.routed_activations, state.dtype)
            y = y.index_add(0, tokens, self._weight_by_gate(routing.gates[tokens, slots], out))
        if state.shared_w13 is not None:
            s13_q, s2_q = self._shared_weights(state)
            shared_x_q = self._quantize_activation(x, scheme.shared_activations)
            y = y + self._mlp(x, shared_x_q, state.shared_w13, s13_q, state.shared_w2, s2_q,
                              scheme.shared_activations, state.dtype)
        return y.to(state.dtype), routing

    def _mlp(self, x: torch.Tensor, x_q: Int8Tensor | None, w13: torch.Tensor, w13_q: Int8Tensor | None,
             w2: torch.Tensor, w2_q: Int8Tensor | None, activations: str, dtype: torch.dtype
             ) -> torch.Tensor:
        """SwiGLU expert y = Q(silu(Q(x) W1) * (Q(x) W3)) W2, Q the activation quantizer (or identity)."""
        h = self._swiglu(self._matmul(x, x_q, w13, w13_q, dtype))
        return self._matmul(h, self._quantize_activation(h, activations), w2, w2_q, dtype)

    def _swiglu(self, a: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, gate = the first F columns of x W13."""
        gate, up = a.chunk(2, dim=-1)
        return _torch().nn.functional.silu(gate) * up

    def _matmul(self, x: torch.Tensor, x_q: Int8Tensor | None, w: torch.Tensor, w_q: Int8Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """x W: float in ``dtype``, int8 x int8 from the codes, or (one side quantized) fake quant; STE backward."""
        if x_q is None and w_q is None:
            return x.to(dtype) @ w.to(dtype)
        if x_q is not None and w_q is not None:
            return _int8_matmul_ste().apply(x, w, x_q.codes, x_q.scale, w_q.codes, w_q.scale)
        x_used = x if x_q is None else _straight_through(x, x_q.dequantize())
        w_used = w if w_q is None else _straight_through(w, w_q.dequantize())
        return x_used.to(dtype) @ w_used.to(dtype)

    def _weight_by_gate(self, gates: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """g_k * expert output, in float32."""
        return gates[:, None] * out

    def _expert_rows(self, spec: MoESpec, routing: TorchRouting, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, slots) of the kept assignments to expert ``e``, in token order."""
        return _torch().nonzero((routing.ids == e) & routing.kept, as_tuple=True)

    # -- routing (float32) ---------------------------------------------------------------------
    def _route(self, state: TorchEagerState, x: torch.Tensor) -> TorchRouting:
        """softmax_topk: p = softmax(x R), ids = topk(p) (= topk of the logits). sigmoid_topk: s = sigmoid(x R),
        ids = topk(s + b), P = s / sum s. Gate weights from the selected scores; then the capacity mask
        and the balance loss."""
        torch = _torch()
        spec = state.spec
        logits = x.float() @ state.router
        if spec.router == "softmax_topk":
            scores = torch.softmax(logits, dim=-1)
            # softmax is monotonic, so the logits pick the same experts; float32 probabilities of a
            # saturated router underflow to 0 and would tie experts that the logits still order.
            selection, probs = logits, scores
        else:
            scores = torch.sigmoid(logits)
            bias = state.router_bias if state.router_bias is not None else 0.0
            selection = scores + bias  # DeepSeek-V3: the bias steers selection only, never the weights
            # P = s / sum(s), as a softmax of logsigmoid: s of very negative logits underflows to 0
            # in float32, and 0 / 0 would put NaN into the balance loss and every gradient.
            probs = sigmoid_balance_probs(logits)
        ids = self._top_k(selection.detach(), spec.top_k)
        gates = self._gate_weights(spec, logits, scores, ids)
        return TorchRouting(ids, gates, self._capacity_mask(spec, ids), self._balance_loss(spec, ids, probs))

    def _top_k(self, selection: torch.Tensor, k: int) -> torch.Tensor:
        """The k best experts per token; a stable sort makes the lower index win ties (torch.topk does not
        promise it)."""
        return _torch().sort(selection, dim=-1, descending=True, stable=True).indices[:, :k]

    def _gate_weights(self, spec: MoESpec, logits: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor
                      ) -> torch.Tensor:
        """The gate weights of the selected experts (see `router_gate_weights`); a seam for mutants."""
        return router_gate_weights(spec, logits, scores, ids)

    def _capacity_mask(self, spec: MoESpec, ids: torch.Tensor) -> torch.Tensor:
        """Keep the first C assignments of each expert in (token, slot) row-major order."""
        torch = _torch()
        capacity = spec.capacity(ids.shape[0])
        if capacity is None:
            return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        flat = ids.reshape(-1)
        onehot = torch.nn.functional.one_hot(flat, spec.experts)
        position = onehot.cumsum(dim=0).gather(1, flat[:, None]).squeeze(1) - 1
        return (position < capacity).reshape(ids.shape)

    def _balance_loss(self, spec: MoESpec, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Switch loss E * sum_i f_i P_i; f_i (share of the T*k picks, before capacity) carries no gradient."""
        torch = _torch()
        f = torch.bincount(ids.reshape(-1), minlength=spec.experts).float() / ids.numel()
        return spec.experts * torch.sum(f * probs.mean(dim=0))

    # -- quantizers ----------------------------------------------------------------------------
    def _quantize_symmetric(self, values: torch.Tensor, dims: int | tuple[int, ...]) -> Int8Tensor:
        """scale = amax / 127 over ``dims`` (1 where amax = 0, so zero slices give zeros, never NaN)."""
        v = values.detach().float()
        amax = v.abs().amax(dim=dims, keepdim=True)
        return self._quantize_with_scale(v, self._int8_scale(amax))

    def _int8_scale(self, amax: torch.Tensor) -> torch.Tensor:
        torch = _torch()
        return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))

    def _quantize_with_scale(self, v: torch.Tensor, scale: torch.Tensor) -> Int8Tensor:
        """q = clamp(round(v / scale), -127, 127); torch.round rounds half to even, as int8 kernels do."""
        torch = _torch()
        return Int8Tensor(torch.clamp(torch.round(v / scale), -INT8_MAX, INT8_MAX), scale)

    def _quantize_per_token(self, values: torch.Tensor) -> Int8Tensor:
        return self._quantize_symmetric(values, -1)

    def _quantize_activation(self, values: torch.Tensor, rule: str) -> Int8Tensor | None:
        return self._quantize_per_token(values) if rule == "per_token" else None

    def _quantize_expert_weights(self, weights: list) -> list:
        """One scale per expert matrix (the per-expert spread of real MoEs needs it)."""
        return [self._quantize_symmetric(w, (-2, -1)) for w in weights]

    def _routed_weight_rule(self, scheme: Scheme) -> str:
        return scheme.routed_weights

    def _routed_weights(self, state: TorchEagerState) -> tuple[list, list]:
        """Per expert, the int8 w13 and w2 the forward uses (None where the scheme leaves them float)."""
        if self._routed_weight_rule(state.scheme) == "float":
            return [None] * state.spec.experts, [None] * state.spec.experts
        return self._quantize_expert_weights(state.w13), self._quantize_expert_weights(state.w2)

    def _shared_weights(self, state: TorchEagerState) -> tuple[Int8Tensor | None, Int8Tensor | None]:
        """Per output channel: reduce over the input axis (-2 in the [in, out] layout)."""
        if state.scheme.shared_weights == "float":
            return None, None
        return self._quantize_symmetric(state.shared_w13, -2), self._quantize_symmetric(state.shared_w2, -2)

    def quantize_int8(self, values: np.ndarray, axis: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The forward's quantizer on float32 ``values``: int8 codes and float scales (keepdims)."""
        q = self._quantize_symmetric(_torch().tensor(np.asarray(values), dtype=_torch().float32), axis)
        return q.codes.to(_torch().int8).numpy(), q.scale.double().numpy()

    # -- backward ------------------------------------------------------------------------------
    def backward(self, prepared: TorchEagerState, x: np.ndarray, dy: np.ndarray, balance_coeff: float = 0.0
                 ) -> dict[str, np.ndarray]:
        x_t, dy_t = self._to_device(prepared, x), self._cotangent(prepared, x, dy)
        grads = self._gradients(prepared, x_t, dy_t, balance_coeff)
        return {name: _numpy(g if not isinstance(g, list) else _torch().stack(g)) for name, g in grads.items()}

    def _gradients(self, state: TorchEagerState, x: torch.Tensor, dy: torch.Tensor, balance_coeff: float
                   ) -> Leaves:
        """Autograd of L = sum(y * dy) + balance_coeff * balance_loss at fresh leaves: x and every
        trainable parameter, per expert as a list. The quantizers are straight-through."""
        torch = _torch()
        leaves = {name: _fresh_leaf(value) for name, value in _trainable(state).items()}
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            y, routing = self._layer(replace(state, **leaves), x)
            loss = torch.sum(y.float() * dy) + balance_coeff * routing.balance_loss
            flat = [x, *_flatten(leaves)]
            found = torch.autograd.grad(loss, flat, allow_unused=True)
        grads = [self._grad_or_zeros(g, like) for g, like in zip(found, flat)]
        return {"x": grads[0], **_unflatten(leaves, grads[1:])}

    def _grad_or_zeros(self, grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """An expert that received no token never entered the graph: its gradient is exactly zero."""
        return _torch().zeros_like(like) if grad is None else grad

    # -- effective weights / bypass ------------------------------------------------------------
    def effective_weights(self, prepared: TorchEagerState) -> dict[str, np.ndarray]:
        """The values the forward multiplies with: codes * scale where int8, else the masters in the compute dtype."""
        w13_q, w2_q = self._routed_weights(prepared)
        shared_q = self._shared_weights(prepared) if prepared.shared_w13 is not None else (None, None)
        router_dtype = _torch().float32

        def used(master: torch.Tensor, q: Int8Tensor | None, dtype: torch.dtype) -> np.ndarray:
            if q is None:
                return _numpy(master.to(dtype))
            return q.codes.double().cpu().numpy() * q.scale.double().cpu().numpy()

        out = {"router": used(prepared.router, None, router_dtype)}
        if prepared.router_bias is not None:
            out["router_bias"] = used(prepared.router_bias, None, router_dtype)
        out["w13"] = np.stack([used(w, q, prepared.dtype) for w, q in zip(prepared.w13, w13_q)])
        out["w2"] = np.stack([used(w, q, prepared.dtype) for w, q in zip(prepared.w2, w2_q)])
        if prepared.shared_w13 is not None:
            out["shared_w13"] = used(prepared.shared_w13, shared_q[0], prepared.dtype)
            out["shared_w2"] = used(prepared.shared_w2, shared_q[1], prepared.dtype)
        return out

    def expert_outputs(self, prepared: TorchEagerState, x: np.ndarray) -> np.ndarray:
        """Bypass routing: every expert on every token, [E, T, H], gate weights unused."""
        torch = _torch()
        x_t = self._to_device(prepared, x)
        activations = prepared.scheme.routed_activations
        x_q = self._quantize_activation(x_t, activations)
        w13_q, w2_q = self._routed_weights(prepared)
        with torch.no_grad():
            outs = [self._mlp(x_t, x_q, prepared.w13[e], w13_q[e], prepared.w2[e], w2_q[e], activations,
                              prepared.dtype)
                    for e in range(prepared.spec.experts)]
        return _numpy(torch.stack(outs))

    # -- update --------------------------------------------------------------------------------
    def update(self, prepared: TorchEagerState, x: np.ndarray, dy: np.ndarray, lr: float) -> TorchEagerState:
        """Master-float SGD on L = sum(y * dy): W <- W - lr * dL/dW (STE gradient), router included.
        The int8 weights of the next call are quantized from the new masters."""
        grads = self._gradients(prepared, self._to_device(prepared, x), self._cotangent(prepared, x, dy), 0.0)
        stepped = {}
        for name, master in _trainable(prepared).items():
            if isinstance(master, list):
                stepped[name] = [w - lr * g for w, g in zip(master, grads[name])]
            else:
                stepped[name] = master - lr * grads[name]
        return replace(prepared, **stepped)

    # -- benchmark step ------------------------------------------------------------------------
    def benchmark_step(self, prepared: TorchEagerState, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        """Forward, or forward + backward, on device-resident copies made here; synchronizes before returning."""
        torch = _torch()
        if pass_ not in self.capabilities.passes:
            raise SpecError(f"unknown pass {pass_!r}; {self.name} offers {', '.join(self.capabilities.passes)}")
        x_t = self._to_device(prepared, x)
        if dy is None:
            dy = np.random.default_rng(0).standard_normal(x.shape)
        dy_t = self._cotangent(prepared, x, dy)
        synchronize = torch.cuda.synchronize if prepared.device.type == "cuda" else (lambda: None)

        def forward_body() -> Any:
            with torch.no_grad():
                return self._layer(prepared, x_t)[0]

        def backward_body() -> Any:
            return self._gradients(prepared, x_t, dy_t, 0.0)

        # eager torch ops all go to the current stream: stream-ordered timing applies
        return synchronized_step(forward_body if pass_ == "forward" else backward_body, synchronize,
                                 torch_stream=prepared.device.type == "cuda")

    # -- boundary ------------------------------------------------------------------------------
    def _to_device(self, state: TorchEagerState, x: np.ndarray, what: str = "x") -> torch.Tensor:
        """Validated input as float32 on the device (values are exact in the compute dtype)."""
        validate_input(state.spec, x, what)
        return _torch().tensor(x, dtype=_torch().float32, device=state.device)

    def _cotangent(self, state: TorchEagerState, x: np.ndarray, dy: np.ndarray) -> torch.Tensor:
        if isinstance(dy, np.ndarray) and np.shape(dy) != np.shape(x):
            raise SpecError(f"dy has shape {np.shape(dy)}, expected the output's shape {np.shape(x)}")
        return self._to_device(state, dy, "dy")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=_torch().float64).numpy()


def _trainable(state: TorchEagerState) -> Leaves:
    """The parameters that get a gradient (``router_bias`` steers selection only)."""
    return {name: getattr(state, name) for name in TRAINABLE if getattr(state, name) is not None}


def _fresh_leaf(value: Any) -> Any:
    if isinstance(value, list):
        return [v.detach().requires_grad_() for v in value]
    return value.detach().requires_grad_()


def _flatten(leaves: Leaves) -> list:
    return [t for value in leaves.values() for t in (value if isinstance(value, list) else [value])]


def _unflatten(leaves: Leaves, flat: list) -> Leaves:
    out, i = {}, 0
    for name, value in leaves.items():
        n = len(value) if isinstance(value, list) else 1
        out[name] = flat[i:i + n] if isinstance(value, list) else flat[i]
        i += n
    return out


def router_gate_weights(spec: MoESpec, logits: torch.Tensor, scores: torch.Tensor | None, ids: torch.Tensor
                        ) -> torch.Tensor:
    """w = the selected scores, / their sum if ``renormalize``, * routed_scaling for sigmoid routers
    (``scores`` are read only without ``renormalize``; a caller may pass None then).

    The renormalized weights are a softmax over the selected log-scores (log p = logit + const,
    log s = logsigmoid(logit)): the same values, but a top-1 gate is exactly 1 with exactly zero
    gradient, as the reference's, where autograd through s / sum(s) leaves rounding noise.
    Shared with `torch_triton`, whose router is the same float32 torch code.
    """
    torch = _torch()
    if spec.renormalize:
        selected = logits.gather(-1, ids)
        if spec.router == "sigmoid_topk":
            selected = torch.nn.functional.logsigmoid(selected)
        gates = torch.softmax(selected, dim=-1)
    else:
        if scores is None:
            raise ValueError("router_gate_weights: scores are needed where the gates are not renormalized")
        gates = scores.gather(-1, ids)
    return gates * spec.routed_scaling if spec.router == "sigmoid_topk" else gates


def sigmoid_balance_probs(logits: torch.Tensor) -> torch.Tensor:
    """P = s / sum(s) as a softmax of logsigmoid: s of very negative logits underflows to 0 (0/0)."""
    torch = _torch()
    return torch.softmax(torch.nn.functional.logsigmoid(logits), dim=-1)
