"""The Python cost of each Triton launcher per call, on any machine (no GPU): the kernels' launches are replaced by
no-ops and the launchers run under TRITON_INTERPRET=1 on CPU tensors of SD1.5's shapes, fp16.

    python benchmarks/launcher_host_cost.py

Outside a CUDA graph every call pays this on the host before its kernel is queued, on top of Triton's own launch
cost (not measured here), and a small kernel is then launch-bound: on the H200 the SD1.5 cross-attention launch
through ops took 0.051 ms by do_bench against 0.021 ms for the bare launch. Prints the median microseconds per call.
"""
import importlib
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # (before triton is imported: the launchers then accept CPU tensors)

import torch  # noqa: E402

from diffusion_fast import ops  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls=2000, rounds=7):
    for _ in range(200):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main():
    for name in ("attention", "ddim", "group_norm_silu"):
        importlib.import_module(f"diffusion_fast.kernels.{name}")
    # every kernel of every loaded kernels module (a launcher's plan may live in a helper module of its own)
    for module in [m for name, m in sys.modules.items() if name.startswith("diffusion_fast.kernels.")]:
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
    h = torch.float16
    q, k = torch.randn(2, 8, 4096, 40, dtype=h), torch.randn(2, 8, 77, 40, dtype=h)
    x, w, b = torch.randn(2, 320, 64, 64, dtype=h), torch.randn(320, dtype=h), torch.randn(320, dtype=h)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    u, t, s = (torch.randn(2, 4, 64, 64, dtype=h) for _ in range(3))
    a_t, a_prev = torch.full((2,), 0.3), torch.full((2,), 0.4)
    cases = {  # the calls our models and pipelines make (ops' internal entry points skip the public checks)
        "attention 2x8x4096x77x40 (cross)": lambda: ops._attention(q, k, k, None, "triton"),
        "group_norm_silu 2x320x64x64 NCHW": lambda: ops._group_norm_silu(x, 32, w, b, 1e-5, True, "triton"),
        "group_norm_silu 2x320x64x64 channels_last": lambda: ops._group_norm_silu(x_cl, 32, w, b, 1e-5, True,
                                                                                  "triton"),
        "cfg_ddim_step 2x4x64x64": lambda: ops.cfg_ddim_step(u, t, 7.5, s, a_t, a_prev, backend="triton"),
    }
    for name, fn in cases.items():
        print(f"{name:45s} {per_call_us(fn):7.1f} us per call")


if __name__ == "__main__":
    main()
