"""`jax_prequant`: JAX MoE with int8 routed experts, pre-quantized weights, a custom VJP and
expert parallelism (the design of ``seeds/jax-moe-ep-int8-logbook.txt``).

Schemes ``none``, ``int8_dense``, ``int8_routed``, ``int8_all``, ``int8_routed_prequant``:
per-token activation scales, one scale per expert weight matrix, int8 x int8 grouped matmuls with
int32 accumulation, dequantized once at the output. ``int8_routed_prequant`` quantizes the expert
weights once here in `prepare` and its backward is the logbook's final custom VJP (MOE-I8-024).

Grouped matmul formulation (`env.select_formulation`): ``ragged`` (``jax.lax.ragged_dot_general``)
on CPU and TPU; ``padded`` (capacity-padded batched matmul) on GPU, where ragged_dot lowers to a dense
masked dot. Force one with ``JaxPrequantBackend(grouped="padded")`` or ``QMOE_JAX_GROUPED=padded``.
``pallas`` (issue 15; only when asked for): grouped Pallas kernels (`pallas_grouped`; Triton on GPU,
interpreted on CPU) over the expert-sorted rows without capacity padding, int8 x int8 -> int32 with
the scales applied in the kernel's epilogue, for the forward, the custom VJP's input gradient and the
weight gradients. Not yet measured on a GPU, so not a default. ``QMOE_JAX_GROUPED=pallas`` runs the
whole suite with it; `JaxPrequantPallasBackend` (``jax_prequant_pallas``, not registered: load it with
``--backend-module qmoe.implementations.jax_prequant:JaxPrequantPallasBackend``) runs it beside the
default in one benchmark session.
On GPU the programs of int8 schemes compile with ``env.INT8_GPU_OPTIONS`` (cuBLASLt int8 GEMMs
instead of XLA's Triton GEMM fusions, which ran the int8 expert GEMMs slower than bfloat16 on an H100).

Expert parallelism: ``prepare(..., ep_size=N)`` shards experts over N devices (mesh axis ``ep``);
CPU runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (at least N; the suite plugin sets
8) before jax is imported. The int8 routed schemes dispatch each token row as int8 codes + a float32
scale, quantized once at its source (the expert would make the same codes);
``JaxPrequantBackend(device, ep_dispatch="int8")`` does so for every scheme (``none`` then computes on
the dequantized rows; straight-through backward), as ``TorchTritonBackend(device, ep_dispatch="int8")``
does. See `expert_parallel`.

Static shapes: the padded formulation and the EP dispatch need per-expert / per-device-pair row
capacities. They are sized from the routing of the input (one small routing program), bucketed
(32 sizes per octave), cached per token count, and checked after every run; a run whose routing
outgrew them is rerun with larger ones, so results are always dropless.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qmoe.reference.layer import ForwardResult
from qmoe.reference.schemes import get_scheme
from qmoe.reference.spec import MoEParams, MoESpec, SpecError, validate_input

from ..base import Backend, Capabilities

SCHEMES = ("none", "int8_dense", "int8_routed", "int8_all", "int8_routed_prequant")
DTYPES = ("float32", "bfloat16")
#: Passes accepted by `JaxPrequantBackend.benchmark_step`: forward, or forward+backward.
FORWARD_BACKWARD = ("backward", "forward_backward")
#: How expert parallelism sends token rows (`expert_parallel.sends_int8`).
EP_DISPATCHES = ("float", "int8")

#: The most rows the platform's ``padded`` default may compute per routed row (capacity x experts over
#: tokens x top_k) before a token count's plan becomes ``pallas`` (no padding). H200, logbook shape, top-8
#: int8_routed_prequant forward+backward (2026-12-01): at the "balanced" routing (1.09 after bucketing) padded
#: beat pallas by ~3%; at zipf routing padded asked for 49-63 GiB and ran out of memory, pallas ran within
#: 6% of balanced.
PADDING_LIMIT = 1.15
#: ... and only where the padding is at least this many rows: below it (32 MiB of bfloat16 rows at H = 2048) it
#: costs little next to a pallas plan's Triton compilations, one per shape. The conformance cases (at most 65
#: tokens) pad far more than PADDING_LIMIT; turned pallas, jax_prequant's GPU conformance did not finish in 230 s
#: (a5cd770), against 143 s on padded (0016e98). The logbook's top-2 "balanced" routing pads 10,240 rows (1.156).
PADDING_MIN_ROWS = 8192

#: The fewest routed elements of h (tokens x top_k x F) for which the platform's default runs the SwiGLU and
#: combine kernels (`env.select_swiglu`: ``pallas`` on GPUs) and the ``mosaic`` int8 GEMM (`env.mosaic_default`:
#: Hopper); below, XLA's fusions and GEMMs. Each kernel is compiled through
#: Triton once per shape, and at small sizes the compiles are all it costs: jax_prequant's GPU conformance (at
#: most 65 tokens) ran 281 s with the SwiGLU kernels (e1b6131) and did not finish in 295 s with the combine kernel
#: too (f33cfcb), against 143 s without kernels (0016e98). The logbook's smallest routed h is 2^27 elements.
KERNEL_MIN_ELEMENTS = 2**22


@dataclass
class JaxPrepared:
    """A prepared layer: device arrays, the static plan and the effective (dequantized) weights.

    ``params``: the float arrays gradients are taken for (router float32; experts padded to a
    multiple of ``ep_size``). ``frozen``: the rest (router bias; pre-quantized expert codes/scales).
    ``sizes``: token count -> (expert_capacity, dispatch_capacity) found so far. ``effective``: the
    dequantized float64 weights, made on first request (at benchmark shapes they are gigabytes).
    ``skewed_formulation``: what a ``padded`` plan becomes for a token count whose routing would pad more than
    `PADDING_LIMIT` and `PADDING_MIN_ROWS` (`JaxPrequantBackend._plan_for`), or None where the formulation was
    asked for. ``small_swiglu``: what the plan's ``swiglu`` becomes below `KERNEL_MIN_ELEMENTS`, or None where the
    kernels were asked for (argument or environment) or are not the platform's default; ``small_int8_gemm`` the same
    for the plan's ``int8_gemm`` (the ``mosaic`` default gives way to ``xla``).
    """

    spec: MoESpec
    scheme: str
    dtype: str
    plan: Any
    params: dict
    frozen: dict
    devices: list
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    effective: dict[str, np.ndarray] | None = None
    skewed_formulation: str | None = None
    small_swiglu: str | None = None
    small_int8_gemm: str | None = None


class JaxPrequantBackend(Backend):
    name = "jax_prequant"
    capabilities = Capabilities(
        schemes=SCHEMES,
        passes=("forward", "backward"),
        dtypes=DTYPES,
        devices=("cpu", "gpu"),
        routers=("softmax_topk", "sigmoid_topk"),
        capacity=True,
        shared_expert=True,
        quantizer=True,
        bypass=True,
        expert_parallel=(2, 4, 8),
    )

    def __init__(self, device: str | None = None, grouped: str | None = None, ep_dispatch: str = "float",
                 int8_gemm: str | None = None, swiglu: str | None = None, router: str | None = None) -> None:
        """``grouped``: force the grouped-matmul formulation (``ragged``, ``padded`` or ``pallas``; default:
        $QMOE_JAX_GROUPED, else the platform's, `env.select_formulation`). ``int8_gemm``: the routed int8 products'
        kernel, ``xla``, ``pallas``, ``split`` (per projection) or ``mosaic`` (default: $QMOE_JAX_INT8_GEMM, else
        `env.select_int8_gemm`'s; the ``pallas`` formulation runs ``pallas`` unless ``mosaic`` is asked for).
        ``swiglu``: the routed SwiGLU's kernels under int8 schemes, ``xla`` or ``pallas`` (default: $QMOE_JAX_SWIGLU,
        else `env.select_swiglu`'s). ``ep_dispatch``: how expert parallelism sends token rows: ``float`` (the compute
        dtype, except that the int8 routed schemes send the int8 codes and scale their experts would make anyway) or
        ``int8`` (codes and scales for every scheme). ``router``: how the router's logits are multiplied, ``float32`` or
        ``bf16_split`` (bfloat16 layers; default: $QMOE_JAX_ROUTER, else `env.select_router`'s)."""
        if ep_dispatch not in EP_DISPATCHES:
            raise ValueError(f"ep_dispatch {ep_dispatch!r}: use one of {', '.join(EP_DISPATCHES)}")
        super().__init__(device)
        self.grouped = grouped
        self.ep_dispatch = ep_dispatch
        self.int8_gemm = int8_gemm
        self.swiglu = swiglu
        self.router = router

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("jax") is None:
            return "jax is not installed"
        try:
            import jax  # noqa: F401
        except Exception as exc:  # a broken install must become a skip reason, not a crash
            return f"jax cannot be imported: {type(exc).__name__}: {exc}"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        import jax
        import jaxlib

        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "jax_backend": jax.default_backend()}

    def device_count(self) -> int | None:
        """The devices of this platform jax sees (on CPU, the simulated ones the suite asks XLA for)."""
        from . import env

        return len(env.platform_devices(self.device))

    # -- prepare -------------------------------------------------------------------------------------
    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> JaxPrepared:
        """Validate, move weights to the device(s) (experts sharded over ``ep`` when ``ep_size`` > 1)
        and, for ``int8_routed_prequant``, quantize the expert weights once."""
        get_scheme(scheme)
        if scheme not in SCHEMES:
            raise ValueError(f"{self.name} does not implement scheme {scheme!r}; it implements {', '.join(SCHEMES)}")
        if dtype not in DTYPES:
            raise ValueError(f"{self.name} does not implement dtype {dtype!r}; it implements {', '.join(DTYPES)}")
        params.validate(spec)
        from . import env, programs
        from .layer import LayerPlan

        devices = env.platform_devices(self.device)
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
        if ep_size > len(devices):
            raise RuntimeError(
                f"ep_size={ep_size} needs {ep_size} {self.device} devices, jax sees {len(devices)}; on CPU set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={max(ep_size, 8)} before jax is imported")
        experts = -(-spec.experts // ep_size) * ep_size
        mesh = _make_mesh(devices[:ep_size]) if ep_size > 1 else None
        platform = devices[0].platform
        formulation = env.select_formulation(platform, self.grouped)
        int8_gemm = env.select_int8_gemm(platform, formulation, self.int8_gemm,
                                         device=devices[0] if ep_size == 1 else None)
        plan = LayerPlan(spec, scheme, dtype, formulation, experts, ep_size=ep_size, mesh=mesh, platform=platform,
                         dispatch=self.ep_dispatch, int8_gemm=int8_gemm,
                         swiglu=env.select_swiglu(platform, self.swiglu), router=env.select_router(dtype, self.router))
        host_params, host_frozen = _host_arrays(spec, params, experts)
        put = _placer(devices[0], mesh)
        compute = {name: "float32" if name == "router" else dtype for name in host_params}
        device_params = {name: put(_host_cast(value, compute[name]), name in _EXPERT_ARRAYS)
                         for name, value in host_params.items()}
        frozen = {name: put(value, False) for name, value in host_frozen.items()}
        if plan.prequantized:
            (w13_codes, w13_scale), (w2_codes, w2_scale) = programs.quantize_experts(
                device_params["w13"], device_params["w2"])
            # Both layouts of the codes: [E, in, out] for the input gradient, [E, out, in] for the
            # forward, so every int8 product contracts the minor axis of both operands.
            w13_codes_t, w2_codes_t = programs.transpose_codes(w13_codes, w2_codes)
            frozen.update({name: put(value, True) for name, value in
                           (("w13_codes", w13_codes), ("w13_scale", w13_scale), ("w13_codes_t", w13_codes_t),
                            ("w2_codes", w2_codes), ("w2_scale", w2_scale), ("w2_codes_t", w2_codes_t))})
        # The platform's padded default gives way to pallas where a routing would pad too much; a formulation
        # somebody asked for (argument or environment) is kept whatever the routing.
        chosen = self.grouped or os.environ.get(env.GROUPED_ENV)
        skewed = "pallas" if formulation == "padded" and ep_size == 1 and not chosen else None
        kernels_asked = self.swiglu or os.environ.get(env.SWIGLU_ENV)
        small = "xla" if plan.swiglu == "pallas" and not kernels_asked else None
        gemm_asked = self.int8_gemm or os.environ.get(env.INT8_GEMM_ENV)
        small_gemm = "xla" if plan.int8_gemm == "mosaic" and not gemm_asked else None
        return JaxPrepared(spec, scheme, dtype, plan, device_params, frozen, devices[:ep_size],
                           skewed_formulation=skewed, small_swiglu=small, small_int8_gemm=small_gemm)

    def effective_weights(self, prepared: JaxPrepared) -> dict[str, np.ndarray]:
        if prepared.effective is None:
            prepared.effective = _effective_weights(prepared.spec, prepared.plan, prepared.params, prepared.frozen)
        return {name: value.copy() for name, value in prepared.effective.items()}

    # -- forward / backward ---------------------------------------------------------------------------
    def forward(self, prepared: JaxPrepared, x: np.ndarray) -> ForwardResult:
        from . import programs

        validate_input(prepared.spec, x)
        x_dev = self._put_tokens(prepared, x)
        outputs = self._run_sized(prepared, x_dev, lambda plan: programs.forward(
            prepared.params, prepared.frozen, x_dev, plan))
        y, ids, gates, balance, _ = outputs
        return ForwardResult(np.asarray(y, dtype=np.float64), np.asarray(ids).astype(np.int64),
                             np.asarray(gates, dtype=np.float64), float(balance))

    def backward(self, prepared: JaxPrepared, x: np.ndarray, dy: np.ndarray, balance_coeff: float = 0.0
                 ) -> dict[str, np.ndarray]:
        """Gradients of sum(y * dy) + balance_coeff * balance_loss, float64, keyed x and the float
        parameters (router_bias steers selection only and has none)."""
        from . import programs

        validate_input(prepared.spec, x)
        validate_input(prepared.spec, dy, "dy")
        if dy.shape != x.shape:
            raise SpecError(f"dy has shape {dy.shape}, expected the output's shape {x.shape}")
        x_dev = self._put_tokens(prepared, x)
        dy_dev = self._put_tokens(prepared, dy)
        d_params, d_x, _, _ = self._run_sized(prepared, x_dev, lambda plan: programs.forward_backward(
            prepared.params, prepared.frozen, x_dev, dy_dev, np.float32(balance_coeff), plan))
        experts = prepared.spec.experts
        grads = {"x": np.asarray(d_x, dtype=np.float64)}
        for name, value in d_params.items():
            value = np.asarray(value, dtype=np.float64)
            grads[name] = value[:experts] if name in _EXPERT_ARRAYS else value
        return grads

    def quantize_int8(self, values: np.ndarray, axis: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric int8 codes and float32 scales (kept dims), computed by the backend's own quantizer."""
        import jax.numpy as jnp

        from .quant import quantize_symmetric

        codes, scale = quantize_symmetric(jnp.asarray(np.asarray(values, dtype=np.float32)), axis)
        return np.asarray(codes), np.asarray(scale)

    def expert_outputs(self, prepared: JaxPrepared, x: np.ndarray) -> np.ndarray:
        from . import programs

        validate_input(prepared.spec, x)
        plan = _noted(replace(_sized_kernels(prepared, prepared.plan, x.shape[0]), ep_size=1, mesh=None))
        out = programs.bypass(prepared.params, prepared.frozen, self._put_tokens(prepared, x), plan)
        return np.asarray(out, dtype=np.float64)[: prepared.spec.experts]

    # -- benchmarks -------------------------------------------------------------------------------------
    def benchmark_step(self, prepared: JaxPrepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        """A callable running one ``pass_`` (``forward``, or ``backward`` = forward+backward) on
        device-resident x / dy, returning after ``block_until_ready``. It offers the jitted call as
        ``step.async_body`` and ``block_until_ready`` as ``step.wait`` (`base.async_step`): JAX dispatches
        the calls asynchronously and runs them in order, so several may be timed with one wait, and
        ``step.memory_analysis`` gives XLA's memory analysis of the compiled program (the benchmarks' peak
        memory, `suite.benchmarks.memory`; per device on an expert-parallel plan). ``step.extra_info``
        (``jax_plan``: formulation, capacity, SwiGLU and int8 GEMM kernels) goes into the benchmark's record.

        The static capacities are sized here from this x's routing (outside the timed call) and the
        first run's needed sizes are checked, so the timed call never overflows; a training loop with
        changing routing would keep the bucket and rerun on overflow, as `forward` does.
        """
        import jax

        from ..base import async_step
        from . import programs

        validate_input(prepared.spec, x)
        x_dev = self._put_tokens(prepared, x)
        plan = self._plan_for(prepared, x_dev)
        if pass_ == "forward":
            program, args = programs.forward, (prepared.params, prepared.frozen, x_dev)
        elif pass_ in FORWARD_BACKWARD:
            if dy is None:
                dy = np.random.default_rng(0).standard_normal(x.shape)
            dy_dev = self._put_tokens(prepared, dy)
            # balance_coeff on the devices already: a host scalar would be copied in every timed call
            program, args = programs.forward_backward, (prepared.params, prepared.frozen, x_dev, dy_dev,
                                                        programs.zero_like_scalar(x_dev))
        else:
            raise ValueError(f"unknown pass {pass_!r}: use 'forward' or one of {FORWARD_BACKWARD}")

        def run() -> Any:
            return program(*args, plan=plan)

        def memory_analysis() -> Any:  # XLA's CompiledMemoryStats, or None
            # the same jitted function, arguments and plan as run's: the compilation cache answers, no rebuild
            return program.lower(*args, plan=plan).compile().memory_analysis()

        needed = jax.device_get(run()[-1])
        if _outgrown(plan, needed):
            raise RuntimeError(f"benchmark sizing failed: plan {plan} but the routing needs {needed}")

        step = async_step(run, jax.block_until_ready, memory_analysis)
        # What ran, in the benchmark's record: the formulation can differ from the platform's default (a skewed
        # routing's padded plan runs pallas, `_plan_for`), and the kernels are options.
        step.extra_info = {"jax_plan": {  # type: ignore[attr-defined]
            "formulation": plan.formulation, "expert_capacity": plan.expert_capacity, "swiglu": plan.swiglu,
            "int8_gemm": plan.int8_gemm, "router": plan.router}}
        return step

    def all_to_all_operands(self, prepared: JaxPrepared, x: np.ndarray, pass_: str = "forward",
                            dy: np.ndarray | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype name, per-device shape) of each ``all_to_all`` operand of the program that
        `benchmark_step` runs for ``pass_`` on this x (empty on one device): what each device sends,
        its own block included (`programs.exchanged_operands`). Traced, not compiled."""
        from . import programs

        validate_input(prepared.spec, x)
        x_dev = self._put_tokens(prepared, x)
        plan = self._plan_for(prepared, x_dev)
        if pass_ == "forward":
            return programs.exchanged_operands(programs.forward, prepared.params, prepared.frozen, x_dev, plan=plan)
        if pass_ not in FORWARD_BACKWARD:
            raise ValueError(f"unknown pass {pass_!r}: use 'forward' or one of {FORWARD_BACKWARD}")
        dy_dev = self._put_tokens(prepared, np.random.default_rng(0).standard_normal(x.shape) if dy is None else dy)
        return programs.exchanged_operands(programs.forward_backward, prepared.params, prepared.frozen, x_dev,
                                           dy_dev, np.float32(0.0), plan=plan)

    def stage_times(self, prepared: JaxPrepared, x: np.ndarray, repeats: int = 5) -> dict[str, float]:
        """Median seconds of each forward stage, run as separate programs on device-resident data:
        ``pack`` (route, argsort pack, gather, activation quantization), ``up`` (fused w13 grouped
        matmul + SwiGLU; weight quantization too for int8_routed), ``down`` (w2 grouped matmul),
        ``combine`` (unsort and gate-weighted sum), and ``shared`` when the layer has a shared expert.
        Single device only (``ep_size`` = 1): in EP the stages interleave with the all_to_alls."""
        import jax

        from . import programs

        if prepared.plan.ep_size != 1:
            raise ValueError("stage_times runs on one device (prepare with ep_size=1)")
        validate_input(prepared.spec, x)
        x_dev = self._put_tokens(prepared, x)
        plan = self._plan_for(prepared, x_dev)
        p, f = prepared.params, prepared.frozen
        packed = programs.pack_stage(p, f, x_dev, plan)
        hidden = programs.up_stage(p, f, packed, plan)
        out_rows = programs.down_stage(p, f, hidden, packed, plan)
        stages = {"pack": lambda: programs.pack_stage(p, f, x_dev, plan),
                  "up": lambda: programs.up_stage(p, f, packed, plan),
                  "down": lambda: programs.down_stage(p, f, hidden, packed, plan),
                  "combine": lambda: programs.combine_stage(out_rows, packed, plan)}
        if prepared.spec.shared_ffn:
            stages["shared"] = lambda: programs.shared_stage(p, x_dev, plan)
        return {name: _median_seconds(fn, repeats, jax.block_until_ready) for name, fn in stages.items()}

    # -- helpers ----------------------------------------------------------------------------------------
    def _put_tokens(self, prepared: JaxPrepared, values: np.ndarray):
        """Token-major array onto the device(s): split over ``ep`` when the count divides evenly."""
        import jax

        host = np.asarray(values, dtype=np.float32)
        mesh = prepared.plan.mesh
        if mesh is None:
            return jax.device_put(host, prepared.devices[0])
        from jax.sharding import NamedSharding, PartitionSpec

        spec = PartitionSpec("ep") if host.shape[0] % prepared.plan.ep_size == 0 else PartitionSpec()
        return jax.device_put(host, NamedSharding(mesh, spec))

    def _plan_for(self, prepared: JaxPrepared, x_dev) -> Any:
        """The plan with static capacities for this token count (sized from the routing if new)."""
        tokens = x_dev.shape[0]
        plan = _sized_kernels(prepared, prepared.plan, tokens)
        if plan.formulation != "padded" and plan.ep_size == 1:  # no static capacity to size
            return _noted(plan)
        if tokens not in prepared.sizes:
            from . import programs

            routing = programs.routing_only(prepared.params["router"], prepared.frozen.get("router_bias"),
                                                 x_dev, plan.spec)
            ids, kept = (np.asarray(a) for a in routing)
            prepared.sizes[tokens] = _bucketed(plan, tokens, *_needed_sizes(plan, ids, kept))
        capacity, dispatch = prepared.sizes[tokens]
        skewed = prepared.skewed_formulation
        rows, routed = capacity * plan.experts, tokens * plan.spec.top_k
        if skewed and rows > PADDING_LIMIT * routed and rows - routed >= PADDING_MIN_ROWS:
            from .env import formulation_int8_gemm

            return _noted(replace(plan, formulation=skewed, expert_capacity=0,
                                  int8_gemm=formulation_int8_gemm(skewed, plan.int8_gemm)))
        return _noted(replace(plan, expert_capacity=capacity, dispatch_capacity=dispatch))

    def _run_sized(self, prepared: JaxPrepared, x_dev, run: Callable[[Any], tuple]) -> tuple:
        """Run with the cached static sizes; rerun with larger buckets while the routing outgrows them."""
        import jax

        tokens = x_dev.shape[0]
        for _ in range(4):
            plan = self._plan_for(prepared, x_dev)
            outputs = run(plan)
            needed = jax.device_get(outputs[-1])
            if not _outgrown(plan, needed):
                return outputs
            prepared.sizes[tokens] = _bucketed(plan, tokens, int(needed["expert_capacity"]),
                                               int(needed["dispatch_capacity"]))
        raise RuntimeError(f"static capacities kept being outgrown: {prepared.sizes[tokens]} vs {needed}")


class JaxPrequantVariant(JaxPrequantBackend):
    """A `JaxPrequantBackend` whose options default to ``defaults``: an unregistered variant that a GPU session loads
    beside the default to compare the two in one benchmark run (issue 15)::

        pytest -m benchmark --device cuda --bench-shape logbook-shared0 \
            --backend-module qmoe.implementations.jax_prequant:JaxPrequantPallasBackend \
            --backend jax_prequant,jax_prequant_pallas

    Not in the registry, so no run gains a backend by default. Options given are kept over the defaults."""

    defaults: dict[str, str] = {}

    def __init__(self, device: str | None = None, **options: Any) -> None:
        super().__init__(device, **{**self.defaults, **options})


class JaxPrequantPallasBackend(JaxPrequantVariant):
    """The ``pallas`` grouped formulation whatever the platform (`env.select_formulation`)."""

    name = "jax_prequant_pallas"
    defaults = {"grouped": "pallas"}


class JaxPrequantInt8PallasBackend(JaxPrequantVariant):
    """The routed int8 products by the Pallas kernel (scales in its epilogue) under the platform's formulation
    (``padded`` on GPUs: XLA's batched GEMMs for everything else; `env.select_int8_gemm`)."""

    name = "jax_prequant_int8_pallas"
    defaults = {"int8_gemm": "pallas"}


class JaxPrequantInt8SplitBackend(JaxPrequantVariant):
    """``int8_gemm`` ``split`` (`grouped.projection_layout`: XLA's int8 dot for the up projection, the Pallas kernel
    with its scale epilogue for the down projection)."""

    name = "jax_prequant_int8_split"
    defaults = {"int8_gemm": "split"}


class JaxPrequantInt8MosaicBackend(JaxPrequantVariant):
    """``int8_gemm`` ``mosaic`` (`pallas_mosaic`: every routed int8 product by the warp-specialized Mosaic GPU
    kernel, the scales in its epilogue, the padded layout's padding tiles skipped)."""

    name = "jax_prequant_int8_mosaic"
    defaults = {"int8_gemm": "mosaic"}


class JaxPrequantInt8XlaBackend(JaxPrequantVariant):
    """``int8_gemm`` ``xla`` (XLA's int8 dot; the ``pallas`` kernel under the ``pallas`` formulation): the default
    before ``mosaic`` became Hopper's, for the A/B beside it."""

    name = "jax_prequant_int8_xla"
    defaults = {"int8_gemm": "xla"}


class JaxPrequantPallasMosaicBackend(JaxPrequantVariant):
    """The ``pallas`` formulation (no capacity padding anywhere: the float weight gradients are its grouped Pallas
    kernels too) with the ``mosaic`` int8 GEMM."""

    name = "jax_prequant_pallas_mosaic"
    defaults = {"grouped": "pallas", "int8_gemm": "mosaic"}


class JaxPrequantRouterSplitBackend(JaxPrequantVariant):
    """Bfloat16 layers multiply the router's logits as bfloat16 tensor-core products (``router`` ``bf16_split``,
    `routing.split_logits`)."""

    name = "jax_prequant_router_split"
    defaults = {"router": "bf16_split"}


# -- module helpers (no framework at import) ---------------------------------------------------------------

_EXPERT_ARRAYS = ("w13", "w2", "w13_codes", "w13_scale", "w13_codes_t", "w2_codes", "w2_scale", "w2_codes_t")


def _noted(plan):
    """``plan``, recorded as live (compiled programs are dropped past a bound: `programs.note_plan`)."""
    from . import programs

    programs.note_plan(plan)
    return plan


def _make_mesh(devices: list):
    from jax.sharding import Mesh

    return Mesh(np.array(devices), ("ep",))


def _placer(device, mesh):
    """put(host_array, expert_axis) -> device array: experts sharded over ``ep``, the rest replicated."""
    import jax

    if mesh is None:
        return lambda value, _: jax.device_put(value, device)
    from jax.sharding import NamedSharding, PartitionSpec

    return lambda value, experts: jax.device_put(value, NamedSharding(mesh, PartitionSpec("ep") if experts
                                                                       else PartitionSpec()))


def _host_cast(value: np.ndarray, dtype: str) -> np.ndarray:
    """``value`` cast to ``dtype`` on the host (round to nearest even, as XLA's convert), so that the device
    never holds a float32 copy of a bfloat16 weight: DeepSeek-V3's w13 is 28 GiB in float32, which ran out
    of memory in prepare on the H200 (2026-12-01); it also halves the bytes sent. Threaded over chunks
    (ml_dtypes' cast releases the GIL: 1.4 ns an element on one core, 0.8 on two)."""
    import jax.numpy as jnp

    target = np.dtype(jnp.dtype(dtype))
    if value.dtype == target:
        return value
    src = np.ascontiguousarray(value).reshape(-1)
    out = np.empty(value.shape, target)
    flat = out.reshape(-1)
    starts = range(0, src.size, _CAST_CHUNK)

    def cast(start: int) -> None:
        flat[start:start + _CAST_CHUNK] = src[start:start + _CAST_CHUNK]

    threads = min(len(starts), os.cpu_count() or 1)
    if threads <= 1:
        for start in starts:
            cast(start)
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="qmoe-jax-cast") as pool:
            list(pool.map(cast, starts))  # list: re-raises a chunk's error
    return out


#: Elements cast per task (`_host_cast`): 64 MiB of float32.
_CAST_CHUNK = 1 << 24


def _host_arrays(spec: MoESpec, params: MoEParams, experts: int) -> tuple[dict, dict]:
    """float32 NumPy arrays (exact: inputs hold values of the compute dtype); expert arrays padded
    with zero experts up to ``experts``."""

    def expert_padded(w: np.ndarray) -> np.ndarray:
        pad = experts - w.shape[0]
        return np.concatenate([w, np.zeros((pad, *w.shape[1:]), w.dtype)]) if pad else w

    host = {"router": np.asarray(params.router, np.float32),
            "w13": np.asarray(expert_padded(params.w13), np.float32),
            "w2": np.asarray(expert_padded(params.w2), np.float32)}
    if spec.shared_ffn:
        host["shared_w13"] = np.asarray(params.shared_w13, np.float32)
        host["shared_w2"] = np.asarray(params.shared_w2, np.float32)
    frozen = {}
    if spec.router == "sigmoid_topk" and params.router_bias is not None:
        frozen["router_bias"] = np.asarray(params.router_bias, np.float32)
    return host, frozen


def _effective_weights(spec: MoESpec, plan, device_params: dict, frozen: dict) -> dict[str, np.ndarray]:
    """The float64 values the forward computes with: codes * scale where the scheme quantizes (the
    very codes the prequant forward consumes, or the in-step quantizer's), the stored values elsewhere."""
    from . import programs

    def dequantized(codes, scale) -> np.ndarray:
        return np.asarray(codes, np.float64) * np.asarray(scale, np.float64)

    effective = {name: np.asarray(value).astype(np.float64) for name, value in device_params.items()}
    if "router_bias" in frozen:
        effective["router_bias"] = np.asarray(frozen["router_bias"], np.float64)
    if plan.routed_int8:
        if plan.prequantized:
            w13_q = (frozen["w13_codes"], frozen["w13_scale"])
            w2_q = (frozen["w2_codes"], frozen["w2_scale"])  # the transposed copies hold the same codes
        else:
            w13_q, w2_q = programs.quantize_experts(device_params["w13"], device_params["w2"])
        effective["w13"] = dequantized(*w13_q)
        effective["w2"] = dequantized(*w2_q)
    if plan.shared_int8 and spec.shared_ffn:
        w13_q, w2_q = programs.quantize_shared(device_params["shared_w13"], device_params["shared_w2"])
        effective["shared_w13"] = dequantized(*w13_q)
        effective["shared_w2"] = dequantized(*w2_q)
    effective["w13"] = effective["w13"][: spec.experts]
    effective["w2"] = effective["w2"][: spec.experts]
    return effective


def _needed_sizes(plan, expert_ids: np.ndarray, kept: np.ndarray) -> tuple[int, int]:
    """(rows of the fullest expert, rows of the fullest (source, destination) device pair)."""
    flat, keep = expert_ids.reshape(-1), kept.reshape(-1)
    per_expert = np.bincount(flat[keep], minlength=plan.experts)
    if plan.ep_size == 1:
        return int(per_expert.max(initial=0)), 0
    tokens, top_k = expert_ids.shape
    local_tokens = -(-tokens // plan.ep_size)
    source = np.repeat(np.arange(tokens) // local_tokens, top_k)[keep]
    destination = flat[keep] // (plan.experts // plan.ep_size)
    pairs = np.bincount(source * plan.ep_size + destination, minlength=plan.ep_size**2)
    return int(per_expert.max(initial=0)), int(pairs.max(initial=0))


def _sized_kernels(prepared: JaxPrepared, plan: Any, tokens: int) -> Any:
    """``plan`` with XLA's fusions and GEMMs instead of the GPU-default kernels for a problem below
    `KERNEL_MIN_ELEMENTS` (``prepared.small_swiglu``, ``prepared.small_int8_gemm``), whatever program runs it."""
    if tokens * plan.spec.top_k * plan.spec.ffn >= KERNEL_MIN_ELEMENTS:
        return plan
    if prepared.small_swiglu:
        plan = replace(plan, swiglu=prepared.small_swiglu)
    if prepared.small_int8_gemm:
        plan = replace(plan, int8_gemm=prepared.small_int8_gemm)
    return plan


def _bucketed(plan, tokens: int, expert_rows: int, pair_rows: int) -> tuple[int, int]:
    """Static capacities for the needed row counts, bucketed and capped at what can ever arrive."""
    from .grouped import bucket_capacity

    padded_tokens = -(-tokens // plan.ep_size) * plan.ep_size
    capacity = 0
    if plan.formulation == "padded":
        capacity = min(bucket_capacity(expert_rows), padded_tokens)
        if plan.int8_gemm == "mosaic" and plan.routed_int8:
            from .pallas_mosaic import ROW_ALIGNMENT

            # its padded layout is whole row tiles per group (it skips a group's tiles past its rows)
            capacity = -(-capacity // ROW_ALIGNMENT) * ROW_ALIGNMENT
    dispatch = 0
    if plan.ep_size > 1:
        dispatch = min(bucket_capacity(pair_rows), (padded_tokens // plan.ep_size) * plan.spec.top_k)
    return capacity, dispatch


def _outgrown(plan, needed: dict) -> bool:
    grown_capacity = plan.formulation == "padded" and int(needed["expert_capacity"]) > plan.expert_capacity
    grown_dispatch = plan.ep_size > 1 and int(needed["dispatch_capacity"]) > plan.dispatch_capacity
    return grown_capacity or grown_dispatch


def _median_seconds(fn: Callable[[], Any], repeats: int, block: Callable[[Any], Any]) -> float:
    block(fn())
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
