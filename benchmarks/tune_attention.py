"""Sweep the flash-attention kernel's tile configs on the SD shapes (GPU only) and print the best per head-dim block.

    python benchmarks/tune_attention.py

The launcher in kernels/attention.py uses a fixed table by default (no tuning at run time, so no minute of tuning
before the first image; DIFFUSION_FAST_ATTENTION_AUTOTUNE=1 opts in); this script is how that table is chosen. Times are triton.testing.do_bench medians, fp16.
"""
import itertools
import math

import torch
import triton
import triton.testing
import torch.nn.functional as F

from diffusion_fast.kernels import attention as A

SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64)]
CONFIGS = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))


def run(q, k, v, out, cfg):
    bm, bn, warps, stages = cfg
    b, h, lq, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(lq, bm), b * h)
    A._flash_attention_kernel[grid](q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                    *out.stride()[:3], h, lq, k.shape[2], d, A.LOG2E / math.sqrt(d),
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PRECISION="tf32",
                                    num_warps=warps, num_stages=stages)


for shape in SHAPES:
    b, h, lq, lk, d = shape
    q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b, h, lk, d, device="cuda", dtype=torch.float16) for _ in range(2))
    out = torch.empty_like(q)
    ref = F.scaled_dot_product_attention(q, k, v)
    sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    results = []
    for cfg in CONFIGS:
        try:
            run(q, k, v, out, cfg)
            if not torch.allclose(out, ref, atol=2e-2, rtol=2e-2):
                continue
            results.append((triton.testing.do_bench(lambda: run(q, k, v, out, cfg), return_mode="median"), cfg))
        except Exception:  # noqa: BLE001 - out of shared memory / registers: skip the config
            continue
    results.sort()
    current = A._config(max(16, triton.next_power_of_2(d)), lk, torch.float16)
    cur_ms = next((t for t, c in results if c == current), float("nan"))
    print(f"{shape}: sdpa {sdpa*1e3:.1f} us | current {current} {cur_ms*1e3:.1f} us | best "
          + ", ".join(f"{c} {t*1e3:.1f} us" for t, c in results[:3]), flush=True)
