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
* The GEMMs are cuBLASLt's (``torch._int_mm``), the strongest int8 GEMM torch offers without autotuning
  Triton templates (inductor's max-autotune would take minutes per shape). A grouped int8 Triton kernel may
  beat it by a little: on the H200 (2026-11-30) torch_triton's int8_routed_prequant forward at top-k 8 ran
  at 101.2% of this bound's forward timing, a row that then failed its exactness check (its replay read
  freed codes, since fixed), so unconfirmed. The tables flag any such row (``above bound!``), never hide it.
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
from .peers import _DTYPES, GemmBound, _Prepared, torch_upload

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

        return {"torch": torch.__version__, "int8_gemm": "torch._int_mm per expert"}

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

        if pass_ == "forward":
            def forward_body():
                for e in range(experts):
                    int_mm(xq[e], w["w13_t"][e].t(), out=out["h"][e])
                    int_mm(aq[e], w["w2_t"][e].t(), out=out["y"][e])
                with torch.no_grad():
                    ys = shared_forward(x_t, w["shared_w13"], w["shared_w2"]) if shared else None
                return Int8BoundResult(lambda: _finish_forward(out, h32, sa, s2, ys, k, tokens))

            return _mark(synchronized_step(forward_body, sync, torch_stream=x_t.is_cuda))

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

        def backward_body():
            for e in range(experts):
                int_mm(xq[e], w["w13_t"][e].t(), out=out["h"][e])
                int_mm(aq[e], w["w2_t"][e].t(), out=out["y"][e])
                int_mm(dyq[e], w["w2"][e].t(), out=out["da"][e])
                int_mm(dhq[e], w["w13"][e].t(), out=out["dx"][e])
                int_mm(at[e], dyt[e].t(), out=out["dw2"][e])
                int_mm(xt[e], dht[e].t(), out=out["dw13"][e])
            dxs = None
            if shared:
                with torch.enable_grad():
                    dxs = torch.autograd.grad(shared_forward(*leaves), leaves, grad_outputs=dy_t)[0]
            return Int8BoundResult(lambda: _finish_backward(out, da32, sdh, s13, dxs, k, tokens))

        return _mark(synchronized_step(backward_body, sync, torch_stream=x_t.is_cuda))


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


def _mark(step: Callable[[], Any]) -> Callable[[], Any]:
    """Capture on CUDA whatever the options say: the per-expert loop's launches are not the layer's cost."""
    step.always_capture = True  # type: ignore[attr-defined]
    return step


def _exact(name: str, timed, untimed) -> None:
    import torch

    if not torch.equal(timed, untimed):
        raise WrongOutputError(f"gemm_bound_int8: the timed {name} GEMM differs from the same int32 GEMM computed "
                               "before timing: the timed call did not do (all) its work")


def _finish_forward(out: dict, h32, sa, s2, ys, k: int, tokens: int):
    _exact("up-projection", out["h"], h32)
    y = (out["y"].float() * sa[..., None] * s2[:, None, None]).reshape(k, tokens, -1).sum(0)
    return y + ys.float() if ys is not None else y


def _finish_backward(out: dict, da32, sdh, s13, dxs, k: int, tokens: int):
    _exact("dA = dy W2^T", out["da"], da32)
    dx = (out["dx"].float() * sdh[..., None] * s13[:, None, None]).reshape(k, tokens, -1).sum(0)
    return dx + dxs.float() if dxs is not None else dx
