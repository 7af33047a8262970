"""Quantizers of every scheme, in float64, with the exact rules of DESIGN.md.

Each quantizer returns the *dequantized* values (what a backend computes with) and, where the
scheme fixes them, the integer codes and scales. ``np.rint`` rounds half to even, as int8 kernels do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schemes import Scheme

INT8_MAX = 127


@dataclass(frozen=True)
class Quantized:
    """Integer codes with the scale (and, for affine, the bias) that dequantize them.

    ``scale``/``bias`` broadcast against ``codes``; ``dequantize()`` = codes * scale + bias.
    """

    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        values = self.codes.astype(np.float64) * self.scale
        return values if self.bias is None else values + self.bias


def quantize_symmetric_int8(values: np.ndarray, axis: int | tuple[int, ...]) -> Quantized:
    """scale = amax / 127 over ``axis`` (1 where amax = 0); q = clip(rint(v / scale), -127, 127).

    An all-zero slice gets scale 1 so that it quantizes to zeros, never to NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    amax = np.max(np.abs(v), axis=axis, keepdims=True) if v.size else np.zeros_like(v)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0)
    codes = np.clip(np.rint(v / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return Quantized(codes, scale)


def quantize_per_token(x: np.ndarray) -> Quantized:
    """Activations [rows, features]: one scale per row (token)."""
    return quantize_symmetric_int8(x, axis=-1)


def quantize_per_output_channel(w: np.ndarray) -> Quantized:
    """Dense weight [in, out]: one scale per output column."""
    return quantize_symmetric_int8(w, axis=-2)


def quantize_per_expert(w: np.ndarray) -> Quantized:
    """Stacked expert weights [E, in, out]: one scale per expert matrix."""
    return quantize_symmetric_int8(w, axis=(-2, -1))


def quantize_affine_groups(w: np.ndarray, group_size: int = 64, bits: int = 8) -> Quantized:
    """Affine quantization in groups of ``group_size`` along the contraction (input) axis.

    For w [..., in, out], each run of ``group_size`` consecutive input rows of one output column
    shares scale = (max - min) / (2^bits - 1) and bias = min; q = rint((w - bias) / scale).
    This is the shape of MLX's ``mx.quantize`` on the transposed [out, in] matrix; backends may
    pick a different but valid grid (conformance level 2 checks validity, not equality).
    """
    w = np.asarray(w, dtype=np.float64)
    n_in = w.shape[-2]
    if n_in % group_size:
        raise ValueError(f"affine groups of {group_size} need the input axis ({n_in}) to be a multiple of it")
    grouped = w.reshape(*w.shape[:-2], n_in // group_size, group_size, w.shape[-1])
    low = grouped.min(axis=-2, keepdims=True)
    high = grouped.max(axis=-2, keepdims=True)
    levels = 2**bits - 1
    scale = np.where(high > low, (high - low) / levels, 1.0)
    codes = np.clip(np.rint((grouped - low) / scale), 0, levels).astype(np.int32)

    def per_element(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, grouped.shape).reshape(w.shape)

    return Quantized(codes.reshape(w.shape), per_element(scale), per_element(low))


def quantize_qat_rows(w: np.ndarray, scheme: Scheme) -> Quantized | None:
    """The QAT exporter's per-row int8 rule, or None where the tensor stays float.

    A "row" is one output channel (a row of the [out, in] matrix a torch/MLX Linear stores), so the
    reduction runs over the input axis (-2 in qmoe's [.., in, out] layout). Tensors with at most
    ``qat_keep_float_max_numel`` elements stay float at export, so QAT must not fake-quantize them
    (review finding 3). Optional clip at a quantile of |w| per row (the same rule in training and
    export, review finding 4); scale = max(clip_abs / 127, floor).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.size <= scheme.qat_keep_float_max_numel:
        return None
    magnitude = np.abs(w)
    if scheme.qat_clip_quantile is None:
        clip_abs = magnitude.max(axis=-2, keepdims=True)
    else:
        clip_abs = np.quantile(magnitude, scheme.qat_clip_quantile, axis=-2, keepdims=True)
    clipped = np.clip(w, -clip_abs, clip_abs)
    scale = np.maximum(clip_abs / INT8_MAX, scheme.qat_scale_floor)
    codes = np.clip(np.rint(clipped / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return Quantized(codes, scale)


def quantize_weight(w: np.ndarray, rule: str, scheme: Scheme) -> Quantized | None:
    """Quantize a weight by the rule named in the scheme table; None means it stays float."""
    if rule == "float":
        return None
    if rule == "per_output_channel":
        return quantize_per_output_channel(w)
    if rule == "per_expert":
        return quantize_per_expert(w)
    if rule == "affine_group":
        return quantize_affine_groups(w, scheme.group_size)
    if rule == "qat_row":
        return quantize_qat_rows(w, scheme)
    raise ValueError(f"unknown weight quantization rule {rule!r}")


def dequantized_weight(w: np.ndarray, rule: str, scheme: Scheme) -> np.ndarray:
    """The float values a scheme computes with for weight ``w`` (``w`` itself where it stays float)."""
    quantized = quantize_weight(w, rule, scheme)
    return np.asarray(w, dtype=np.float64) if quantized is None else quantized.dequantize()


def fake_quant_activations(x: np.ndarray, rule: str) -> np.ndarray:
    """Dequantized activations for rule ``per_token``; ``x`` unchanged for ``float``."""
    if rule == "float":
        return np.asarray(x, dtype=np.float64)
    if rule == "per_token":
        return quantize_per_token(x).dequantize()
    raise ValueError(f"unknown activation quantization rule {rule!r}")


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - actual|^2) in dB (inf if equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(actual, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
