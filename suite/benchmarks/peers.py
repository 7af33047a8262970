"""Native peers: each framework's own grouped matmul in a minimal MoE layer, run the way its users run
it, benchmarked beside the backends with the same FLOP counting, plus a do-nothing backend for the
harness-overhead check.

* ``torch._grouped_mm.compiled``: rows sorted by expert, two `torch._grouped_mm` calls with the cumulative
  row counts as ``offs``, SwiGLU between, gate-weighted ``index_add`` back to tokens, the whole layer under
  ``torch.compile`` (fullgraph, static shapes: how torch MoE training runs). ``torch._grouped_mm.eager``:
  the same layer without compiling, kept as its own row.
* ``jax.lax.ragged_dot``: the same with `jax.lax.ragged_dot` and per-expert group sizes, jitted.
* ``mx.gather_mm.compiled``: the same with `mx.gather_mm` on expert-sorted rows (``sorted_indices=True``)
  under ``mx.compile``; ``mx.gather_mm.eager`` without it.

Each is a full `qmoe.implementations.Backend` for scheme ``none`` (float routing, dropless, optional shared
expert), so its timed output is checked against the reference like any backend's; the backward is
the framework's autograd. Peers are not in the backend registry: conformance never runs them; the
benchmark grid adds every peer of every framework a selected backend uses (`framework_of`), and a
backend's ``x native peer`` is against the fastest of its framework's peers on the same case.

Beside them, one bound (`GemmBound`, ``gemm_bound``): the layer's grouped GEMMs alone, with
``torch._grouped_mm`` on rows already sorted by expert and perfectly balanced across the experts
(no router, gather, sort or scatter), plus the shared expert. It does exactly the work the suite's
FLOP formula counts (`metrics.flops`), so its TF/s is the ceiling of a layer on that device and
dtype; every other row's share of it is the table's ``% of bound``. Its routing is fixed
(`GemmBound.fixed_expert_ids`) and its timed output is checked against the reference computed with
that routing (`outputs.check_output`'s ``expert_ids``). The int8 schemes' bound is in `int8_bound`.

Steps that CUDA graphs can capture carry their body without the final synchronization as
``step.graph_body`` (`graphs.capture`, ``--bench-cuda-graph``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from qmoe.implementations.base import Backend, Capabilities, async_step, synchronized_step
from qmoe.reference.layer import ForwardResult
from qmoe.reference.spec import MoEParams, MoESpec, SpecError, validate_input

#: Compute dtypes of the peers (the router is float32 whatever they are).
_DTYPES = ("float32", "bfloat16")


class PeerBackend(Backend):
    """A native-op peer: scheme ``none`` only, dropless; ``framework`` names the framework it stands for."""

    framework: str = ""
    #: A bound (`GemmBound`) is not its framework's peer: rows are not compared with it as with a peer.
    bound: bool = False

    def fixed_expert_ids(self, spec: MoESpec, tokens: int) -> np.ndarray | None:
        """[T, k] experts of a peer whose routing is fixed instead of computed (with unit gate weights), or
        None: the layer's own routing. The output check computes the reference with the same routing."""
        return None

    def _check(self, spec: MoESpec, scheme: str, dtype: str) -> None:
        if scheme != "none":
            raise SpecError(f"{self.name} is a float peer: scheme 'none' only, not {scheme!r}")
        if dtype not in _DTYPES:
            raise SpecError(f"{self.name} computes in {', '.join(_DTYPES)}, not {dtype!r}")
        if spec.capacity_factor is not None:
            raise SpecError(f"{self.name} is dropless (no capacity factor)")

    def effective_weights(self, prepared: Any) -> dict[str, np.ndarray]:
        return {name: np.asarray(value, dtype=np.float64) for name, value in prepared.host.items()}


def _peer_capabilities(devices: tuple[str, ...]) -> Capabilities:
    return Capabilities(schemes=("none",), passes=("forward", "backward"), dtypes=_DTYPES, devices=devices,
                        capacity=False, shared_expert=True)


class _Prepared:
    """Device arrays by parameter name, the host copies (effective weights) and the layer's spec."""

    def __init__(self, spec: MoESpec, dtype: str, arrays: dict, host: MoEParams, extra: dict | None = None):
        self.spec, self.dtype, self.arrays, self.host = spec, dtype, arrays, host.as_dict()
        self.extra = extra or {}


# -- torch._grouped_mm ----------------------------------------------------------------------------------------
def torch_upload(value: np.ndarray, dtype, device):
    """A torch tensor of ``dtype`` on ``device`` from a float32 host array, one expert slice at a time: a
    whole-layer host temporary would double host memory at DeepSeek-V3's 11e9 expert weights."""
    import torch

    out = torch.empty(value.shape, dtype=dtype, device=device)
    slices = range(value.shape[0]) if value.ndim == 3 else [slice(None)]
    for i in slices:
        out[i].copy_(torch.from_numpy(np.ascontiguousarray(value[i])))
    return out


def torch_moe_layer(spec: MoESpec, w: dict, x):
    """The peer layer: float32 router, top-k, rows sorted by expert, two grouped GEMMs, gate-weighted combine."""
    import torch
    import torch.nn.functional as F

    logits = x.float() @ w["router"]
    if spec.router == "softmax_topk":
        scores, selection = torch.softmax(logits, dim=-1), logits
    else:
        scores = torch.sigmoid(logits)
        selection = scores + w["router_bias"] if "router_bias" in w else scores
    ids = torch.topk(selection.detach(), spec.top_k, dim=-1).indices
    gates = scores.gather(1, ids)
    if spec.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    if spec.router == "sigmoid_topk":
        gates = gates * spec.routed_scaling
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // spec.top_k
    # scatter_add, not bincount: bincount reads the maximum back to the host (a synchronization).
    counts = torch.zeros(spec.experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x[token], w["w13"], offs=ends)
    a = F.silu(h[:, :spec.ffn]) * h[:, spec.ffn:]
    out = torch._grouped_mm(a, w["w2"], offs=ends)
    weighted = out.float() * gates.reshape(-1)[order][:, None]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, token, weighted)
    if "shared_w13" in w:
        hs = x @ w["shared_w13"]
        y = y + ((F.silu(hs[:, :spec.shared_ffn]) * hs[:, spec.shared_ffn:]) @ w["shared_w2"]).float()
    return y.to(x.dtype), ids, gates


class TorchGroupedMMPeer(PeerBackend):
    """`torch_moe_layer` run eagerly (op by op), as written."""

    name = "torch._grouped_mm.eager"
    framework = "torch"
    capabilities = _peer_capabilities(("cpu", "cuda"))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        import torch

        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm (needs >= 2.8)"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__}

    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> _Prepared:
        import torch

        self._check(spec, scheme, dtype)
        params.validate(spec)
        compute = getattr(torch, dtype)
        # torch._grouped_mm needs 16-byte aligned row strides in every operand.
        elements = 16 // torch.empty((), dtype=compute).element_size()
        if spec.hidden % elements or spec.ffn % elements:
            raise SpecError(f"{self.name} needs hidden and ffn multiples of {elements} in {dtype} (16-byte strides)")
        device = torch.device(self.device)
        arrays = {name: torch_upload(np.asarray(value), torch.float32 if name.startswith("router") else compute,
                                     device)
                  for name, value in params.items()}
        return _Prepared(spec, dtype, arrays, params, {"layer": self._make_layer(spec, dtype)})

    def _make_layer(self, spec: MoESpec, dtype: str) -> Callable:
        """The callable (weights, x) -> (y, ids, gates) the steps time."""
        return partial(torch_moe_layer, spec)

    def _layer(self, p: _Prepared, w: dict, x):
        return p.extra["layer"](w, x)

    def forward(self, prepared: _Prepared, x: np.ndarray) -> ForwardResult:
        import torch

        validate_input(prepared.spec, x)
        with torch.no_grad():
            y, ids, gates = self._layer(prepared, prepared.arrays, self._put(prepared, x))
        return ForwardResult(y.double().cpu().numpy(), ids.cpu().numpy(), gates.double().cpu().numpy(), float("nan"))

    def _put(self, prepared: _Prepared, values: np.ndarray):
        import torch

        return torch.tensor(values, dtype=getattr(torch, prepared.dtype), device=self.device)

    def benchmark_step(self, prepared: _Prepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        import torch

        x_t = self._put(prepared, x)
        dy_t = self._put(prepared, dy if dy is not None else np.random.default_rng(0).standard_normal(x.shape))
        sync = torch.cuda.synchronize if x_t.is_cuda else (lambda: None)
        trainable = {name: t.detach().requires_grad_(name != "router_bias") for name, t in prepared.arrays.items()}
        wanted = [x_t.detach().requires_grad_()] + [t for n, t in trainable.items() if n != "router_bias"]

        def forward_body():
            with torch.no_grad():
                return self._layer(prepared, prepared.arrays, x_t)[0]

        def backward_body():
            with torch.enable_grad():
                y = self._layer(prepared, trainable, wanted[0])[0]
                return torch.autograd.grad(y, wanted, grad_outputs=dy_t)  # dx first

        if pass_ not in ("forward", "backward"):
            raise SpecError(f"unknown pass {pass_!r}")
        return synchronized_step(forward_body if pass_ == "forward" else backward_body, sync,
                                 torch_stream=x_t.is_cuda)


#: torch.compile's own cache: every case is a new (spec, shape), and the default limit of 8 recompiles would
#: silently fall back to eager, turning the compiled peer into the eager one. Raised, and made loud.
_TORCH_RECOMPILE_LIMIT = 256


class TorchGroupedMMCompiledPeer(TorchGroupedMMPeer):
    """`torch_moe_layer` under ``torch.compile(fullgraph=True, dynamic=False)``: the strongest torch layer
    a user gets without writing kernels. Compiling happens in the warm-up rounds (never timed)."""

    name = "torch._grouped_mm.compiled"

    @classmethod
    def versions(cls) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__, "torch_compile": "inductor, fullgraph, static shapes"}

    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> _Prepared:
        reason = torch_compile_refusal(dtype, self.device)
        if reason:
            raise SpecError(reason)
        return super().prepare(spec, params, scheme, dtype, ep_size)

    def _make_layer(self, spec: MoESpec, dtype: str) -> Callable:
        import torch
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _TORCH_RECOMPILE_LIMIT)
        dynamo_config.fail_on_recompile_limit_hit = True

        def layer(w: dict, x):
            return torch_moe_layer(spec, w, x)

        return torch.compile(layer, fullgraph=True, dynamic=False)


def torch_compile_refusal(dtype: str, device: str | None) -> str | None:
    """Why torch.compile cannot trace `torch._grouped_mm` at ``dtype`` here, or None. Asked of the op's meta
    kernel (what the compiler traces with): torch 2.13's accepts bfloat16 only, while the eager CPU kernel
    also runs float32."""
    import torch

    compute = getattr(torch, dtype)
    try:
        torch._grouped_mm(torch.empty(16, 16, dtype=compute, device="meta"),
                          torch.empty(2, 16, 16, dtype=compute, device="meta"),
                          offs=torch.empty(2, dtype=torch.int32, device="meta"))
    except RuntimeError as exc:
        return (f"torch.compile cannot trace torch._grouped_mm in {dtype} (torch {torch.__version__}'s meta kernel: "
                f"{str(exc).splitlines()[0]})")
    return None


# -- the GEMM bound: the layer's grouped GEMMs alone ------------------------------------------------------------
def balanced_expert_ids(tokens: int, top_k: int, experts: int) -> np.ndarray:
    """[T, k] experts of perfectly balanced, pre-sorted rows: token t's j-th row is row p = j T + t of the
    k T rows, and row p goes to expert floor(p E / (k T)). Experts are non-decreasing in p (the rows are
    sorted by expert), every expert gets floor or ceil of k T / E rows, and a token's k experts differ
    (its rows are T >= k T / E apart when k <= E)."""
    if not 0 < top_k <= experts:
        raise SpecError(f"top_k {top_k} must be in 1..experts ({experts})")
    rows = np.arange(top_k * tokens, dtype=np.int64).reshape(top_k, tokens)
    return np.ascontiguousarray((rows * experts // (top_k * tokens)).T)


class GemmBound(TorchGroupedMMPeer):
    """The layer's GEMMs and nothing else: what a layer could reach if routing, packing and combining cost
    nothing and every expert got the same number of rows.

    Untimed, once per input: x repeated k times (row j T + t is token t), so the rows are already sorted
    by expert under `balanced_expert_ids`. Timed: ``torch._grouped_mm`` for the up and down projections
    with the SwiGLU between, the sum of each token's k rows (unit gate weights), and the shared expert's
    two matmuls; forward+backward adds autograd's data and weight gradients of each (and dx, the sum of
    its k rows' gradients). That is the suite's FLOP count (`metrics.flops`) and little else: on CPU, at
    the cpu-small preset, a fraction of a millisecond per call.

    A bound that a layer beats is not a bound. The same GEMMs run eagerly and under ``torch.compile``
    (fullgraph, static shapes: inductor fuses the SwiGLU and the row sum into the GEMMs' neighbours and
    plans the backward, which eager autograd does not), and each step times the faster of the two,
    chosen by a few untimed calls (`faster_variant`); extra_info says which (``bound_variant``), both
    medians, and why the compiled one was not tried where torch.compile cannot trace torch._grouped_mm.
    On the H200 (2026-11-30) the eager-only bound was beaten by the compiled torch layer (106.8% at top-k 8
    forward+backward), which does the router, gather and combine besides. A row still above 100% is
    flagged in the tables (`tables.fmt_share`), never hidden.
    """

    name = "gemm_bound"
    bound = True

    @classmethod
    def bound_operand(cls, dtype: str) -> str:
        """The tensor-core operand type this bound's GEMMs run in: the compute dtype."""
        return dtype

    def fixed_expert_ids(self, spec: MoESpec, tokens: int) -> np.ndarray:
        return balanced_expert_ids(tokens, spec.top_k, spec.experts)

    def forward(self, prepared: _Prepared, x: np.ndarray) -> ForwardResult:
        import torch

        validate_input(prepared.spec, x)
        with torch.no_grad():
            y = self._forward_output(self.benchmark_step(prepared, x, "forward")())
        ids = self.fixed_expert_ids(prepared.spec, x.shape[0])
        return ForwardResult(y.double().cpu().numpy(), ids, np.ones(ids.shape), float("nan"))

    def _forward_output(self, result: Any) -> Any:
        """The output tensor of a forward step's result (subclasses whose steps return more unpack it)."""
        return result

    def benchmark_step(self, prepared: _Prepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        import torch

        if pass_ not in ("forward", "backward"):
            raise SpecError(f"unknown pass {pass_!r}")
        spec, w = prepared.spec, prepared.arrays
        tokens, k, ffn, shared = x.shape[0], spec.top_k, spec.ffn, spec.shared_ffn
        x_t = self._put(prepared, x)
        dy_t = self._put(prepared, dy if dy is not None else np.random.default_rng(0).standard_normal(x.shape))
        counts = np.bincount(self.fixed_expert_ids(spec, tokens).reshape(-1), minlength=spec.experts)
        ends = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=x_t.device)
        rows = x_t.repeat(k, 1)  # pre-sorted by expert (balanced_expert_ids), made before any timed call
        sync = torch.cuda.synchronize if x_t.is_cuda else (lambda: None)
        names = ["w13", "w2"] + (["shared_w13", "shared_w2"] if shared else [])

        layers = {"eager": partial(gemm_layer, ffn=ffn, shared=shared, k=k, tokens=tokens)}
        compiled = self._compiled_layer(prepared)
        if compiled is not None:
            layers["compiled"] = partial(compiled, ffn=ffn, shared=shared, k=k, tokens=tokens)
        leaves = {name: w[name].detach().requires_grad_() for name in names}
        rows_leaf = rows.detach().requires_grad_()
        x_leaf = x_t.detach().requires_grad_()
        inputs = [rows_leaf] + ([x_leaf] if shared else []) + [leaves[name] for name in names]

        def forward_of(layer):
            def forward_body():
                with torch.no_grad():
                    return layer(rows, x_t, w, ends)
            return forward_body

        def backward_of(layer):
            def backward_body():
                with torch.enable_grad():
                    y = layer(rows_leaf, x_leaf, leaves, ends)
                    grads = torch.autograd.grad(y, inputs, grad_outputs=dy_t)
                    dx = grads[0].view(k, tokens, -1).sum(0)
                    if shared:
                        dx = dx + grads[1]
                return {"dx": dx, **dict(zip(names, grads[-len(names):]))}
            return backward_body

        make = forward_of if pass_ == "forward" else backward_of
        bodies = {variant: make(layer) for variant, layer in layers.items()}
        chosen, seconds = faster_variant(bodies, sync)
        step = synchronized_step(bodies[chosen], sync, torch_stream=x_t.is_cuda)
        step.extra_info = {"bound_variant": chosen,  # type: ignore[attr-defined]
                           "bound_variant_s": seconds,
                           **({"bound_variant_note": prepared.extra["compile_refusal"]}
                              if prepared.extra.get("compile_refusal") else {})}
        return step

    def _compiled_layer(self, prepared: _Prepared) -> Callable | None:
        """`gemm_layer` under torch.compile (fullgraph, static shapes), once per prepared layer; None (with the
        reason kept for extra_info) where the compiler cannot trace torch._grouped_mm at this dtype."""
        if "compiled_layer" not in prepared.extra:
            import torch

            reason = torch_compile_refusal(prepared.dtype, self.device)
            prepared.extra["compile_refusal"] = reason
            prepared.extra["compiled_layer"] = (None if reason else
                                                torch.compile(gemm_layer, fullgraph=True, dynamic=False))
        return prepared.extra["compiled_layer"]


def gemm_layer(rows, x, p: dict, ends, ffn: int, shared: int, k: int, tokens: int):
    """The bound's work: two grouped GEMMs with SwiGLU between, each token's k rows summed, the shared expert."""
    import torch
    import torch.nn.functional as F

    h = torch._grouped_mm(rows, p["w13"], offs=ends)
    out = torch._grouped_mm(F.silu(h[:, :ffn]) * h[:, ffn:], p["w2"], offs=ends)
    y = out.view(k, tokens, -1).sum(0)
    if shared:
        hs = x @ p["shared_w13"]
        y = y + (F.silu(hs[:, :shared]) * hs[:, shared:]) @ p["shared_w2"]
    return y


#: Untimed calls per variant when a bound picks its fastest way: warm-up (compiling) and the calls compared.
VARIANT_WARMUP_CALLS, VARIANT_TIMED_CALLS = 2, 3


def faster_variant(bodies: dict[str, Callable[[], Any]], sync: Callable[[], None]) -> tuple[str, dict[str, float]]:
    """The name of the fastest body (median of `VARIANT_TIMED_CALLS` untimed calls each, after warm-up) and
    every body's median seconds: a bound runs its GEMMs the fastest way the framework offers."""
    import statistics
    import time

    seconds = {}
    for name, body in bodies.items():
        for _ in range(VARIANT_WARMUP_CALLS):
            body()
        sync()
        calls = []
        for _ in range(VARIANT_TIMED_CALLS):
            start = time.perf_counter()
            body()
            sync()
            calls.append(time.perf_counter() - start)
        seconds[name] = statistics.median(calls)
    return min(seconds, key=seconds.__getitem__), seconds


# -- jax.lax.ragged_dot ---------------------------------------------------------------------------------------
def _jax_layer(params: dict, x, spec: MoESpec):
    import jax
    import jax.numpy as jnp

    logits = x.astype(jnp.float32) @ params["router"]
    if spec.router == "softmax_topk":
        scores, selection = jax.nn.softmax(logits, axis=-1), logits
    else:
        scores = jax.nn.sigmoid(logits)
        selection = scores + params["router_bias"] if "router_bias" in params else scores
    ids = jax.lax.top_k(jax.lax.stop_gradient(selection), spec.top_k)[1]
    gates = jnp.take_along_axis(scores, ids, axis=-1)
    if spec.renormalize:
        gates = gates / gates.sum(axis=-1, keepdims=True)
    if spec.router == "sigmoid_topk":
        gates = gates * spec.routed_scaling
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // spec.top_k
    sizes = jnp.bincount(flat, length=spec.experts).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[token], params["w13"], sizes)
    a = jax.nn.silu(h[:, :spec.ffn]) * h[:, spec.ffn:]
    out = jax.lax.ragged_dot(a, params["w2"], sizes)
    weighted = out.astype(jnp.float32) * gates.reshape(-1)[order][:, None]
    y = jnp.zeros(x.shape, jnp.float32).at[token].add(weighted)
    if "shared_w13" in params:
        hs = x @ params["shared_w13"]
        y = y + ((jax.nn.silu(hs[:, :spec.shared_ffn]) * hs[:, spec.shared_ffn:]) @ params["shared_w2"]).astype(
            jnp.float32)
    return y.astype(x.dtype), ids, gates


def _jax_forward_backward(params: dict, x, dy, spec: MoESpec):
    import jax

    trainable = {k: v for k, v in params.items() if k != "router_bias"}
    fixed = {k: v for k, v in params.items() if k == "router_bias"}
    y, vjp = jax.vjp(lambda p, x_: _jax_layer({**p, **fixed}, x_, spec)[0], trainable, x)
    d_params, d_x = vjp(dy)
    return d_x, d_params, y  # dx first; y kept (`Backend.benchmark_step`: a training step computes it)


class JaxRaggedDotPeer(PeerBackend):
    name = "jax.lax.ragged_dot"
    framework = "jax"
    capabilities = _peer_capabilities(("cpu", "gpu"))
    #: On GPU, XLA lowers ragged_dot to a dense masked dot over all experts (implementations/_jax_env.py,
    #: H100 2026-11-22: 16 GiB buffers, out of memory at top-k 8): an intermediate of about rows x E x
    #: max(2F, H) elements. Cases whose estimate passes this share of JAX's allocator limit (``bytes_limit``,
    #: XLA_PYTHON_CLIENT_MEM_FRACTION of the device: 75% by default, grown on demand since the benchmark
    #: plugin turns preallocation off) are skipped.
    GPU_MEMORY_SHARE = 0.45

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("jax") is None:
            return "jax is not installed"
        try:
            import jax

            if not hasattr(jax.lax, "ragged_dot"):
                return f"jax {jax.__version__} has no jax.lax.ragged_dot"
        except Exception as exc:
            return f"jax cannot be imported: {type(exc).__name__}: {exc}"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        import jax

        return {"jax": jax.__version__, "jax_backend": jax.default_backend()}

    def _device(self):
        import jax

        return jax.devices(self.device)[0]

    def benchmark_limit(self, spec: MoESpec, tokens: int, pass_: str, dtype: str) -> str | None:
        """Why this case is not run here (GPU memory of the dense lowering), or None."""
        device = self._device()
        if device.platform != "gpu":
            return None
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit:
            return None
        itemsize = 2 if dtype == "bfloat16" else 4
        estimate = tokens * spec.top_k * spec.experts * max(2 * spec.ffn, spec.hidden) * itemsize
        estimate *= 1 if pass_ == "forward" else 3
        if estimate > self.GPU_MEMORY_SHARE * limit:
            return (f"jax.lax.ragged_dot lowers to a dense masked dot on GPU: ~{estimate / 2**30:.0f} GiB of "
                    f"intermediates (rows x experts x max(2F, H)) > {self.GPU_MEMORY_SHARE:.0%} of JAX's "
                    f"{limit / 2**30:.0f} GiB allocator limit (bytes_limit: XLA_PYTHON_CLIENT_MEM_FRACTION of the "
                    "device, grown on demand)")
        return None

    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> _Prepared:
        import jax
        import jax.numpy as jnp

        self._check(spec, scheme, dtype)
        params.validate(spec)
        device = self._device()
        arrays = {name: jax.device_put(np.asarray(value, np.float32), device).astype(
                      jnp.float32 if name.startswith("router") else getattr(jnp, dtype))
                  for name, value in params.items()}
        fwd = jax.jit(partial(_jax_layer, spec=spec))
        fwd_bwd = jax.jit(partial(_jax_forward_backward, spec=spec))
        return _Prepared(spec, dtype, arrays, params, {"forward": fwd, "forward_backward": fwd_bwd})

    def _put(self, prepared: _Prepared, values: np.ndarray):
        import jax
        import jax.numpy as jnp

        return jax.device_put(np.asarray(values, np.float32), self._device()).astype(getattr(jnp, prepared.dtype))

    def forward(self, prepared: _Prepared, x: np.ndarray) -> ForwardResult:
        validate_input(prepared.spec, x)
        y, ids, gates = prepared.extra["forward"](prepared.arrays, self._put(prepared, x))
        return ForwardResult(np.asarray(y, np.float64), np.asarray(ids).astype(np.int64),
                             np.asarray(gates, np.float64), float("nan"))

    def benchmark_step(self, prepared: _Prepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        import jax

        x_dev = self._put(prepared, x)
        dy_dev = self._put(prepared, dy if dy is not None else np.random.default_rng(0).standard_normal(x.shape))
        if pass_ == "forward":
            program, args = prepared.extra["forward"], (prepared.arrays, x_dev)
        elif pass_ == "backward":
            program, args = prepared.extra["forward_backward"], (prepared.arrays, x_dev, dy_dev)
        else:
            raise SpecError(f"unknown pass {pass_!r}")

        def memory_analysis() -> Any:  # XLA's CompiledMemoryStats, or None
            # XLA's runtime peak is process-wide (`memory`): the compiled program's own figure, from its cache
            return program.lower(*args).compile().memory_analysis()

        # jitted calls dispatch asynchronously, in order
        return async_step(partial(program, *args), jax.block_until_ready, memory_analysis)


# -- mx.gather_mm -----------------------------------------------------------------------------------------------
def _mlx_layer(w: dict, x, spec: MoESpec):
    import mlx.core as mx
    import mlx.nn as nn

    logits = x.astype(mx.float32) @ w["router"]
    if spec.router == "softmax_topk":
        scores, selection = mx.softmax(logits, axis=-1), logits
    else:
        scores = mx.sigmoid(logits)
        selection = scores + w["router_bias"] if "router_bias" in w else scores
    ids = mx.stop_gradient(mx.argpartition(-selection, kth=spec.top_k - 1, axis=-1)[:, :spec.top_k])
    gates = mx.take_along_axis(scores, ids, axis=-1)
    if spec.renormalize:
        gates = gates / gates.sum(axis=-1, keepdims=True)
    if spec.router == "sigmoid_topk":
        gates = gates * spec.routed_scaling
    flat = ids.reshape(-1)
    order = mx.argsort(flat)
    token = order // spec.top_k
    experts = flat[order].astype(mx.uint32)
    rows = x[token][:, None, :]
    h = mx.gather_mm(rows, w["w13"], rhs_indices=experts, sorted_indices=True)
    a = nn.silu(h[..., :spec.ffn]) * h[..., spec.ffn:]
    out = mx.gather_mm(a, w["w2"], rhs_indices=experts, sorted_indices=True)[:, 0, :]
    weighted = out.astype(mx.float32) * gates.reshape(-1)[order][:, None]
    y = mx.zeros(x.shape, dtype=mx.float32).at[token].add(weighted)
    if "shared_w13" in w:
        hs = x @ w["shared_w13"]
        y = y + ((nn.silu(hs[:, :spec.shared_ffn]) * hs[:, spec.shared_ffn:]) @ w["shared_w2"]).astype(mx.float32)
    return y.astype(x.dtype), ids, gates


class MlxGatherMMPeer(PeerBackend):
    """`_mlx_layer` run eagerly (MLX's lazy graph, evaluated once per call)."""

    name = "mx.gather_mm.eager"
    framework = "mlx"
    capabilities = _peer_capabilities(("cpu", "gpu"))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            if importlib.util.find_spec("mlx") is None:
                return "mlx is not installed"
            import mlx.core as mx

            if not hasattr(mx, "gather_mm"):
                return f"mlx {mx.__version__} has no gather_mm"
        except Exception as exc:
            return f"mlx cannot be imported: {type(exc).__name__}: {exc}"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        import mlx.core as mx

        return {"mlx": mx.__version__}

    def _stream(self):
        import mlx.core as mx

        return mx.stream(mx.gpu if self.device == "gpu" else mx.cpu)

    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> _Prepared:
        import mlx.core as mx

        self._check(spec, scheme, dtype)
        params.validate(spec)
        with self._stream():
            arrays = {name: mx.array(np.asarray(value, np.float32)).astype(
                          mx.float32 if name.startswith("router") else getattr(mx, dtype))
                      for name, value in params.items()}
            mx.eval(list(arrays.values()))
        return _Prepared(spec, dtype, arrays, params)

    def _put(self, prepared: _Prepared, values: np.ndarray):
        import mlx.core as mx

        with self._stream():
            out = mx.array(np.asarray(values, np.float32)).astype(getattr(mx, prepared.dtype))
            mx.eval(out)
        return out

    def forward(self, prepared: _Prepared, x: np.ndarray) -> ForwardResult:
        import mlx.core as mx

        validate_input(prepared.spec, x)
        with self._stream():
            y, ids, gates = _mlx_layer(prepared.arrays, self._put(prepared, x), prepared.spec)
            mx.eval(y, ids, gates)
        return ForwardResult(np.array(y.astype(mx.float32), np.float64), np.array(ids).astype(np.int64),
                             np.array(gates, np.float64), float("nan"))

    def benchmark_step(self, prepared: _Prepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        import mlx.core as mx

        if pass_ not in ("forward", "backward"):
            raise SpecError(f"unknown pass {pass_!r}")
        x_dev = self._put(prepared, x)
        dy_dev = self._put(prepared, dy if dy is not None else np.random.default_rng(0).standard_normal(x.shape))
        spec, arrays = prepared.spec, prepared.arrays
        trainable = tuple(n for n in arrays if n != "router_bias")
        device = mx.gpu if self.device == "gpu" else mx.cpu
        forward = partial(_mlx_forward, spec=spec)
        forward_backward = partial(_mlx_forward_backward, spec=spec, trainable=trainable)
        fn = self._transform(forward if pass_ == "forward" else forward_backward)
        args = (arrays, x_dev) if pass_ == "forward" else (arrays, x_dev, dy_dev)

        def step():
            with mx.stream(device):
                out = fn(*args)
                mx.eval(out)
            return out  # y, or the gradients with dx first

        return step

    def _transform(self, fn: Callable) -> Callable:
        """How users run the layer: as written (eager) here, ``mx.compile`` in the compiled peer."""
        return fn


def _mlx_forward(arrays: dict, x, spec: MoESpec):
    return _mlx_layer(arrays, x, spec)[0]


def _mlx_forward_backward(arrays: dict, x, dy, spec: MoESpec, trainable: tuple[str, ...]):
    import mlx.core as mx

    def layer_of(x_, *leaves):
        return _mlx_layer({**arrays, **dict(zip(trainable, leaves))}, x_, spec)[0]

    outputs, grads = mx.vjp(layer_of, [x, *(arrays[n] for n in trainable)], [dy])
    return [*grads, *outputs]  # dx first; y evaluated too (`Backend.benchmark_step`: a training step computes it)


class MlxGatherMMCompiledPeer(MlxGatherMMPeer):
    """The same layer under ``mx.compile`` (one fused graph per shape; compiled in the warm-up rounds)."""

    name = "mx.gather_mm.compiled"

    def _transform(self, fn: Callable) -> Callable:
        import mlx.core as mx

        return mx.compile(fn)


# -- the harness-overhead backend --------------------------------------------------------------------------------
class NoopBackend(Backend):
    """Does nothing: its timed call is the harness's own cost (setup rotation, wrapper, timer). On CUDA it
    ends with the device synchronization every real step ends with (on an idle device: its latency only),
    so the figure is what a round adds to any step, measured on the same CUDA-event clock. It offers its
    empty body as ``step.async_body`` (`implementations.base.async_step`), so its rounds take the path of
    the steps that run several calls per round and wait once (JAX's)."""

    name = "noop"
    harness_only = True
    torch_stream = False
    capabilities = Capabilities(schemes=("none",), passes=("forward", "backward"), dtypes=_DTYPES,
                                devices=("cpu", "cuda", "gpu"))

    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> MoEParams:
        return params

    def forward(self, prepared: MoEParams, x: np.ndarray) -> ForwardResult:
        raise NotImplementedError("noop measures the harness; it computes nothing")

    def effective_weights(self, prepared: MoEParams) -> dict[str, np.ndarray]:
        return prepared.as_dict()

    def benchmark_step(self, prepared: MoEParams, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        if self.device in ("cuda", "gpu") and importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                if self.torch_stream:
                    return synchronized_step(_nothing, torch.cuda.synchronize, torch_stream=True)
                return async_step(_nothing, _synchronize_cuda)
        return _nothing


class NoopStreamBackend(NoopBackend):
    """`NoopBackend` offering its (empty) body for stream-ordered timing (``step.stream_body``): what the
    harness adds to a step timed between CUDA events on torch's stream, with no host round trip inside."""

    name = "noop.stream"
    torch_stream = True


def _nothing() -> None:
    return None


def _synchronize_cuda(_output: object) -> None:
    """`NoopBackend`'s wait: the device synchronization a real step's wait amounts to (its output is None)."""
    import torch

    torch.cuda.synchronize()


#: Peers by framework, strongest first (how its users run the layer: compiled, jitted), then the eager rows.
#: A backend whose `versions()` names the framework is compared with the fastest of them on each case.
PEERS: dict[str, tuple[type[PeerBackend], ...]] = {
    "torch": (TorchGroupedMMCompiledPeer, TorchGroupedMMPeer),
    "jax": (JaxRaggedDotPeer,),
    "mlx": (MlxGatherMMCompiledPeer, MlxGatherMMPeer),
}


def framework_of(backend_cls: type[Backend]) -> str | None:
    """The peer framework a backend runs on, from the framework names its `versions()` reports."""
    if isinstance(backend_cls, type) and issubclass(backend_cls, PeerBackend):
        return backend_cls.framework
    try:
        keys = backend_cls.versions().keys()
    except Exception:
        return None
    for framework in PEERS:
        if framework in keys:
            return framework
    return None

