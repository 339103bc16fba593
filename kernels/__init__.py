"""Fused Triton kernels, installed as ``diffusion_fast.kernels``: one op per file, the kernel then its launcher.

On CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported
(correctness only). Call them through ``diffusion_fast.ops``, which validates input and dispatches.
"""
