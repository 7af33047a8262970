"""The quantization schemes of DESIGN.md, as data: one `Scheme` per name, nothing else decides.

Every rule a scheme implies (which tensors are quantized, along which axes, how the backward
treats the quantizer) is read from this table by the reference and by the suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightQuant = Literal["float", "per_output_channel", "per_expert", "affine_group", "qat_row"]
ActivationQuant = Literal["float", "per_token"]
BackwardRule = Literal["exact", "ste", "prequant_vjp"]


class UnknownSchemeError(ValueError):
    """A scheme name that is not in `SCHEMES`."""


@dataclass(frozen=True)
class Scheme:
    """How one scheme quantizes the routed experts and the shared (dense) expert.

    ``routed_weights`` / ``shared_weights``: the weight quantizer of each projection family.
    ``routed_activations`` / ``shared_activations``: the activation quantizer feeding it.
    ``backward``: ``exact`` (float graph), ``ste`` (straight-through: the float graph at the
    dequantized values, quantizers as identity), ``prequant_vjp`` (the JAX logbook's custom VJP:
    input gradient through the int8 weights with a per-token-quantized output gradient, weight
    gradient from the float activations).
    """

    name: str
    routed_weights: WeightQuant
    routed_activations: ActivationQuant
    shared_weights: WeightQuant
    shared_activations: ActivationQuant
    backward: BackwardRule
    codes_fixed: bool
    description: str
    group_size: int = 64
    qat_scale_floor: float = 1.0 / 127.0
    qat_keep_float_max_numel: int = 65_536
    qat_clip_quantile: float | None = None

    @property
    def quantized(self) -> bool:
        return self.backward != "exact"

    def weight_quant(self, param: str) -> WeightQuant:
        """The weight quantizer applied to parameter ``param`` (router: always float)."""
        if param in ("w13", "w2"):
            return self.routed_weights
        if param in ("shared_w13", "shared_w2"):
            return self.shared_weights
        return "float"


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("none", "float", "float", "float", "float", "exact", False, "no quantization"),
        Scheme("int8_dense", "float", "float", "per_output_channel", "per_token", "ste", True,
               "shared/dense projections int8: per-token activations, per-output-channel weights"),
        Scheme("int8_routed", "per_expert", "per_token", "float", "float", "ste", True,
               "routed experts int8, weights quantized each call with one scale per expert matrix"),
        Scheme("int8_all", "per_expert", "per_token", "per_output_channel", "per_token", "ste", True,
               "int8_dense and int8_routed together"),
        Scheme("int8_routed_prequant", "per_expert", "per_token", "float", "float", "prequant_vjp", True,
               "as int8_routed, expert weights quantized once at prepare; custom VJP"),
        Scheme("int8_affine_g64", "affine_group", "float", "float", "float", "ste", False,
               "expert weights only, MLX affine 8-bit, groups of 64 along the contraction axis"),
        Scheme("qat_int8_row", "qat_row", "float", "qat_row", "float", "ste", True,
               "fake quant per row (output channel), scale floor 1/127, tensors <= 65,536 elements stay float"),
    )
}


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``; UnknownSchemeError lists the known names otherwise."""
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise UnknownSchemeError(f"unknown scheme {name!r}; known schemes: {', '.join(SCHEMES)}") from None
