"""Expert parallelism for torch_triton through torch.distributed: experts split over the ranks, token
rows sent to their experts' rank and back with ``all_to_all_single`` (NCCL on GPUs, gloo on CPU).

Every rank holds the router and the shared expert whole and experts ``begin .. end`` of
``E_l = ceil(E / N)`` (the last ranks may hold fewer, or none). Every rank is handed the same global
batch and owns tokens ``r * T_l .. (r + 1) * T_l`` of it (``T_l = ceil(T / N)``; a rank may own none).
Per rank:

1. route its tokens (float32, as on one device); capacity is applied in *global* (token, slot) order:
   the per-expert counts of the ranks before it (one ``all_gather`` of E counts) offset its positions;
   the balance loss is a sum over tokens, so each rank adds its tokens' share with the global counts;
2. dispatch: kept assignments sorted by destination rank (stable, so token order is kept), counts
   exchanged (``all_to_all_single`` of N integers, read on the host for the split sizes), then the rows
   and their local expert ids. ``dispatch="int8"`` sends each row as int8 codes with its float32 scale
   (per-token symmetric int8, the scheme's own quantizer; H + 4 bytes instead of H x the float width) and
   dequantizes on arrival, the backward sending float gradients (straight-through);
3. experts: the received rows, sorted by local expert (stable: the sources are in rank order, so the
   rows of an expert are in global token order, as on one device), through the same grouped GEMMs;
4. combine: the rows go back by the reverse ``all_to_all_single`` and are mixed with the gate weights at
   their source, where the gates live; the shared expert runs on the rank's own tokens.

The two row exchanges are autograd functions whose backward is the reverse exchange, so every rank's
backward runs the same collectives in the same order (a rank with no token or no row still takes part:
its empty tensors stay in the graph). Router and shared-expert gradients are summed over the ranks
(``all_reduce``), x's and the experts' are gathered, so `TorchTritonBackend.forward` / ``backward`` return
the whole layer's values on every rank: they are collective calls.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from qmoe.reference.schemes import Scheme
from qmoe.reference.spec import MoESpec, SpecError

from . import layer
from .kernels.quant import dequantize_rows, quantize_rows

#: Seconds a collective may wait for the other ranks before it raises (a rank that failed must not hang
#: the others for torch's default 10 to 30 minutes).
COLLECTIVE_TIMEOUT_S = 120.0
DISPATCHES = ("float", "int8")
EXPERT_WEIGHTS = ("w13", "w2")


def join(rank: int, world_size: int, init_method: str, device: str | None) -> None:
    """Join (or check) the default process group: NCCL for CUDA (rank r on GPU r mod count), gloo on CPU."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"a process group is already initialized as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not {rank} of {world_size}")
        return
    cuda = device in ("cuda", "gpu")
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


@dataclass
class ExpertShard:
    """This rank's share of the layer: experts ``begin .. end`` (``per_rank`` = ceil(E / N) each) and
    ``expert_scheme``, the scheme the local expert slices are fake-quantized under (QAT decides "float or
    quantized" by the size of the *whole* tensor, not of a slice)."""

    rank: int
    size: int
    experts: int
    per_rank: int
    begin: int
    end: int
    expert_scheme: Scheme
    dispatch: str = "float"
    group: Any = None

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        return torch.div(expert_ids, self.per_rank, rounding_mode="floor")

    def sendable(self, kept: torch.Tensor | None, assignments: int, device: torch.device) -> torch.Tensor:
        """The assignments this rank sends out (all but the capacity-dropped ones)."""
        return torch.ones(assignments, dtype=torch.bool, device=device) if kept is None else kept.reshape(-1)

    def tokens(self, total: int) -> tuple[int, int, int]:
        """(begin, end, per rank) of this rank's token rows in a global batch of ``total``."""
        per = -(-total // self.size)
        begin = min(self.rank * per, total)
        return begin, min(begin + per, total), per


def make_shard(spec: MoESpec, scheme: Scheme, ep_size: int, dispatch: str) -> ExpertShard:
    if dispatch not in DISPATCHES:
        raise SpecError(f"expert-parallel dispatch {dispatch!r}: choose one of {', '.join(DISPATCHES)}")
    if not (dist.is_available() and dist.is_initialized()):
        raise SpecError(f"expert parallel size {ep_size} needs torch.distributed initialized with {ep_size} ranks: "
                        "run under torchrun (one process per device) or join a group with "
                        "TorchTritonBackend.join_expert_parallel; qmoe's level 6 launches such processes itself")
    if dist.get_world_size() != ep_size:
        raise SpecError(f"expert parallel size {ep_size}, but the process group has {dist.get_world_size()} ranks")
    rank = dist.get_rank()
    per_rank = -(-spec.experts // ep_size)
    begin = min(rank * per_rank, spec.experts)
    whole = spec.experts * spec.hidden * 2 * spec.ffn  # w13; w2 has half of it: QAT keeps both float or not alike
    quantized_whole = whole > scheme.qat_keep_float_max_numel
    expert_scheme = dataclasses.replace(scheme, qat_keep_float_max_numel=0 if quantized_whole else sys.maxsize)
    if (spec.experts * spec.ffn * spec.hidden > scheme.qat_keep_float_max_numel) != quantized_whole:
        raise SpecError("w13 and w2 fall on different sides of the QAT float threshold; not offered in expert parallel")
    return ExpertShard(rank, ep_size, spec.experts, per_rank, begin, min(begin + per_rank, spec.experts),
                       expert_scheme, dispatch)


# -- collectives ----------------------------------------------------------------------------------------------
def exchange(values: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """Rows ``send_counts[j]`` of block j go to rank j; block i of the result came from rank i."""
    out = values.new_empty((sum(recv_counts), *values.shape[1:]))
    dist.all_to_all_single(out, values.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return out


class _Exchange(torch.autograd.Function):
    """`exchange` with the reverse exchange as its backward."""

    @staticmethod
    def forward(ctx, values, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return exchange(values, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return exchange(grad, recv_counts, send_counts, ctx.group), None, None, None


def pack_int8_rows(rows: torch.Tensor) -> torch.Tensor:
    """[R, H] float -> [R, H + 4] int8: per-token symmetric codes, then the float32 scale's four bytes."""
    codes, scale = quantize_rows(rows.contiguous())
    return torch.cat([codes, scale.to(torch.float32).contiguous().view(torch.int8).view(-1, 4)], dim=1)


def unpack_int8_rows(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes, scale = packed[:, :-4], packed[:, -4:].contiguous().view(torch.float32).view(-1)
    return dequantize_rows(codes, scale, dtype)


class _Int8Dispatch(torch.autograd.Function):
    """Rows sent as int8 codes + scale and dequantized on arrival; backward: float gradients sent back
    (straight-through: the dispatch quantizer is the identity for the gradient)."""

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return unpack_int8_rows(exchange(pack_int8_rows(rows), send_counts, recv_counts, group), rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return exchange(grad, recv_counts, send_counts, ctx.group), None, None, None


def gather_rows(values: torch.Tensor, per: int, total: int, group=None) -> torch.Tensor:
    """Each rank's ``values`` (up to ``per`` rows) concatenated in rank order, first ``total`` rows."""
    size = dist.get_world_size(group)
    padded = values.new_zeros((per, *values.shape[1:]))
    padded[: values.shape[0]] = values
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts)[:total]


# -- stage records (benchmarks) -------------------------------------------------------------------------------
@dataclass
class StageRecorder:
    """Marks the end of each stage of one rank's step: CUDA events on a GPU (read after the step, so
    recording costs no synchronisation), ``perf_counter`` on CPU (gloo's collectives return when done).
    ``sent_bytes``: bytes this rank handed to each exchange, split into those to other ranks and to itself."""

    cuda: bool
    marks: list = field(default_factory=list)
    sent_bytes: dict = field(default_factory=dict)

    def start(self) -> None:
        self.marks.clear()
        self.sent_bytes.clear()
        self.mark("start")

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def add_bytes(self, what: str, per_destination: list[int], element_bytes: int, rank: int) -> None:
        off_rank = sum(n for j, n in enumerate(per_destination) if j != rank) * element_bytes
        total = sum(per_destination) * element_bytes
        before = self.sent_bytes.get(what, (0, 0))
        self.sent_bytes[what] = (before[0] + off_rank, before[1] + total)

    def seconds(self) -> dict[str, float]:
        """Seconds per stage (after the step: synchronizes on the last CUDA event)."""
        out: dict[str, float] = {}
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + seconds
        return out


class _NoRecorder:
    def mark(self, name: str) -> None:
        pass

    def add_bytes(self, *args) -> None:
        pass


# -- the layer on one rank ------------------------------------------------------------------------------------
@dataclass
class RankOutput:
    y: torch.Tensor                 # [T_l, H] this rank's tokens
    expert_ids: torch.Tensor        # [T_l, k]
    gate_weights: torch.Tensor      # [T_l, k]
    balance_share: torch.Tensor     # this rank's tokens' part of the balance loss (differentiable)


def _used_weights(shard: ExpertShard, scheme: Scheme, weights: layer.LayerWeights, fake_quant: bool):
    def used(name: str, w: torch.Tensor) -> torch.Tensor:
        rule = scheme.weight_quant(name)
        return layer.training_weight(w, rule, shard.expert_scheme if name in EXPERT_WEIGHTS else scheme, fake_quant)

    return weights.map(used)


def rank_forward(shard: ExpertShard, spec: MoESpec, scheme: Scheme, weights: layer.LayerWeights, x: torch.Tensor,
                 total_tokens: int, prequantized: layer.Int8Experts | None, fake_quant: bool,
                 recorder: Any = None) -> RankOutput:
    """This rank's tokens ``x`` [T_l, H] through the layer (collective: every rank calls it)."""
    rec = recorder or _NoRecorder()
    group, n, top_k, hidden = shard.group, shard.size, spec.top_k, spec.hidden
    used = _used_weights(shard, scheme, weights, fake_quant)
    routing = layer.route(spec, used.router, used.router_bias, x)
    ids = routing.expert_ids
    flat = ids.reshape(-1)
    counts = layer.counts_per_expert(flat, spec.experts)
    parts = [torch.empty_like(counts) for _ in range(n)]
    dist.all_gather(parts, counts, group=group)
    every = torch.stack(parts)  # [N, E] assignments per expert from each rank
    capacity = spec.capacity(total_tokens)
    kept = None
    if capacity is not None:  # global (token, slot) order: the ranks before this one come first
        before = every[: shard.rank].sum(dim=0)
        position = torch.cumsum(torch.nn.functional.one_hot(flat, spec.experts), dim=0).gather(1, flat[:, None])[:, 0]
        kept = ((position - 1 + before[flat]) < capacity).reshape(ids.shape)
    share = every.sum(dim=0).to(torch.float32) / (total_tokens * top_k)
    balance_share = spec.experts * torch.sum(share * routing.balance_probs.sum(dim=0)) / total_tokens
    rec.mark("route")

    # dispatch: kept assignments by destination rank, token order within each
    owner = shard.owner(flat)
    key = torch.where(shard.sendable(kept, flat.numel(), flat.device), owner, n)
    order = torch.argsort(key, stable=True)
    send_counts_t = layer.counts_per_expert(key, n + 1)[:n]
    recv_counts_t = exchange(send_counts_t, [1] * n, [1] * n, group)
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()  # host split sizes
    sent = sum(send_counts)
    chosen = order[:sent]
    local_expert = exchange((flat - owner * shard.per_rank)[chosen], send_counts, recv_counts, group)
    rows = x[torch.div(chosen, top_k, rounding_mode="floor")]
    if shard.dispatch == "int8":
        received = _Int8Dispatch.apply(rows, send_counts, recv_counts, group)
        rec.add_bytes("dispatch_rows", send_counts, hidden + 4, shard.rank)
    else:
        received = _Exchange.apply(rows, send_counts, recv_counts, group)
        rec.add_bytes("dispatch_rows", send_counts, hidden * x.element_size(), shard.rank)
    rec.add_bytes("dispatch_meta", send_counts, local_expert.element_size(), shard.rank)
    rec.add_bytes("dispatch_meta", [1] * n, send_counts_t.element_size(), shard.rank)
    rec.mark("dispatch")

    local_experts = shard.end - shard.begin
    if received.shape[0] == 0 or local_experts == 0:
        out_rows = received * 0  # no row here: the empty result stays in the graph (the backward exchange)
    else:
        plan = layer.plan_dispatch(local_expert[:, None], None, local_experts)
        out_rows = layer.routed_experts(received, used.w13, used.w2, plan, scheme, prequantized)[plan.inverse]
    rec.mark("experts")

    returned = _Exchange.apply(out_rows, recv_counts, send_counts, group)
    rec.add_bytes("combine_rows", recv_counts, hidden * out_rows.element_size(), shard.rank)
    assignments = flat.numel()
    padded = torch.cat([returned, returned.new_zeros((assignments - sent, hidden))])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(assignments, device=order.device)
    y = layer.combine_weighted(padded, routing.gate_weights, inverse, kept)
    rec.mark("combine")
    if used.shared_w13 is not None:
        y = y + layer.shared_expert(x, used.shared_w13, used.shared_w2)
        rec.mark("shared")
    return RankOutput(y, ids, routing.gate_weights, balance_share)


# -- whole-layer calls (every rank passes the same global batch and gets the whole result) -------------------
def sharded_forward(prepared: Any, x: torch.Tensor, fake_quant: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, float]:
    shard: ExpertShard = prepared.shard
    begin, end, per = shard.tokens(x.shape[0])
    with torch.no_grad():
        out = rank_forward(shard, prepared.spec, prepared.scheme, prepared.weights, x[begin:end], x.shape[0],
                           prepared.int8_experts, fake_quant)
        balance = out.balance_share.detach().clone()
        dist.all_reduce(balance, group=shard.group)
        total = x.shape[0]
        return (gather_rows(out.y, per, total, shard.group), gather_rows(out.expert_ids, per, total, shard.group),
                gather_rows(out.gate_weights, per, total, shard.group), float(balance))


def sharded_gradients(prepared: Any, x: torch.Tensor, dy: torch.Tensor, balance_coeff: float,
                      trainable: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Gradients of sum(y * dy) + c * balance_loss over the whole batch, on every rank."""
    shard: ExpertShard = prepared.shard
    begin, end, per = shard.tokens(x.shape[0])
    leaves = prepared.weights.map(lambda name, w: w.detach().clone().requires_grad_(name in trainable))
    x_local = x[begin:end].detach().clone().requires_grad_()
    names = ["x"] + [name for name in trainable if getattr(leaves, name) is not None]
    wanted = [x_local] + [getattr(leaves, name) for name in names[1:]]
    with torch.enable_grad():
        out = rank_forward(shard, prepared.spec, prepared.scheme, leaves, x_local, x.shape[0], prepared.int8_experts,
                           prepared.fake_quant)
        loss = torch.sum(out.y.to(torch.float32) * dy[begin:end].to(torch.float32)) + balance_coeff * out.balance_share
        found = torch.autograd.grad(loss, wanted, allow_unused=True)
    grads = {}
    for name, g, like in zip(names, found, wanted):
        g = torch.zeros_like(like) if g is None else g
        if name == "x":
            g = gather_rows(g, per, x.shape[0], shard.group)
        elif name in EXPERT_WEIGHTS:
            g = gather_rows(g, shard.per_rank, shard.experts, shard.group)
        else:  # replicated: each rank holds its tokens' part
            dist.all_reduce(g, group=shard.group)
        grads[name] = g
    return grads


def local_step(prepared: Any, x: torch.Tensor, pass_: str, dy: torch.Tensor | None, trainable: tuple[str, ...],
               synchronize, recorder: Any = None):
    """A zero-argument step running this rank's tokens of the global batch ``x`` forward (or forward +
    backward), returning after the device finished; ``recorder`` (a `StageRecorder`) marks its stages."""
    shard: ExpertShard = prepared.shard
    begin, end, _ = shard.tokens(x.shape[0])
    x_local = x[begin:end].detach()
    leaves = prepared.weights.map(lambda name, w: w.detach().requires_grad_(name in trainable))
    wanted = [x_local.requires_grad_()] + [getattr(leaves, n) for n in trainable if getattr(leaves, n) is not None]
    dy_local = None if dy is None else dy[begin:end].to(x.dtype)

    def run(weights, inputs) -> RankOutput:
        if recorder is not None:
            recorder.start()
        return rank_forward(shard, prepared.spec, prepared.scheme, weights, inputs, x.shape[0], prepared.int8_experts,
                            prepared.fake_quant, recorder)

    def forward_step():
        with torch.no_grad():
            y = run(prepared.weights, x_local).y
        synchronize()
        return y

    def backward_step():
        with torch.enable_grad():
            y = run(leaves, wanted[0]).y
            grads = torch.autograd.grad(y, wanted, grad_outputs=dy_local, allow_unused=True)
        if recorder is not None:
            recorder.mark("backward")
        synchronize()
        return grads

    if pass_ == "forward":
        return forward_step
    if dy_local is None:
        raise SpecError("a forward + backward step needs dy")
    return backward_step


def local_expert_weights(spec: MoESpec, shard: ExpertShard, values: dict) -> dict:
    """The rank's slices of the expert arrays (NumPy or torch), the rest whole."""
    return {name: (value[shard.begin:shard.end] if name in EXPERT_WEIGHTS else value) for name, value in values.items()}


def gather_experts(shard: ExpertShard, value: torch.Tensor) -> torch.Tensor:
    return gather_rows(value, shard.per_rank, shard.experts, shard.group)
