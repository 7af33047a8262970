"""Benchmark inputs: parameters, inputs and cotangents at a shape, with a routing pattern.

Routing patterns (a benchmark parameter, since skew changes grouped-GEMM speed):

* ``balanced``: every expert equally likely for every token (the logbook's ``--distribution random``);
  loads are multinomial around T k / E. The measured max/mean load is recorded with each result.
* ``zipf``: expert e (0-based) is picked with probability proportional to 1 / (e + 1)^s, s =
  `ZIPF_EXPONENT`, the head-heavy load of an untrained or collapsing router.

How: logits = x R. Feature 0 of every token is the constant 1 and row 0 of the router holds log p_e,
so every logit gets + log p_e; the rest of the router is random with logit standard deviation
pi / sqrt(6) (a Gumbel's), so top-1 selection follows p (the Gumbel-max trick, approximately, since
the noise is Gaussian) and top-k draws without replacement from it. Both patterns keep the same x
distribution, so only the routing differs between them.

Every value is exactly representable in the compute dtype (the backend interface's promise), and
arrays are float32 (`MoEParams` accepts any float; float64 would double host memory at the
logbook's 805M expert weights). Generation is seeded: the same shape and pattern give the same arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from qmoe.reference.spec import MoEParams, MoESpec

from .shapes import BenchShape

ROUTINGS = ("balanced", "zipf")
#: Zipf exponent of the skewed pattern: s = 1 (classic Zipf) puts ~21% of the top-1 picks on the
#: hottest of 64 experts and ~1/3 of the experts' share on the top 3.
ZIPF_EXPONENT = 1.0
#: Per-expert weight magnitudes spread over this factor (log-uniform), as `MoEParams.random` does, so a
#: scheme with one scale for all experts would be visibly wrong in the output check.
EXPERT_SPREAD = 4.0
LOGIT_STD = math.pi / math.sqrt(6.0)
_CHUNK = 1 << 24  # elements per generation chunk: bounds the float32 temporaries


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` rounded (nearest, ties to even) to ``dtype``, returned as float32, in place."""
    if dtype == "float32":
        return values
    if dtype != "bfloat16":
        raise ValueError(f"benchmark inputs support float32 and bfloat16, not {dtype!r}")
    flat = values.reshape(-1)
    for start in range(0, flat.size, _CHUNK):  # chunks bound the temporaries of a layer of many GB
        chunk = flat[start:start + _CHUNK]
        chunk[:] = chunk.astype(ml_dtypes.bfloat16).astype(np.float32)
    return values


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float | np.ndarray = 1.0) -> np.ndarray:
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        n = min(_CHUNK, flat.size - start)
        rng.standard_normal(n, dtype=np.float32, out=flat[start:start + n])
    if np.ndim(scale) == 0:
        out *= np.float32(scale)
    else:
        out *= np.asarray(scale, dtype=np.float32)
    return out


def routing_prior(pattern: str, experts: int) -> np.ndarray:
    """log p_e of the pattern (added to every token's logits)."""
    if pattern == "balanced":
        return np.zeros(experts)
    if pattern == "zipf":
        p = 1.0 / np.arange(1, experts + 1) ** ZIPF_EXPONENT
        return np.log(p / p.sum())
    raise ValueError(f"unknown routing pattern {pattern!r}; patterns: {', '.join(ROUTINGS)}")


def make_params(shape: BenchShape, pattern: str, dtype: str, seed: int = 0) -> MoEParams:
    """Parameters for ``shape`` (any top-k: they do not depend on it) steering routing to ``pattern``."""
    rng = np.random.default_rng([seed, shape.hidden, shape.experts, ROUTINGS.index(pattern)])
    h, f, e, s = shape.hidden, shape.ffn, shape.experts, shape.shared_ffn
    magnitude = np.exp(rng.uniform(-0.5, 0.5, size=(e, 1, 1)) * np.log(EXPERT_SPREAD)).astype(np.float32)
    router = _normal(rng, (h, e), LOGIT_STD / math.sqrt(h - 1))
    router[0] = routing_prior(pattern, e)
    params = MoEParams(
        router=round_to_dtype(router, dtype),
        w13=round_to_dtype(_normal(rng, (e, h, 2 * f), magnitude / math.sqrt(h)), dtype),
        w2=round_to_dtype(_normal(rng, (e, f, h), magnitude / math.sqrt(f)), dtype),
    )
    if shape.router == "sigmoid_topk":
        params.router_bias = round_to_dtype(_normal(rng, (e,), 0.01), dtype)
    if s:
        params.shared_w13 = round_to_dtype(_normal(rng, (h, 2 * s), 1 / math.sqrt(h)), dtype)
        params.shared_w2 = round_to_dtype(_normal(rng, (s, h), 1 / math.sqrt(s)), dtype)
    return params


@dataclass(frozen=True)
class Inputs:
    """One round's input and cotangent, [T, H] float32 holding ``dtype`` values."""

    x: np.ndarray
    dy: np.ndarray


def make_inputs(shape: BenchShape, dtype: str, count: int, seed: int = 0) -> list[Inputs]:
    """``count`` distinct (x, dy): rounds rotate through them, so a backend cannot serve a cached result."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, 1, i, shape.tokens, shape.hidden])
        x = _normal(rng, (shape.tokens, shape.hidden))
        x[:, 0] = 1.0  # the routing-steering feature (module docstring)
        out.append(Inputs(round_to_dtype(x, dtype), round_to_dtype(_normal(rng, (shape.tokens, shape.hidden)), dtype)))
    return out


def expert_loads(spec: MoESpec, params: MoEParams, x: np.ndarray) -> np.ndarray:
    """Rows each expert receives from ``x`` under the reference's routing (float64), length E."""
    from qmoe.reference.routing import route

    ids = route(spec, params, np.asarray(x, dtype=np.float64)).expert_ids
    return np.bincount(ids.reshape(-1), minlength=spec.experts)


def load_imbalance(loads: np.ndarray) -> float:
    """max / mean rows per expert: 1.0 is perfectly balanced."""
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else float("nan")
