"""Pallas kernels lowered through Triton for CUDA on a machine without a GPU: the check that the Pallas kernels'
tests (`test_jax_pallas_grouped`, `test_jax_pallas_swiglu`, `test_jax_pallas_combine`) run on their kernels. Where
those tests run the kernels is the ``interpret`` fixture of `tests/conftest.py`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import pytest

TRITON_CALL = "__gpu$xla.gpu.triton"


def verified_cuda_lowerings(fn: Callable, args: Sequence[jax.ShapeDtypeStruct]) -> list[bool]:
    """Export ``jax.jit(fn)`` at ``args`` for CUDA, assert that the program holds a Triton kernel, and return
    whether each Triton module Pallas emitted on the way verifies (as XLA's parser verifies it on a GPU).
    Compiling to PTX and running need a GPU: not checked."""
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    verified: list[bool] = []

    def lower_and_verify(*lower_args, **kwargs):
        lowered = lower(*lower_args, **kwargs)
        verified.append(lowered.module.operation.verify())
        return lowered

    with pytest.MonkeyPatch.context() as patch:  # undone on return: a second call wraps the original again
        patch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
        exported = export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    assert TRITON_CALL in exported.mlir_module(), "no Triton kernel in the CUDA program"
    return verified
