"""Expert-only int8 checkpoints of a stack of MoE layers, as safetensors (the MoE8 report's gate 1).

Only the routed experts' projections are quantized (MLX affine, 8 bits, groups of 64 along the
contraction axis, float32 scales and biases); router, router bias and shared expert stay float. A
checkpoint stores, per layer ``i``::

    layers.{i}.router, layers.{i}.router_bias, layers.{i}.shared_w13, layers.{i}.shared_w2   (float, qmoe layout)
    layers.{i}.w13.codes / .scales / .biases, layers.{i}.w2.codes / .scales / .biases      (MLX layout [E, out, in])

and in the safetensors metadata the format name, the `MoESpec` as JSON, group size and bits.
Loading gives back every tensor bit for bit (`bit_identical` checks it).

This module imports mlx at import time; `qmoe.implementations.mlx_layerwise` does not import it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from qmoe.reference.spec import MoEParams, MoESpec

from .experts import AFFINE_BITS, AFFINE_GROUP_SIZE, QuantizedExperts
from .layer import LayerWeights

CHECKPOINT_FORMAT = "qmoe-mlx-expert-int8-v1"
_FLOAT_PARAMS = ("router", "router_bias", "shared_w13", "shared_w2")
_EXPERT_PARAMS = ("w13", "w2")
_QUANT_PARTS = ("codes", "scales", "biases")


class CheckpointError(ValueError):
    """A file that is not a qmoe expert-int8 checkpoint, or one whose tensors do not fit its spec."""


def quantize_expert_layers(spec: MoESpec, layers: Sequence[MoEParams], dtype: str = "float32") -> list[LayerWeights]:
    """Device layers with only the routed experts quantized (scheme ``int8_affine_g64``)."""
    from . import layer_weights_on_device

    return [layer_weights_on_device(spec, layer, "int8_affine_g64", dtype) for layer in layers]


def checkpoint_tensors(layers: Sequence[LayerWeights]) -> dict[str, mx.array]:
    """The flat name -> array map a checkpoint stores."""
    tensors: dict[str, mx.array] = {}
    for index, weights in enumerate(layers):
        for name in _FLOAT_PARAMS:
            value = getattr(weights, name)
            if value is not None:
                tensors[f"layers.{index}.{name}"] = value
        for name in _EXPERT_PARAMS:
            experts = getattr(weights, name)
            if not isinstance(experts, QuantizedExperts):
                raise CheckpointError(f"layer {index} {name} is not quantized: an expert-int8 checkpoint stores "
                                      "int8 experts only (prepare with scheme int8_affine_g64)")
            for part in _QUANT_PARTS:
                tensors[f"layers.{index}.{name}.{part}"] = getattr(experts, part)
    return tensors


def save_expert_int8_checkpoint(path: str | Path, spec: MoESpec, layers: Sequence[LayerWeights]) -> Path:
    """Write ``layers`` to ``path`` (a ``.safetensors`` file) with the spec in the metadata."""
    path = Path(path)
    group_sizes = {getattr(w, n).group_size for w in layers for n in _EXPERT_PARAMS}
    if group_sizes != {AFFINE_GROUP_SIZE}:
        raise CheckpointError(f"expected group size {AFFINE_GROUP_SIZE}, got {sorted(group_sizes)}")
    metadata = {"format": CHECKPOINT_FORMAT, "spec": json.dumps(dataclasses.asdict(spec)),
                "layers": str(len(layers)), "group_size": str(AFFINE_GROUP_SIZE), "bits": str(AFFINE_BITS)}
    mx.save_safetensors(str(path), checkpoint_tensors(layers), metadata=metadata)
    return path


def load_expert_int8_checkpoint(path: str | Path) -> tuple[MoESpec, list[LayerWeights]]:
    """Read a checkpoint written by `save_expert_int8_checkpoint`: (spec, device layers)."""
    tensors, metadata = mx.load(str(path), return_metadata=True)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    spec = MoESpec(**json.loads(metadata["spec"]))
    group_size, bits = int(metadata["group_size"]), int(metadata["bits"])
    layers = []
    for index in range(int(metadata["layers"])):
        def get(name: str, required: bool = True, index: int = index) -> mx.array | None:
            key = f"layers.{index}.{name}"
            if key not in tensors and required:
                raise CheckpointError(f"{path}: tensor {key} is missing")
            return tensors.get(key)

        experts = {name: QuantizedExperts(*(get(f"{name}.{part}") for part in _QUANT_PARTS), group_size=group_size,
                                          bits=bits) for name in _EXPERT_PARAMS}
        layers.append(LayerWeights(router=get("router"), router_bias=get("router_bias", False),
                                   shared_w13=get("shared_w13", False), shared_w2=get("shared_w2", False), **experts))
    return spec, layers


def bit_pattern(array: mx.array) -> np.ndarray:
    """The raw bits of ``array`` as unsigned integers of the same width (so -0.0 != 0.0 and NaNs compare)."""
    unsigned = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[array.itemsize]
    return np.array(mx.view(array, unsigned))


def bit_identical(first: dict[str, mx.array], second: dict[str, mx.array]) -> list[str]:
    """Names whose dtype, shape or bits differ between two tensor maps (missing names included); [] if identical."""
    differ = sorted(set(first) ^ set(second))
    for name in sorted(set(first) & set(second)):
        a, b = first[name], second[name]
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(bit_pattern(a), bit_pattern(b)):
            differ.append(name)
    return differ
