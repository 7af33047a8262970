"""Stacked expert projections for the MLX backend: float, or MLX affine int8 with a trainable gather.

qmoe stores a projection as ``[E, in, out]`` (``w13 [E, H, 2F]``, ``w2 [E, F, H]``). MLX quantizes
groups of consecutive elements along the *last* axis, and the groups must run along the contraction
axis, so quantized projections are kept transposed, ``[E, out, in]``, and multiplied with
``transpose=True`` (``rows @ W_e^T``).

The runtime primitive the MoE8 report was missing lives here: `mx.gather_qmm` refuses a gradient
with respect to its quantized weights (``[GatherQMM::vjp] no gradient wrt the quantized weights``),
so `trainable_gather_qmm` wraps it in `mx.custom_function` with a straight-through VJP. Its weight
cotangent is the gradient of the *dequantized* weight, and it is computed only for the experts passed
in: callers pass the experts that received tokens (`QuantizedExperts.take`), never the full stack,
so no dense float gradient exists for an expert without a token (the report's 31 GB FP32 problem).

This module imports mlx at import time; `qmoe.implementations.mlx_layerwise` imports it lazily.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import mlx.core as mx
import numpy as np

#: MLX affine int8 with groups of 64 along the contraction axis (scheme ``int8_affine_g64``).
AFFINE_BITS = 8
AFFINE_GROUP_SIZE = 64


def qmoe_to_mlx_layout(weight: mx.array) -> mx.array:
    """[E, in, out] -> [E, out, in]: the contraction axis last, where MLX forms its groups."""
    return mx.swapaxes(weight, -1, -2)


def mlx_to_qmoe_layout(weight: mx.array) -> mx.array:
    """[E, out, in] -> [E, in, out]."""
    return mx.swapaxes(weight, -1, -2)


def segments_of_sorted(expert_ids: mx.array, experts: int) -> mx.array:
    """[experts, 2] half-open row ranges [start, end) of each expert in ascending ``expert_ids``.

    end_e = sum_{i <= e} count_i, start_e = end_e - count_e; an expert with no row gets an empty range.
    """
    counts = mx.zeros((experts,), dtype=mx.int32).at[expert_ids].add(1)
    ends = mx.cumsum(counts)
    return mx.stack([ends - counts, ends], axis=-1).astype(mx.uint32)


def per_expert_outer_sum(cotangent: mx.array, rows: mx.array, expert_ids: mx.array, experts: int) -> mx.array:
    """dW_e = sum_{r: id_r = e} cot_r^T rows_r, shape [experts, out, in], for ascending ``expert_ids``.

    One `mx.segmented_mm` over the row axis: no [rows, out, in] intermediate. Accumulates in float32
    whatever the compute dtype (a bfloat16 sum over thousands of rows would lose the small ones).
    """
    cot = cotangent.reshape(-1, cotangent.shape[-1]).astype(mx.float32)
    lhs = rows.reshape(-1, rows.shape[-1]).astype(mx.float32)
    return mx.segmented_mm(cot.T, lhs, segments_of_sorted(expert_ids, experts))


def widened_gather_qmm(rows: mx.array, codes: mx.array, scales: mx.array, biases: mx.array, expert_ids: mx.array,
                       transpose: bool, group_size: int, bits: int) -> mx.array:
    """`mx.gather_qmm` accumulated in float32, the result in ``rows``' dtype.

    mlx's CPU kernel accumulates in the activation dtype: with bfloat16 rows a K = 128 product is
    off by ~2% of its largest entry. With float32 rows it computes exactly sum(rows * (q s + b))
    in float32 (bfloat16 scales and biases widen exactly), which is what `dequantized` reports.
    """
    wide = rows if rows.dtype == mx.float32 else rows.astype(mx.float32)
    out = mx.gather_qmm(wide, codes, scales, biases, rhs_indices=expert_ids, transpose=transpose,
                        group_size=group_size, bits=bits, sorted_indices=True)
    return out if rows.dtype == mx.float32 else out.astype(rows.dtype)


@functools.cache
def trainable_gather_qmm(group_size: int, bits: int) -> Callable[..., mx.array]:
    """``f(rows, codes, scales, biases, expert_ids) = gather_qmm(rows, W, ids, transpose=True)``, trainable.

    rows [N, 1, in], W = dequantize(codes, scales, biases) [U, out, in], ids [N] ascending in [0, U).
    Straight-through VJP for output cotangent g [N, 1, out]:

    * d rows_r = g_r W_{id_r}: `gather_qmm` with ``transpose=False``, still on the int8 codes;
    * d codes = dL/dW (the dequantized weight's gradient, float32 [U, out, in]) by
      `per_expert_outer_sum`. The quantizer is identity in the backward (STE), so this is also the
      gradient of the float master weight. The cotangent has W's float shape, not the packed codes'
      uint32 shape: MLX passes it through as is, and the caller reads it as the weight gradient;
    * d scales, d biases = 0: they are not separate trainable leaves under STE (the SGD step moves
      the dequantized weight, and requantization picks new scales and biases);
    * d ids = 0 (integers).
    """

    @mx.custom_function
    def gathered(rows, codes, scales, biases, expert_ids):
        return widened_gather_qmm(rows, codes, scales, biases, expert_ids, True, group_size, bits)

    @gathered.vjp
    def gathered_vjp(primals, cotangent, output):
        rows, codes, scales, biases, expert_ids = primals
        d_rows = widened_gather_qmm(cotangent, codes, scales, biases, expert_ids, False, group_size, bits)
        d_weight = per_expert_outer_sum(cotangent, rows, expert_ids, codes.shape[0])
        return d_rows.astype(rows.dtype), d_weight, mx.zeros_like(scales), mx.zeros_like(biases), \
            mx.zeros_like(expert_ids)

    return gathered


class Experts(Protocol):
    """A stack of E expert matrices that multiplies gathered rows; float or quantized."""

    @property
    def experts(self) -> int: ...

    def arrays(self) -> list[mx.array]:
        """Every array it holds (for `mx.eval`, which does not look inside dataclasses)."""

    def leaf(self) -> mx.array:
        """The array a gradient is taken with respect to."""

    def with_leaf(self, leaf: mx.array) -> Experts: ...

    def take(self, experts: mx.array) -> Experts:
        """The sub-stack of the given expert indices (in that order)."""

    def matmul(self, rows: mx.array, expert_ids: mx.array, trainable: bool) -> mx.array:
        """rows [N, 1, in] times expert ``expert_ids[r]`` -> [N, 1, out]; ids ascending."""

    def dequantized(self) -> mx.array:
        """The float weights computed with, qmoe layout [E, in, out]."""

    def leaf_grad_to_qmoe(self, grad: mx.array) -> mx.array:
        """The leaf's cotangent as the gradient of `dequantized()`, qmoe layout."""

    def sgd_step(self, used: np.ndarray, grad_qmoe: mx.array, lr: float) -> Experts:
        """New stack after W_e <- W_e - lr * grad for each used expert (requantized if quantized)."""


@dataclass(frozen=True)
class FloatExperts:
    """Float expert matrices in qmoe layout [E, in, out]; `mx.gather_mm` and its own VJP."""

    weight: mx.array

    @property
    def experts(self) -> int:
        return self.weight.shape[0]

    def arrays(self) -> list[mx.array]:
        return [self.weight]

    def leaf(self) -> mx.array:
        return self.weight

    def with_leaf(self, leaf: mx.array) -> FloatExperts:
        return FloatExperts(leaf)

    def take(self, experts: mx.array) -> FloatExperts:
        return FloatExperts(self.weight[experts])

    def matmul(self, rows: mx.array, expert_ids: mx.array, trainable: bool) -> mx.array:
        if rows.dtype == mx.float32 and self.weight.dtype == mx.float32:
            return mx.gather_mm(rows, self.weight, rhs_indices=expert_ids, sorted_indices=True)
        # mlx's CPU GatherMM is float32-only ("[GatherMM::eval] Currently only supports float32"):
        # bfloat16 operands are widened (exactly), accumulated in float32 and the result rounded
        # back, which is what a bfloat16 GEMM with float32 accumulation computes.
        product = mx.gather_mm(rows.astype(mx.float32), self.weight.astype(mx.float32), rhs_indices=expert_ids,
                               sorted_indices=True)
        return product.astype(rows.dtype)

    def dequantized(self) -> mx.array:
        return self.weight

    def leaf_grad_to_qmoe(self, grad: mx.array) -> mx.array:
        return grad

    def sgd_step(self, used: np.ndarray, grad_qmoe: mx.array, lr: float) -> FloatExperts:
        if used.size == 0:
            return self
        index = mx.array(used)
        stepped = self.weight[index] - (lr * grad_qmoe).astype(self.weight.dtype)
        weight = mx.array(self.weight)
        weight[index] = stepped
        return FloatExperts(weight)


@dataclass(frozen=True)
class QuantizedExperts:
    """MLX affine-quantized expert matrices, MLX layout [E, out, in] (contraction axis last).

    ``codes`` uint32 [E, out, in * bits / 32] (packed), ``scales`` and ``biases`` [E, out, in / group];
    W = codes * scales + biases per group of ``group_size`` consecutive input elements.
    """

    codes: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int = AFFINE_GROUP_SIZE
    bits: int = AFFINE_BITS

    @classmethod
    def from_qmoe(cls, weight: mx.array, group_size: int = AFFINE_GROUP_SIZE,
                  bits: int = AFFINE_BITS) -> QuantizedExperts:
        """Quantize a qmoe-layout [E, in, out] stack with `mx.quantize` on its [E, out, in] transpose."""
        codes, scales, biases = mx.quantize(qmoe_to_mlx_layout(weight), group_size=group_size, bits=bits)
        return cls(codes, scales, biases, group_size, bits)

    @property
    def experts(self) -> int:
        return self.codes.shape[0]

    def arrays(self) -> list[mx.array]:
        return [self.codes, self.scales, self.biases]

    def leaf(self) -> mx.array:
        return self.codes

    def with_leaf(self, leaf: mx.array) -> QuantizedExperts:
        return replace(self, codes=leaf)

    def take(self, experts: mx.array) -> QuantizedExperts:
        return replace(self, codes=self.codes[experts], scales=self.scales[experts], biases=self.biases[experts])

    def matmul(self, rows: mx.array, expert_ids: mx.array, trainable: bool) -> mx.array:
        if trainable:
            op = trainable_gather_qmm(self.group_size, self.bits)
            return op(rows, self.codes, self.scales, self.biases, expert_ids)
        return widened_gather_qmm(rows, self.codes, self.scales, self.biases, expert_ids, True, self.group_size,
                                  self.bits)

    def dequantized_mlx_layout(self) -> mx.array:
        """codes * scales + biases in float32 (what `widened_gather_qmm` multiplies with), [E, out, in]."""
        return mx.dequantize(self.codes, self.scales.astype(mx.float32), self.biases.astype(mx.float32),
                             group_size=self.group_size, bits=self.bits)

    def dequantized(self) -> mx.array:
        return mlx_to_qmoe_layout(self.dequantized_mlx_layout())

    def leaf_grad_to_qmoe(self, grad: mx.array) -> mx.array:
        return mlx_to_qmoe_layout(grad)

    def sgd_step(self, used: np.ndarray, grad_qmoe: mx.array, lr: float) -> QuantizedExperts:
        """Re-quantizing SGD, one expert projection at a time: W_e <- Q(deQ(W_e) - lr * grad_e).

        Only experts that received tokens are touched: their codes are rewritten, the others keep
        theirs bit for bit (requantizing an untouched expert is not idempotent under MLX's grid, so
        doing it would move weights that have no gradient). Each projection is evaluated before the
        next one starts, so at most one expert's float copy is alive at a time (the report's
        streaming update primitive); the new int8 projections are written back in one scatter.
        """
        if used.size == 0:
            return self
        grad_mlx = qmoe_to_mlx_layout(grad_qmoe)
        new_parts: list[tuple[mx.array, mx.array, mx.array]] = []
        for position, expert in enumerate(used.tolist()):
            weight = mx.dequantize(self.codes[expert], self.scales[expert].astype(mx.float32),
                                   self.biases[expert].astype(mx.float32), group_size=self.group_size, bits=self.bits)
            # Requantize in the stack's own precision (float32 scales; see `make_experts`).
            stepped = (weight - lr * grad_mlx[position]).astype(self.scales.dtype)
            parts = mx.quantize(stepped, group_size=self.group_size, bits=self.bits)
            mx.eval(parts)
            new_parts.append(parts)
        index = mx.array(used.astype(np.int32))
        updated = []
        for stored, new in zip((self.codes, self.scales, self.biases), zip(*new_parts)):
            array = mx.array(stored)
            array[index] = mx.stack(new)
            updated.append(array)
        mx.eval(updated)
        return replace(self, codes=updated[0], scales=updated[1], biases=updated[2])


def make_experts(weight_qmoe: mx.array, quantized: bool, group_size: int = AFFINE_GROUP_SIZE) -> Experts:
    """Float or MLX-affine-int8 expert stack from a qmoe-layout [E, in, out] array.

    Quantized stacks always get float32 scales and biases, whatever the compute dtype: quantizing a
    bfloat16 array directly rounds its scales and biases to bfloat16, which moves a group's far end
    by up to ~1.5 quantization steps (measured on the wide_g64 case), so the result is no longer a
    valid round-to-nearest grid. The codes stay int8; the metadata costs 8 bytes per 64 weights.
    """
    if quantized:
        return QuantizedExperts.from_qmoe(weight_qmoe.astype(mx.float32), group_size=group_size)
    return FloatExperts(weight_qmoe)
