"""Throughput of the `jax_prequant` backend per scheme, side by side with `torch._grouped_mm`.

    python scripts/bench_jax_gpu.py                       # the seed shape on the default JAX device
    python scripts/bench_jax_gpu.py --tokens 256 --hidden 64 --ffn 64 --experts 8 --dtype float32

FLOPs are counted as the JAX logbook does: routed forward = 2*T*k*H*2F + 2*T*k*F*H (+ the shared
expert 2*T*H*2S + 2*T*S*H), forward+backward = 3x forward. Times are medians of ``--iters`` timed
calls after ``--warmup`` calls; every timed call returns only after the device finished
(``block_until_ready`` / ``torch.cuda.synchronize``). The torch peer runs the same routing (softmax
top-k, renormalized), argsort pack, ``torch._grouped_mm`` for both projections and an index_add
combine, in bfloat16 (float32 where asked and the device is a CPU).

Order per top_k: the torch peer, then the JAX schemes (forward, forward+backward each); the
``ragged_dot`` formulation peer (``--ragged-peer``) and the raw GEMM probe (``--gemm-probe``) run last.
Inputs and weights are device-resident before any timed call; no timed call copies to or from the host.

Prints one table (Markdown) at the end and, with ``--out``, writes it plus the raw rows (JSON lines).
``--budget-s`` stops starting new measurements once that much wall time has passed, so a device run
always ends with a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmoe.reference import MoEParams, MoESpec  # noqa: E402

SCHEMES = ("none", "int8_dense", "int8_routed", "int8_all", "int8_routed_prequant")
PASSES = ("forward", "forward_backward")


def layer_flops(spec: MoESpec, tokens: int, pass_: str) -> float:
    """The logbook's count: routed 2*T*k*H*2F + 2*T*k*F*H, shared 2*T*H*2S + 2*T*S*H; x3 with backward."""
    t, k, h, f, s = tokens, spec.top_k, spec.hidden, spec.ffn, spec.shared_ffn
    forward = 2 * t * k * h * 2 * f + 2 * t * k * f * h + 2 * t * h * 2 * s + 2 * t * s * h
    return forward * (3 if pass_ == "forward_backward" else 1)


def random_layer(spec: MoESpec, tokens: int, seed: int = 0) -> tuple[MoEParams, np.ndarray, np.ndarray]:
    """float32 weights with 1/sqrt(fan_in) scale (routing close to uniform, as the logbook's
    ``--distribution random``), x and dy standard normal."""
    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in)))

    h, f, e, s = spec.hidden, spec.ffn, spec.experts, spec.shared_ffn
    params = MoEParams(router=normal((h, e), h), w13=normal((e, h, 2 * f), h), w2=normal((e, f, h), f))
    if s:
        params.shared_w13, params.shared_w2 = normal((h, 2 * s), h), normal((s, h), s)
    x = rng.standard_normal((tokens, h), dtype=np.float32)
    return params, x, rng.standard_normal((tokens, h), dtype=np.float32)


def median_seconds(step, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jax(args, backend, prepared, x, dy, pass_, stage_timing: bool) -> dict:
    """Median seconds of one prepared layer's benchmark step (and, forward with ``stage_timing``, the
    median seconds of its pack / up / down / combine stages run as separate programs)."""
    step = backend.benchmark_step(prepared, x, "forward" if pass_ == "forward" else "backward", dy)
    seconds = median_seconds(step, args.iters, args.warmup)
    row = {"impl": f"jax_prequant[{prepared.plan.formulation}]", "scheme": prepared.scheme, "pass": pass_,
           "capacity": prepared.sizes.get(x.shape[0], (0, 0))[0], "seconds": seconds}
    if stage_timing and pass_ == "forward":
        row["stages"] = backend.stage_times(prepared, x, repeats=args.iters)
    return row


def gemm_probe(args, spec: MoESpec, capacity: int) -> list[str]:
    """Raw batched expert GEMMs [E, C, H] x [E, H, 2F] compiled as the backend compiles them, bf16
    (float32 accumulation; XLA's default options) and int8 -> int32 (the backend's
    `INT8_GPU_OPTIONS`), with the weight stored [E, K, N] (N minor) or [E, N, K] (K minor, the layout
    int8 tensor-core GEMMs take)."""
    import functools

    import jax
    import jax.numpy as jnp

    from qmoe.implementations.jax_prequant.env import INT8_GPU_OPTIONS

    int8_jit = functools.partial(jax.jit, compiler_options=INT8_GPU_OPTIONS)

    e, h, n = spec.experts, spec.hidden, 2 * spec.ffn
    key = jax.random.PRNGKey(0)
    lhs = jax.random.normal(key, (e, capacity, h), jnp.bfloat16)
    rhs = jax.random.normal(key, (e, h, n), jnp.bfloat16)
    lhs8 = jax.random.randint(key, (e, capacity, h), -127, 128, jnp.int8)
    rhs8 = jax.random.randint(key, (e, h, n), -127, 128, jnp.int8)
    rhs_t = jnp.swapaxes(rhs, 1, 2).copy()
    rhs8_t = jnp.swapaxes(rhs8, 1, 2).copy()
    programs = {
        "bf16 [E,K,N]": (jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (([2], [1]), ([0], [0])), preferred_element_type=jnp.float32).astype(jnp.bfloat16)), lhs, rhs),
        "bf16 [E,N,K]": (jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (([2], [2]), ([0], [0])), preferred_element_type=jnp.float32).astype(jnp.bfloat16)), lhs, rhs_t),
        "int8 [E,K,N]": (int8_jit(lambda a, b: jax.lax.dot_general(
            a, b, (([2], [1]), ([0], [0])), preferred_element_type=jnp.int32)), lhs8, rhs8),
        "int8 [E,N,K]": (int8_jit(lambda a, b: jax.lax.dot_general(
            a, b, (([2], [2]), ([0], [0])), preferred_element_type=jnp.int32)), lhs8, rhs8_t),
    }
    lines = []
    for name, (fn, a, b) in programs.items():
        seconds = median_seconds(lambda: jax.block_until_ready(fn(a, b)), args.iters, args.warmup)
        lines.append(f"- gemm probe {name}: E={e} C={capacity} K={h} N={n}: {seconds * 1e3:.3f} ms, "
                     f"{2 * e * capacity * h * n / seconds / 1e12:.1f} T(FL)OP/s")
    return lines


def bench_torch(args, spec, params, x, dy, pass_) -> dict:
    """The same MoE forward (and backward) with torch._grouped_mm for the expert projections."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    k, f, e = spec.top_k, spec.ffn, spec.experts
    router = torch.tensor(params.router, device=device)
    # [E, N, K] storage, passed transposed: the K-major layout grouped GEMMs want for mat_b
    w13_t = torch.tensor(params.w13, device=device).to(dtype).transpose(1, 2).contiguous()
    w2_t = torch.tensor(params.w2, device=device).to(dtype).transpose(1, 2).contiguous()
    xt = torch.tensor(x, device=device).to(dtype)
    dyt = torch.tensor(dy, device=device).to(dtype)
    backward = pass_ == "forward_backward"
    if backward:
        for tensor in (router, w13_t, w2_t, xt):
            tensor.requires_grad_(True)

    def forward():
        probs = torch.softmax(xt.float() @ router, dim=-1)
        gates, ids = torch.topk(probs, k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        offsets = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
        rows = xt[token]
        a = torch._grouped_mm(rows, w13_t.transpose(1, 2), offs=offsets)
        hidden = torch.nn.functional.silu(a[:, :f]) * a[:, f:]
        out = torch._grouped_mm(hidden, w2_t.transpose(1, 2), offs=offsets)
        weighted = out * gates.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(xt).index_add(0, token, weighted)

    leaves = (router, w13_t, w2_t, xt)

    def step():
        y = forward()
        if backward:
            for tensor in leaves:  # fresh gradients each step, as JAX returns them (no accumulation)
                tensor.grad = None
            y.backward(dyt)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = median_seconds(step, args.iters, args.warmup)
    return {"impl": "torch._grouped_mm", "scheme": "none", "pass": pass_, "capacity": 0, "seconds": seconds}


def release_torch_memory() -> None:
    """Hand torch's cached CUDA blocks back to the driver (no-op without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def versions_line() -> str:
    """Device and library versions for the header (torch only if importable)."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    parts = [f"device {getattr(device, 'device_kind', device.platform)} x{len(jax.devices())}",
             f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}", f"jax backend {jax.default_backend()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} (cuda {torch.version.cuda})")
    except ImportError:
        parts.append("torch not installed")
    return ", ".join(parts)


def table(rows: list[dict], spec: MoESpec, tokens: int) -> str:
    """Markdown: TF/s and tokens/s; time-based delta vs the same impl's `none` and vs the torch peer
    at the same top_k and pass (positive: faster)."""
    lines = ["| impl | scheme | top_k | pass | ms | TF/s | tokens/s | vs none | vs torch | capacity |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    ok = [r for r in rows if "error" not in r]
    base = {(r["impl"], r["top_k"], r["pass"]): r["seconds"] for r in ok if r["scheme"] == "none"}
    peer = {(r["top_k"], r["pass"]): r["seconds"] for r in ok if r["impl"] == "torch._grouped_mm"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['scheme']} | {r['top_k']} | {r['pass']} | error: {r['error'][:80]} "
                         "| | | | | |")
            continue
        s = spec.replace(top_k=r["top_k"])
        tflops = layer_flops(s, tokens, r["pass"]) / r["seconds"] / 1e12
        ref = base.get((r["impl"], r["top_k"], r["pass"]))
        delta = f"{(ref / r['seconds'] - 1) * 100:+.1f}%" if ref and r["scheme"] != "none" else ""
        torch_ref = peer.get((r["top_k"], r["pass"]))
        vs_torch = (f"{(torch_ref / r['seconds'] - 1) * 100:+.1f}%"
                    if torch_ref and r["impl"] != "torch._grouped_mm" else "")
        lines.append(f"| {r['impl']} | {r['scheme']} | {r['top_k']} | {r['pass']} | {r['seconds'] * 1e3:.2f} | "
                     f"{tflops:.4g} | {tokens / r['seconds']:,.0f} | {delta} | {vs_torch} | {r['capacity'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--shared", type=int, default=0)
    parser.add_argument("--topk", default="2,8")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default=None, help="jax_prequant device (cpu, gpu); default: jax's default")
    parser.add_argument("--grouped", default=None, help="force the formulation (ragged, padded)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch._grouped_mm peer")
    parser.add_argument("--ragged-peer", default="", metavar="TOPK",
                        help="also time the ragged_dot formulation (scheme none, forward) at these top_k, last")
    parser.add_argument("--stage-timing", default="", metavar="SCHEMES",
                        help="forward stage times (pack/up/down/combine) for these schemes (comma-separated)")
    parser.add_argument("--gemm-probe", action="store_true", help="time raw bf16/int8 batched expert GEMMs too")
    parser.add_argument("--probe-capacity", type=int, default=0,
                        help="rows per expert of the GEMM probe (default: the padded capacity measured at the "
                             "largest top_k, else tokens*top_k/experts)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new measurement after this many seconds")
    parser.add_argument("--out", default=None, help="write the table and JSON-lines rows here")
    args = parser.parse_args(argv)
    stage_schemes = {v for v in args.stage_timing.split(",") if v}

    import jax

    args.device = args.device or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    started = time.perf_counter()
    tokens = args.tokens
    spec = MoESpec(hidden=args.hidden, ffn=args.ffn, experts=args.experts, top_k=1, shared_ffn=args.shared)
    header = (f"# jax_prequant vs torch._grouped_mm, {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}\n"
              f"# shape tokens={tokens} hidden={args.hidden} ffn={args.ffn} experts={args.experts} "
              f"shared={args.shared} dtype={args.dtype} iters={args.iters} warmup={args.warmup}\n"
              f"# {versions_line()}\n"
              f"# command: {' '.join(sys.argv)}")
    print(header, flush=True)
    rows: list[dict] = []
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    raw = open(out.with_suffix(".jsonl"), "a") if out else None

    def record(row: dict, top_k: int) -> None:
        row["top_k"] = top_k
        row["elapsed_s"] = round(time.perf_counter() - started, 1)  # compile + measure, for planning runs
        rows.append(row)
        if "error" not in row:
            s = spec.replace(top_k=top_k)
            row["tflops"] = layer_flops(s, tokens, row["pass"]) / row["seconds"] / 1e12
            row["tokens_per_s"] = tokens / row["seconds"]
        print(json.dumps(row), flush=True)
        if raw:
            raw.write(json.dumps({**row, "tokens": tokens, "hidden": args.hidden, "ffn": args.ffn,
                                  "experts": args.experts, "shared": args.shared, "dtype": args.dtype}) + "\n")
            raw.flush()

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - started > args.budget_s

    from qmoe.implementations.jax_prequant import JaxPrequantBackend

    backend = JaxPrequantBackend(args.device, grouped=args.grouped)
    notes: list[str] = []
    needs_layer = bool(args.schemes.strip(",")) or not args.no_torch or bool(args.ragged_peer)
    # the weights do not depend on top_k; none are made for a GEMM-probe-only run
    params, x, dy = random_layer(spec, tokens) if needs_layer else (None, None, None)
    top_ks = [int(v) for v in args.topk.split(",") if v]
    for top_k in top_ks:
        kspec = spec.replace(top_k=top_k)
        # torch first, then its cached blocks back to the driver: JAX's allocator never returns memory,
        # so a torch peer run after the JAX schemes could fail for memory JAX merely holds
        for pass_ in args.passes.split(","):
            if args.no_torch or over_budget():
                break
            try:
                record(bench_torch(args, kspec, params, x, dy, pass_), top_k)
            except Exception as exc:
                record({"impl": "torch._grouped_mm", "scheme": "none", "pass": pass_, "error": repr(exc)}, top_k)
        release_torch_memory()
        for scheme in [v for v in args.schemes.split(",") if v]:
            if over_budget():
                break
            try:
                prepared = backend.prepare(kspec, params, scheme, args.dtype)
            except Exception as exc:  # one failing configuration must not lose the others' numbers
                record({"impl": "jax_prequant", "scheme": scheme, "pass": "prepare", "error": repr(exc)}, top_k)
                continue
            for pass_ in args.passes.split(","):
                if over_budget():
                    break
                try:
                    record(bench_jax(args, backend, prepared, x, dy, pass_, scheme in stage_schemes), top_k)
                except Exception as exc:
                    record({"impl": "jax_prequant", "scheme": scheme, "pass": pass_, "error": repr(exc)}, top_k)
            del prepared
    # Last, so that its memory appetite (a dense masked dot over all experts) cannot cost other rows.
    for top_k in [int(v) for v in args.ragged_peer.split(",") if v]:
        if over_budget():
            break
        try:
            ragged = JaxPrequantBackend(args.device, grouped="ragged")
            record(bench_jax(args, ragged, ragged.prepare(spec.replace(top_k=top_k), params, "none", args.dtype),
                             x, dy, "forward", False), top_k)
        except Exception as exc:
            record({"impl": "jax_prequant[ragged]", "scheme": "none", "pass": "forward", "error": repr(exc)}, top_k)
    if args.gemm_probe and not over_budget():
        top_k = max(top_ks)
        capacity = (args.probe_capacity
                    or next((r["capacity"] for r in reversed(rows) if r.get("capacity") and r["top_k"] == top_k), 0)
                    or tokens * top_k // args.experts)
        try:
            notes += gemm_probe(args, spec.replace(top_k=top_k), capacity)
        except Exception as exc:
            notes.append(f"- gemm probe failed: {exc!r}")

    text = header + "\n\n" + table(rows, spec, tokens)
    stages = [r for r in rows if "stages" in r]
    if stages:
        text += "\n\nforward stage seconds (median):\n" + "\n".join(
            f"- {r['impl']} {r['scheme']} top{r['top_k']}: " + ", ".join(f"{k}={v * 1e3:.3f} ms" for k, v in
                                                                        r["stages"].items()) for r in stages)
    if notes:
        text += "\n\n" + "\n".join(notes)
    text += f"\n\nwall time {time.perf_counter() - started:.0f} s"
    print("\n" + text, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    raise SystemExit(main())
