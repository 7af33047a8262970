"""Hypothesis strategies and profiles, in one place. Draws are labelled so a failure reads as a case."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from qmoe.reference import MoESpec

from .cases import Case, CaseData, round_to_dtype

PROFILES = {
    # CI: same examples every run, bounded so the whole conformance run stays within minutes.
    "ci": settings(max_examples=12, derandomize=True, deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]),
    # dev: the README's first run; each example is a new layer shape, which JAX compiles afresh (about 2 s
    # an example on a 2-core machine), so fewer than ci, which replays the same ones every run.
    "dev": settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]),
    "thorough": settings(max_examples=300, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]),
}


def register_profiles() -> None:
    for name, profile in PROFILES.items():
        settings.register_profile(name, profile)


# Tile-boundary token counts: kernels that tile by 16/32/64 break at one past a tile.
TOKEN_COUNTS = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65)


@st.composite
def moe_specs(draw, router: str | None = None, multiple: int = 1) -> MoESpec:
    """Small specs, top_k up to experts. Sizes are not multiples of any block, unless the scheme under
    test needs hidden and ffn to be multiples of ``multiple`` (MLX's groups of 64): then one or two of them."""
    experts = draw(st.integers(1, 8), label="experts")
    hidden_sizes, ffn_sizes = ([8, 12, 16, 24, 33], [8, 12, 17, 24]) if multiple <= 1 else \
        ([multiple, 2 * multiple], [multiple, 2 * multiple])
    return MoESpec(
        hidden=draw(st.sampled_from(hidden_sizes), label="hidden"),
        ffn=draw(st.sampled_from(ffn_sizes), label="ffn"),
        experts=experts,
        top_k=draw(st.integers(1, experts), label="top_k"),
        router=router or draw(st.sampled_from(["softmax_topk", "sigmoid_topk"]), label="router"),
        renormalize=draw(st.booleans(), label="renormalize"),
        routed_scaling=draw(st.sampled_from([1.0, 2.5]), label="routed_scaling"),
        shared_ffn=draw(st.sampled_from([0, 0, 8]), label="shared_ffn"),
        capacity_factor=draw(st.sampled_from([None, None, 1.0, 1.5]), label="capacity_factor"),
    )


@st.composite
def case_data(draw, dtype: str, multiple: int = 1) -> CaseData:
    """A generated layer and input: zero rows, outlier rows/features, skewed routing, ragged sizes
    (multiples of ``multiple`` where the scheme needs them)."""
    spec = draw(moe_specs(multiple=multiple), label="spec")
    tokens = draw(st.sampled_from(TOKEN_COUNTS), label="tokens")
    seed = draw(st.integers(0, 2**16), label="seed")
    pattern = draw(st.sampled_from(["balanced", "zipf", "one_expert", "empty_experts", "zero_rows_outliers"]),
                   label="pattern")
    if pattern == "one_expert" or pattern == "empty_experts":
        hot = draw(st.integers(0, spec.experts - 1), label="hot_expert")
    else:
        hot = 0
    empty = (hot,) if pattern == "empty_experts" and spec.experts - 1 >= spec.top_k else ()
    case = Case("generated", spec, tokens, pattern if (pattern != "empty_experts" or empty) else "balanced",
                seed=seed, hot_expert=hot, empty=empty)
    data = case._build(dtype, seed)
    assume(not data.near_ties().any())
    outlier_scale = draw(st.sampled_from([1.0, 1.0, 1e3]), label="outlier_row_scale")
    if outlier_scale != 1.0 and tokens > 1:
        x = data.x.copy()
        x[-1] *= outlier_scale
        data.x = round_to_dtype(x, dtype)
        assume(not data.near_ties().any())
    return data
