"""Named conformance cases: a shape, a router and a routing pattern, built the same way for every backend.

Routing patterns are constructed, not left to a seed: a constant input feature (column 0 = 1) feeds
per-expert logit offsets through row 0 of the router, so "Zipf-skewed", "one hot expert" and
"some experts empty" hold by construction; exact ties come from duplicated router columns.
Token rows get magnitudes spread over ~2 decades, so a per-tensor activation scale (instead of
per-token) loses the small tokens visibly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np

from qmoe.reference import MoEParams, MoESpec, route

from .tolerances import ROUTER_SATURATION, ROUTING_MARGIN

Pattern = Literal["balanced", "zipf", "one_expert", "empty_experts", "ties", "zero_rows_outliers", "exact_ties"]


DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 copy of ``values`` rounded to ``dtype``, so both sides see exactly the same numbers."""
    if dtype == "bfloat16":
        # Through float32, as a bfloat16 tensor made from float32 data would be: nearest, ties to even.
        return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(values, dtype=DTYPES[dtype]).astype(np.float64)


@dataclass(frozen=True)
class Case:
    """One named conformance case; ``build(dtype)`` gives the inputs both sides use."""

    name: str
    spec: MoESpec
    tokens: int
    pattern: Pattern = "balanced"
    seed: int = 0
    hot_expert: int = 2
    empty: tuple[int, ...] = field(default=())

    def build(self, dtype: str) -> CaseData:
        """Inputs rounded to ``dtype``; the first of a fixed sequence of seeds without near-ties."""
        for attempt in range(100):
            data = self._build(dtype, self.seed * 1000 + attempt)
            if not data.near_ties().any():
                return data
        raise AssertionError(f"case {self.name}: no seed without routing near-ties in 100 tries")

    def _build(self, dtype: str, seed: int) -> CaseData:
        rng = np.random.default_rng(seed)
        spec = self.spec
        params = MoEParams.random(spec, seed=seed)
        # One hot expert must win for every token without saturating the softmax (a saturated router has
        # a gradient of pure rounding noise, which nothing can be compared against): small rows there.
        low, high = (-1.5, -0.5) if self.pattern == "one_expert" else (-2.3, 2.3)
        x = rng.standard_normal((self.tokens, spec.hidden)) * np.exp(rng.uniform(low, high, (self.tokens, 1)))
        x[:, 0] = 1.0
        params.router[0, :] = self._logit_offsets()
        if self.pattern == "ties":
            for low in range(0, spec.experts - 1, 2):
                params.router[:, low + 1] = params.router[:, low]
            if params.router_bias is not None:
                params.router_bias[1::2] = params.router_bias[0:-1:2][: len(params.router_bias[1::2])]
        if self.pattern == "zero_rows_outliers":
            x[0] = 0.0
            x[min(5, self.tokens - 1)] = 0.0
            if self.tokens > 2:
                x[1] *= 1e3
                x[2, -1] *= 50.0
        if self.pattern == "exact_ties":
            x, params = _exact_ties(rng, x, params)
        params = params.map(lambda a: round_to_dtype(a, dtype))
        if params.router is not None:
            params.router = round_to_dtype(params.router, "float32")
        x = round_to_dtype(x, dtype)
        dy = round_to_dtype(rng.standard_normal(x.shape), dtype)
        return CaseData(self, dtype, params, x, dy)

    def _logit_offsets(self) -> np.ndarray:
        e = self.spec.experts
        rng = np.random.default_rng(self.seed + 1)
        base = rng.standard_normal(e) * 0.3
        if self.pattern == "zipf":
            return 2.0 * np.log(1.0 / np.arange(1, e + 1) ** 1.2)
        if self.pattern == "one_expert":
            base[self.hot_expert] += 5.0  # with rows of rms <= 0.6, every token picks it
        if self.pattern == "empty_experts":
            base[list(self.empty)] -= 30.0
        if self.pattern == "ties":
            base[1::2] = base[0:-1:2][: len(base[1::2])]
        return base

    @property
    def id(self) -> str:
        return f"top{self.spec.top_k}-{self.name}"


@dataclass
class CaseData:
    """A case's inputs in float64, exactly representable in ``dtype`` (the router in float32)."""

    case: Case
    dtype: str
    params: MoEParams
    x: np.ndarray
    dy: np.ndarray

    @property
    def spec(self) -> MoESpec:
        return self.case.spec

    def near_ties(self) -> np.ndarray:
        """[T, k] True where a float32 router could resolve the selection either way."""
        gaps = routing_gaps(self.spec, self.params, self.x)
        return (gaps > 0) & (gaps < ROUTING_MARGIN)


def routing_gaps(spec: MoESpec, params: MoEParams, x: np.ndarray) -> np.ndarray:
    """[T, k] relative gap between each selected score and its nearest competitor (inf when top_k = experts).

    Competitors are the best unselected score and the neighbouring selected ones (their order matters
    too). Gaps are relative to the larger of the two scores, because a float32 router's error in a
    softmax probability is relative. A gap of exactly 0 is a true tie (the lower index must win).
    """
    routing = route(spec, params, x)
    selection = routing.selection
    selected = np.take_along_axis(selection, routing.expert_ids, axis=-1)

    if spec.router == "softmax_topk":
        # Logits: float32 error scales with sum_i |x_i r_i|, not with the logit (which may be ~0).
        row_scale = (np.abs(x) @ np.abs(params.router)).max(axis=-1, keepdims=True)

        def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.abs(a - b) / np.maximum(row_scale, np.finfo(np.float64).tiny)
    else:
        def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), np.finfo(np.float64).tiny)
            return np.abs(a - b) / scale

    gaps = np.full(selected.shape, np.inf)
    if spec.top_k < spec.experts:
        masked = selection.copy()
        np.put_along_axis(masked, routing.expert_ids, -np.inf, axis=-1)
        gaps = relative(selected, masked.max(axis=-1, keepdims=True))
    within = relative(selected[:, 1:], selected[:, :-1])
    gaps[:, 1:] = np.minimum(gaps[:, 1:], within)
    gaps[:, :-1] = np.minimum(gaps[:, :-1], within)
    return gaps


#: Exact-tie grids (pattern ``exact_ties``): codes ~ N(0, TIE_CODE_SPREAD), a share TIE_FRACTION of them
#: moved onto .5, token rows with amax 127 * 2^k for k in TIE_TOKEN_EXPONENTS, expert matrices 127 * 2^j for
#: j in TIE_WEIGHT_EXPONENTS (rms of rows ~0.6-10 and of weights ~1 / sqrt(fan_in), as in the other cases).
#: Every tie is a full half code of quantization error: with these figures the reference's SQNR against
#: float (y 35.0, dx 35.9, router 33.8, weights 32.7 dB under int8_routed) stays above the other cases'
#: worst, so the fidelity floors are unchanged by this case.
TIE_CODE_SPREAD = 40.0
TIE_FRACTION = 0.35
TIE_TOKEN_EXPONENTS = (-6, -5, -4, -3, -2)
TIE_WEIGHT_EXPONENTS = (-9, -8, -7)


def tie_grid(rng: np.random.Generator, shape: tuple[int, ...], exponent: int) -> np.ndarray:
    """Values on a power-of-two int8 grid with many exact .5 ties, amax exactly 127 * 2^exponent.

    Codes are rounded normals (|c| <= 126); a share TIE_FRACTION of them moves by 0.5 away from zero, so
    that v / 2^exponent is an exact half-integer (0.5, 2.5, -4.5, ...: round half to even and half away
    from zero disagree on half of those); one element is +-127, so a symmetric int8 scale over the whole
    array is exactly 2^exponent. Every value has at most 8 significant bits: exact in bfloat16.
    """
    codes = np.clip(np.rint(rng.standard_normal(shape) * TIE_CODE_SPREAD), -126, 126)
    half = rng.random(shape) < TIE_FRACTION
    codes = codes + np.where(half, np.where(codes < 0, -0.5, 0.5), 0.0)
    flat = codes.reshape(-1)
    flat[rng.integers(flat.size)] = 127.0 * rng.choice([-1.0, 1.0])
    return flat.reshape(shape) * 2.0**exponent


def _exact_ties(rng: np.random.Generator, x: np.ndarray, params: MoEParams) -> tuple[np.ndarray, MoEParams]:
    """Pattern ``exact_ties``: every token row (but its constant feature 1 in column 0, itself the
    code 2^-k on the row's grid) and every routed expert matrix on a power-of-two grid (`tie_grid`), so
    that per-token activation scales and per-expert weight scales are exact powers of two and their
    quantizers meet exact .5 ties. The router stays random float (no routing ties)."""
    x = x.copy()
    for t in range(x.shape[0]):
        x[t, 1:] = tie_grid(rng, x[t, 1:].shape, int(rng.choice(TIE_TOKEN_EXPONENTS)))
    w13 = np.stack([tie_grid(rng, w.shape, int(rng.choice(TIE_WEIGHT_EXPONENTS))) for w in params.w13])
    w2 = np.stack([tie_grid(rng, w.shape, int(rng.choice(TIE_WEIGHT_EXPONENTS))) for w in params.w2])
    return x, params.replace(w13=w13, w2=w2)


def _spec(hidden=32, ffn=16, experts=4, top_k=2, **options) -> MoESpec:
    return MoESpec(hidden=hidden, ffn=ffn, experts=experts, top_k=top_k, **options)


#: Weight of the balance loss in the objective levels 4 and 6 differentiate, sum(y * dy) + c * balance_loss:
#: non-zero so that its gradient is checked too.
BALANCE_COEFF = 0.05

#: The fixed cases, by name. T values sit on tile boundaries (1, 31, 33, 63, 65).
CASES: dict[str, Case] = {c.name: c for c in (
    Case("balanced", _spec(), tokens=33),
    Case("zipf_skew", _spec(experts=8), tokens=65, pattern="zipf"),
    Case("one_expert", _spec(top_k=1), tokens=31, pattern="one_expert"),
    Case("all_on_one_top2", _spec(), tokens=33, pattern="one_expert", seed=3),
    Case("empty_experts", _spec(experts=8), tokens=33, pattern="empty_experts", empty=(1, 5, 6)),
    Case("ties", _spec(experts=4), tokens=31, pattern="ties"),
    Case("capacity_drop", _spec(experts=8, capacity_factor=1.0), tokens=63, pattern="zipf"),
    Case("no_renorm", _spec(renormalize=False), tokens=33, seed=4),
    Case("sigmoid", _spec(experts=8, router="sigmoid_topk", routed_scaling=2.5), tokens=33, seed=5),
    Case("shared_expert", _spec(shared_ffn=24), tokens=33, seed=6),
    Case("one_token", _spec(), tokens=1, seed=7),
    Case("topk_all", _spec(top_k=4), tokens=31, seed=8),
    Case("zero_rows_outliers", _spec(), tokens=33, pattern="zero_rows_outliers", seed=9),
    Case("wide_g64", _spec(hidden=128, ffn=128, experts=4, shared_ffn=64), tokens=31, seed=10),
    # Activations and routed expert weights on power-of-two int8 grids with exact .5 ties: a quantizer
    # that rounds half away from zero gets other codes (in x, in the weights, in float32 and bfloat16).
    Case("exact_ties", _spec(), tokens=33, pattern="exact_ties", seed=11),
    # A shared expert that is not gate-weighted: with renormalize=False the gates do not sum to 1, so
    # adding the shared output inside the gated sum (sum_k g_k (expert_k + shared)) differs visibly.
    Case("shared_no_renorm", _spec(shared_ffn=24, renormalize=False), tokens=33, seed=12),
    # The same with the DeepSeek-V3 sigmoid router (gates sum to routed_scaling = 2.5).
    Case("shared_sigmoid", _spec(experts=8, router="sigmoid_topk", routed_scaling=2.5, shared_ffn=24),
         tokens=33, seed=13),
)}


def router_margin(spec: MoESpec, params: MoEParams, x: np.ndarray) -> float:
    """The smallest distance of a selected router score (softmax p or sigmoid s) from 0 or 1 (1.0 if E = 1
    under softmax, where p is identically 1).

    A float32 router computes p (1 - p) (or s (1 - s)), which every router gradient carries, with
    absolute error ~u: relative error ~u / margin.
    """
    if spec.experts == 1 and spec.router == "softmax_topk":
        return 1.0
    routing = route(spec, params, x)
    selected = np.take_along_axis(routing.scores, routing.expert_ids, axis=-1)
    return float(np.minimum(selected, 1.0 - selected).min())


def router_saturated(spec: MoESpec, params: MoEParams, x: np.ndarray, threshold: float = ROUTER_SATURATION) -> bool:
    """True if some selected router score is within ``threshold`` of 0 or 1: the router gradient there
    is rounding noise (relative error u / threshold and beyond; see `router_margin`)."""
    return router_margin(spec, params, x) < threshold
