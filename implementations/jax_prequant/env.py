"""JAX process settings and device choice for the `jax_prequant` backend.

Imported only once the backend is selected (it imports jax). Two process-wide settings are pinned
here, the first time the backend touches JAX:

* ``jax_enable_x64 = False``: float32 stays float32 and the int8 x int8 products accumulate in int32
  exactly as on an accelerator; float64 inputs are cast down at the boundary, never silently kept.
* matmul precision: every float32 dot in the backend passes ``precision=HIGHEST`` itself (see
  `precision_for`), so float32 means float32 also on GPUs whose default would be TF32. The global
  ``jax_default_matmul_precision`` is left to the caller (the suite's plugin sets it to highest too).

Simulated devices for expert parallelism must be set before jax is imported:
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the suite plugin does this for CPU runs: level 6
shards over up to 8 devices).
"""

from __future__ import annotations

import os

import jax

jax.config.update("jax_enable_x64", False)

#: Precision of every float32 dot product in the backend (float32 must not silently become TF32).
FLOAT_PRECISION = jax.lax.Precision.HIGHEST


def precision_for(dtype) -> jax.lax.Precision | None:
    """HIGHEST for float32 operands; None (the operands' own precision) for bfloat16 and integers."""
    return FLOAT_PRECISION if jax.numpy.dtype(dtype) == jax.numpy.float32 else None

#: Environment override of the grouped-matmul formulation: ``ragged``, ``padded`` or ``pallas``.
GROUPED_ENV = "QMOE_JAX_GROUPED"
FORMULATIONS: tuple[str, ...] = ("ragged", "padded", "pallas")
GPU_PLATFORMS: tuple[str, ...] = ("gpu", "cuda", "rocm")
#: Where the ``pallas`` formulation runs: its kernels lower through Triton on GPUs and run in Pallas's
#: interpreter on CPU. TPUs would need Mosaic TPU kernels, which this backend does not have.
PALLAS_PLATFORMS: tuple[str, ...] = (*GPU_PLATFORMS, "cpu")

#: XLA options for the programs of int8 schemes on GPU: int8 x int8 GEMMs go to cuBLASLt instead of
#: XLA's default Triton GEMM fusions. H100, 2026-11-23 (results/h100/jax_prequant_seed.md): the raw
#: expert GEMM [64, 4608, 2048] x [64, 2048, 4096] ran at 1210-1332 int8 TOP/s through cuBLAS against
#: 526-541 bf16 TF/s; the int8_routed_prequant layer at top_k 8 went from 408 to 542 TF/s forward
#: (-9.6% -> +19.4% against bf16) and 434 -> 491 TF/s forward+backward, and its compilation from
#: about 90 s of Triton autotuning to seconds.
INT8_GPU_OPTIONS: dict[str, bool] = {"xla_gpu_enable_triton_gemm": False}


def platform_devices(device: str) -> list:
    """JAX devices for the backend's ``device`` name (``cpu``, ``gpu``/``cuda``)."""
    platform = "gpu" if device in GPU_PLATFORMS else device
    try:
        return jax.devices(platform)
    except RuntimeError as exc:
        raise RuntimeError(f"jax has no {platform} devices here ({exc})") from None


def select_formulation(platform: str, override: str | None = None) -> str:
    """``padded`` on GPUs, ``ragged`` elsewhere, unless ``override`` (or $QMOE_JAX_GROUPED) names one.

    Why: XLA lowers ``ragged_dot`` on GPU to a dense masked dot over all experts (H100, 2026-11-22:
    12.8 TF/s bf16, out of memory at top_k 8), while a capacity-padded batched matmul is a plain
    cuBLAS batched GEMM. On CPU and TPU ``ragged_dot`` is the native grouped matmul. ``pallas`` (the
    grouped Pallas/Triton kernels of `pallas_grouped`, no capacity padding; issue 15) is not a platform's
    formulation: at balanced routing ``padded`` beat it by ~3% on the H200; the backend turns a padded plan
    into a pallas one for a routing that would pad too much (`PADDING_LIMIT` in the package). On CPU
    ``pallas`` runs interpreted (slow; for tests). Asked for where it cannot run (TPU, or a jax without
    Pallas's Triton support), it raises instead of falling back.
    """
    default = "padded" if platform in GPU_PLATFORMS else "ragged"
    return _chosen("grouped formulation", override or os.environ.get(GROUPED_ENV) or default, FORMULATIONS, platform)


def _chosen(what: str, choice: str, choices: tuple[str, ...], platform: str) -> str:
    """``choice``, once it is one of ``choices`` and, where it is ``pallas``, can run on ``platform``; else
    raise, naming ``what`` was asked for."""
    _one_of(what, choice, choices)
    if choice == "pallas":
        check_pallas(platform)
    if choice == "mosaic":
        check_mosaic(platform)
    return choice


def _one_of(what: str, choice: str, choices: tuple[str, ...]) -> None:
    """Raise, naming ``what`` was asked for, unless ``choice`` is one of ``choices``."""
    if choice not in choices:
        raise ValueError(f"{what} {choice!r} is not one of {', '.join(choices)}")


#: Environment override of the int8 x int8 grouped GEMM under the ``ragged`` and ``padded`` formulations:
#: ``xla``, ``pallas`` or ``split`` (`select_int8_gemm`).
INT8_GEMM_ENV = "QMOE_JAX_INT8_GEMM"
INT8_GEMMS: tuple[str, ...] = ("xla", "pallas", "split", "mosaic")
#: Where the ``mosaic`` int8 GEMM runs: Hopper GPUs through Pallas's Mosaic GPU backend, and Pallas's GPU
#: interpreter on CPU (slow; for tests).
MOSAIC_PLATFORMS: tuple[str, ...] = ("gpu", "cuda", "cpu")


def mosaic_default(device) -> bool:
    """Whether ``mosaic`` is the int8 GEMM's default on ``device`` (a jax Device, or None: never): a Hopper GPU
    (compute capability 9.x: the kernel's wgmma is Hopper's instruction) whose jax has Pallas's Mosaic GPU backend."""
    if device is None or device.platform not in GPU_PLATFORMS:
        return False
    if not str(getattr(device, "compute_capability", "")).startswith("9."):
        return False
    try:
        check_mosaic(device.platform)
    except (ValueError, RuntimeError):
        return False
    return True


def select_int8_gemm(platform: str, formulation: str, override: str | None = None, device=None) -> str:
    """Which kernel runs the routed int8 x int8 products: ``xla`` (XLA's int8 dot, cuBLAS on GPUs, whose
    int32 result XLA scales in the fusion that reads it, or the SwiGLU kernels as they read it) or
    ``pallas`` (the grouped Pallas kernel of `pallas_grouped`, the scales applied in its epilogue: the int32
    products never reach memory, but the GEMM is slower than cuBLAS's; on the H200, logbook top-8
    int8_routed_prequant forward+backward, 31.19 against 31.42 ms, within the runs' spread, 2026-12-01), or
    ``split``: the up projection's products (forward and input gradient) by XLA, whose int32 sums the SwiGLU kernels
    dequantize as they read them, and the down projection's by the Pallas kernel, whose epilogue writes the scaled
    result that the combine and the SwiGLU's backward read (`grouped.projection_layout`; H200, logbook
    int8_routed_prequant forward+backward, three runs beside ``xla``: +0.3 to +1.2% at top-8, -0.9 to +3.1% at top-2,
    within the runs' spread, 2026-12-01).

    ``mosaic``: every int8 product by `pallas_mosaic`'s warp-specialized Hopper kernel (Pallas's Mosaic GPU
    backend: one warpgroup loading through the TMA, two issuing int8 wgmma, the scales in the epilogue), which skips
    the padded layout's padding tiles and takes the ``pallas`` formulation's ragged rows as they are (H200, logbook
    top-8 up projection alone, 2026-12-01: 3.15-3.20 ms with its scales against 3.78 ms for XLA's int8 dot without
    them; in the layer, logbook int8_routed_prequant forward+backward beside ``xla`` in one run: 27.54 against 30.28 ms
    at top-8, 9.03 against 9.30 ms at top-2 under the ``pallas`` formulation; a run before, 28.13 against 30.66 ms at
    top-8; results/h200/issue15_2026-12-02). A product whose shape its tiles cannot take (K not a multiple of 32, N
    of 16, narrow ragged outputs: small layers; `pallas_mosaic.mosaic_unsupported_reason`) runs the ``pallas`` kernel
    instead.

    ``override``, else $QMOE_JAX_INT8_GEMM, else ``mosaic`` where `mosaic_default` (``device``: the layer's one
    device; None for expert-parallel layers, whose dispatch layouts it has not run), else ``xla``. The ``pallas``
    formulation runs ``pallas`` unless the choice is ``mosaic``. Under ``padded`` ``pallas`` runs over every group's
    full capacity (the padding rows are zero), and the float GEMMs and weight gradients stay XLA's batched ones.
    """
    choice = override or os.environ.get(INT8_GEMM_ENV) or ("mosaic" if mosaic_default(device) else "xla")
    runs = formulation_int8_gemm(formulation, choice)
    return runs if runs != choice else _chosen("int8 GEMM", choice, INT8_GEMMS, platform)


def formulation_int8_gemm(formulation: str, int8_gemm: str) -> str:
    """The int8 GEMM a plan of ``formulation`` runs when ``int8_gemm`` is chosen: the ``pallas`` formulation runs its
    own grouped kernel unless the choice is ``mosaic``, which takes its ragged rows too; the others run the choice."""
    return "pallas" if formulation == "pallas" and int8_gemm != "mosaic" else int8_gemm


#: Environment override of the routed SwiGLU's kernels: ``xla`` or ``pallas`` (`select_swiglu`).
SWIGLU_ENV = "QMOE_JAX_SWIGLU"
SWIGLUS: tuple[str, ...] = ("xla", "pallas")


def select_swiglu(platform: str, override: str | None = None) -> str:
    """Where the routed SwiGLU and its per-row int8 quantizers run, and with them the combine's backward:
    ``pallas`` (`pallas_swiglu`: one kernel each way under int8 schemes, the backward's kernel under float ones;
    `pallas_combine`) or ``xla`` (`layer.swiglu`, `quant.quantize_rows` and autodiff of the combine, fused by XLA).
    ``override``, else $QMOE_JAX_SWIGLU, else ``pallas`` on GPUs and ``xla`` elsewhere (on CPU ``pallas`` runs
    interpreted: slow, for tests). The GPU default gives way to ``xla`` for token counts below
    `KERNEL_MIN_ELEMENTS` (`_sized_kernels`, in every program the backend runs); a choice made here by argument
    or environment is kept at every size. H200, logbook top-8, int8_routed_prequant forward+backward: 34.9 ms with
    XLA's fusions, 32.9 with the SwiGLU kernels (2026-12-01, one run with both), 31.4 with the combine's kernel
    too."""
    default = "pallas" if platform in GPU_PLATFORMS else "xla"
    return _chosen("swiglu", override or os.environ.get(SWIGLU_ENV) or default, SWIGLUS, platform)


#: Environment override of how the router's logits are multiplied: ``float32`` or ``bf16_split`` (`select_router`).
ROUTER_ENV = "QMOE_JAX_ROUTER"


def select_router(dtype: str, override: str | None = None) -> str:
    """The router's products (`routing.ROUTER_PRODUCTS`): ``override``, else $QMOE_JAX_ROUTER, else ``float32``.
    ``bf16_split`` (`routing.split_logits`: float32 accuracy from bfloat16 tensor-core products) is for bfloat16
    layers; asked for in another dtype it raises. Not yet measured on a GPU (issue 15): not a default."""
    from .routing import ROUTER_PRODUCTS

    choice = override or os.environ.get(ROUTER_ENV) or "float32"
    _one_of("router products", choice, ROUTER_PRODUCTS)
    if choice == "bf16_split" and dtype != "bfloat16":
        raise ValueError(f"router products 'bf16_split' are for bfloat16 layers, not {dtype}: use float32")
    return choice


def check_pallas(platform: str) -> None:
    """Raise, saying why, where the ``pallas`` formulation cannot run on ``platform``."""
    if platform not in PALLAS_PLATFORMS:
        raise ValueError(f"the pallas grouped formulation runs Triton kernels on GPUs (interpreted on CPU); "
                         f"platform {platform!r} has neither: use ragged")
    try:
        from jax.experimental import pallas  # noqa: F401
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the pallas grouped formulation needs jax.experimental.pallas with its Triton "
                           f"backend, which jax {jax.__version__} cannot import here: {exc}") from exc


def check_mosaic(platform: str) -> None:
    """Raise, saying why, where the ``mosaic`` int8 GEMM cannot run on ``platform``."""
    if platform not in MOSAIC_PLATFORMS:
        raise ValueError(f"the mosaic int8 GEMM runs on Hopper GPUs (interpreted on CPU), not on {platform!r}")
    try:
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the mosaic int8 GEMM needs Pallas's Mosaic GPU backend, which jax {jax.__version__} "
                           f"cannot import here: {exc}") from exc


def pallas_interpret(platform: str) -> bool:
    """Whether the ``pallas`` kernels run in Pallas's interpreter on ``platform`` (CPU) rather than
    through Triton (GPUs)."""
    return platform not in GPU_PLATFORMS
