"""Benchmark shapes: one source of truth for every preset (``--bench-shape NAME``).

A `BenchShape` is a MoE layer (`qmoe.reference.MoESpec` without ``top_k``) plus a token count and the
top-k values to sweep. Presets:

* ``cpu-small`` (default): small enough that every backend, interpreted Triton included, finishes
  on two CPU cores in minutes.
* ``logbook``: the JAX logbook's shape (seeds/jax-moe-ep-int8-logbook.txt, MOE-I8-003 onwards):
  tokens 32768, hidden 2048, mlp_dim 2048, experts 64, top-k sweep 1,2,4,6,8, shared expert 0 and
  5632 (the logbook's ``--shared-expert-dim``).
* ``logbook-shared0`` / ``logbook-shared5632``: the two halves of ``logbook``.
* ``models``: the MoE layer of real models, each from its published config (URL in ``source``).
  Simplifications are named in ``note``: qmoe's layer is a SwiGLU expert with a softmax-top-k or
  sigmoid-top-k router, so features outside it (DeepSeek-V3's group-limited routing, gpt-oss's
  clamped SwiGLU with biases) are left out; they change neither the matmul shapes nor the FLOPs.
* one preset per model (``mixtral-8x7b``, ...), for running a single real layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmoe.reference.spec import MoESpec

#: Tokens per benchmark call for the real-model layers: one 4096-token training micro-batch,
#: large enough that every expert gets rows at the models' top-k (4096 * k / E >= 16 rows each).
MODEL_TOKENS = 4096


@dataclass(frozen=True)
class BenchShape:
    """One MoE layer at one token count; ``spec(k)`` gives the `MoESpec` for top-k ``k``."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_ks: tuple[int, ...]
    shared_ffn: int = 0
    router: str = "softmax_topk"
    renormalize: bool = True
    routed_scaling: float = 1.0
    source: str = ""
    note: str = ""

    def spec(self, top_k: int) -> MoESpec:
        return MoESpec(hidden=self.hidden, ffn=self.ffn, experts=self.experts, top_k=top_k, router=self.router,
                       renormalize=self.renormalize, routed_scaling=self.routed_scaling, shared_ffn=self.shared_ffn)

    def describe(self) -> dict:
        """The numbers a saved result must match to be compared with another (see plugin's compare)."""
        return {"shape": self.name, "tokens": self.tokens, "hidden": self.hidden, "ffn": self.ffn,
                "experts": self.experts, "shared_ffn": self.shared_ffn, "router": self.router}


# -- cpu-small ------------------------------------------------------------------------------------------
# Hidden/ffn multiples of 64 so the MLX affine-g64 scheme runs; rows multiples of 8 so
# torch._grouped_mm's 16-byte stride rule holds in float32 and bfloat16. Tokens 256 at top-k 4 and 8
# experts give every expert ~128 rows: small, yet not a degenerate one-row-per-expert case.
CPU_SMALL = (
    BenchShape("cpu-small", tokens=256, hidden=128, ffn=128, experts=8, top_ks=(1, 2, 4),
               source="qmoe: a CPU-sized layer (no model)"),
    BenchShape("cpu-small-shared", tokens=256, hidden=128, ffn=128, experts=8, top_ks=(2,), shared_ffn=384,
               source="qmoe: cpu-small with a shared expert (exercises the dense/shared FLOPs)"),
)

_LOGBOOK_SOURCE = ("seeds/jax-moe-ep-int8-logbook.txt (MOE-I8-003..025): --tokens 32768 --hidden 2048 "
                   "--mlp-dim 2048 --experts 64 --topk 1,2,4,6,8 --shared-expert-dim {0,5632}")
LOGBOOK_SHARED0 = BenchShape("logbook-shared0", tokens=32768, hidden=2048, ffn=2048, experts=64,
                             top_ks=(1, 2, 4, 6, 8), source=_LOGBOOK_SOURCE)
LOGBOOK_SHARED5632 = BenchShape("logbook-shared5632", tokens=32768, hidden=2048, ffn=2048, experts=64,
                                top_ks=(1, 2, 4, 6, 8), shared_ffn=5632, source=_LOGBOOK_SOURCE)

# -- real models: the MoE layer of each, from its config.json ----------------------------------------------
MODELS = (
    BenchShape("mixtral-8x7b", tokens=MODEL_TOKENS, hidden=4096, ffn=14336, experts=8, top_ks=(2,),
               source="https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json "
                      "(hidden_size 4096, intermediate_size 14336, num_local_experts 8, num_experts_per_tok 2)",
               note="softmax over the top-2 logits = renormalized softmax top-k"),
    BenchShape("qwen3-30b-a3b", tokens=MODEL_TOKENS, hidden=2048, ffn=768, experts=128, top_ks=(8,),
               source="https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json "
                      "(hidden_size 2048, moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8, "
                      "norm_topk_prob true)"),
    BenchShape("deepseek-v3", tokens=MODEL_TOKENS, hidden=7168, ffn=2048, experts=256, top_ks=(8,),
               shared_ffn=2048, router="sigmoid_topk", routed_scaling=2.5,
               source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json "
                      "(hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 256, num_experts_per_tok 8, "
                      "n_shared_experts 1, scoring_func sigmoid, routed_scaling_factor 2.5, norm_topk_prob true)",
               note="group-limited routing (n_group 8, topk_group 4) not modeled; shared ffn = 1 x 2048"),
    BenchShape("gpt-oss-20b", tokens=MODEL_TOKENS, hidden=2880, ffn=2880, experts=32, top_ks=(4,),
               source="https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json "
                      "(hidden_size 2880, intermediate_size 2880, num_local_experts 32, num_experts_per_tok 4)",
               note="softmax over the top-4 logits; the clamped SwiGLU with biases is modeled as plain SwiGLU"),
    BenchShape("lfm2-8b-a1b", tokens=MODEL_TOKENS, hidden=2048, ffn=1792, experts=32, top_ks=(4,),
               router="sigmoid_topk",
               source="https://huggingface.co/LiquidAI/LFM2-8B-A1B/blob/main/config.json "
                      "(hidden_size 2048, moe_intermediate_size 1792, num_experts 32, num_experts_per_tok 4, "
                      "use_expert_bias true, norm_topk_prob true, routed_scaling_factor 1.0); the MLX report's "
                      "model (seeds/mlx-int8-moe-layerwise-trainer-report.txt, LFM2.5-8B-A1B)",
               note="sigmoid router with a selection bias, normalized top-4 weights"),
)

#: Every preset by name (``--bench-shape``).
PRESETS: dict[str, tuple[BenchShape, ...]] = {
    "cpu-small": CPU_SMALL,
    "logbook": (LOGBOOK_SHARED0, LOGBOOK_SHARED5632),
    "logbook-shared0": (LOGBOOK_SHARED0,),
    "logbook-shared5632": (LOGBOOK_SHARED5632,),
    "models": MODELS,
    **{shape.name: (shape,) for shape in MODELS},
}
DEFAULT_PRESET = "cpu-small"
#: Default ``--bench-max-call-s`` per preset: on CPU, a case whose first call takes longer is skipped with
#: its measured time as the reason (Triton kernels run in the interpreter there: seconds per call, a
#: correctness tool, not a throughput); the run then stays within minutes. GPU presets have no budget.
PRESET_CALL_BUDGET_S: dict[str, float] = {"cpu-small": 1.0}


class UnknownPresetError(KeyError):
    """A ``--bench-shape`` name that is not a preset."""


def preset(name: str) -> tuple[BenchShape, ...]:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown benchmark shape preset {name!r}; presets: {', '.join(PRESETS)}") from None


def all_shapes() -> dict[str, BenchShape]:
    """Every distinct shape of every preset, by shape name."""
    return {shape.name: shape for shapes in PRESETS.values() for shape in shapes}
