"""Named metrics: FLOPs, bytes moved, TF/s, tokens/s, GB/s and device peaks.

FLOPs follow the JAX logbook exactly (seeds/jax-moe-ep-int8-logbook.txt): the SwiGLU expert's two
projections, x W13 ([T k, H] x [H, 2F]) and h W2 ([T k, F] x [F, H]), count 2 * (2 H F + F H) = 6 H F
per routed row, the shared expert 6 H S per token, the router and element-wise work nothing:

    forward           = 6 T H (k F + S)
    forward+backward  = 3 x forward      (the backward is two matmuls per forward matmul)

Check against the logbook: MOE-I8-007 reports 238.640 TF/s at 0.027644 s for T 32768, H 2048,
F 2048, k 8, S 0 (forward), and 264.767 TF/s at 0.033482 s with S 5632: 6.597e12 and 8.865e12 FLOPs,
which is this formula (tests/test_benchmarks.py holds it to those numbers).

Bytes are the compulsory traffic, a lower bound: every weight (with its scales) read once per
use, activations in and out once; a kernel that re-reads or spills moves more. How a scheme stores
its weights decides their bytes (`WEIGHT_STORAGE`): float weights at the compute dtype's width; int8
quantized once (prequant, MLX affine) at one byte plus scales; int8 quantized on every call reads the
float weights, writes and reads the int8 copy (the logbook's MOE-I8-017 diagnosis: ~2x the traffic of
stored int8); QAT fake quantization reads, writes and reads float.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmoe.reference.schemes import SCHEMES, get_scheme
from qmoe.reference.spec import MoESpec

PASSES = ("forward", "forward_backward")
#: Bytes per element of a compute dtype.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SCALE_BYTES = 4  # float32 scales everywhere in qmoe

#: How each scheme holds (routed, shared) weights at run time; every scheme must have an entry.
#: "float": the compute dtype; "int8_stored": int8 codes + scales made at prepare; "int8_per_call":
#: quantized from float on every call; "fake_quant_per_call": QAT fake quant (float out).
WEIGHT_STORAGE: dict[str, tuple[str, str]] = {
    "none": ("float", "float"),
    "int8_dense": ("float", "int8_per_call"),
    "int8_routed": ("int8_per_call", "float"),
    "int8_all": ("int8_per_call", "int8_per_call"),
    "int8_routed_prequant": ("int8_stored", "float"),
    "int8_affine_g64": ("int8_stored", "float"),
    "qat_int8_row": ("fake_quant_per_call", "fake_quant_per_call"),
}


def forward_flops(spec: MoESpec, tokens: int) -> int:
    """6 T H (k F + S): routed SwiGLU projections plus the shared expert (router excluded)."""
    return 6 * tokens * spec.hidden * (spec.top_k * spec.ffn + spec.shared_ffn)


def flops(spec: MoESpec, tokens: int, pass_: str) -> int:
    """FLOPs of one call: forward, or forward+backward (3x forward, the logbook's count)."""
    _check_pass(pass_)
    return forward_flops(spec, tokens) * (1 if pass_ == "forward" else 3)


def _weight_bytes(elements: int, rows: int, storage: str, scales: int, dtype_bytes: int) -> int:
    """Bytes to bring ``elements`` weights into one use under ``storage`` (``rows``: scale rows for QAT)."""
    if storage == "float":
        return elements * dtype_bytes
    if storage == "int8_stored":
        return elements + scales * SCALE_BYTES
    if storage == "int8_per_call":
        return elements * dtype_bytes + 2 * elements + scales * SCALE_BYTES  # read float, write + read int8
    if storage == "fake_quant_per_call":
        return 3 * elements * dtype_bytes + rows * SCALE_BYTES
    raise ValueError(f"unknown weight storage {storage!r}")


def _routed_scales(scheme_name: str, spec: MoESpec) -> int:
    scheme = get_scheme(scheme_name)
    e, h, f = spec.experts, spec.hidden, spec.ffn
    if scheme.routed_weights == "per_expert":
        return 2 * e
    if scheme.routed_weights == "affine_group":
        return 2 * (e * h * 2 * f + e * f * h) // scheme.group_size  # a scale and a bias per group
    if scheme.routed_weights == "qat_row":
        return e * (2 * f + h)
    return 0


@dataclass(frozen=True)
class Traffic:
    """Compulsory bytes of one call, split so a report can say what dominates."""

    weights: int
    activations: int
    gradients: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.gradients


def bytes_moved(spec: MoESpec, tokens: int, scheme: str, dtype: str, pass_: str) -> Traffic:
    """Lower-bound bytes of one call (see the module docstring for the model).

    Forward: all routed and shared weights once (experts with no rows are rare at benchmark shapes
    and counted anyway), x read, y written, the router read. Forward+backward adds the weights read
    again (dx = g W^T), dy read, dx written and every weight gradient written at the compute width.
    """
    _check_pass(pass_)
    if scheme not in WEIGHT_STORAGE:
        raise KeyError(f"scheme {scheme!r} has no entry in suite.benchmarks.metrics.WEIGHT_STORAGE")
    width = DTYPE_BYTES[dtype]
    routed_storage, shared_storage = WEIGHT_STORAGE[scheme]
    e, h, f, s = spec.experts, spec.hidden, spec.ffn, spec.shared_ffn
    routed = e * 3 * h * f
    shared = 3 * h * s
    weights = _weight_bytes(routed, e * (2 * f + h), routed_storage, _routed_scales(scheme, spec), width)
    if s:
        shared_scales = (2 * s + h) if shared_storage != "float" else 0
        weights += _weight_bytes(shared, 2 * s + h, shared_storage, shared_scales, width)
    weights += h * e * 4  # float32 router
    activations = 2 * tokens * h * width
    gradients = 0
    if pass_ == "forward_backward":
        weights *= 2
        activations *= 2
        gradients = (routed + shared) * width + h * e * 4
    return Traffic(weights, activations, gradients)


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; passes: {', '.join(PASSES)}")


def tflops(flop_count: int, seconds: float) -> float:
    """TF/s (10^12 FLOP per second)."""
    return flop_count / seconds / 1e12


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds


def gb_per_s(byte_count: int, seconds: float) -> float:
    """GB/s (10^9 bytes per second)."""
    return byte_count / seconds / 1e9


# -- device peaks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePeak:
    """Dense (no sparsity) tensor-core peaks in TF/s by operand type, and memory bandwidth in GB/s."""

    match: str
    tflops: dict[str, float]
    gb_per_s: float
    source: str


#: Matched by substring of the device name, first match wins (H100 PCIe before the SXM catch-all).
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "int8": 1513.0, "float32": 51.0}, 2000.0,
               "https://www.nvidia.com/en-us/data-center/h100/ (H100 PCIe datasheet column, dense)"),
    DevicePeak("H100", {"bfloat16": 989.4, "float16": 989.4, "int8": 1978.9, "float32": 66.9}, 3350.0,
               "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM datasheet column, dense)"),
    DevicePeak("H200", {"bfloat16": 989.4, "float16": 989.4, "int8": 1978.9, "float32": 66.9}, 4800.0,
               "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM datasheet column, dense)"),
)


def device_peak(device_name: str) -> DevicePeak | None:
    for peak in DEVICE_PEAKS:
        if peak.match in device_name:
            return peak
    return None


def peak_operand(scheme: str, dtype: str) -> str:
    """The tensor-core operand type bounding a scheme: int8 where the routed experts run int8 x int8."""
    routed_storage, _ = WEIGHT_STORAGE[scheme]
    scheme_ = SCHEMES[scheme]
    if routed_storage in ("int8_stored", "int8_per_call") and scheme_.routed_activations == "per_token":
        return "int8"
    return dtype


def percent_of_peak(tflops_value: float, device_name: str, scheme: str, dtype: str) -> float | None:
    """TF/s as a percentage of the device's dense peak for the scheme's operand type; None if unknown."""
    peak = device_peak(device_name)
    if peak is None:
        return None
    value = peak.tflops.get(peak_operand(scheme, dtype))
    return None if value is None else 100.0 * tflops_value / value
