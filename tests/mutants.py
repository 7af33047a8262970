"""Backends with one planted bug each: the conformance suite must fail every one of them.

Each mutant subclasses a real backend (`TorchEagerBackend`; `TorchTritonBackend` for the prequant
custom VJP) and overrides one small method, so the bug is the only difference. Every bug here is one
that a real kernel had, or that once passed the whole suite. ``MUTANTS`` maps a mutant's name to its
class and the conformance test that should catch it; a suite that passes a mutant has a hole
(tolerances too generous, a case missing). ``CONTROLS`` are the unmutated subclasses, run beside them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from qmoe.implementations.base import Backend
from qmoe.implementations.torch_eager import INT8_MAX, Int8Tensor, TorchEagerBackend, TorchEagerState, TorchRouting
from qmoe.implementations.torch_triton import TorchTritonBackend
from qmoe.reference.layer import ForwardResult
from qmoe.reference.schemes import Scheme
from qmoe.reference.spec import MoESpec


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


# -- backward ---------------------------------------------------------------------------------------

class MutantMasterWeightInputGrad(TorchEagerBackend):
    """Bug: the input gradient of an int8 x int8 projection is taken through the float master weight
    (dx = g W^T) instead of the dequantized one the forward used (dx = g (s_w q_w)^T)."""

    name = "mutant_master_weight_input_grad"

    def _matmul(self, x, x_q, w, w_q, dtype):
        if x_q is None or w_q is None:
            return super()._matmul(x, x_q, w, w_q, dtype)
        # The forward value is the int8 product (dW as before); the gradient into x comes from the master.
        return super()._matmul(x.detach(), x_q, w, w_q, dtype) + _input_grad_only(x, w, dtype)


def _input_grad_only(x, w, dtype):
    """Zero in the forward; d/dx = g w^T in the backward (w gets no gradient from this term)."""
    master = x.to(dtype) @ w.detach().to(dtype)
    return master - master.detach()


class MutantBf16WeightGradAccumulation(TorchEagerBackend):
    """Bug: every projection's weight gradient dW = X^T g is accumulated in bfloat16 (inputs and the
    running sum rounded to 8 bits of mantissa) although the backend declares float32."""

    name = "mutant_bf16_weight_grad_accumulation"

    def _matmul(self, x, x_q, w, w_q, dtype):
        y = super()._matmul(x, x_q, w.detach(), w_q, dtype)  # the forward and dx exactly as before
        if not w.requires_grad:
            return y
        x_used = x if x_q is None else x_q.dequantize()
        return y + _bf16_weight_grad().apply(x_used.detach(), w).to(y.dtype)


@functools.cache
def _bf16_weight_grad() -> Any:
    import torch

    class Bf16WeightGrad(torch.autograd.Function):
        """Forward: zeros [T, out]. Backward: dW = X^T g with bfloat16 operands and accumulator."""

        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x)
            return x.new_zeros((x.shape[0], w.shape[-1]), dtype=torch.float32)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            xb, gb = x.to(torch.bfloat16), g.to(torch.bfloat16)
            acc = torch.zeros((x.shape[1], g.shape[1]), dtype=torch.bfloat16, device=x.device)
            for t in range(x.shape[0]):  # a bfloat16 accumulator: each partial sum is rounded
                acc = acc + xb[t, :, None] * gb[t, None, :]
            return None, acc.float()

    return Bf16WeightGrad


class MutantPrequantWeightGradFromQuantizedHidden(TorchTritonBackend):
    """Bug (prequant custom VJP): the float surrogate d_w2 = h^T g is taken from the int8 hidden the
    forward fed to w2, Q(h)^T g, instead of the float hidden h (the logbook's MOE-I8-024 says float rows)."""

    name = "mutant_triton_prequant_dw2_from_quantized_hidden"

    def _run(self, prepared, weights, x, fake_quant):
        from qmoe.implementations.torch_triton import layer

        if prepared.scheme.backward != "prequant_vjp":
            return super()._run(prepared, weights, x, fake_quant)
        # `_triton_layer.layer_forward` with the routed experts' autograd Function swapped.
        spec = prepared.spec
        used = layer.training_weights(weights, prepared.scheme, fake_quant)
        routing = layer.route(spec, used.router, used.router_bias, x)
        plan = layer.plan_dispatch(routing.expert_ids, routing.kept, spec.experts)
        rows = _prequant_dw2_from_q_h().apply(x, used.w13, used.w2, plan, "prequant_vjp", prepared.int8_experts)
        y = layer.combine(rows, plan, routing)
        if used.shared_w13 is not None:
            y = y + layer.shared_expert(x, used.shared_w13, used.shared_w2)
        return layer.LayerOutput(y, routing)


@functools.cache
def _prequant_dw2_from_q_h() -> Any:
    from qmoe.implementations.torch_triton import layer

    class RoutedInt8ExpertsDw2FromQh(layer._RoutedInt8Experts):
        """`_RoutedInt8Experts` with its prequant backward copied, d_w2 alone changed."""

        @staticmethod
        def backward(ctx, g):
            saved = ctx.saved  # layer._Int8Saved
            plan, experts, x = saved.plan, saved.experts, saved.x
            g = plan.mask_rows(g.contiguous())
            a, h = saved.take("stash")
            dtype = x.dtype
            h_codes, h_scale = layer.quantize_rows(h)                               # the bug:
            d_w2 = layer.grouped_weight_grad((h_codes.float() * h_scale[:, None]).to(dtype), g, plan)  # Q(h)^T g
            g_codes, g_scale = layer.quantize_rows(g)
            d_h = layer.grouped_gemm(g_codes, experts.w2_bwd, plan.group_starts, out_dtype=dtype, a_scale=g_scale,
                                     b_scale=experts.w2_scale, zero_uncovered=plan.has_drops)
            d_a, d_a_codes, d_a_scale = layer.fused_swiglu_backward(a, d_h, quantize=True)
            d_w13 = layer.grouped_weight_grad(x[plan.row_token], d_a, plan)
            d_x_rows = layer.grouped_gemm(d_a_codes, experts.w13_bwd, plan.group_starts, out_dtype=dtype,
                                          a_scale=d_a_scale, b_scale=experts.w13_scale, zero_uncovered=plan.has_drops)
            return plan.sum_per_token(d_x_rows), d_w13, d_w2, None, None, None

    return RoutedInt8ExpertsDw2FromQh


# -- quantizers -------------------------------------------------------------------------------------

class MutantW2PerColumnScale(TorchEagerBackend):
    """Bug: each expert's w2 is quantized with one scale per output column (the dense rule), a scale
    layout ``int8_routed`` does not have (one scale per expert matrix)."""

    name = "mutant_w2_per_column_scale"

    def _routed_weights(self, state: TorchEagerState) -> tuple[list, list]:
        w13_q, w2_q = super()._routed_weights(state)
        if w2_q[0] is None:
            return w13_q, w2_q
        return w13_q, [self._quantize_symmetric(w, -2) for w in state.w2]


class MutantRoundHalfAwayFromZero(TorchEagerBackend):
    """Bug: int8 rounding half away from zero (C's ``round``, ``floor(|v| + 0.5)``) instead of half to
    even; differs from the reference only at exact .5 ties."""

    name = "mutant_round_half_away_from_zero"

    def _quantize_with_scale(self, v, scale) -> Int8Tensor:
        import torch

        ratio = v / scale
        codes = torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)
        return Int8Tensor(torch.clamp(codes, -INT8_MAX, INT8_MAX), scale)


class MutantFloatRoutedWeights(TorchEagerBackend):
    """Bug: the routed expert weights are never quantized: under ``int8_routed`` the forward computes
    with the float masters and reports them as its effective weights (activations still int8)."""

    name = "mutant_float_routed_weights"

    def _routed_weight_rule(self, scheme: Scheme) -> str:
        return "float"


class MutantFloatActivations(TorchEagerBackend):
    """Bug: activations are never quantized (the per-token quantizer is the identity); the weights are."""

    name = "mutant_float_activations"

    def _quantize_activation(self, values, rule: str):
        return None


class MutantHiddenNotRequantized(TorchEagerBackend):
    """Bug: the SwiGLU hidden goes into w2 in float, not re-quantized per token (int8 x only for w13)."""

    name = "mutant_hidden_not_requantized"

    def _mlp(self, x, x_q, w13, w13_q, w2, w2_q, activations, dtype):
        h = self._swiglu(self._matmul(x, x_q, w13, w13_q, dtype))
        return self._matmul(h, None, w2, w2_q, dtype)


class MutantClip128(TorchEagerBackend):
    """Bug: int8 range confusion: scale = amax / 128 and codes clipped to [-128, 128] (the amax
    element lands on code 128, which int8 cannot hold)."""

    name = "mutant_clip_128"

    def _quantize_symmetric(self, values, dims) -> Int8Tensor:
        import torch

        v = values.detach().float()
        amax = v.abs().amax(dim=dims, keepdim=True)
        scale = torch.where(amax > 0, amax / 128, torch.ones_like(amax))
        return Int8Tensor(torch.clamp(torch.round(v / scale), -128, 128), scale)


class MutantActivationScaleFloor(TorchEagerBackend):
    """Bug: the QAT weight rule's scale floor applied to activations: scale = max(amax / 127, 1 / 127),
    so every token with amax < 1 is quantized on a coarser grid than its own."""

    name = "mutant_activation_scale_floor"

    def _quantize_per_token(self, values) -> Int8Tensor:
        import torch

        v = values.detach().float()
        amax = v.abs().amax(dim=-1, keepdim=True)
        return self._quantize_with_scale(v, torch.clamp(amax / INT8_MAX, min=1.0 / INT8_MAX))


# -- routing ----------------------------------------------------------------------------------------

class MutantTieBreakHigherIndex(TorchEagerBackend):
    """Bug: on equal router scores the higher expert index wins (a descending sort of the reversed
    experts, or an unstable topk); the contract says the lower index wins."""

    name = "mutant_tie_break_higher_index"

    def _top_k(self, selection, k: int):
        import torch

        experts = selection.shape[-1]
        reversed_ = torch.sort(selection.flip(-1), dim=-1, descending=True, stable=True).indices[:, :k]
        return experts - 1 - reversed_


class MutantCapacityKeepsLast(TorchEagerBackend):
    """Bug: under a capacity limit each expert keeps its last C assignments (in token order) instead
    of its first C."""

    name = "mutant_capacity_keeps_last"

    def _capacity_mask(self, spec: MoESpec, ids):
        return super()._capacity_mask(spec, ids.flip(0)).flip(0)


class MutantRouterBiasInGates(TorchEagerBackend):
    """Bug: the sigmoid router's bias goes into the gate weights (w = (s + b) normalized, times the
    scaling) instead of only steering which experts are selected."""

    name = "mutant_router_bias_in_gates"

    def _route(self, state: TorchEagerState, x) -> TorchRouting:
        import torch

        routing = super()._route(state, x)
        if state.router_bias is None:
            return routing
        biased = torch.sigmoid(x.float() @ state.router) + state.router_bias
        gates = biased.gather(-1, routing.ids)
        if state.spec.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return dataclasses.replace(routing, gates=gates * state.spec.routed_scaling)


class MutantSharedInsideGate(TorchEagerBackend):
    """Bug: the shared expert is added to every routed expert's output before the gate weights apply,
    y = sum_k g_k (expert_k + shared), instead of y = sum_k g_k expert_k + shared (the same when the
    kept gates sum to 1: renormalized softmax without drops)."""

    name = "mutant_shared_inside_gate"

    def _layer(self, state: TorchEagerState, x):
        y, routing = super()._layer(state, x)
        if state.shared_w13 is None:
            return y, routing
        scheme = state.scheme
        s13_q, s2_q = self._shared_weights(state)
        shared = self._mlp(x, self._quantize_activation(x, scheme.shared_activations), state.shared_w13, s13_q,
                           state.shared_w2, s2_q, scheme.shared_activations, state.dtype)
        gate_sum = (routing.gates * routing.kept).sum(dim=-1, keepdim=True)
        return (y.float() + (gate_sum - 1) * shared.float()).to(state.dtype), routing


class MutantBf16Router(TorchEagerBackend):
    """Bug: the router runs in bfloat16: logits from bfloat16 copies of x and the router weights
    (the contract: the router is float32 whatever the compute dtype)."""

    name = "mutant_bf16_router"

    def _route(self, state: TorchEagerState, x) -> TorchRouting:
        import torch

        bf16 = dataclasses.replace(state, router=state.router.to(torch.bfloat16).float())
        return super()._route(bf16, x.to(torch.bfloat16).float())


# -- update -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _StaleScaleState(TorchEagerState):
    """A state after `MutantStaleScaleAfterUpdate.update`: new masters, the old per-expert scales."""

    stale_scales: tuple = ()


class MutantStaleScaleAfterUpdate(TorchEagerBackend):
    """Bug: after a master-float update the next call quantizes the new masters with the scales of
    the old ones (a scale cached at prepare and never refreshed)."""

    name = "mutant_stale_scale_after_update"

    def update(self, prepared: TorchEagerState, x: np.ndarray, dy: np.ndarray, lr: float) -> TorchEagerState:
        stepped = super().update(prepared, x, dy, lr)
        w13_q, w2_q = self._routed_weights(prepared)
        if w13_q[0] is None:
            return stepped
        scales = ([q.scale for q in w13_q], [q.scale for q in w2_q])
        fields = {f.name: getattr(stepped, f.name) for f in dataclasses.fields(stepped)}
        return _StaleScaleState(**fields, stale_scales=scales)

    def _routed_weights(self, state: TorchEagerState) -> tuple[list, list]:
        stale = getattr(state, "stale_scales", ())
        if not stale:
            return super()._routed_weights(state)
        return tuple([self._quantize_with_scale(w.detach().float(), s) for w, s in zip(masters, scales)]
                     for masters, scales in zip((state.w13, state.w2), stale))


#: name -> (mutant class, the conformance test expected to catch it, as a fragment of its pytest node id).
MUTANTS: dict[str, tuple[type[Backend], str]] = {
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
        (MutantMasterWeightInputGrad, "test_level4_backward.py::test_backward["),  # grad.x, int8_routed
        (MutantBf16WeightGradAccumulation, "test_level4_backward.py::test_backward["),  # grad.w13 / w2
        (MutantPrequantWeightGradFromQuantizedHidden, "test_level4_backward.py::test_backward["),  # grad.w2
        (MutantW2PerColumnScale, "test_level2_effective_weights.py::test_effective_weights["),  # off the grid
        (MutantRoundHalfAwayFromZero, "test_level2_effective_weights.py::test_effective_weights["),  # exact_ties
        (MutantFloatRoutedWeights, "test_level2_effective_weights.py::test_effective_weights["),  # float under int8
        (MutantFloatActivations, "test_level3_forward.py::test_forward["),     # float32 tight bound
        (MutantHiddenNotRequantized, "test_level3_forward.py::test_forward["),  # float32 tight bound
        (MutantClip128, "test_level1_quantizer.py::test_quantizer_fixed_cases["),  # scale amax/128
        (MutantActivationScaleFloor, "test_level3_forward.py::test_forward["),  # small tokens
        (MutantTieBreakHigherIndex, "test_level3_forward.py::test_forward["),   # ties case: expert ids
        (MutantCapacityKeepsLast, "test_level3_forward.py::test_forward["),     # capacity_drop case
        (MutantRouterBiasInGates, "test_level3_forward.py::test_forward["),    # sigmoid case: gate weights
        (MutantSharedInsideGate, "test_level3_forward.py::test_forward["),      # shared_no_renorm / shared_sigmoid
        (MutantBf16Router, "test_level3_forward.py::test_forward["),            # gate weights to 1e-5
        (MutantStaleScaleAfterUpdate, "test_level5_update.py::test_update["),   # int8_routed, master_float
    )
}


class MutantControl(TorchEagerBackend):
    """No bug: the control that must pass every test the torch_eager mutants are run through."""

    name = "mutant_control"


class MutantControlTriton(TorchTritonBackend):
    """No bug: the control for the torch_triton mutant (same tests, same scheme)."""

    name = "mutant_control_triton"


#: The unmutated control, run beside the mutants (not one of them).
CONTROL: type[TorchEagerBackend] = MutantControl
#: Every unmutated control: one per backend a mutant is built on.
CONTROLS: tuple[type[Backend], ...] = (MutantControl, MutantControlTriton)


# -- expert parallel (level 6) -------------------------------------------------------------------------------
def _drops_last_assignment(shard_cls: type) -> type:
    """An `ExpertShard` whose dispatch never sends the rank's last kept assignment (an off-by-one in the
    send loop): that token's expert output never comes back and its gate-weighted share is lost."""

    class DropsLastAssignment(shard_cls):
        def sendable(self, kept, assignments, device):
            mask = super().sendable(kept, assignments, device).clone()
            if mask.numel():
                mask[int(mask.nonzero().max())] = False
            return mask

    return DropsLastAssignment


class MutantTritonEPDroppedToken(TorchTritonBackend):
    """Bug (expert parallel only): each rank's dispatch drops its last token assignment; on one device the
    layer is correct, so only level 6 can see it."""

    name = "mutant_triton_ep_dropped_token"

    def prepare(self, spec, params, scheme, dtype, ep_size=1):
        prepared = super().prepare(spec, params, scheme, dtype, ep_size=ep_size)
        if prepared.shard is not None:
            fields = {f.name: getattr(prepared.shard, f.name) for f in dataclasses.fields(prepared.shard)}
            prepared.shard = _drops_last_assignment(type(prepared.shard))(**fields)
        return prepared


MUTANTS[MutantTritonEPDroppedToken.name] = (MutantTritonEPDroppedToken,
                                            "test_level6_expert_parallel.py::test_expert_parallel_forward[")
