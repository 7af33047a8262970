"""The MoE layer of the torch_triton backend, in PyTorch around the Triton kernels.

    y = sum_k gate_k * expert_{e_k}(x) [+ shared(x)],  expert(x) = swiglu(x W13) W2

Steps: route (float32 logits, through `kernels.router` on the tensor cores for bfloat16 tokens; top-k on
the logits or on float64 sigmoid scores, lower index wins ties), plan the dispatch (token rows in expert order,
placed from the top-k kernel's per-block expert counts where nothing is dropped, else sorted; group offsets, no
capacity padding, no host synchronisation), run the routed experts as grouped
GEMMs, combine by gate weight (int8 schemes: experts and combine are one autograd node, `_RoutedInt8Layer`,
whose backward holds each [N, .] buffer only to its last use).
Per scheme (`qmoe.reference.schemes`):

* ``none``: `torch._grouped_mm` forward and backward (no loop over experts).
* ``qat_int8_row``: the same float path on fake-quantized weights (Triton fused per-row kernel,
  straight-through backward); tensors of <= 65,536 elements stay float.
* ``int8_routed``: per-token int8 activations x per-expert int8 weights through the Triton grouped
  int8 GEMM (the SwiGLU and the hidden's int8 fused in one Triton kernel); weights quantized on
  every call; straight-through backward (the float graph at the dequantized values, as float
  grouped matmuls, the SwiGLU gradient a Triton kernel).
* ``int8_routed_prequant``: weights quantized once at prepare; the JAX logbook's custom VJP
  (MOE-I8-023/024): input gradients through the int8 kernel with the transposed weight codes and a
  per-token-quantized output gradient (Q(g) once d_w2 has read g, Q(d_a) fused into the
  SwiGLU-gradient kernel), weight gradients as float grouped matmuls of the float rows.

Imports torch and triton: the backend module imports this lazily.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from qmoe.reference.schemes import Scheme
from qmoe.reference.spec import MoESpec

from ..torch_eager import router_gate_weights, sigmoid_balance_probs
from .common import FALLBACKS
from .kernels import router as router_kernels
from .kernels.combine import combine_gate_grads, combine_rows, combine_rows_backward, combine_rows_grad, spread_rows
from .kernels.dispatch import ExpertCounts, counts_fit, plan_from_counts, plan_indices, sort_keys
from .kernels.gluon_gemm import GemmTiles
from .kernels.grouped_gemm import grouped_gemm
from .kernels.quant import dequantize_experts, dequantize_rows, fake_quant_rows, quantize_per_expert, quantize_rows
from .kernels.router import top_k_counted
from .kernels.swiglu import swiglu_backward as fused_swiglu_backward
from .kernels.swiglu import swiglu_forward

# -- weights ---------------------------------------------------------------------------------------

@dataclass
class LayerWeights:
    """Master weights as torch tensors: the router in float32, the projections in the compute dtype."""

    router: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    router_bias: torch.Tensor | None = None
    shared_w13: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None

    def items(self):
        for field_ in fields(self):
            value = getattr(self, field_.name)
            if value is not None:
                yield field_.name, value

    def map(self, fn) -> LayerWeights:
        return LayerWeights(**{name: fn(name, value) for name, value in self.items()})


@dataclass
class Int8Experts:
    """Expert weights as int8 codes with one scale per expert, in the layouts the kernel reads.

    ``*_fwd``: [E, in, out] views of K-major storage (B of x @ W). ``*_bwd``: [E, out, in] views of
    the row-major codes (B of g @ W^T, also K-major); only the prequant backward needs them.
    """

    w13_fwd: torch.Tensor
    w13_scale: torch.Tensor
    w2_fwd: torch.Tensor
    w2_scale: torch.Tensor
    w13_bwd: torch.Tensor | None = None
    w2_bwd: torch.Tensor | None = None

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor, with_transposed: bool) -> Int8Experts:
        w13_fwd, s13 = expert_codes(w13)
        w2_fwd, s2 = expert_codes(w2)
        if not with_transposed:
            return cls(w13_fwd, s13, w2_fwd, s2)
        # The same codes again in row-major storage: transposed, that is K-major for g @ W^T.
        return cls(w13_fwd, s13, w2_fwd, s2, w13_fwd.contiguous().transpose(1, 2), w2_fwd.contiguous().transpose(1, 2))

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W13, W2) as the float values the int8 products compute with, codes * scale (the float32 product
        rounded once to ``dtype``), each in its codes' K-major layout, which `torch._grouped_mm` reads either way."""
        return (dequantize_experts(self.w13_fwd, self.w13_scale, dtype),
                dequantize_experts(self.w2_fwd, self.w2_scale, dtype))


def expert_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection's [E, in, out] int8 codes in the K-major storage the forward kernel reads, and
    its per-expert float32 scales."""
    return quantize_per_expert(w.detach(), k_major=True)


# -- QAT ------------------------------------------------------------------------------------------

def qat_quantized(w: torch.Tensor, scheme: Scheme) -> bool:
    """The exporter quantizes a tensor only above ``qat_keep_float_max_numel`` elements, so training
    fake-quantizes exactly those (review finding 3: no noise that export will not have)."""
    return w.numel() > scheme.qat_keep_float_max_numel


def qat_clip_abs(w: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per output channel, the ``quantile`` of |w| over the input axis (-2), NumPy's default
    ("linear") rule: sorted[lo] + (sorted[hi] - sorted[lo]) * t, evaluated from the end nearer t.

    Computed in float64 by a sort, not `torch.quantile` (which refuses tensors over 2^24 elements).
    """
    magnitude = w.detach().abs().to(torch.float64).sort(dim=-2).values
    n = magnitude.shape[-2]
    position = quantile * (n - 1)
    low = int(position // 1)
    high = min(low + 1, n - 1)
    t = position - low
    a, b = magnitude.select(-2, low), magnitude.select(-2, high)
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def qat_export_rows(w: torch.Tensor, scheme: Scheme, write_values: bool, write_codes: bool):
    """The exporter's per-row rule through the fused Triton kernel (values and/or codes, scales)."""
    clip = None if scheme.qat_clip_quantile is None else qat_clip_abs(w, scheme.qat_clip_quantile)
    return fake_quant_rows(w.detach(), scheme.qat_scale_floor, clip, write_values=write_values,
                           write_codes=write_codes)


class _FakeQuantRowsSTE(torch.autograd.Function):
    """Forward: the exporter's per-row fake quantization. Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        return qat_export_rows(w, scheme, write_values=True, write_codes=False)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def training_weight(w: torch.Tensor, rule: str, scheme: Scheme, fake_quant: bool) -> torch.Tensor:
    """What the training forward computes with for a weight under rule ``rule``."""
    if rule == "qat_row" and fake_quant and qat_quantized(w, scheme):
        return _FakeQuantRowsSTE.apply(w, scheme)
    return w


# -- routing --------------------------------------------------------------------------------------

@dataclass
class Routing:
    """The router's decisions, and its float32 logits for what only a loss reads (the balance loss is made
    when first read: the layer's output does not need it, nor do its benchmark steps). Read it under the
    grad mode of the forward that made the routing: its graph is built at that first read."""

    expert_ids: torch.Tensor         # [T, k] int64, best first
    gate_weights: torch.Tensor       # [T, k] float32, differentiable
    kept: torch.Tensor | None        # [T, k] bool, None when dropless
    logits: torch.Tensor             # [T, E] float32, differentiable
    router: str                      # the spec's router family
    counts: ExpertCounts | None = None  # per token block, where the router kernel counted (`plan_dispatch`)

    @functools.cached_property
    def balance_probs(self) -> torch.Tensor:
        """P [T, E], differentiable: the softmax, or sigmoid scores normalized per token."""
        if self.router == "softmax_topk":
            return torch.softmax(self.logits, dim=-1)
        return sigmoid_balance_probs(self.logits)

    @functools.cached_property
    def balance_loss(self) -> torch.Tensor:
        """Switch balance loss E * sum_e share_e * mean_t P_te (scalar, differentiable through P)."""
        experts = self.logits.shape[-1]
        share = counts_per_expert(self.expert_ids.reshape(-1), experts).to(torch.float32) / self.expert_ids.numel()
        return experts * torch.sum(share * self.balance_probs.mean(dim=0))


def route(spec: MoESpec, router: torch.Tensor, router_bias: torch.Tensor | None, x: torch.Tensor) -> Routing:
    """softmax/sigmoid top-k in float32 (never quantized) and the capacity mask; the Switch balance loss
    on demand (`Routing.balance_loss`).

    Among equal scores the lower expert index wins, as in the reference (``torch.topk`` promises no
    order for ties): `top_k_counted`, a Triton kernel, which also counts each block of tokens' assignments per
    expert (the dispatch plan places them from the counts, without a sort). A softmax router of bfloat16 tokens
    over at most `router_kernels.FUSED_TOP_K_EXPERTS` experts takes the logits, the same top-k and the counts from
    one kernel (`router_kernels.logits_top_k`): the launches before the step's first GEMM are where the GPU waits
    on the host.
    """
    # Select on the float32 logits (softmax) or float64 scores (sigmoid), never on float32 scores:
    # probabilities of a saturated router (an outlier token) underflow to 0 or round to 1 and tie
    # experts that the reference still orders; the softmax is monotonic, so its top-k is the logits'.
    # The scores themselves only where the gate weights are not renormalized (then a softmax of the
    # selected logits).
    if spec.router == "softmax_topk":
        if x.dtype == torch.bfloat16 and spec.experts <= router_kernels.FUSED_TOP_K_EXPERTS:
            logits, ids, counts = _RouterLogits.apply(x, router.to(torch.float32), spec.top_k)
        else:
            logits = router_logits(x, router)
            ids, counts = top_k_counted(logits.detach(), spec.top_k)
        scores = None if spec.renormalize else torch.softmax(logits, dim=-1)
    else:
        logits = router_logits(x, router)
        bias = router_bias.detach().to(torch.float64) if router_bias is not None else 0.0
        selection = torch.sigmoid(logits.detach().to(torch.float64)) + bias
        ids, counts = top_k_counted(selection, spec.top_k)
        scores = None if spec.renormalize else torch.sigmoid(logits)
    weights = router_gate_weights(spec, logits, scores, ids)
    return Routing(ids, weights, capacity_mask(spec, ids), logits, spec.router, counts)


class _RouterLogits(torch.autograd.Function):
    """float32 logits of bfloat16 tokens through `kernels.router` (tensor cores, float32-accurate), with
    both gradients likewise: dx rounded to x's dtype, as autograd's cast back from float32 would. With
    ``top_k`` > 0, (logits, top-k ids, expert counts) from the fused kernel (`router_kernels.logits_top_k`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, router: torch.Tensor, top_k: int = 0):
        ctx.save_for_backward(x, router)
        if not top_k:
            return router_kernels.logits_bf16(x, router)
        logits, ids, counts = router_kernels.logits_top_k(x, router, top_k)
        ctx.mark_non_differentiable(ids)
        return logits, ids, counts

    @staticmethod
    def backward(ctx, d_logits: torch.Tensor, *_):
        x, router = ctx.saved_tensors
        d_logits = d_logits.to(torch.float32).contiguous()
        dx = router_kernels.input_grad(d_logits, router, x.dtype) if ctx.needs_input_grad[0] else None
        d_router = router_kernels.router_grad(x, d_logits) if ctx.needs_input_grad[1] else None
        return dx, d_router, None


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """x R in float32 [T, E], differentiable. bfloat16 x runs the split-operand kernels (exact parts of the
    float32 router on the tensor cores); any other dtype is copied to float32 for torch's float32 GEMM."""
    router = router.to(torch.float32)
    if x.dtype == torch.bfloat16:
        return _RouterLogits.apply(x, router)
    return x.to(torch.float32) @ router


def counts_per_expert(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """How many entries of ``ids`` (in 0 .. experts - 1) name each expert, int64 [experts].

    A histogram of unit-wide bins (`torch.histc`: exact while a count stays below 2^24), not
    `torch.bincount`, which on CUDA reads the maximum back to the host (a synchronisation in the middle
    of every forward), nor a scatter-add of ones, whose atomics on E addresses serialise: 57 us per call
    at T * k = 262,144 on the H200, twice per forward."""
    if ids.numel() >= 2**24:
        raise ValueError(f"counts_per_expert: {ids.numel()} entries, float32 bins count exactly below 2^24")
    bins = torch.histc(ids.to(torch.float32), bins=experts, min=0, max=experts)
    return bins.to(torch.int64)


def capacity_mask(spec: MoESpec, ids: torch.Tensor) -> torch.Tensor | None:
    """True for the first C assignments of each expert in (token, slot) order; None when dropless."""
    capacity = spec.capacity(ids.shape[0])
    if capacity is None:
        return None
    flat = ids.reshape(-1)
    position = torch.cumsum(F.one_hot(flat, spec.experts), dim=0).gather(1, flat[:, None])[:, 0] - 1
    return (position < capacity).reshape(ids.shape)


# -- dispatch plan --------------------------------------------------------------------------------

@dataclass
class DispatchPlan:
    """Token rows sorted by expert: row r of the sorted order is assignment ``order[r]`` (= t * k + slot).

    ``group_starts`` [E + 1] int32: rows of expert e are group_starts[e] .. group_starts[e + 1]; an
    expert with no token has an empty range. Capacity-dropped assignments sort after the last group
    (``row_valid`` marks the kept rows, ``kept`` [T * k] the kept assignments; None when nothing can
    be dropped).
    """

    tokens: int
    top_k: int
    experts: int
    order: torch.Tensor
    inverse: torch.Tensor
    group_starts: torch.Tensor
    row_valid: torch.Tensor | None
    kept: torch.Tensor | None = None
    tiles: GemmTiles | None = None   # the int8 GEMMs' tile table, where the plan kernel made it

    @property
    def assignment_rows(self) -> torch.Tensor:
        """[T, k]: the sorted row of token t's j-th assignment (``inverse`` by token)."""
        return self.inverse.view(self.tokens, self.top_k)

    @property
    def group_ends(self) -> torch.Tensor:
        """Cumulative row counts [E] int32: the ``offs`` of `torch._grouped_mm`."""
        return self.group_starts[1:]

    @property
    def row_token(self) -> torch.Tensor:
        """[N] int64: the token of each sorted row (order // k). No step reads it (`token_rows` spreads x without
        it); derived on demand for checks."""
        return self.order // self.top_k

    @property
    def has_drops(self) -> bool:
        return self.row_valid is not None

    def mask_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Zero the rows no group covers (they hold whatever the GEMM left there)."""
        return rows if self.row_valid is None else torch.where(self.row_valid[:, None], rows, 0)

    def token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [N, D]: each kept assignment's token row at its sorted row (x[row_token]), a dropped one's
        zero; each token read once (`spread_rows`), not k times in the sorted order (torch's gather: 0.549 against
        0.325 ms at the logbook's top-8 shape on the H200, 2026-12-02). The adjoint of `sum_per_token`."""
        return spread_rows(x, self.inverse, self.top_k, self.order.numel(), kept=self.kept)

    def sum_per_token(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, D] sorted rows -> [T, D]: each token's kept rows summed in float32 (deterministic, no
        atomics; a dropped assignment's row is never read)."""
        return combine_rows(rows, self.inverse, self.top_k, kept=self.kept)


def plan_dispatch(expert_ids: torch.Tensor, kept: torch.Tensor | None, experts: int,
                  counts: ExpertCounts | None = None) -> DispatchPlan:
    """Sort the T * k assignments by expert (stable: token order within an expert). A dropless routing with the
    router kernel's expert ``counts`` is placed from them in one kernel, with the int8 GEMMs' tile table
    (`plan_from_counts`, where the counts are few enough: `counts_fit`); any other is sorted."""
    tokens, top_k = expert_ids.shape
    if kept is None and counts is not None and counts_fit(counts):
        order, inverse, starts, tiles = plan_from_counts(expert_ids, counts, experts)
        return DispatchPlan(tokens, top_k, experts, order, inverse, starts, None, None, tiles)
    key = expert_ids.reshape(-1)
    kept_flat = None if kept is None else kept.reshape(-1)
    if kept_flat is not None:
        key = torch.where(kept_flat, key, experts)
    sorted_key, order = sort_keys(key, experts)
    # Group e begins at the first sorted key >= e (an empty group where the next begins); the last
    # group ends where the dropped assignments' key E begins. No counts, no host synchronization.
    inverse, starts, row_valid = plan_indices(sorted_key, order, experts, kept_flat is not None)
    return DispatchPlan(tokens, top_k, experts, order, inverse, starts, row_valid, kept_flat)


# -- float grouped matmuls (torch._grouped_mm) ------------------------------------------------------

_REFUSED: set[tuple[str, torch.dtype]] = set()


def _torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm`; where a device/dtype is refused (not every build takes float32 on CUDA),
    a per-group loop instead, counted in FALLBACKS so that a run can say it happened."""
    key = (a.device.type, a.dtype)
    if key not in _REFUSED:
        try:
            return torch._grouped_mm(a, b, offs=ends)
        except RuntimeError:
            _REFUSED.add(key)
    FALLBACKS["torch_grouped_mm_loop"] += 1
    bounds = [0, *ends.tolist()]
    if b.dim() == 3:  # rows of a grouped: [N, K] x [E, K, M] -> [N, M]
        pieces = [a[start:end] @ b[e] for e, (start, end) in enumerate(zip(bounds, bounds[1:]))]
        pieces.append(a.new_zeros(a.shape[0] - bounds[-1], b.shape[-1]))
        return torch.cat(pieces)
    # contraction grouped: [K, N] x [N, M] -> [E, K, M]
    return torch.stack([a[:, start:end] @ b[start:end] for start, end in zip(bounds, bounds[1:])])


def _alignment(t: torch.Tensor) -> int:
    """`torch._grouped_mm` wants 16-byte aligned row strides."""
    return max(1, 16 // t.element_size())


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def grouped_mm(a: torch.Tensor, b: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """[N, K] rows x [E, K, M] -> [N, M], row group e times b[e]; differentiable (torch's own VJP).

    Feature sizes that break the 16-byte alignment (the suite's hidden = 33) are zero-padded, which
    leaves every product unchanged. Rows past the last group (capacity-dropped) are zero, as the int8
    `grouped_gemm`'s with ``zero_uncovered``: `torch._grouped_mm` leaves them unwritten, and a SwiGLU
    kernel reading the output (forward, or the STE backward's d_h) would compute on whatever is there.
    Its input gradient's uncovered rows stay unwritten: callers mask the input (`float_experts`).
    """
    align = _alignment(a)
    k_dim, m_dim = b.shape[-2:]
    if k_dim % align or m_dim % align:
        a = _pad_last(a, align)
        b = F.pad(b, (0, -m_dim % align, 0, -k_dim % align))
        return plan.mask_rows(_torch_grouped_mm(a, b, plan.group_ends)[:, :m_dim])
    return plan.mask_rows(_torch_grouped_mm(a, b, plan.group_ends))


def grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """dW[e] = a_e^T g_e over each group's rows: [N, K], [N, M] -> [E, K, M] (zero for an empty group)."""
    align = _alignment(a)
    k_dim, m_dim = a.shape[-1], g.shape[-1]
    a_p, g_p = _pad_last(a, align), _pad_last(g, align)
    grad = _torch_grouped_mm(a_p.t(), g_p, plan.group_ends)
    return grad[:, :k_dim, :m_dim] if (a_p is not a or g_p is not g) else grad


# -- routed experts -------------------------------------------------------------------------------

class _SwiGLU(torch.autograd.Function):
    """h = silu(a_gate) * a_up through the fused Triton kernels (float32 inside, one rounding to a's
    dtype), both directions: torch's silu on a column slice, its product and their backward are four
    passes over [N, 2F] (on the H200 profile of the float path, more time than its combine)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return swiglu_forward(a, store_h=True, quantize=False)[0]

    @staticmethod
    def backward(ctx, d_h: torch.Tensor):
        (a,) = ctx.saved_tensors
        return fused_swiglu_backward(a, d_h)[0]


def swiglu(a: torch.Tensor) -> torch.Tensor:
    """silu(a[:, :F]) * a[:, F:] for a [N, 2F], differentiable."""
    return _SwiGLU.apply(a)


class _TokenRows(torch.autograd.Function):
    """x [T, H] -> its rows in expert order [N, H] (`DispatchPlan.token_rows`); backward: each token's kept rows summed
    (`DispatchPlan.sum_per_token`), not autograd's index_put with accumulation (a sort on CUDA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return plan.token_rows(x)

    @staticmethod
    def backward(ctx, d_rows: torch.Tensor):
        return ctx.plan.sum_per_token(d_rows), None


def token_rows(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return _TokenRows.apply(x, plan)


def float_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Unweighted expert outputs per sorted row, float: swiglu(x_rows W13_e) W2_e (autograd).

    `torch._grouped_mm` leaves rows past the last group (capacity-dropped) unwritten, in its output
    and in its input gradient alike: `grouped_mm` zeroes its output's. The first GEMM's input has those rows zero
    (`DispatchPlan.token_rows`), and its input gradient's are never read (`DispatchPlan.sum_per_token` reads kept
    rows only); the second GEMM's input is masked with `torch.where`, which keeps its input gradient's out of the
    backward (where's backward selects, so even a NaN there is dropped). Without drops the mask is the identity.
    """
    return float_down(float_up(float_rows(x, plan), w13, plan), w2, plan)


def float_rows(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x's rows in expert order [N, H], capacity-dropped rows zero (`DispatchPlan.token_rows` writes them so): the
    float path's GEMM input."""
    return token_rows(x, plan)


def float_up(rows: torch.Tensor, w13: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """h = swiglu(rows W13_e) per sorted row, [N, F]."""
    return swiglu(grouped_mm(rows, w13, plan))


def float_down(h: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """h W2_e per sorted row, [N, H]; h's uncovered rows are zeroed first (see `float_experts`)."""
    return grouped_mm(plan.mask_rows(h), w2, plan)


@dataclass
class _Int8Saved:
    """What an int8 experts forward hands its backward: the plan, the rule, the weights' codes, x (the prequant
    weight gradient reads its float rows, the straight-through one its codes, made again), the activations
    (``stash``) and, for the one-node layer, the experts' output rows (read by the gates' gradient). The last two
    are given over once (`take`)."""

    plan: DispatchPlan
    rule: str
    experts: Int8Experts
    x: torch.Tensor | None
    stash: list[torch.Tensor] | None
    rows: torch.Tensor | None = None

    def take(self, name: str):
        """``name``'s value, no longer held here (a ``del`` in the backward then frees it). A second backward
        through the same graph (``retain_graph``) finds it gone and is refused."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError("torch_triton's int8 experts run their backward once per forward "
                               "(backward through a retained graph is not supported)")
        setattr(self, name, None)
        return value


def _int8_experts_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan, rule: str,
                          prequantized: Int8Experts | None, needs_grad: bool
                          ) -> tuple[torch.Tensor, _Int8Saved]:
    """Unweighted expert rows [N, H] = Q(swiglu(Q(x_r) Q(W13_e))) Q(W2_e), and what the backward needs
    (no activation kept unless ``needs_grad``)."""
    experts = prequantized if prequantized is not None else Int8Experts.quantize(w13, w2, with_transposed=False)
    x_codes, x_scale = sorted_codes(x, plan)
    # The hidden d_w2 reads is kept for the backward: h for the prequant VJP (d_w2 = h^T g), Q(h)'s values for
    # the straight-through one (d_w2 = Q(h)^T g), written by the SwiGLU kernel from its registers rather than
    # made again from the codes there (a pass reading N x F codes and writing N x F values: ~40% of the bytes of
    # the 1.1 ms that the backward's four dequantizations took at the logbook's top-8 shape on the H200). The
    # backward's peak holds those values either way.
    prequant = rule == "prequant_vjp"
    a, h, h_codes, h_scale = int8_up(x_codes, x_scale, experts.w13_fwd, experts.w13_scale, plan, x.dtype,
                                     store_h=needs_grad, dequantized_h=not prequant)
    del x_codes, x_scale  # [N, H] int8: gone before the down projection's output is made
    stash = [a, h] if needs_grad else None
    out = int8_down(h_codes, h_scale, experts.w2_fwd, experts.w2_scale, plan, x.dtype)
    # x itself for the backward (its float rows for the prequant weight gradient; its codes, made again, for the
    # straight-through one): the layer's caller holds it anyway, where its [N, H] codes would be k times its rows
    return out, _Int8Saved(plan, rule, experts, x if needs_grad else None, stash)


def _int8_experts_backward(saved: _Int8Saved, rows_grad: list,
                           g_quantized: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x [T, H], d_w13, d_w2) from the rows' gradient g [N, H] (zero on rows no group covers).

    ``g_quantized``: where the caller can make Q(g)'s codes and scales without reading g (`_RoutedInt8Layer`: from
    dy and the gates); else Q(g) = `quantize_rows` (g).

    ``rows_grad`` = [g], emptied here: g and every [N, .] buffer is dropped right after its last use, so
    that the largest ones are never alive together. The order is chosen for the peak: Q(g) is made once
    d_w2 has read h and g (with a, the peak's operands), d_a is written over a (the SwiGLU gradient in
    place), and the input gradient d_x goes through before d_w13 (so Q(d_a) and d_x's rows are gone when
    x's gathered rows and d_w13 are made).
    """
    plan, experts = saved.plan, saved.experts
    g, = rows_grad
    rows_grad.clear()
    stash = saved.take("stash")
    if saved.rule == "prequant_vjp":
        x = saved.x
        assert x is not None  # kept for this rule by `_int8_experts_forward`
        dtype = x.dtype
        a, h = stash
        del stash
        d_w2 = grouped_weight_grad(h, g, plan)
        del h
        if g_quantized is None:
            g_codes, g_scale = quantize_rows(g)
            del g
        else:  # made without reading g, which goes first
            del g
            g_codes, g_scale = g_quantized()
        d_h = grouped_gemm(g_codes, experts.w2_bwd, plan.group_starts, out_dtype=dtype, a_scale=g_scale,
                           b_scale=experts.w2_scale, zero_uncovered=plan.has_drops, tiles=plan.tiles)
        del g_codes, g_scale
        d_a, d_a_codes, d_a_scale = fused_swiglu_backward(a, d_h, quantize=True, in_place=True)
        del a, d_h
        d_x_rows = grouped_gemm(d_a_codes, experts.w13_bwd, plan.group_starts, out_dtype=dtype,
                                a_scale=d_a_scale, b_scale=experts.w13_scale, zero_uncovered=plan.has_drops,
                                tiles=plan.tiles)
        del d_a_codes, d_a_scale
        d_x = plan.sum_per_token(d_x_rows)
        del d_x_rows
        d_w13 = grouped_weight_grad(plan.token_rows(x), d_a, plan)
        return d_x, d_w13, d_w2
    a, h_eff = stash  # h_eff: Q(h)'s values
    del stash
    dtype = a.dtype
    d_w2 = grouped_weight_grad(h_eff, g, plan)
    del h_eff
    # Each projection's float weights exist only around the product that reads them (made together up
    # front, both sat beside a, g and h at the d_w2 peak: 1.5 GiB at the logbook shape).
    w2_eff = dequantize_experts(experts.w2_fwd, experts.w2_scale, dtype)
    d_h = grouped_mm(g, w2_eff.transpose(1, 2), plan)
    del g, w2_eff
    d_a = plan.mask_rows(fused_swiglu_backward(a, d_h, in_place=True)[0])
    del a, d_h
    w13_eff = dequantize_experts(experts.w13_fwd, experts.w13_scale, dtype)
    d_x = plan.sum_per_token(grouped_mm(d_a, w13_eff.transpose(1, 2), plan))
    del w13_eff
    # Q(x) again, per token, rather than its [N, H] codes in expert order kept from the forward (k times the
    # bytes, held through the backward's peak): one read of x, the same codes.
    x = saved.x
    assert x is not None  # kept by `_int8_experts_forward`
    x_eff = plan.token_rows(dequantize_rows(*quantize_rows(x), dtype))
    return d_x, grouped_weight_grad(x_eff, d_a, plan), d_w2


class _RoutedInt8Experts(torch.autograd.Function):
    """Routed experts with int8 products: y_r = Q(swiglu(Q(x_r) Q(W13_e))) Q(W2_e) per sorted row r
    (expert parallelism's local experts; the one-device layer runs `_RoutedInt8Layer`).

    Backward ``ste``: the float graph at the dequantized values (d_w2 = Q(h)^T g, d_h = g W2^T,
    d_w13 = Q(x)^T d_a, d_x = d_a W13^T). Backward ``prequant_vjp``: d_h = Q(g) W2^T and
    d_x = Q(d_a) W13^T through the int8 kernel with the transposed codes; d_w2 = h^T g and
    d_w13 = x^T d_a from the float rows.
    """

    @staticmethod
    def forward(ctx, x, w13, w2, plan: DispatchPlan, rule: str, prequantized: Int8Experts | None):
        # Activations go to the backward in `_Int8Saved`, not save_for_backward, which would keep every
        # one of them alive until the backward returns.
        out, ctx.saved = _int8_experts_forward(x, w13, w2, plan, rule, prequantized, any(ctx.needs_input_grad))
        return out

    @staticmethod
    def backward(ctx, g):
        d_x, d_w13, d_w2 = _int8_experts_backward(ctx.saved, [ctx.saved.plan.mask_rows(g.contiguous())])
        return d_x, d_w13, d_w2, None, None, None


class _RoutedInt8Layer(torch.autograd.Function):
    """The int8 routed experts and their gate-weighted combine as one autograd node, y [T, H].

    One node, so that the rows' gradient g [N, H] is made inside this backward (the combine's backward
    kernel), after the expert rows (read by the gates' gradient alone) are freed, and is freed once d_w2
    and Q(g) (or d_h) have read it, where autograd would hold it until the experts' backward returned.
    """

    @staticmethod
    def forward(ctx, x, w13, w2, gate_weights, plan: DispatchPlan, rule: str, prequantized: Int8Experts | None):
        needs_grad = any(ctx.needs_input_grad)
        rows, ctx.saved = _int8_experts_forward(x, w13, w2, plan, rule, prequantized, needs_grad)
        y = combine_rows(rows, plan.inverse, plan.top_k, weight=gate_weights, kept=plan.kept)
        if needs_grad:  # read once more, by the gates' gradient
            ctx.saved.rows = rows
        ctx.gate_weights = gate_weights.detach()
        return y

    @staticmethod
    def backward(ctx, dy):
        saved: _Int8Saved = ctx.saved
        plan = saved.plan
        rows = saved.take("rows")
        dy = dy.contiguous()
        # The gates' gradient first, the only reader of the rows, which go before g exists.
        d_gates = combine_gate_grads(rows, dy, plan.inverse, plan.top_k, kept=plan.kept)
        n_rows, dtype = rows.shape[0], rows.dtype
        del rows
        # Q(g) for the prequant VJP is made after d_w2, once h is gone (`_int8_experts_backward`), not in
        # this pass: at the backward's peak (d_w2 = h^T g, with a, h and g alive) it would add N x H int8
        # (0.38 GiB at the logbook shape, top-8, measured on the H200). It is made from dy, not g: row
        # g[inverse(t, j)] = gate[t, j] * dy[t] has dy[t]'s codes and gate times its scale (`quantize_rows`
        # with ``weight``), so dy's [T, H] is read instead of g's [N, H], and the codes are those of the exact
        # product, not of g rounded to dy's dtype.
        rows_grad = [combine_rows_grad(dy, plan.inverse, ctx.gate_weights, plan.top_k, n_rows, dtype,
                                       kept=plan.kept)]
        gates = ctx.gate_weights

        def g_quantized() -> tuple[torch.Tensor, torch.Tensor]:
            return quantize_rows(dy, dest=plan.assignment_rows, weight=gates.reshape(plan.assignment_rows.shape))

        d_x, d_w13, d_w2 = _int8_experts_backward(saved, rows_grad, g_quantized)
        return d_x, d_w13, d_w2, d_gates.to(ctx.gate_weights.dtype).view_as(ctx.gate_weights), None, None, None


def sorted_codes(x: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Q(x)'s per-token codes [N, H] and scales [N] in the plan's expert order: each token quantized once and its
    codes written at each of its k rows (`quantize_rows` with ``dest``), so that the up projection reads whole
    rows (Hopper's TMA cannot gather). On the H200 the up projection's rows were first gathered by the Triton
    kernel as it loaded them, then copied for the Gluon kernel (0.26 ms per logbook top-8 step); here no pass
    reads them again."""
    return quantize_rows(x, dest=plan.assignment_rows)


def int8_up(x_codes: torch.Tensor, x_scale: torch.Tensor, w13_codes: torch.Tensor, w13_scale: torch.Tensor,
            plan: DispatchPlan, dtype: torch.dtype, store_h: bool, dequantized_h: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(a, h or None, Q(h) codes, Q(h) scales): a = Q(x_r) Q(W13_e) per sorted row, from the codes in expert
    order (`sorted_codes`), then the fused SwiGLU + per-row int8 of h. ``dequantized_h``: the stored hidden is
    Q(h)'s values instead of h (`swiglu_forward`)."""
    a = grouped_gemm(x_codes, w13_codes, plan.group_starts, out_dtype=dtype, a_scale=x_scale, b_scale=w13_scale,
                     zero_uncovered=plan.has_drops, tiles=plan.tiles)
    h, h_codes, h_scale = swiglu_forward(a, store_h=store_h, dequantized=dequantized_h)
    assert h_codes is not None and h_scale is not None  # quantize (the default) always makes them
    return a, h, h_codes, h_scale


def int8_down(h_codes: torch.Tensor, h_scale: torch.Tensor, w2_codes: torch.Tensor, w2_scale: torch.Tensor,
              plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
    """Q(h_r) Q(W2_e) per sorted row, [N, H] (uncovered rows zero where assignments were dropped)."""
    return grouped_gemm(h_codes, w2_codes, plan.group_starts, out_dtype=dtype, a_scale=h_scale, b_scale=w2_scale,
                        zero_uncovered=plan.has_drops, tiles=plan.tiles)


def int8_routed(scheme: Scheme) -> bool:
    """Whether the routed experts run as int8 products (else as float grouped matmuls)."""
    return scheme.routed_weights == "per_expert"


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan, scheme: Scheme,
                   prequantized: Int8Experts | None) -> torch.Tensor:
    """Unweighted expert outputs [N, H] per sorted row under ``scheme`` (weights already training weights)."""
    if int8_routed(scheme):
        return _RoutedInt8Experts.apply(x, w13, w2, plan, scheme.backward, prequantized)
    return float_experts(x, w13, w2, plan)


class _Combine(torch.autograd.Function):
    """y_t = sum_j gate_{t,j} * rows[position(t, j)] over kept assignments, fused (`kernels.combine`):
    float32 products and sum, one rounding to the rows' dtype."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, gate_weights: torch.Tensor, position: torch.Tensor, top_k: int,
                kept: torch.Tensor | None) -> torch.Tensor:
        ctx.top_k = top_k
        ctx.save_for_backward(rows, gate_weights, position, kept)
        return combine_rows(rows, position, top_k, weight=gate_weights, kept=kept)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, gate_weights, position, kept = ctx.saved_tensors
        d_rows, d_weight = combine_rows_backward(rows, dy, position, gate_weights, ctx.top_k, kept=kept)
        return d_rows, d_weight.to(gate_weights.dtype).view_as(gate_weights), None, None, None


def combine_weighted(rows: torch.Tensor, gate_weights: torch.Tensor, position: torch.Tensor,
                     kept: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = sum_j gate_{t,j} * rows[position[t * k + j]] for gate_weights [T, k], skipping assignments
    not ``kept``; differentiable in rows and gate_weights."""
    return _Combine.apply(rows, gate_weights, position, gate_weights.shape[-1], kept)


def combine(rows: torch.Tensor, plan: DispatchPlan, routing: Routing) -> torch.Tensor:
    """y_t = sum_k gate_{t,k} * rows[inverse(t, k)]; dropped assignments contribute nothing."""
    return combine_weighted(rows, routing.gate_weights, plan.inverse, plan.kept)


def shared_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return swiglu(x @ w13) @ w2


# -- the layer ------------------------------------------------------------------------------------

@dataclass
class LayerOutput:
    y: torch.Tensor
    routing: Routing


def training_weights(weights: LayerWeights, scheme: Scheme, fake_quant: bool) -> LayerWeights:
    """The weights the forward computes with (QAT: fake-quantized where the exporter quantizes)."""
    return weights.map(lambda name, w: training_weight(w, scheme.weight_quant(name), scheme, fake_quant))


def layer_forward(spec: MoESpec, scheme: Scheme, weights: LayerWeights, x: torch.Tensor,
                  prequantized: Int8Experts | None = None, fake_quant: bool = True) -> LayerOutput:
    """The MoE layer under ``scheme`` on master ``weights``; differentiable in x and the masters."""
    used = training_weights(weights, scheme, fake_quant)
    experts = prequantized
    if int8_routed(scheme) and experts is None:
        # int8_routed quantizes its weights on every call. Issued first, that device work (1.3 ms at the logbook
        # shape on the H200) runs while the host launches the router and the dispatch plan, whose own device work
        # is short: the GPU would otherwise wait on the host there (~1 ms per step, eager against graph replay).
        experts = Int8Experts.quantize(used.w13, used.w2, with_transposed=False)
    routing = route(spec, used.router, used.router_bias, x)
    plan = plan_dispatch(routing.expert_ids, routing.kept, spec.experts, routing.counts)
    if int8_routed(scheme):
        y = _RoutedInt8Layer.apply(x, used.w13, used.w2, routing.gate_weights, plan, scheme.backward, experts)
    else:
        y = combine(float_experts(x, used.w13, used.w2, plan), plan, routing)
    if used.shared_w13 is not None:
        y = y + shared_expert(x, used.shared_w13, used.shared_w2)
    return LayerOutput(y, routing)


# -- the forward in stages (stage timing) ----------------------------------------------------------

@dataclass
class Packed:
    """What the pack stage hands on: the routing, its dispatch plan and the up projection's input in expert
    order: x's float rows (``scale`` None) or, for int8 schemes, their int8 codes and scales (`sorted_codes`)."""

    routing: Routing
    plan: DispatchPlan
    dtype: torch.dtype  # x's: the grouped GEMMs' output dtype
    rows: torch.Tensor
    scale: torch.Tensor | None = None


@dataclass
class Hidden:
    """The up stage's output, the down projection's input: h (``scale`` None) or Q(h)'s codes and scales."""

    rows: torch.Tensor
    scale: torch.Tensor | None = None


@dataclass
class LayerStages:
    """`layer_forward` without autograd, cut into stages that can each run on their own:

    * ``pack``: routing, the dispatch plan, and the rows in expert order (int8: quantized per token as placed);
    * ``up``: the w13 grouped GEMM and the SwiGLU (int8: with Q(h) fused);
    * ``down``: the w2 grouped GEMM;
    * ``combine``: the gate-weighted sum back to tokens;
    * ``shared``: the shared expert, where the layer has one.

    The stages call what the forward calls (the functions under `routed_experts`), so their values are
    the forward's bit for bit. Weight work that the forward does on every call (QAT fake quantization,
    ``int8_routed``'s weight quantization) is counted in the stage that reads the weight.
    """

    spec: MoESpec
    scheme: Scheme
    weights: LayerWeights
    prequantized: Int8Experts | None = None
    fake_quant: bool = True

    def weight(self, name: str) -> torch.Tensor:
        """Parameter ``name``'s training weight (`training_weights`, one parameter of it); it must be present."""
        return training_weight(getattr(self.weights, name), self.scheme.weight_quant(name), self.scheme,
                               self.fake_quant)

    def pack(self, x: torch.Tensor) -> Packed:
        bias = None if self.weights.router_bias is None else self.weight("router_bias")
        routing = route(self.spec, self.weight("router"), bias, x)
        plan = plan_dispatch(routing.expert_ids, routing.kept, self.spec.experts, routing.counts)
        if int8_routed(self.scheme):
            return Packed(routing, plan, x.dtype, *sorted_codes(x, plan))
        return Packed(routing, plan, x.dtype, float_rows(x, plan))

    def up(self, packed: Packed) -> Hidden:
        if packed.scale is None:
            return Hidden(float_up(packed.rows, self.weight("w13"), packed.plan))
        codes, scale = self._codes("w13")
        _, _, h_codes, h_scale = int8_up(packed.rows, packed.scale, codes, scale, packed.plan, packed.dtype,
                                         store_h=False)
        return Hidden(h_codes, h_scale)

    def down(self, packed: Packed, hidden: Hidden) -> torch.Tensor:
        if hidden.scale is None:
            return float_down(hidden.rows, self.weight("w2"), packed.plan)
        codes, scale = self._codes("w2")
        return int8_down(hidden.rows, hidden.scale, codes, scale, packed.plan, packed.dtype)

    def combine(self, packed: Packed, rows: torch.Tensor) -> torch.Tensor:
        return combine(rows, packed.plan, packed.routing)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return shared_expert(x, self.weight("shared_w13"), self.weight("shared_w2"))

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Callable[[], object]]]:
        """(y, {stage: a call re-running that stage alone on the inputs it had here}), stages in forward order."""
        packed = self.pack(x)
        hidden = self.up(packed)
        rows = self.down(packed, hidden)
        y = self.combine(packed, rows)
        stages: dict[str, Callable[[], object]] = {
            "pack": lambda: self.pack(x),
            "up": lambda: self.up(packed),
            "down": lambda: self.down(packed, hidden),
            "combine": lambda: self.combine(packed, rows)}
        if self.weights.shared_w13 is not None:
            y = y + self.shared(x)
            stages["shared"] = lambda: self.shared(x)
        return y, stages

    def _codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A routed projection's forward codes and scales: prepare's, or quantized now (``int8_routed``)."""
        if self.prequantized is not None:
            return getattr(self.prequantized, f"{name}_fwd"), getattr(self.prequantized, f"{name}_scale")
        return expert_codes(self.weight(name))


def bypass_expert_outputs(spec: MoESpec, scheme: Scheme, weights: LayerWeights, x: torch.Tensor,
                          prequantized: Int8Experts | None = None, fake_quant: bool = True) -> torch.Tensor:
    """Every expert on every token, [E, T, H] (GPTQ calibration): the plan of a router that picks all."""
    used = training_weights(weights, scheme, fake_quant)
    tokens = x.shape[0]
    ids = torch.arange(spec.experts, device=x.device).expand(tokens, spec.experts)
    plan = plan_dispatch(ids, None, spec.experts)
    rows = routed_experts(x, used.w13, used.w2, plan, scheme, prequantized)
    return rows[plan.inverse].view(tokens, spec.experts, -1).transpose(0, 1)


def prepare_int8(scheme: Scheme, weights: LayerWeights) -> Int8Experts | None:
    """Prequant: the expert codes, once (both layouts, for the forward and the custom backward)."""
    if scheme.backward == "prequant_vjp":
        return Int8Experts.quantize(weights.w13, weights.w2, with_transposed=True)
    return None


def effective_layer_weights(scheme: Scheme, weights: LayerWeights, prequantized: Int8Experts | None,
                            fake_quant: bool = True) -> LayerWeights:
    """The float values the forward computes with, by parameter."""
    with torch.no_grad():
        used = training_weights(weights, scheme, fake_quant)
        if scheme.routed_weights == "per_expert":
            experts = prequantized or Int8Experts.quantize(weights.w13, weights.w2, with_transposed=False)
            w13, w2 = experts.dequantized(weights.w13.dtype)
            used = replace(used, w13=w13, w2=w2)
        return used
