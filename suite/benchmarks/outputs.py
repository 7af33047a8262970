"""The output check of every benchmark: a fast wrong answer is not a result.

After the timed rounds, the output of the last timed call on each distinct input is compared with
the reference on a sample of token rows: ``y`` for the forward pass, ``dx`` for forward+backward
(both are per-token, so a row sample needs the reference on those rows only). What
`Backend.benchmark_step`'s callable returns is backend-specific; the check finds the tensor in it:
an entry named ``y``/``x``/``dx`` wherever it sits, else the first array of shape [T, H] (the
presets keep T apart from every parameter dimension so that is unambiguous; tests/test_benchmarks.py
holds them to it). Arrays of torch, jax, mlx and numpy are read without importing any of them.
A step that returns None, or nothing holding such an array, fails the benchmark: a timing whose
output was never checked is not a result.

A peer whose routing is fixed instead of computed (the GEMM bound, `peers.GemmBound.fixed_expert_ids`)
is checked the same way against the reference with that routing: each token's output (or dx) is the sum
of its experts' outputs (unit gate weights) plus the shared expert, the reference's own SwiGLU expert
(`qmoe.reference.experts`) computing each.

A real model's layer is never held in float64 on the host: `check_layer` builds the reference from
the experts the checked rows use (`BACKWARD_CHECK_BYTES` of float64 at most, at least one row).

The bound (`OUTPUT_CHECK_FLOOR_DB`) is a garbage detector, not conformance (that is `pytest -m
conformance`): SQNR of the output against the reference of the *same scheme* at the reference's
quantization of the float weights. Legitimate differences stay far above it: bfloat16 rounding
(u = 2^-8 per step: ~40 dB), one-code int8 flips at bfloat16 activations (~35 dB), a different but
valid weight grid (MLX affine vs the reference's: within half a step of each weight, above the
scheme's own ~30 dB fidelity). Wrong answers fall far below: a stale output of another input
-3 dB, zeros 0 dB, a lost gate weight or per-expert scale a few dB, a wrong expert ~0 dB on its row.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe import reference
from qmoe.reference.experts import mlp_backward, mlp_forward
from qmoe.reference.schemes import get_scheme
from qmoe.reference.spec import MoEParams, MoESpec

from ..tolerances import BENCHMARK_OUTPUT_FLOOR_DB

#: SQNR floor of a benchmark's output against the same-scheme reference (see the module docstring).
OUTPUT_CHECK_FLOOR_DB = BENCHMARK_OUTPUT_FLOOR_DB
#: Rows compared per input: evenly spaced over the tokens.
DEFAULT_CHECK_ROWS = 32
#: The backward reference allocates every weight's gradient (float64, zeroed): at the logbook's shape
#: 6.4 GB per call. The dx check therefore runs on a sub-layer of the experts the checked rows use,
#: adding rows while that sub-layer stays within this many bytes (at least one row always).
BACKWARD_CHECK_BYTES = 1 << 30
#: Float64 expert weights `ExpertEffective` keeps between checks: a top-2 check of two inputs at the
#: logbook's shape uses ~20 experts of 100 MB, so they are all still there for the next backend.
EFFECTIVE_CACHE_BYTES = 3 * BACKWARD_CHECK_BYTES
_NAMED = {"forward": ("y",), "forward_backward": ("dx", "x")}


class OutputNotFoundError(LookupError):
    """The benchmark step's return value holds no [T, H] array to check."""


class WrongOutputError(AssertionError):
    """A benchmark's timed output disagrees with the reference beyond the garbage floor."""


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (dict, list, tuple))


def _children(value):
    """(name, child) pairs of a container: dict items, sequence items, dataclass fields, attributes."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return [(None, v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if hasattr(value, "__dict__") and not callable(value):
        return list(vars(value).items())
    return []


def array_leaves(result, depth: int = 4) -> list[tuple[str | None, Any]]:
    """(name or None, array) for every array in a step's return value, in order, down to ``depth`` levels of
    containers (dicts, sequences, dataclasses, objects' attributes)."""
    def walk(value, level):
        if _is_array(value):
            yield None, value
            return
        if level > depth:
            return
        for name, child in _children(value):
            if _is_array(child):
                yield name, child
            else:
                yield from walk(child, level + 1)

    return list(walk(result, 0))


def find_output(result, shape: tuple[int, int], names: tuple[str, ...], depth: int = 4):
    """The array called one of ``names`` (any depth), else the first array of ``shape``, else None."""
    leaves = array_leaves(result, depth)
    for name, leaf in leaves:
        if name in names and tuple(leaf.shape) == shape:
            return leaf
    for _, leaf in leaves:
        if tuple(leaf.shape) == shape:
            return leaf
    return None


def to_numpy(array) -> np.ndarray:
    """float64 NumPy copy of a torch / jax / mlx / NumPy array (bfloat16 included)."""
    module = type(array).__module__
    if module.startswith("torch"):
        return array.detach().float().cpu().numpy().astype(np.float64)
    if module.startswith("mlx"):
        import mlx.core as mx

        return np.array(array.astype(mx.float32), dtype=np.float64)
    return np.asarray(array).astype(np.float64)


def take_rows(array, rows: np.ndarray) -> np.ndarray:
    """float64 NumPy copy of ``array[rows]``, selected where the array lives: copying a [T, H] output off the
    device and widening all of it to float64 costs ~0.3 s at the logbook's shape, the checked rows nothing."""
    module = type(array).__module__
    if module.startswith("torch"):
        import torch

        return to_numpy(array[torch.as_tensor(rows, device=array.device)])
    if module.startswith("mlx"):
        import mlx.core as mx

        return to_numpy(array[mx.array(rows)])
    return to_numpy(array[rows])  # jax and NumPy arrays take a NumPy index


def check_rows(tokens: int, count: int) -> np.ndarray:
    """``count`` distinct token indices spread evenly over [0, tokens)."""
    return np.unique(np.linspace(0, tokens - 1, min(count, tokens)).round().astype(np.int64))


@dataclass(frozen=True)
class OutputCheck:
    what: str
    sqnr_db: float
    floor_db: float
    rows: int

    def as_dict(self) -> dict:
        return {"what": self.what, "sqnr_db": round(self.sqnr_db, 2) if np.isfinite(self.sqnr_db) else None,
                "floor_db": self.floor_db, "rows": self.rows}


def sublayer_valid(spec: MoESpec) -> bool:
    """Whether a token's output and dx depend only on the experts it picks (dropless, and gate weights
    that do not see the other experts: renormalized softmax, or sigmoid scores). Then the layer
    restricted to a superset of the picked experts routes, weighs and differentiates those tokens alike:
    their top-k within the subset is their top-k overall, and d gate / d logit of an unpicked expert is 0."""
    return spec.capacity_factor is None and (spec.renormalize or spec.router == "sigmoid_topk")


def sublayer(spec: MoESpec, effective: MoEParams, experts: np.ndarray) -> tuple[MoESpec, MoEParams]:
    """The layer of ``experts`` only (router columns, biases and expert weights selected)."""
    pick = {"router": lambda a: a[:, experts], "router_bias": lambda a: a[experts],
            "w13": lambda a: a[experts], "w2": lambda a: a[experts]}
    params = MoEParams(**{name: pick.get(name, lambda a: a)(value) for name, value in effective.items()})
    return spec.replace(experts=int(experts.size)), params


def backward_rows(spec: MoESpec, effective: MoEParams, x: np.ndarray, rows: np.ndarray,
                  budget_bytes: int = BACKWARD_CHECK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(rows to check, the experts they use): rows in order while their experts' float64 weights fit."""
    if not sublayer_valid(spec):
        return rows, np.arange(spec.experts)
    ids = reference.route(spec, effective, np.asarray(x[rows], dtype=np.float64)).expert_ids
    return rows_within(spec, rows, ids, budget_bytes)


def rows_within(spec: MoESpec, rows: np.ndarray, picked: np.ndarray, budget_bytes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` in order (``picked[i]``: row i's experts) while the float64 weights of the experts they use
    stay within ``budget_bytes``; at least the first row. Returns (kept rows, their experts, sorted)."""
    per_expert = 8 * 3 * spec.hidden * spec.ffn
    kept, used = [], set()
    for row, chosen in zip(rows, picked):
        grown = used | set(int(e) for e in chosen)
        if kept and len(grown) * per_expert > budget_bytes:
            continue
        kept.append(row)
        used = grown
    return np.asarray(kept, dtype=np.int64), np.asarray(sorted(used), dtype=np.int64)


def layer_float64_bytes(spec: MoESpec) -> int:
    """Bytes of the whole layer's weights in float64 (what a full-layer reference would hold)."""
    return 8 * (spec.experts * 3 * spec.hidden * spec.ffn + 3 * spec.hidden * spec.shared_ffn
                + spec.hidden * spec.experts)


@dataclass(frozen=True)
class CheckLayer:
    """What the output check compares against: the rows, and the (sub-)layer's spec and effective weights
    they need, with the fixed routing (if any) renumbered into the sub-layer's experts."""

    rows: np.ndarray
    spec: MoESpec
    effective: MoEParams
    expert_ids: np.ndarray | None = None


class CheckTooLargeError(RuntimeError):
    """The reference check would need the whole layer in float64, and it does not fit."""


class ExpertEffective:
    """One scheme's effective (dequantized, float64) weights per expert of one layer, kept for the checks of
    later cases: quantizing an expert's weights in float64 costs ~0.3 s at the logbook's shape, and every
    backend, top-k, pass and input of a benchmark run checks rows of the same experts again. Each scheme
    quantizes weights per expert (or finer), so an expert's effective weights do not depend on which
    others share its sub-layer; the float router is selected, not quantized. At most ``max_bytes`` of
    experts are kept, the least recently used dropped first. Use one instance per (layer, scheme's weight
    quantization)."""

    def __init__(self, scheme: str, max_bytes: int = EFFECTIVE_CACHE_BYTES) -> None:
        self.scheme = scheme
        self.max_bytes = max_bytes
        self._experts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._shared: dict[str, np.ndarray] | None = None

    def sublayer(self, spec: MoESpec, params: MoEParams, experts: np.ndarray) -> MoEParams:
        """`reference.effective_params` of the layer ``spec``'s ``experts`` (`sublayer` of ``params``); only
        the experts not kept yet are sliced and quantized."""
        missing = [int(e) for e in experts if int(e) not in self._experts]
        if missing or self._shared is None:
            # at least top_k experts (a valid layer), at least one (it brings the shared weights)
            kept = [int(e) for e in experts if int(e) in self._experts][:max(0, spec.top_k - len(missing))]
            part = np.asarray(sorted(missing + kept), dtype=np.int64)
            part_spec, part_params = sublayer(spec, params, part)
            _same_qat_decision(spec, part_spec, self.scheme)
            computed = reference.effective_params(part_spec, part_params, self.scheme)
            for j, e in enumerate(part):
                self._experts[int(e)] = (computed.w13[j], computed.w2[j])
            self._shared = {name: value for name, value in computed.items()
                            if name not in ("router", "router_bias", "w13", "w2")}
        for e in experts:
            self._experts.move_to_end(int(e))
        self._evict(keep=len(experts))
        floats = {"router": np.asarray(params.router[:, experts], dtype=np.float64)}
        if params.router_bias is not None:
            floats["router_bias"] = np.asarray(params.router_bias[experts], dtype=np.float64)
        return MoEParams(w13=np.stack([self._experts[int(e)][0] for e in experts]),
                         w2=np.stack([self._experts[int(e)][1] for e in experts]), **floats, **self._shared)

    def _evict(self, keep: int) -> None:
        per_expert = sum(a.nbytes for a in next(iter(self._experts.values()))) if self._experts else 0
        while len(self._experts) > keep and len(self._experts) * per_expert > self.max_bytes:
            self._experts.popitem(last=False)


def check_layer(spec: MoESpec, params: MoEParams, scheme: str, x: np.ndarray, rows: np.ndarray,
                expert_ids: np.ndarray | None = None, full_effective=None,
                budget_bytes: int = BACKWARD_CHECK_BYTES, cache: ExpertEffective | None = None) -> CheckLayer:
    """The reference layer for checking ``rows``. A layer whose float64 weights fit ``budget_bytes`` is used
    whole (``full_effective()``, a cached `reference.effective_params`, if given). A larger one (a real
    model's: DeepSeek-V3's is ~90 GB in float64) never exists in float64: the checked rows are routed with
    the float router (no scheme quantizes it), kept while their experts fit the budget (at least one row),
    and only those experts are sliced from the float32 parameters and quantized by the reference. Every
    scheme's weight quantization is per expert, per channel, per group or per row, so the slice's effective
    weights are those experts' effective weights; QAT's keep-small-tensors-float rule depends on a tensor's
    size and is checked to decide alike. ``cache``: an `ExpertEffective` of this layer and scheme that
    serves (and keeps) those experts' effective weights."""
    if layer_float64_bytes(spec) <= budget_bytes:
        effective = full_effective() if full_effective is not None else reference.effective_params(spec, params, scheme)
        return CheckLayer(rows, spec, effective, expert_ids)
    if expert_ids is None:
        if not sublayer_valid(spec):
            raise CheckTooLargeError(
                f"the output check needs the whole layer in float64 ({layer_float64_bytes(spec) / 2**30:.0f} GiB > "
                f"{budget_bytes / 2**30:.0f} GiB): its gate weights see every expert (no renormalization)")
        picked = reference.route(spec, params, np.asarray(x[rows], dtype=np.float64)).expert_ids
    else:
        picked = np.asarray(expert_ids)[rows]
    rows, experts = rows_within(spec, rows, picked, budget_bytes)
    sub_spec = spec.replace(experts=int(experts.size))
    _same_qat_decision(spec, sub_spec, scheme)
    if cache is None:
        effective = reference.effective_params(sub_spec, sublayer(spec, params, experts)[1], scheme)
    else:
        effective = cache.sublayer(spec, params, experts)
    renumbered = None if expert_ids is None else np.searchsorted(experts, np.asarray(expert_ids))
    return CheckLayer(rows, sub_spec, effective, renumbered)


def _same_qat_decision(spec: MoESpec, sub_spec: MoESpec, scheme: str) -> None:
    scheme_ = get_scheme(scheme)
    if scheme_.routed_weights != "qat_row":
        return
    limit = scheme_.qat_keep_float_max_numel
    for factor in (1, 2):  # w2 [E, F, H] and w13 [E, H, 2F]
        full = factor * spec.experts * spec.hidden * spec.ffn
        sub = factor * sub_spec.experts * spec.hidden * spec.ffn
        if (full <= limit) != (sub <= limit):
            raise CheckTooLargeError(f"{scheme} keeps tensors of <= {limit} elements float: a sub-layer of "
                                     f"{sub_spec.experts} experts would decide differently from the whole layer")


def expected_rows(spec: MoESpec, effective: MoEParams, scheme: str, pass_: str, x: np.ndarray,
                  dy: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows actually checked, the reference's y (forward) or dx (forward+backward) on them)."""
    if pass_ == "forward":
        x_rows = np.asarray(x[rows], dtype=np.float64)
        return rows, reference.forward(spec, effective, x_rows, scheme, weights_are_effective=True).y
    rows, experts = backward_rows(spec, effective, x, rows)
    if experts.size < spec.experts:
        spec, effective = sublayer(spec, effective, experts)
    x_rows = np.asarray(x[rows], dtype=np.float64)
    dy_rows = np.asarray(dy[rows], dtype=np.float64)
    return rows, reference.backward(spec, effective, x_rows, dy_rows, scheme, weights_are_effective=True)["x"]


def fixed_routing_rows(spec: MoESpec, effective: MoEParams, scheme: str, pass_: str, x: np.ndarray,
                       dy: np.ndarray, rows: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
    """The reference's y (forward) or dx (forward+backward) on ``rows`` when token t goes to the experts
    ``expert_ids[t]`` with unit gate weights (no router): the sum of those experts' outputs, plus the
    shared expert's, each computed by the reference's SwiGLU expert under ``scheme``."""
    scheme_ = get_scheme(scheme)
    x_rows = np.asarray(x[rows], dtype=np.float64)
    dy_rows = np.asarray(dy[rows], dtype=np.float64)
    ids = np.asarray(expert_ids)[rows]
    out = np.zeros_like(x_rows)

    def add(tokens, w13, w2, activations, weights):
        y, cache = mlp_forward(x_rows[tokens], w13, w2, activations)
        if pass_ != "forward":
            rule = "exact" if weights == "float" and activations == "float" else scheme_.backward
            y = mlp_backward(cache, dy_rows[tokens], rule)[0]
        np.add.at(out, tokens, y)

    for e in np.unique(ids):
        tokens = np.nonzero(ids == e)[0]
        add(tokens, effective.w13[e], effective.w2[e], scheme_.routed_activations, scheme_.routed_weights)
    if spec.shared_ffn:
        add(np.arange(rows.size), effective.shared_w13, effective.shared_w2, scheme_.shared_activations,
            scheme_.shared_weights)
    return out


@dataclass(frozen=True)
class Expected:
    """The reference's ``y`` (forward) or ``dx`` (forward+backward) on the token rows ``rows``."""

    rows: np.ndarray
    values: np.ndarray


def expected_output(spec: MoESpec, effective: MoEParams, scheme: str, pass_: str, x: np.ndarray, dy: np.ndarray,
                    rows: np.ndarray, expert_ids: np.ndarray | None = None) -> Expected:
    """What `check_output` compares with. It is the same for every backend run on the same layer, scheme,
    pass, input and routing, so a benchmark session computes it once (`harness.reference_expected`) and
    hands it to `compare_output`."""
    if expert_ids is None:
        rows, values = expected_rows(spec, effective, scheme, pass_, x, dy, rows)
    else:
        values = fixed_routing_rows(spec, effective, scheme, pass_, x, dy, rows, expert_ids)
    return Expected(rows, values)


def check_output(result, spec: MoESpec, effective: MoEParams, scheme: str, pass_: str, x: np.ndarray,
                 dy: np.ndarray, rows: np.ndarray, what: str, floor_db: float = OUTPUT_CHECK_FLOOR_DB,
                 expert_ids: np.ndarray | None = None) -> OutputCheck:
    """Compare the timed call's output on ``rows`` with the reference; raise if below ``floor_db``.
    ``expert_ids`` ([T, k]): the fixed routing of a peer that does not route (see `fixed_routing_rows`)."""
    expected = expected_output(spec, effective, scheme, pass_, x, dy, rows, expert_ids)
    return compare_output(result, expected, (x.shape[0], spec.hidden), scheme, pass_, what, floor_db)


def compare_output(result, expected: Expected, shape: tuple[int, int], scheme: str, pass_: str, what: str,
                   floor_db: float = OUTPUT_CHECK_FLOOR_DB) -> OutputCheck:
    """`check_output` against an `expected_output` computed earlier; ``shape``: [T, H] of the output."""
    target = "y" if pass_ == "forward" else "dx"
    finish = getattr(result, "finish", None)
    if callable(finish):
        result = finish()  # a bound's untimed epilogue (dequantize, sum rows; `int8_bound`)
    if result is None:
        raise OutputNotFoundError(
            f"{what}: benchmark_step's callable returned None, so the timed output cannot be checked and the "
            f"timing is not a result; return {target} (shape {list(shape)}, or a structure holding it under the "
            f"name '{target}')")
    found = find_output(result, shape, _NAMED[pass_])
    if found is None:
        raise OutputNotFoundError(
            f"{what}: benchmark_step's callable returned {type(result).__name__} with no {target} of shape "
            f"{list(shape)}; return {target} (or a structure holding it under the name '{target}') so the "
            "timed output can be checked")
    rows, want = expected.rows, expected.values
    actual = take_rows(found, rows)
    sqnr = reference.sqnr_db(want, actual)
    outcome = OutputCheck(target, float(sqnr), floor_db, int(rows.size))
    if not sqnr >= floor_db:
        worst = int(np.argmax(np.linalg.norm(actual - want, axis=1)))
        raise WrongOutputError(
            f"{what}: the timed {target} is wrong: SQNR {sqnr:.1f} dB < {floor_db:.0f} dB against the reference "
            f"({scheme}) on {rows.size} rows; worst token {int(rows[worst])}: |diff| "
            f"{np.linalg.norm(actual[worst] - want[worst]):.3e} vs |ref| {np.linalg.norm(want[worst]):.3e}")
    return outcome
