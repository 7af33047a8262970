"""qmoe's independent float reference: NumPy float64, no backend framework.

Public names: `MoESpec`, `MoEParams`, `forward`, `backward`, `ForwardResult`, the scheme table
`SCHEMES`, the quantizers and the update rules.
"""

from .flips import FlipEnvelope, flip_envelope, possible_code_change
from .layer import ForwardResult, backward, effective_params, expert_outputs, forward, router_path
from .quantization import (
    Quantized,
    quantize_affine_groups,
    quantize_per_expert,
    quantize_per_output_channel,
    quantize_per_token,
    quantize_qat_rows,
    quantize_symmetric_int8,
    sqnr_db,
)
from .routing import route
from .schemes import SCHEMES, Scheme, UnknownSchemeError, get_scheme
from .spec import PARAM_NAMES, MoEParams, MoESpec, SpecError, validate_input
from .updates import (
    block_coordinate_descent,
    master_float_step,
    requantize_step,
    sgd_step_master_float,
    sgd_step_requantize,
    stack_backward,
    stack_forward,
    stack_loss,
)

__all__ = [
    "FlipEnvelope", "ForwardResult", "MoEParams", "MoESpec", "PARAM_NAMES", "Quantized", "SCHEMES", "Scheme",
    "SpecError", "UnknownSchemeError", "backward", "router_path", "effective_params", "expert_outputs",
    "flip_envelope", "forward", "get_scheme",
    "possible_code_change",
    "quantize_affine_groups", "quantize_per_expert", "quantize_per_output_channel", "quantize_per_token",
    "quantize_qat_rows", "quantize_symmetric_int8", "route", "sqnr_db", "validate_input",
    # update rules and the residual stack (reference/updates.py)
    "block_coordinate_descent", "master_float_step", "requantize_step", "sgd_step_master_float",
    "sgd_step_requantize", "stack_backward", "stack_forward", "stack_loss",
]
