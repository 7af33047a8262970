"""Group-size sweep of the grouped (block-coordinate) trainer: peak memory and time per step per G.

The MoE8 report measured, on a 9,999-token batch of a 22-layer model, how the group size G of its
grouped trainer trades memory for time (G = 1: 34.5 GB, 213 s; G = 8: 49.5 GB, 45 s; G = 11: 60.0 GB,
37 s) and picked the largest G under a 64 GB machine's budget. `group_size_sweep` is that
measurement as a function: for each G it runs `block_coordinate_descent` passes over the same
int8-expert stack, reads `mx.get_peak_memory` (reset between runs, buffer cache cleared), times the
passes, and returns the rows with the largest G whose peak stays under the target.

Larger G holds more layers' expert gradients at once (memory up) and needs fewer passes over the
tail of the stack (time down). Run as a script to print or write the Markdown table::

    python -m qmoe.implementations.mlx_layerwise.sweep --layers 8 --tokens 128 --hidden 128 --ffn 256 --experts 32 \\
        --top-k 2 --groups 1,2,4,8 --target-mib 128 --out results/mlx_group_sweep.md

This module imports mlx at import time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qmoe.reference.spec import MoEParams, MoESpec

from .experts import AFFINE_GROUP_SIZE
from .layer import LayerWeights
from .training import block_coordinate_descent

MIB = 1 << 20
#: Scales each layer's w2 so its output is a small fraction of its input, as a trained (pre-norm)
#: residual branch is. Unscaled random SwiGLU layers grow the residual stream quadratically; after
#: one step on their huge loss gradient every layer routes all tokens to two experts, and the sweep
#: would then measure a degenerate, almost expert-free stack.
RESIDUAL_BRANCH_SCALE = 0.1


@dataclass(frozen=True)
class SweepRow:
    """One group size: peak bytes over its timed passes and mean seconds per pass (one step)."""

    group_size: int
    peak_memory_bytes: int
    seconds_per_step: float
    fits: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"group_size": self.group_size, "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_mib": round(self.peak_memory_bytes / MIB, 2),
                "seconds_per_step": round(self.seconds_per_step, 4), "fits": self.fits}


@dataclass(frozen=True)
class SweepResult:
    """All rows, the chosen G (largest that fits; None if none does) and what was measured."""

    rows: tuple[SweepRow, ...]
    chosen: int | None
    memory_target_bytes: int
    spec: MoESpec
    layers: int
    tokens: int
    dtype: str
    steps: int
    device: str
    load_average: float | None = None

    def expert_gradient_bytes_per_layer(self) -> int:
        """float32 gradient of one layer's experts when all receive tokens: E (H 2F + F H) * 4 bytes."""
        spec = self.spec
        return spec.experts * 3 * spec.hidden * spec.ffn * 4

    def int8_expert_bytes(self) -> int:
        """The stack's int8 expert codes plus float32 scales and biases (8 bytes per 64 weights)."""
        weights = self.layers * self.spec.experts * 3 * self.spec.hidden * self.spec.ffn
        return weights + weights // AFFINE_GROUP_SIZE * 8


@dataclass
class SweepStack:
    """A residual stack of int8-expert layers on the device, with its input and regression target."""

    spec: MoESpec
    layers: list[LayerWeights]
    x: mx.array
    target: mx.array
    dtype: str


def device_description() -> str:
    """The MLX default device and the host, e.g. ``mlx cpu (x86_64, Linux)``."""
    return f"mlx {mx.default_device()} ({platform.machine()}, {platform.system()})"


def build_stack(spec: MoESpec, n_layers: int, tokens: int, dtype: str = "float32", seed: int = 0) -> SweepStack:
    """Seeded random layers (experts quantized int8_affine_g64), input and target, evaluated on the device."""
    from . import _to_device, layer_weights_on_device

    rng = np.random.default_rng(seed)
    layers = []
    for index in range(n_layers):
        params = MoEParams.random(spec, seed=seed + 1 + index)
        params.w2 = params.w2 * RESIDUAL_BRANCH_SCALE
        layers.append(layer_weights_on_device(spec, params, "int8_affine_g64", dtype))
    x = _to_device(rng.standard_normal((tokens, spec.hidden)), dtype)
    target = _to_device(rng.standard_normal((tokens, spec.hidden)), "float32")
    mx.eval([layer.arrays() for layer in layers], x, target)
    return SweepStack(spec, layers, x, target, dtype)


def _fresh_peak() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def measure_group_size(stack: SweepStack, group_size: int, steps: int = 2, lr: float = 1e-3,
                       warmup: int = 1) -> tuple[int, float]:
    """(peak bytes, seconds per step) of ``steps`` trainer passes with groups of ``group_size``.

    Consumes ``stack``: its layers are trained in place of it (``stack.layers`` is emptied), so one
    copy of the weights is resident, as in a training run. Passes continue from each other's
    weights. ``warmup`` passes run first, outside the peak and the clock.
    """
    layers, stack.layers = stack.layers, []
    for _ in range(warmup):
        layers = block_coordinate_descent(stack.spec, layers, stack.x, stack.target, lr, group_size)
    _fresh_peak()
    start = time.perf_counter()
    for _ in range(steps):
        layers = block_coordinate_descent(stack.spec, layers, stack.x, stack.target, lr, group_size)
    mx.eval([layer.arrays() for layer in layers])
    seconds = (time.perf_counter() - start) / steps
    peak = mx.get_peak_memory()
    del layers
    return int(peak), seconds


def choose_group_size(rows: Sequence[SweepRow]) -> int | None:
    """The largest group size whose peak fits the target; None when none does."""
    fitting = [row.group_size for row in rows if row.fits]
    return max(fitting) if fitting else None


def group_size_sweep(spec: MoESpec, n_layers: int, tokens: int, group_sizes: Sequence[int],
                     memory_target_bytes: int, *, dtype: str = "float32", steps: int = 2, lr: float = 1e-3,
                     seed: int = 0) -> SweepResult:
    """Peak memory and seconds per step of the grouped trainer for each G; picks the largest G under the target.

    Every G trains its own fresh copy of the same seeded stack (`build_stack`). Group sizes above
    ``n_layers`` are clipped to it (they are all one joint step).
    """
    if n_layers < 1 or tokens < 1:
        raise ValueError(f"need at least one layer and one token, got {n_layers} layers, {tokens} tokens")
    sizes = sorted({min(int(g), n_layers) for g in group_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"group sizes must be positive integers, got {list(group_sizes)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for group_size in sizes:
        peak, seconds = measure_group_size(build_stack(spec, n_layers, tokens, dtype, seed), group_size, steps, lr)
        rows.append(SweepRow(group_size, peak, seconds, peak <= memory_target_bytes))
    return SweepResult(tuple(rows), choose_group_size(rows), int(memory_target_bytes), spec, n_layers, tokens, dtype,
                       steps, device_description(), load)


def sweep_markdown(result: SweepResult, command: str) -> str:
    """The sweep as a Markdown report: header (device, command, date, shape) and one row per G."""
    from tabulate import tabulate

    spec = result.spec
    table = tabulate([[row.group_size, f"{row.peak_memory_bytes / MIB:.1f}", f"{row.seconds_per_step:.3f}",
                       "yes" if row.fits else "no"] for row in result.rows],
                     headers=["G (layers/group)", "peak memory (MiB)", "seconds / step", "under target"],
                     tablefmt="github")
    chosen = "none fits" if result.chosen is None else f"G = {result.chosen}"
    return "\n".join([
        "# MLX grouped trainer: group-size sweep",
        "",
        f"- device: {result.device}; mlx {mx.__version__}; python {platform.python_version()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- stack: {result.layers} MoE layers, hidden {spec.hidden}, ffn {spec.ffn}, experts {spec.experts}, "
        f"top-{spec.top_k}, {result.tokens} tokens, {result.dtype}, experts int8_affine_g64 "
        f"(router and the rest float)",
        f"- step: one front-to-back block-coordinate pass (`train_stack`); mean of {result.steps} timed passes "
        "after one warm-up pass; peak = `mx.get_peak_memory()` over the timed passes, reset (and the buffer "
        "cache cleared) before each G",
        f"- memory target: {result.memory_target_bytes / MIB:.0f} MiB -> chosen: **{chosen}** "
        "(the largest G under the target)",
        f"- what grows with G: each layer in a group holds its experts' float32 gradient, "
        f"{result.expert_gradient_bytes_per_layer() / MIB:.1f} MiB per layer here (only experts that received "
        f"tokens get one; here all do); the int8 expert stack itself is "
        f"{result.int8_expert_bytes() / MIB:.1f} MiB",
        f"- host: {os.cpu_count()} CPU cores, load average {result.load_average:.2f} at the start (timings are "
        "wall-clock; a shared machine inflates them, the ratios between rows are the result)"
        if result.load_average is not None else f"- host: {os.cpu_count()} CPU cores",
        "",
        table,
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--groups", default="1,2,4,8", help="comma-separated group sizes")
    parser.add_argument("--target-mib", type=float, default=128.0, help="peak memory target in MiB")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="write the Markdown report here (default: print it)")
    args = parser.parse_args(argv)
    spec = MoESpec(hidden=args.hidden, ffn=args.ffn, experts=args.experts, top_k=args.top_k)
    result = group_size_sweep(spec, args.layers, args.tokens, [int(g) for g in args.groups.split(",")],
                              int(args.target_mib * MIB), dtype=args.dtype, steps=args.steps)
    command = "python -m qmoe.implementations.mlx_layerwise.sweep "
    report = sweep_markdown(result, command + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
