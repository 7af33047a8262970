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

Speed (a DeepSeek-V3 layer is 11.3e9 weights; one thread at ~18 ns each took 206 s of an H200 call):
each tensor is cut into `_CHUNK`-element chunks, and chunk c of tensor t draws from its own generator,
seeded from (the call's seed words, t, c), so the values depend on neither the thread count nor the
order in which chunks run. Chunks run on a thread pool (`THREADS`; NumPy's generators and ufuncs
release the GIL), and each is filled, scaled and rounded `_BLOCK` elements at a time while they are
in cache. Rounding to bfloat16 works on the float32 bit pattern (`_round_bfloat16`), bit for bit
ml_dtypes' rounding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
#: Elements per chunk: the unit of seeding (one generator each) and of a thread's work. Fixed, since the
#: values depend on it; 4 MiB of float32 is ~10 ms of work, against ~15 us to seed its generator.
_CHUNK = 1 << 20
#: Elements generated, scaled and rounded at a time within a chunk: 512 KiB of float32 plus as much
#: scratch, so every pass after the first finds the block in the core's L2.
_BLOCK = 1 << 17
#: Threads that fill a tensor of several chunks; None: one per core this process may run on, at most
#: `MAX_THREADS` (the GIL, held for ~1% of a block's time between NumPy calls, and memory bandwidth
#: should limit the gain beyond that; not measured above 2 cores).
THREADS: int | None = None
MAX_THREADS = 32
_BF16_KEEP = np.uint32(0xFFFF0000)
_BF16_HALF = np.uint32(0x7FFF)


def _threads() -> int:
    if THREADS is not None:
        return max(1, THREADS)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


def _run_chunks(size: int, work: Callable[[int, int], None]) -> None:
    """``work(start, stop)`` on each `_CHUNK`-element piece of [0, ``size``): on a thread pool where there
    are several pieces and threads, else in this thread (no pool for a tensor of one chunk)."""
    starts = range(0, size, _CHUNK)
    threads = min(_threads(), len(starts))
    if threads <= 1:
        for start in starts:
            work(start, min(start + _CHUNK, size))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="qmoe-workload") as pool:
        list(pool.map(lambda start: work(start, min(start + _CHUNK, size)), starts))  # list: re-raises errors


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"benchmark inputs support float32 and bfloat16, not {dtype!r}")


def _round_bfloat16(block: np.ndarray, scratch: np.ndarray) -> None:
    """Round the float32 1-D contiguous ``block`` to bfloat16 in place (nearest, ties to even), bit for bit
    ``block.astype(ml_dtypes.bfloat16).astype(np.float32)``; ``scratch`` is uint32, at least as long.

    On the bit pattern: adding 0x7FFF plus the lowest kept bit (bit 16) carries into the kept upper half
    exactly when the dropped lower half is above one half, or one half with the kept part odd; the mask
    then clears the lower half. A carry out of the mantissa steps the exponent, which is right, and at
    the largest finite values gives inf, as ml_dtypes does; zeros, subnormals, negative values and +-inf
    need nothing else. Valid for every non-NaN input: a NaN's payload can carry into inf or the sign bit.
    Generated values are never NaN; a block that holds one anyway (found with a max reduction, which
    propagates NaN: ~0.07 ns an element, under 1% of generating it) goes through ml_dtypes instead.
    """
    if np.isnan(block.max()):
        with np.errstate(invalid="ignore"):  # NaN in, NaN out: not worth a warning
            block[:] = block.astype(ml_dtypes.bfloat16).astype(np.float32)
        return
    bits = block.view(np.uint32)
    carry = scratch[:bits.size]
    np.right_shift(bits, 16, out=carry)
    np.bitwise_and(carry, 1, out=carry)
    np.add(carry, _BF16_HALF, out=carry)
    np.add(bits, carry, out=bits)
    np.bitwise_and(bits, _BF16_KEEP, out=bits)


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` rounded (nearest, ties to even) to ``dtype``, returned as float32, in place."""
    _check_dtype(dtype)
    if dtype == "float32" or values.size == 0:
        return values
    if values.dtype != np.float32:
        raise TypeError(f"round_to_dtype rounds float32 arrays in place, not {values.dtype}")
    if not values.flags.c_contiguous:  # a strided view: round a contiguous copy, write it back
        values[...] = round_to_dtype(np.ascontiguousarray(values), dtype)
        return values
    flat = values.reshape(-1)

    def work(start: int, stop: int) -> None:
        scratch = np.empty(min(_BLOCK, stop - start), dtype=np.uint32)
        for begin in range(start, stop, _BLOCK):
            _round_bfloat16(flat[begin:min(begin + _BLOCK, stop)], scratch)

    _run_chunks(flat.size, work)
    return values


def _normal(entropy: tuple[int, ...], tensor: int, shape: tuple[int, ...], scale: float | np.ndarray = 1.0,
            dtype: str = "float32") -> np.ndarray:
    """float32 standard normals times ``scale``, rounded to ``dtype``: chunk c drawn from its own generator,
    seeded with ``entropy`` and spawn key (``tensor``, c), so the values do not depend on the thread count.

    ``scale`` is one number, or one per index of the leading axis (any shape of that many elements, such
    as [E, 1, 1]); it multiplies in float32.
    """
    _check_dtype(dtype)
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1)
    if flat.size == 0:
        return out
    scales = np.asarray(scale, dtype=np.float32).reshape(-1)
    if scales.size not in (1, shape[0]):
        raise ValueError(f"scale of {scales.size} values for shape {shape}: give 1 or {shape[0]}")
    per_scale = flat.size // scales.size  # consecutive elements sharing one scale
    unit = scales.size == 1 and scales[0] == 1
    rounding = dtype == "bfloat16"

    def work(start: int, stop: int) -> None:
        seed = np.random.SeedSequence(list(entropy), spawn_key=(tensor, start // _CHUNK))
        # SFC64: float32 standard normals ~10% faster than default_rng's PCG64 (measured on a 2-core Xeon VM).
        rng = np.random.Generator(np.random.SFC64(seed))
        scratch = np.empty(min(_BLOCK, stop - start), dtype=np.uint32) if rounding else None
        for begin in range(start, stop, _BLOCK):
            end = min(begin + _BLOCK, stop)
            block = flat[begin:end]
            rng.standard_normal(end - begin, dtype=np.float32, out=block)
            pos = begin
            while pos < end and not unit:  # the scales this block spans (usually one)
                index = pos // per_scale
                upto = min(end, (index + 1) * per_scale)
                block[pos - begin:upto - begin] *= scales[index]
                pos = upto
            if scratch is not None:
                _round_bfloat16(block, scratch)

    _run_chunks(flat.size, work)
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
    entropy = (seed, shape.hidden, shape.experts, ROUTINGS.index(pattern))
    rng = np.random.default_rng(list(entropy))
    h, f, e, s = shape.hidden, shape.ffn, shape.experts, shape.shared_ffn
    magnitude = np.exp(rng.uniform(-0.5, 0.5, size=(e, 1, 1)) * np.log(EXPERT_SPREAD)).astype(np.float32)
    router = _normal(entropy, 0, (h, e), LOGIT_STD / math.sqrt(h - 1), dtype)
    router[0] = routing_prior(pattern, e)
    round_to_dtype(router[0], dtype)
    params = MoEParams(
        router=router,
        w13=_normal(entropy, 1, (e, h, 2 * f), magnitude / math.sqrt(h), dtype),
        w2=_normal(entropy, 2, (e, f, h), magnitude / math.sqrt(f), dtype),
    )
    if shape.router == "sigmoid_topk":
        params.router_bias = _normal(entropy, 3, (e,), 0.01, dtype)
    if s:
        params.shared_w13 = _normal(entropy, 4, (h, 2 * s), 1 / math.sqrt(h), dtype)
        params.shared_w2 = _normal(entropy, 5, (s, h), 1 / math.sqrt(s), dtype)
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
        entropy = (seed, 1, i, shape.tokens, shape.hidden)
        x = _normal(entropy, 0, (shape.tokens, shape.hidden), 1.0, dtype)
        x[:, 0] = 1.0  # the routing-steering feature (module docstring); exact in every dtype
        out.append(Inputs(x, _normal(entropy, 1, (shape.tokens, shape.hidden), 1.0, dtype)))
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
