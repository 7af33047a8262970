"""torch_triton's Triton kernels: the grouped int8 GEMM, the per-row quantizers and the fused SwiGLU."""
