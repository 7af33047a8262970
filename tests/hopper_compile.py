"""Compile `gluon_gemm`'s kernel for Hopper (sm_90a) on a machine without a GPU and print facts of its PTX as JSON:
the check, run in a subprocess by `test_torch_triton`, that the kernel builds, with either epilogue, against the
Triton installed here (Gluon's names move between releases). Triton compiles through ``ptxas`` without a device once
its driver answers for one: the stand-in below names an sm_90 target and never launches. Running the kernel needs
the GPU."""

from __future__ import annotations

import json
import re

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _HopperStandIn:
    """The driver calls a compile makes, answered for an sm_90 device (132 multiprocessors' worth of nothing)."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


#: The compiled cases: (output dtype, TMA-store epilogue). A float32 output always takes the stores from registers
#: (`gluon_gemm.tma_storable`).
CASES = ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True))


def ptx_facts() -> dict[str, dict[str, int]]:
    """Per case (keyed by the output dtype, "+tma_store" added for the TMA-store epilogue): int8 wgmma instructions,
    waits that leave one product in flight, register reallocations (the loading warp's and the consumers'), the
    shared memory the kernel asks for, and the epilogue's traces: bulk tensor stores from shared memory, waits for
    them to have read it, and fences between the threads' shared-memory writes and the TMA's reads."""
    driver.set_active(_HopperStandIn())
    from qmoe.implementations.torch_triton.kernels import gluon_gemm

    a = torch.zeros(1024, 512, dtype=torch.int8)
    b = torch.zeros(4, 384, 512, dtype=torch.int8).transpose(1, 2)
    facts = {}
    for dtype, tma_store in CASES:
        c = torch.empty(1024, 384, dtype=dtype)
        scales, table = torch.empty(1024), torch.empty(64, dtype=torch.int32)
        c_desc = gluon_gemm.output_descriptor(c) if tma_store else None
        kernel = gluon_gemm._grouped_int8_kernel.warmup(
            *gluon_gemm.descriptors(a, b), c, c_desc, scales, scales, table, table, 384, 512, c.stride(0),
            RING=gluon_gemm.STAGES, LOADER_REGS=gluon_gemm.LOADER_REGISTERS, TMA_STORE=tma_store,
            num_warps=gluon_gemm.WARPS, grid=(1,))
        ptx = kernel.asm["ptx"]
        facts[str(dtype) + ("+tma_store" if tma_store else "")] = {
            "int8_wgmma": ptx.count(".s32.s8.s8"),
            "wait_one_in_flight": ptx.count("wgmma.wait_group.sync.aligned 1;"),
            "setmaxnreg": ptx.count("setmaxnreg"), "shared": kernel.metadata.shared,
            "tma_store": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::cta", ptx)),
            "tma_store_wait": ptx.count("cp.async.bulk.wait_group"),
            "fence_async_shared": ptx.count("fence.proxy.async.shared::cta")}
    return facts


if __name__ == "__main__":
    print(json.dumps(ptx_facts()))
