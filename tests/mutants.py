"""Backends with one planted bug each: the conformance suite must fail every one of them.

Each mutant subclasses `TorchEagerBackend` and overrides one small method, so the bug is the only
difference. ``MUTANTS`` maps a mutant's name to its class and the conformance check that should
catch it; a suite that passes a mutant has a hole (tolerances too generous, a case missing).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from implementations.torch_eager import Int8Tensor, TorchEagerBackend, TorchEagerState, TorchRouting
from reference.layer import ForwardResult
from reference.schemes import Scheme
from reference.spec import MoESpec


class MutantSwappedGateUp(TorchEagerBackend):
    """Bug: silu is applied to the up half, h = gate * silu(up) (gate/up order of w13 swapped)."""

    name = "mutant_swapped_gate_up"

    def _swiglu(self, a):
        import torch

        gate, up = a.chunk(2, dim=-1)
        return gate * torch.nn.functional.silu(up)


class MutantLostTokenScale(TorchEagerBackend):
    """Bug: activations quantized with one scale for the whole tensor instead of one per token."""

    name = "mutant_lost_token_scale"

    def _quantize_per_token(self, values) -> Int8Tensor:
        whole = self._quantize_symmetric(values, tuple(range(values.dim())))
        return Int8Tensor(whole.codes, whole.scale.expand(*values.shape[:-1], 1))


class MutantOffByOneExpert(TorchEagerBackend):
    """Bug: a token routed to expert e is computed by expert (e + 1) mod E (reported ids are right)."""

    name = "mutant_off_by_one_expert"

    def _expert_rows(self, spec: MoESpec, routing: TorchRouting, e: int):
        import torch

        return torch.nonzero(((routing.ids + 1) % spec.experts == e) & routing.kept, as_tuple=True)


class MutantNoRenormalize(TorchEagerBackend):
    """Bug: the selected gate weights are never renormalized, whatever ``spec.renormalize`` says."""

    name = "mutant_no_renormalize"

    def _gate_weights(self, spec: MoESpec, logits, scores, ids):
        gates = scores.gather(-1, ids)
        return gates * spec.routed_scaling if spec.router == "sigmoid_topk" else gates


class MutantGradIgnoresGate(TorchEagerBackend):
    """Bug: the output is g * expert(x), but its gradient into the expert is taken as if g = 1
    (expert weight and input gradients not scaled by the gate weight)."""

    name = "mutant_grad_ignores_gate"

    def _weight_by_gate(self, gates, out):
        return gates[:, None] * out.detach() + (out - out.detach())


class MutantFakeQuantAtEval(TorchEagerBackend):
    """Bug: fake quant left on outside its scheme: even scheme ``none`` quantizes the routed expert
    weights per expert (the QAT review's eval path that still ran through the quantizer)."""

    name = "mutant_fake_quant_at_eval"

    def _routed_weight_rule(self, scheme: Scheme) -> str:
        return "per_expert"


class MutantZeroTokenExpertNaN(TorchEagerBackend):
    """Bug: an expert that received no token gets a gradient buffer that is never written, as from
    ``torch.empty`` (NaN here) instead of exact zeros (the nanochat devlog's empty-expert case)."""

    name = "mutant_zero_token_expert_nan"

    def _grad_or_zeros(self, grad, like):
        import torch

        return torch.full_like(like, float("nan")) if grad is None else grad


class MutantZeroOutput(TorchEagerBackend):
    """Bug: the forward returns an all-zero output (routing and gradients are right)."""

    name = "mutant_zero_output"

    def forward(self, prepared: TorchEagerState, x: np.ndarray) -> ForwardResult:
        result = super().forward(prepared, x)
        return dataclasses.replace(result, y=np.zeros_like(result.y))


class MutantPerTensorWeightScale(TorchEagerBackend):
    """Bug: routed expert weights quantized with one scale over all experts instead of one per expert."""

    name = "mutant_per_tensor_weight_scale"

    def _quantize_expert_weights(self, weights: list) -> list:
        import torch

        amax = torch.stack([w.detach().abs().amax() for w in weights]).amax().reshape(1, 1)
        scale = self._int8_scale(amax)
        return [self._quantize_with_scale(w.detach().float(), scale) for w in weights]


#: name -> (mutant class, the conformance test expected to catch it, as a fragment of its pytest node id).
MUTANTS: dict[str, tuple[type[TorchEagerBackend], str]] = {
    cls.name: (cls, catcher)
    for cls, catcher in (
        (MutantSwappedGateUp, "test_level3_forward.py::test_forward["),
        (MutantLostTokenScale, "test_level3_forward.py::test_forward["),      # int8 schemes; outlier rows
        (MutantOffByOneExpert, "test_level3_forward.py::test_forward["),      # reported ids are right
        (MutantNoRenormalize, "test_level3_forward.py::test_forward["),       # gate weights, renormalize=True
        (MutantGradIgnoresGate, "test_level4_backward.py::test_backward["),   # forward is exact
        (MutantFakeQuantAtEval, "test_level2_effective_weights.py::test_effective_weights["),  # scheme none
        (MutantZeroTokenExpertNaN, "test_level4_backward.py::test_backward["),  # empty_experts case
        (MutantZeroOutput, "test_level3_forward.py::test_forward["),
        (MutantPerTensorWeightScale, "test_level2_effective_weights.py::test_effective_weights["),  # int8_routed
    )
}


class MutantControl(TorchEagerBackend):
    """No bug: the control that must pass every test the mutants are run through."""

    name = "mutant_control"


#: The unmutated control, run beside the mutants (not one of them).
CONTROL: type[TorchEagerBackend] = MutantControl
