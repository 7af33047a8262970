"""Central differences of a float64 NumPy loss: the independent check of the reference's analytic gradients."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: The step: float64 losses of O(1) keep a central difference's truncation (eps^2) and rounding (1e-16 / eps)
#: errors near 1e-10 at this step, far below the tests' relative bounds.
FD_EPS = 1e-6


def central_difference(loss: Callable[[], float], array: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """(L(a + eps e_i) - L(a - eps e_i)) / (2 eps) for every element i of ``array``, perturbed in place."""
    flat = array.reshape(-1)
    assert np.shares_memory(flat, array), "central_difference needs a contiguous array to perturb in place"
    grad = np.zeros(flat.size)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        up = loss()
        flat[i] = original - eps
        down = loss()
        flat[i] = original
        grad[i] = (up - down) / (2.0 * eps)
    return grad.reshape(array.shape)
