"""torch_triton on a CUDA GPU: prove the compiled kernels right, then measure TF/s at the seed shape.

    python scripts/bench_torch_gpu.py [--out results/h100/torch_triton_seed.txt] [--quick]

1. Correctness of the *compiled* kernels at small shapes: forward (routing, y) and backward of every
   scheme against `reference` evaluated at the backend's effective weights, on the suite's cases with
   empty experts, capacity drops and a shared expert, in float32, held to the suite's tolerance table;
   the QAT checks of suite/test_qat.py; a bfloat16 smoke check of each scheme against float.
2. Throughput at the JAX logbook's seed shape (tokens 32768, hidden 2048, ffn 2048, experts 64,
   top-k 2 and 8, no shared expert), bf16 activations: forward and forward+backward of each scheme
   and of the native peer (`torch._grouped_mm` bf16 on pre-sorted rows: the two expert GEMMs and the
   SwiGLU, no routing), side by side in one process. CUDA-event timing after warm-up (which also
   autotunes the int8 GEMM); median of the timed repeats.

FLOPs counted: the expert matmuls only, 2 * T * k * H * 2F + 2 * T * k * F * H = 6 T k H F forward
and three times that for forward+backward (router and element-wise work excluded, as in the logbook).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qmoe import reference  # noqa: E402
from qmoe.reference import MoEParams, MoESpec, get_scheme  # noqa: E402

SCHEMES = ("none", "int8_routed", "int8_routed_prequant", "qat_int8_row")
SEED_SHAPE = dict(tokens=32768, hidden=2048, ffn=2048, experts=64)
CHECK_CASES = ("empty_experts", "capacity_drop", "shared_expert", "sigmoid", "wide_g64", "zero_rows_outliers")


class Log:
    """Prints and keeps every line, for the raw results file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def worst_rel(actual: np.ndarray, expected: np.ndarray, by_row: bool) -> float:
    """The suite's figure: worst token row for y and dx, the whole tensor for weight/router grads."""
    from qmoe.suite.checks import error_figures

    return error_figures(actual, expected, by_row=by_row).worst_row_rel


def check_compiled(backend, log: Log) -> bool:
    """Small-shape conformance of the compiled kernels; returns True when every check passed."""
    from qmoe.suite.cases import CASES
    from qmoe.suite.tolerances import tolerance

    ok = True
    log("## correctness of the compiled kernels (float32, worst row relative error vs reference)")
    log(f"{'case':22s} {'scheme':22s} {'ids':>4s} {'y':>9s} {'grads':>9s} {'tight':>7s}  result")
    for name in CHECK_CASES:
        data = CASES[name].build("float32")
        for scheme in SCHEMES:
            tol = tolerance(scheme, "float32", "backward").tight
            prepared = backend.prepare(data.spec, data.params, scheme, "float32")
            eff = MoEParams(**backend.effective_weights(prepared))
            result = backend.forward(prepared, data.x)
            expected = reference.forward(data.spec, eff, data.x, scheme, weights_are_effective=True)
            ids_ok = bool(np.array_equal(result.expert_ids, expected.expert_ids))
            y_err = worst_rel(result.y, expected.y, by_row=True)
            grads = backend.backward(prepared, data.x, data.dy, 0.05)
            ref_grads = reference.backward(data.spec, eff, data.x, data.dy, scheme, 0.05, weights_are_effective=True)
            g_err = 0.0
            for key, value in ref_grads.items():
                got = np.asarray(grads[key])
                if key in ("w13", "w2"):
                    for e in range(data.spec.experts):
                        if not value[e].any() and got[e].any():
                            g_err = np.inf  # an expert without tokens must have an exactly zero gradient
                        elif value[e].any():
                            g_err = max(g_err, worst_rel(got[e], value[e], by_row=False))
                else:
                    g_err = max(g_err, worst_rel(got, value, by_row=(key == "x")))
            passed = ids_ok and y_err <= tol and g_err <= tol
            ok &= passed
            log(f"{name:22s} {scheme:22s} {str(ids_ok):>4s} {y_err:9.2e} {g_err:9.2e} {tol:7.0e}  "
                f"{'ok' if passed else 'FAIL'}")
    ok &= check_bf16(backend, log)
    try:
        from qmoe.suite import test_qat  # imports pytest
    except ImportError as error:
        log(f"qat checks not run: {error}")
        return False
    for check in (test_qat.check_eval_never_fake_quantizes, test_qat.check_exported_tensors_fake_quantized,
                  test_qat.check_clip_rule_same_in_training_and_export, test_qat.check_round_trip_not_quantized_twice):
        try:
            check(backend)
            log(f"qat: {check.__name__}: ok")
        except AssertionError as error:
            ok = False
            log(f"qat: {check.__name__}: FAIL {str(error).splitlines()[0]}")
    return ok


def check_bf16(backend, log: Log) -> bool:
    """bf16 activations on a mid-size layer with empty experts: SQNR of y and dx against float64."""
    spec = MoESpec(hidden=512, ffn=256, experts=16, top_k=4)
    params = MoEParams.random(spec, seed=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((700, spec.hidden))
    x[:, 0] = 1.0
    params.router[0, 5] = -30.0  # through the constant feature: expert 5 receives no token
    dy = rng.standard_normal(x.shape)
    rounded = {}
    for name, value in params.items():
        rounded[name] = value if name == "router" else torch.tensor(value).bfloat16().double().numpy()
    params = MoEParams(**rounded)
    x = torch.tensor(x).bfloat16().double().numpy()
    y_float = reference.forward(spec, params, x).y
    dx_float = reference.backward(spec, params, x, dy)["x"]
    ok = True
    for scheme in SCHEMES:
        prepared = backend.prepare(spec, params, scheme, "bfloat16")
        y = backend.forward(prepared, x).y
        grads = backend.backward(prepared, x, dy)
        y_db, dx_db = reference.sqnr_db(y_float, y), reference.sqnr_db(dx_float, grads["x"])
        zero = not np.any(grads["w13"][5])
        passed = y_db > 22 and dx_db > 20 and zero
        ok &= passed
        log(f"bf16 {scheme:22s} SQNR y {y_db:5.1f} dB, dx {dx_db:5.1f} dB vs float64; empty expert grad zero "
            f"{zero}: {'ok' if passed else 'FAIL'}")
    return ok


def cuda_time_ms(step, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``step()`` between CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def seed_weights(spec: MoESpec, device: torch.device, seed: int):
    """Random bf16 expert weights (1/sqrt(fan_in)) and a float32 router, made on the device."""
    from qmoe.implementations.torch_triton.layer import LayerWeights

    gen = torch.Generator(device=device).manual_seed(seed)
    h, f, e = spec.hidden, spec.ffn, spec.experts

    def randn(*shape, scale, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    return LayerWeights(router=randn(h, e, scale=h**-0.5, dtype=torch.float32),
                        w13=randn(e, h, 2 * f, scale=h**-0.5), w2=randn(e, f, h, scale=f**-0.5))


def native_peer_steps(spec: MoESpec, weights, x: torch.Tensor, dy: torch.Tensor):
    """torch._grouped_mm bf16 on rows already sorted by expert (the routing's own group sizes)."""
    from qmoe.implementations.torch_triton.layer import plan_dispatch, route

    with torch.no_grad():
        routing = route(spec, weights.router, None, x)
        plan = plan_dispatch(routing.expert_ids, None, spec.experts)
        rows = x[plan.row_token].contiguous()
    offs, ffn = plan.group_ends, spec.ffn
    w13 = weights.w13.detach().requires_grad_()
    w2 = weights.w2.detach().requires_grad_()
    rows_leaf = rows.detach().requires_grad_()
    g = torch.randn(rows.shape[0], spec.hidden, device=x.device, dtype=x.dtype)

    def experts(a_rows, w13_, w2_):
        a = torch._grouped_mm(a_rows, w13_, offs=offs)
        return torch._grouped_mm(torch.nn.functional.silu(a[:, :ffn]) * a[:, ffn:], w2_, offs=offs)

    def forward():
        with torch.no_grad():
            return experts(rows, weights.w13, weights.w2)

    def forward_backward():
        out = experts(rows_leaf, w13, w2)
        return torch.autograd.grad(out, [rows_leaf, w13, w2], grad_outputs=g)

    return forward, forward_backward


def int8_kernel_only_step(spec: MoESpec, weights, x: torch.Tensor):
    """The Triton int8 grouped GEMMs alone (up + down projection on pre-quantized sorted rows)."""
    from qmoe.implementations.torch_triton.kernels.grouped_gemm import grouped_gemm
    from qmoe.implementations.torch_triton.layer import Int8Experts, plan_dispatch, route
    from qmoe.implementations.torch_triton.kernels.quant import quantize_rows

    with torch.no_grad():
        routing = route(spec, weights.router, None, x)
        plan = plan_dispatch(routing.expert_ids, None, spec.experts)
        experts = Int8Experts.quantize(weights.w13, weights.w2, with_transposed=False)
        x_codes, x_scale = quantize_rows(x)
        h_codes = torch.randint(-127, 128, (plan.row_token.numel(), spec.ffn), device=x.device, dtype=torch.int8)
        h_scale = torch.rand(plan.row_token.numel(), device=x.device) + 0.01

    def step():
        grouped_gemm(x_codes, experts.w13_fwd, plan.group_starts, out_dtype=torch.bfloat16, a_scale=x_scale,
                     b_scale=experts.w13_scale, a_rows=plan.row_token)
        grouped_gemm(h_codes, experts.w2_fwd, plan.group_starts, out_dtype=torch.bfloat16, a_scale=h_scale,
                     b_scale=experts.w2_scale)

    return step


def benchmark(backend, log: Log, top_ks: tuple[int, ...], warmup: int, repeats: int) -> None:
    device = torch.device("cuda")
    shape = SEED_SHAPE
    log()
    log(f"## throughput at tokens {shape['tokens']}, hidden {shape['hidden']}, ffn {shape['ffn']}, "
        f"experts {shape['experts']}, shared 0, bf16 activations; median of {repeats} after {warmup} warm-up")
    log("TF/s = 6*T*k*H*F (forward) or 18*T*k*H*F (forward+backward) expert-matmul FLOPs / time")
    log(f"{'variant':34s} {'top_k':>5s} {'fwd ms':>8s} {'fwd TF/s':>9s} {'f+b ms':>8s} {'f+b TF/s':>9s}")
    rows = []
    for top_k in top_ks:
        spec = MoESpec(hidden=shape["hidden"], ffn=shape["ffn"], experts=shape["experts"], top_k=top_k)
        weights = seed_weights(spec, device, seed=top_k)
        gen = torch.Generator(device=device).manual_seed(100 + top_k)
        x = torch.randn(shape["tokens"], spec.hidden, generator=gen, device=device).to(torch.bfloat16)
        dy = torch.randn(shape["tokens"], spec.hidden, generator=gen, device=device).to(torch.bfloat16)
        flops = 6.0 * shape["tokens"] * top_k * spec.hidden * spec.ffn
        variants = []
        for scheme in SCHEMES:
            prepared = backend.prepare_tensors(spec, get_scheme(scheme), "bfloat16", device, weights)
            variants.append((f"torch_triton {scheme}", backend.device_step(prepared, x, "forward"),
                             backend.device_step(prepared, x, "backward", dy)))
        peer_fwd, peer_fb = native_peer_steps(spec, weights, x, dy)
        variants.append(("torch._grouped_mm bf16 (experts only)", peer_fwd, peer_fb))
        variants.append(("triton int8 gemms only (up+down)", int8_kernel_only_step(spec, weights, x), None))
        for name, forward, forward_backward in variants:
            t0 = time.time()
            try:
                fwd_ms = cuda_time_ms(forward, warmup, repeats)
                fb_ms = cuda_time_ms(forward_backward, warmup, repeats) if forward_backward else float("nan")
            except Exception:
                log(f"{name} top_k {top_k} raised:\n" + traceback.format_exc())
                continue
            row = (name, top_k, fwd_ms, flops / fwd_ms / 1e9, fb_ms, 3 * flops / fb_ms / 1e9)
            rows.append(row)
            log(f"{name:34s} {top_k:5d} {fwd_ms:8.3f} {row[3]:9.1f} {fb_ms:8.3f} {row[5]:9.1f}"
                f"   (wall incl. warm-up {time.time() - t0:.1f}s)")
        del variants
        torch.cuda.empty_cache()
    log()
    log("| variant | top_k | forward ms | forward TF/s | fwd+bwd ms | fwd+bwd TF/s |")
    log("|---|---:|---:|---:|---:|---:|")
    for name, top_k, fwd_ms, fwd_tf, fb_ms, fb_tf in rows:
        fb = "n/a" if np.isnan(fb_ms) else f"{fb_ms:.3f}"
        fbt = "n/a" if np.isnan(fb_tf) else f"{fb_tf:.1f}"
        log(f"| {name} | {top_k} | {fwd_ms:.3f} | {fwd_tf:.1f} | {fb} | {fbt} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the raw output here too")
    parser.add_argument("--top-k", default="2,8")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import triton

    from qmoe.implementations import _triton_common
    from qmoe.implementations.torch_triton import TorchTritonBackend

    log = Log()
    props = torch.cuda.get_device_properties(0)
    log(f"# torch_triton on {props.name} ({props.multi_processor_count} SMs), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    log(f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
        f"command: python {' '.join(sys.argv)}")
    backend = TorchTritonBackend("cuda")
    ok = True
    if not args.skip_check:
        t0 = time.time()
        try:
            ok = check_compiled(backend, log)
        except Exception:  # keep going: the throughput table is still worth having, marked as unchecked
            ok = False
            log("correctness check raised:\n" + traceback.format_exc())
        log(f"correctness: {'ALL OK' if ok else 'FAILURES'} ({time.time() - t0:.0f}s)")
    benchmark(backend, log, tuple(int(k) for k in args.top_k.split(",")), args.warmup, args.repeats)
    log(f"kernel launches: {dict(_triton_common.LAUNCHES)}")
    log(f"fallbacks: {dict(_triton_common.FALLBACKS) or 'none'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(log.lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
