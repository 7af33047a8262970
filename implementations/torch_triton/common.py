"""Shared pieces of the torch_triton kernels: the launch record, the run mode, round-half-even.

Imported only when the torch_triton backend runs (it imports triton). Whether kernels run compiled
or in Triton's interpreter is fixed when a kernel module is imported: ``triton.jit`` reads
``TRITON_INTERPRET`` at decoration time, so the suite sets it in ``pytest_configure`` on CPU.
"""

from __future__ import annotations

from collections import Counter

import triton
import triton.language as tl

#: Kernel launches by kernel name, counted by every wrapper right before it launches. The
#: backend-specific tests read it to prove that a Triton kernel (not a torch fallback) ran.
LAUNCHES: Counter[str] = Counter()

#: Uses of a non-Triton, non-grouped fallback by name (a per-group loop where torch refused
#: `torch._grouped_mm` for a device and dtype). Empty in a healthy run.
FALLBACKS: Counter[str] = Counter()

INT8_MAX = 127

#: Below this many elements the memory-bound kernels (SwiGLU, combine, per-expert quantization) launch with their
#: fixed shape, not an autotuned one: the correctness checks' small problems then cost one compile each,
#: not a tuning sweep. Read at each launch (a test lowers it to compare the two).
TUNE_MIN_ELEMENTS = 2**22


def is_interpreted_kernel(kernel: object) -> bool:
    """True when ``kernel`` (a ``triton.jit`` result) was built for the interpreter, whatever the
    environment says now: the mode is fixed when the kernel's module is imported."""
    return type(kernel).__name__ == "InterpretedFunction"


def record_launch(kernel: str) -> None:
    LAUNCHES[kernel] += 1


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def round_half_even(v):
    """rint(v) with ties to even, exact for |v| < 2^23 (float32): floor, then bump where the
    fraction is above one half or is exactly one half on an odd integer (NumPy's rint, the
    reference's rule; `tl.math.rint` is not available in the interpreter on every version)."""
    low = tl.floor(v)
    fraction = v - low
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (fraction > 0.5) | ((fraction == 0.5) & low_is_odd)
    return tl.where(up, low + 1.0, low)
