"""The int8 GEMM bound (``gemm_bound_int8``): what an int8 layer could reach if only its GEMMs cost anything.

The bf16 bound (`peers.GemmBound`) is the ceiling of a float layer; an int8 layer is measured against its
own: the same GEMM sizes run as int8 x int8 -> int32 (``torch._int_mm``: cuBLASLt's IMMA kernels on CUDA),
one GEMM per expert on perfectly balanced, pre-sorted rows (every expert's block has k T / E rows, so
every GEMM has the same size), on codes quantized before the timed call. On CUDA the per-expert loop is
captured in a CUDA graph (`graphs.capture`), so the host's launch cost is left out too.

Why it is an upper bound for the int8 schemes (``int8_routed``, ``int8_all``, ``int8_routed_prequant``:
the rows whose `metrics.peak_operand` is int8, compared with it in the tables' ``% of bound``):

* Timed: only the GEMMs. Forward: x W13 and a W2 per expert. Forward+backward adds the four backward
  GEMMs of each expert (dA = dy W2^T, dx = dh W13^T, dW2 = a^T dy, dW13 = x^T dh), all in int8 as well:
  a real layer runs at least these GEMMs (most run the weight gradients in bf16, slower), plus routing.
* Left out, and so not paid by the bound: quantizing activations (per token), the scale epilogue
  (int32 x row scale x expert scale), SwiGLU and its derivative, the gather, the combine, the router.
  The backward's operands (dh, a^T, dy^T) are prepared before timing, in the layouts cuBLASLt wants.
* The GEMMs run two ways and each step times the faster (`peers.faster_variant`, as the bf16 bound picks
  between eager and compiled): ``int_mm``, cuBLASLt's IMMA kernels (``torch._int_mm``) per expert with int32
  outputs; and ``triton_grouped``, the grouped int8 Triton kernel that torch_triton ships (one launch per
  projection over all experts, the scales applied in its epilogue, outputs in the compute dtype), where
  Triton runs. On the H200 (2026-11-30) torch_triton's whole int8 layer, forward at top-k 8, ran at 113.7%
  of the ``int_mm``-only bound (8.87 against 10.08 ms): cuBLASLt per expert writes int32, twice the bytes
  of a bf16 epilogue, and this bound was no bound there. The tables still flag any row above its bound
  (``above bound!``), never hide it.
* The shared expert (if any) runs in the compute dtype, forward and backward, as the schemes with float
  shared weights run it; ``int8_all`` quantizes it too, so at shapes with a shared expert ``int8_all``
  could in principle beat this bound by the shared part's int8 speed-up (say so when reading its row).

The timed call returns int32 blocks; the output check dequantizes them afterwards (`Int8BoundResult.finish`,
untimed), verifies that the first GEMM of each pass equals the same GEMM computed before timing (int32
arithmetic is exact, so equal means the timed call did the work), and compares y or dx with the
reference of the scheme like any row. The check caught the H200 run's (2026-11-30) replays reading freed
codes: the captured step now keeps every tensor its graph reads alive (`graphs.replaying`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe.implementations.base import Capabilities, synchronized_step
from qmoe.reference.spec import MoEParams, MoESpec, SpecError

from .outputs import WrongOutputError
from .peers import _DTYPES, GemmBound, _Prepared, faster_variant, torch_upload

#: Schemes whose routed experts run int8 x int8 (`metrics.peak_operand` is int8): they share this bound.
#: The bound's own rows carry the scheme whose weights are stored int8 once, as the bound's are.
BOUND_SCHEME = "int8_routed_prequant"


def quantize_rows(values):
    """Symmetric int8 per row (the last axis): codes and float32 scales, scale 1 for all-zero rows."""
    import torch

    amax = values.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(values / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _quantize_expert(w):
    """One scale per expert matrix (the ``per_expert`` rule of the schemes)."""
    import torch

    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


@dataclass
class Int8BoundResult:
    """What the timed call leaves: int32 GEMM outputs, finished (dequantized, summed) only for the check."""

    finish: Callable[[], Any]


class GemmBoundInt8(GemmBound):
    name = "gemm_bound_int8"
    bound = True
    capabilities = Capabilities(schemes=(BOUND_SCHEME,), passes=("forward", "backward"), dtypes=_DTYPES,
                                devices=("cpu", "cuda"), capacity=False, shared_expert=True)

    @classmethod
    def bound_operand(cls, dtype: str) -> str:
        return "int8"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = super().unavailable_reason()
        if reason:
            return reason
        import torch

        if not hasattr(torch, "_int_mm"):
            return f"torch {torch.__version__} has no torch._int_mm"
        return None

    @classmethod
    def versions(cls) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__,
                "int8_gemm": "the faster of torch._int_mm per expert and torch_triton's grouped int8 kernel (Gluon's "
                              "warp-specialized one on sm_90, else Triton's)"}

    def _check(self, spec: MoESpec, scheme: str, dtype: str) -> None:
        if scheme != BOUND_SCHEME:
            raise SpecError(f"{self.name} is the bound of int8 x int8 experts: scheme {BOUND_SCHEME!r}, not {scheme!r}")
        if dtype not in _DTYPES:
            raise SpecError(f"{self.name} computes in {', '.join(_DTYPES)}, not {dtype!r}")
        if spec.capacity_factor is not None:
            raise SpecError(f"{self.name} is dropless (no capacity factor)")

    def prepare(self, spec: MoESpec, params: MoEParams, scheme: str, dtype: str, ep_size: int = 1) -> _Prepared:
        import torch

        self._check(spec, scheme, dtype)
        params.validate(spec)
        device = torch.device(self.device)
        compute = getattr(torch, dtype)
        arrays: dict = {}
        for name in ("w13", "w2"):
            value = np.asarray(getattr(params, name))
            codes = torch.empty(value.shape, dtype=torch.int8, device=device)
            scales = torch.empty(value.shape[0], dtype=torch.float32, device=device)
            for e in range(value.shape[0]):  # one expert at a time: no float copy of the whole layer
                codes[e], scales[e] = _quantize_expert(torch_upload(value[e], torch.float32, device))
            arrays[name] = codes  # [E, K, N] row-major: its .t() is the column-major B of dgrad
            arrays[name + "_t"] = codes.transpose(1, 2).contiguous()  # [E, N, K]: .t() is the forward's B
            arrays[name + "_scale"] = scales
        for name in ("shared_w13", "shared_w2"):
            value = getattr(params, name, None)
            if value is not None:
                arrays[name] = torch_upload(np.asarray(value), compute, device)
        return _Prepared(spec, dtype, arrays, params)

    def _forward_output(self, result: Int8BoundResult) -> Any:
        return result.finish()

    def benchmark_step(self, prepared: _Prepared, x: np.ndarray, pass_: str, dy: np.ndarray | None = None
                       ) -> Callable[[], Any]:
        import torch
        import torch.nn.functional as F

        if pass_ not in ("forward", "backward"):
            raise SpecError(f"unknown pass {pass_!r}")
        spec, w = prepared.spec, prepared.arrays
        tokens, k, experts, ffn, shared = x.shape[0], spec.top_k, spec.experts, spec.ffn, spec.shared_ffn
        block = block_rows(tokens, k, experts)
        x_t = self._put(prepared, x)
        dy_t = self._put(prepared, dy if dy is not None else np.random.default_rng(0).standard_normal(x.shape))
        int_mm = torch._int_mm
        s13, s2 = w["w13_scale"], w["w2_scale"]

        # -- untimed: codes of every operand, and the first GEMM of each pass for the exactness check ----------
        xq, sx = quantize_rows(x_t.float().repeat(k, 1).view(experts, block, -1))
        h32 = torch.stack([int_mm(xq[e], w["w13_t"][e].t()) for e in range(experts)])
        h = h32.float() * sx[..., None] * s13[:, None, None]
        gate, up = h[..., :ffn], h[..., ffn:]
        aq, sa = quantize_rows(F.silu(gate) * up)
        out = {"h": torch.empty_like(h32),
               "y": torch.empty(experts, block, spec.hidden, dtype=torch.int32, device=x_t.device)}
        sync = torch.cuda.synchronize if x_t.is_cuda else (lambda: None)
        leaves = [t.detach().requires_grad_() for t in (x_t, w.get("shared_w13"), w.get("shared_w2"))
                  if t is not None]

        def shared_forward(x_, w13, w2):
            hs = x_ @ w13
            return (F.silu(hs[:, :shared]) * hs[:, shared:]) @ w2

        grouped, grouped_refusal = triton_grouped_gemm(x_t.device)
        starts = torch.arange(experts + 1, dtype=torch.int32, device=x_t.device) * block
        dtype = x_t.dtype

        def project(codes, scale, b, b_scale):
            """One grouped projection over the balanced blocks, dequantized in the kernel's epilogue."""
            return grouped(codes.reshape(experts * block, -1), b, starts, out_dtype=dtype,
                           a_scale=scale.reshape(-1), b_scale=b_scale)

        if pass_ == "forward":
            def forward_body():
                for e in range(experts):
                    int_mm(xq[e], w["w13_t"][e].t(), out=out["h"][e])
                    int_mm(aq[e], w["w2_t"][e].t(), out=out["y"][e])
                with torch.no_grad():
                    ys = shared_forward(x_t, w["shared_w13"], w["shared_w2"]) if shared else None
                return Int8BoundResult(lambda: _finish_forward(out, h32, sa, s2, ys, k, tokens))

            bodies = {"int_mm": forward_body}
            if grouped is not None:
                h_grouped = project(xq, sx, w["w13_t"].transpose(1, 2), s13)  # untimed: the exactness check's

                def grouped_forward_body():
                    h_timed = project(xq, sx, w["w13_t"].transpose(1, 2), s13)
                    y_rows = project(aq, sa, w["w2_t"].transpose(1, 2), s2)
                    with torch.no_grad():
                        ys = shared_forward(x_t, w["shared_w13"], w["shared_w2"]) if shared else None
                    return Int8BoundResult(lambda: _finish_rows("up-projection", h_timed, h_grouped, y_rows, ys, k,
                                                                tokens))

                bodies["triton_grouped"] = grouped_forward_body
            return _variant_step(bodies, sync, x_t.is_cuda, grouped_refusal)

        dyq, sdy = quantize_rows(dy_t.float().repeat(k, 1).view(experts, block, -1))
        da32 = torch.stack([int_mm(dyq[e], w["w2"][e].t()) for e in range(experts)])
        da = da32.float() * sdy[..., None] * s2[:, None, None]
        sig = torch.sigmoid(gate)
        dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], dim=-1)  # d(silu(g) u)
        dhq, sdh = quantize_rows(dh)
        at, xt = aq.transpose(1, 2).contiguous(), xq.transpose(1, 2).contiguous()
        dyt, dht = dyq.transpose(1, 2).contiguous(), dhq.transpose(1, 2).contiguous()
        out.update(da=torch.empty_like(da32), dx=torch.empty_like(out["y"]),
                   dw2=torch.empty(w["w2"].shape, dtype=torch.int32, device=x_t.device),
                   dw13=torch.empty(w["w13"].shape, dtype=torch.int32, device=x_t.device))

        def shared_backward():
            if not shared:
                return None
            with torch.enable_grad():
                return torch.autograd.grad(shared_forward(*leaves), leaves, grad_outputs=dy_t)[0]

        def backward_body():
            for e in range(experts):
                int_mm(xq[e], w["w13_t"][e].t(), out=out["h"][e])
                int_mm(aq[e], w["w2_t"][e].t(), out=out["y"][e])
                int_mm(dyq[e], w["w2"][e].t(), out=out["da"][e])
                int_mm(dhq[e], w["w13"][e].t(), out=out["dx"][e])
                int_mm(at[e], dyt[e].t(), out=out["dw2"][e])
                int_mm(xt[e], dht[e].t(), out=out["dw13"][e])
            dxs = shared_backward()
            return Int8BoundResult(lambda: _finish_backward(out, da32, sdh, s13, dxs, k, tokens))

        bodies = {"int_mm": backward_body}
        if grouped is not None:
            hidden = spec.hidden
            unit = {n: torch.ones(n, dtype=torch.float32, device=x_t.device) for n in (experts, experts * ffn,
                                                                                      experts * hidden)}
            ends = {n: torch.arange(experts + 1, dtype=torch.int32, device=x_t.device) * n for n in (ffn, hidden)}
            da_grouped = project(dyq, sdy, w["w2"].transpose(1, 2), s2)  # untimed: the exactness check's

            def weight_grad(rows_t, grads_t, per_expert):
                """dW[e] = rows_e^T grads_e over the block's rows: rows of rows_t grouped per expert (K = the
                block), unit scales (per-token scales lie along K; the int_mm variant leaves them out too), written
                in the compute dtype as a layer's weight gradients are (float32 would double DeepSeek-V3's 22 GiB)."""
                return grouped(rows_t.reshape(experts * per_expert, block), grads_t.transpose(1, 2), ends[per_expert],
                               out_dtype=dtype, a_scale=unit[experts * per_expert], b_scale=unit[experts])

            def grouped_backward_body():
                project(xq, sx, w["w13_t"].transpose(1, 2), s13)
                project(aq, sa, w["w2_t"].transpose(1, 2), s2)
                da_timed = project(dyq, sdy, w["w2"].transpose(1, 2), s2)
                dx_rows = project(dhq, sdh, w["w13"].transpose(1, 2), s13)
                weight_grad(at, dyt, ffn)
                weight_grad(xt, dht, hidden)
                dxs = shared_backward()
                return Int8BoundResult(lambda: _finish_rows("dA = dy W2^T", da_timed, da_grouped, dx_rows, dxs, k,
                                                            tokens))

            bodies["triton_grouped"] = grouped_backward_body
        return _variant_step(bodies, sync, x_t.is_cuda, grouped_refusal)


def block_rows(tokens: int, top_k: int, experts: int) -> int:
    """Rows per expert of the balanced layout, refused where the blocks cannot all be equal or where
    cuBLASLt's int8 GEMM cannot take them (more than 16 rows, a multiple of 8: the K of the weight gradients)."""
    rows = tokens * top_k
    if rows % experts:
        raise SpecError(f"gemm_bound_int8 needs k T ({rows}) divisible by E ({experts}): equal expert blocks")
    block = rows // experts
    if block <= 16 or block % 8:
        raise SpecError(f"gemm_bound_int8 needs k T / E ({block}) > 16 and a multiple of 8 (torch._int_mm)")
    return block


#: Whether CPU runs also try the triton_grouped variant. There it runs in Triton's interpreter, Python
#: executing the kernel: it is never the faster variant, and comparing it cost 1698 of the 2173 s of
#: `pytest --benchmark-autosave` (cpu-small, every backend; 2 cores, 2026-12-01). The tests switch it on to
#: check that variant's output on CPU.
CPU_TRITON_VARIANT = False


def triton_grouped_gemm(device) -> tuple[Callable | None, str | None]:
    """torch_triton's grouped GEMM (`implementations.torch_triton.kernels.grouped_gemm.grouped_gemm`), or None
    and why not: Triton missing, a CPU run (`CPU_TRITON_VARIANT`), or a CPU run whose kernels were not built
    for Triton's interpreter."""
    try:
        from qmoe.implementations.torch_triton.kernels import grouped_gemm as kernels
    except ImportError as exc:
        return None, f"the triton_grouped variant needs triton ({exc})"
    if device.type != "cuda" and not CPU_TRITON_VARIANT:
        return None, ("the triton_grouped variant is left out on CPU: Triton's interpreter runs it in Python, "
                      "never the faster variant there")
    if device.type != "cuda" and not kernels.INTERPRETED:
        return None, "the triton_grouped variant runs on CPU only under TRITON_INTERPRET=1 (set before import)"
    return kernels.grouped_gemm, None


def _variant_step(bodies: dict[str, Callable[[], Any]], sync: Callable[[], None], cuda: bool,
                  refusal: str | None) -> Callable[[], Any]:
    """The step of the faster body (`peers.faster_variant`), with what was compared in its extra_info."""
    chosen, seconds = faster_variant(bodies, sync)
    step = _mark(synchronized_step(bodies[chosen], sync, torch_stream=cuda))
    step.extra_info = {"bound_variant": chosen, "bound_variant_s": seconds,  # type: ignore[attr-defined]
                       **({"bound_variant_note": refusal} if refusal else {})}
    return step


def _mark(step: Callable[[], Any]) -> Callable[[], Any]:
    """Capture on CUDA whatever the options say: the per-expert loop's launches are not the layer's cost."""
    step.always_capture = True  # type: ignore[attr-defined]
    return step


def _exact(name: str, timed, untimed) -> None:
    import torch

    if not torch.equal(timed, untimed):
        raise WrongOutputError(f"gemm_bound_int8: the timed {name} GEMM differs from the same GEMM computed "
                               "before timing: the timed call did not do (all) its work")


def _finish_forward(out: dict, h32, sa, s2, ys, k: int, tokens: int):
    return _finish_rows("up-projection", out["h"], h32, out["y"].float() * sa[..., None] * s2[:, None, None], ys,
                        k, tokens)


def _finish_rows(name: str, timed, untimed, rows, extra, k: int, tokens: int):
    """A timed call's result: its first GEMM (``timed``) equal to the same GEMM computed before timing (int32
    arithmetic, and the grouped kernel, are deterministic), then the dequantized ``rows`` (k blocks of T
    rows) summed per token, plus the shared expert's part (``extra``) where there is one."""
    _exact(name, timed, untimed)
    y = rows.float().reshape(k, tokens, -1).sum(0)
    return y + extra.float() if extra is not None else y


def _finish_backward(out: dict, da32, sdh, s13, dxs, k: int, tokens: int):
    return _finish_rows("dA = dy W2^T", out["da"], da32, out["dx"].float() * sdh[..., None] * s13[:, None, None],
                        dxs, k, tokens)
