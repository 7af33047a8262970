"""Benchmark: the MLX grouped trainer's group-size sweep (peak memory vs seconds per step, per G).

The MoE8 report's measurement (seeds/mlx-int8-moe-layerwise-trainer-report.txt) on a CPU-sized
stack: one benchmark per group size G timing a block-coordinate pass (`train_stack`'s step) with
its peak memory in ``extra_info``, and one that runs `group_size_sweep` and records every row and
the chosen G (the largest under the memory target). Run it explicitly::

    pytest -m benchmark suite/benchmarks/test_mlx_group_sweep.py --benchmark-json=sweep.json

mlx is imported inside the tests: collecting this file needs no framework.
"""

from __future__ import annotations

import pytest

from qmoe.reference import MoESpec

pytestmark = pytest.mark.benchmark

#: A stack that takes a minute or two on a laptop CPU; every expert receives tokens.
SPEC = MoESpec(hidden=128, ffn=256, experts=32, top_k=2)
LAYERS = 8
TOKENS = 128
GROUP_SIZES = (1, 2, 4, 8)
#: The budget the sweep picks under (the report's was a 64 GB machine; this stack's peaks are ~1e2 MiB).
MEMORY_TARGET_BYTES = 128 << 20
LEARNING_RATE = 1e-3


def _common_info(sweep) -> dict:
    import mlx.core as mx

    return {"scheme": "int8_affine_g64", "top_k": SPEC.top_k, "layers": LAYERS, "tokens": TOKENS,
            "shape": {"hidden": SPEC.hidden, "ffn": SPEC.ffn, "experts": SPEC.experts},
            "device": sweep.device_description(), "mlx": mx.__version__,
            "memory_target_bytes": MEMORY_TARGET_BYTES}


@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"group{g}")
def test_grouped_trainer_step(benchmark, group_size):
    """One block-coordinate pass over the stack with groups of ``group_size`` layers, per round."""
    mx = pytest.importorskip("mlx.core")
    from qmoe.implementations.mlx_layerwise import sweep
    from qmoe.implementations.mlx_layerwise.training import block_coordinate_descent

    stack = sweep.build_stack(SPEC, LAYERS, TOKENS)
    state = {"layers": stack.layers}
    stack.layers = []

    def step() -> None:
        state["layers"] = block_coordinate_descent(SPEC, state["layers"], stack.x, stack.target, LEARNING_RATE,
                                                   group_size)
        mx.eval([layer.arrays() for layer in state["layers"]])

    step()  # warm-up, outside the clock and the peak
    sweep._fresh_peak()
    benchmark.pedantic(step, rounds=2, iterations=1)
    peak = mx.get_peak_memory()
    benchmark.extra_info.update(_common_info(sweep), group_size=group_size, peak_memory_bytes=int(peak),
                                peak_memory_mib=round(peak / sweep.MIB, 2),
                                tokens_per_s=round(TOKENS / benchmark.stats.stats.mean, 2))


def test_group_size_sweep(benchmark):
    """The sweep as a user calls it: rows (G, peak, seconds per step) and the largest G under the target."""
    pytest.importorskip("mlx.core")
    from qmoe.implementations.mlx_layerwise import sweep

    result = benchmark.pedantic(
        lambda: sweep.group_size_sweep(SPEC, LAYERS, TOKENS, GROUP_SIZES, MEMORY_TARGET_BYTES, lr=LEARNING_RATE),
        rounds=1, iterations=1)
    benchmark.extra_info.update(_common_info(sweep), rows=[row.as_dict() for row in result.rows],
                                chosen_group_size=result.chosen)
    assert [row.group_size for row in result.rows] == sorted(GROUP_SIZES)
    fitting = [row.group_size for row in result.rows if row.peak_memory_bytes <= MEMORY_TARGET_BYTES]
    assert result.chosen == (max(fitting) if fitting else None)
