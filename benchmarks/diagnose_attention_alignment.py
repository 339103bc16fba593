"""Which views does the compiled attention kernel get wrong when their rows are not 16 bytes apart? One GPU run.

    python benchmarks/diagnose_attention_alignment.py

On the H200 (triton 3.6) tests/test_kernel_attention.py's fp16 views with a row stride of 41 elements came out wrong
(error 0.97 against PyTorch's 1e-3) while the interpreter, fp32 and every 16-byte-aligned view were right. attention()
now copies such views into aligned rows first; this launches the kernel directly (kernel._launch, no copy) on
unaligned views, one variable changed at a time (row stride, base offset, dtype, tiles, pipeline stages, head-dim
split), and prints each case's error against the float64 reference beside PyTorch's own, to say where it breaks.
Its first H200 run: the 16-byte-aligned control right, then the test's view (stride 41) faulted with an illegal memory
access, which ends the CUDA context; so each case runs in its own process.
"""
import subprocess
import sys

import torch
import triton

from diffusion_fast import reference
from diffusion_fast.kernels import attention as kernel


def case(name, dtype, width, head_dim, offset=0, config=None, split=None, lens=(19, 23)):
    gen = torch.Generator().manual_seed(7)
    len_q, len_k = lens
    wide = [torch.randn(2, 3, n, width + offset, generator=gen).to("cuda", dtype) for n in (len_q, len_k, len_k)]
    q, k, v = (t[..., offset:offset + head_dim] for t in wide)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    config = config or kernel._config(max(16, triton.next_power_of_2(head_dim)), len_k, dtype)
    try:
        kernel._launch(q, k, v, out, None, config, split)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a case that does not compile is an answer too
        print(f"{name:58s} {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return
    ref = reference.attention(q.double(), k.double(), v.double())
    err = (out.double() - ref).abs().max().item()
    base = (reference.attention(q, k, v).double() - ref).abs().max().item()
    verdict = "ok" if err <= 2 * base + 1e-3 else "WRONG"
    print(f"{name:58s} config {config} error {err:.2e} (PyTorch {base:.2e}) {verdict}", flush=True)


CASES = {  # name: (dtype, row stride, head dim, case()'s other arguments)
    "fp16 row stride 48, head dim 40 (16-byte rows: control)": ("float16", 48, 40, {}),
    "fp16 row stride 41, head dim 40 (the test's view)": ("float16", 41, 40, {}),
    "fp16 row stride 42 (4-byte rows)": ("float16", 42, 40, {}),
    "fp16 row stride 44 (8-byte rows)": ("float16", 44, 40, {}),
    "fp16 head dim 12 contiguous (24-byte rows)": ("float16", 12, 12, {}),
    "fp16 row stride 40, base one element in": ("float16", 40, 40, {"offset": 1}),
    "fp16 row stride 41, head dim 32 (no tail block)": ("float16", 41, 32, {}),
    "fp16 row stride 41, padded head dim (no split)": ("float16", 41, 40, {"split": False}),
    "fp16 row stride 41, one pipeline stage": ("float16", 41, 40, {"config": (128, 128, 8, 1)}),
    "fp16 row stride 41, 64x32 tiles, 4 warps, 1 stage": ("float16", 41, 40, {"config": (64, 32, 4, 1)}),
    "fp16 row stride 41, lengths 128 (no row/key masks)": ("float16", 41, 40, {"lens": (128, 128)}),
    "bf16 row stride 41": ("bfloat16", 41, 40, {}),
    "fp32 row stride 41 (control: right before)": ("float32", 41, 40, {}),
}


def main():
    if len(sys.argv) == 2:  # one case, in this process
        dtype, width, head_dim, extra = CASES[sys.argv[1]]
        case(sys.argv[1], getattr(torch, dtype), width, head_dim, **extra)
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for name in CASES:
        result = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stdout.splitlines() if line.startswith(name)]
        print(lines[-1] if lines else f"{name:58s} died (exit {result.returncode}): "
              f"{(result.stderr.strip().splitlines() or [''])[-1][:120]}", flush=True)


if __name__ == "__main__":
    main()
