"""Kernel benchmark on a CUDA GPU, one command:

    python benchmarks/gpu_kernels.py [--out benchmarks/results/gpu_kernels.jsonl] [--quick]

Measures, in one run with triton.testing.do_bench (medians): the GPU's ceilings (device-to-device copy bandwidth,
counting bytes read + written; an fp16 8192^3 matrix product), then each kernel against PyTorch eager on SD1.5 and
SDXL shapes: group_norm_silu vs F.group_norm + F.silu (fp16, NCHW and channels_last), flash attention vs
F.scaled_dot_product_attention (fp16), and the fused CFG+DDIM step vs diffusers' CFG combine + DDIMScheduler.step.
Each row: time, GB/s or TFLOP/s, the fraction of the measured ceiling, and the speedup. Appends one JSON record
(GPU, versions, date, rows) to --out and prints a table. One failing row is recorded with its error; the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

GN = {  # (N, C, H, W) per model at its native size; VAE decoder shapes are batch 1
    "SD1.5 UNet 512px": [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)],
    "SD1.5 VAE dec 512px": [(1, 512, 64, 64), (1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 512, 512),
                            (1, 128, 512, 512)],
    "SDXL UNet 1024px": [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32)],
    "SDXL VAE dec 1024px": [(1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 512, 512), (1, 128, 1024, 1024)],
}
ATTN = {  # (B, H, Lq, Lk, D)
    "SD1.5 512px": [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
                    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160)],
    "SDXL 1024px": [(2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64)],
}
LATENTS = {"SD1.5 512px": [(1, 4, 64, 64), (2, 4, 64, 64)], "SDXL 1024px": [(1, 4, 128, 128), (4, 4, 128, 128)]}


def median_ms(fn):
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except TypeError:  # older triton: no return_mode
        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0]


def graphed_ms(fn, replays=200):
    """Median time of fn as one replay of a CUDA graph holding 20 back-to-back calls (per call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    return median_ms(graph.replay) / 20


def ceilings():
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB: far past L2
    dst = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / (median_ms(lambda: dst.copy_(big)) * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_tflops = 2 * 8192**3 / (median_ms(lambda: a @ b) * 1e-3) / 1e12
    del big, dst, a, b
    torch.cuda.empty_cache()
    return copy_gbs, mm_tflops


def run(quick=False):
    import diffusion_fast  # noqa: F401
    from diffusion_fast import ops

    copy_gbs, mm_tflops = ceilings()
    print(f"ceilings: copy {copy_gbs:.0f} GB/s (read + write), fp16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    rows = []

    def add(kernel, model, shape, layout, ours_fn, eager_fn, amount, unit):
        row = {"kernel": kernel, "model": model, "shape": "x".join(map(str, shape)), "layout": layout}
        try:
            ours_fn(), eager_fn()  # compile / warm up
            t_ours, t_eager = median_ms(ours_fn), median_ms(eager_fn)
            ceiling = copy_gbs if unit == "GB/s" else mm_tflops
            scale = 1e9 if unit == "GB/s" else 1e12
            row.update(ours_ms=t_ours, eager_ms=t_eager, unit=unit, ours_rate=amount / (t_ours * 1e-3) / scale,
                       eager_rate=amount / (t_eager * 1e-3) / scale, speedup=t_eager / t_ours)
            row["ours_fraction_of_ceiling"] = row["ours_rate"] / ceiling
            row["eager_fraction_of_ceiling"] = row["eager_rate"] / ceiling
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        if "error" in row:
            print(f"{kernel:16s} {model:20s} {row['shape']:22s} {layout:14s} ERROR {row['error']}", flush=True)
        else:
            print(f"{kernel:16s} {model:20s} {row['shape']:22s} {layout:14s} ours {row['ours_ms']:8.4f} ms "
                  f"{row['ours_rate']:7.1f} {unit} ({row['ours_fraction_of_ceiling']:5.1%})  eager "
                  f"{row['eager_ms']:8.4f} ms  x{row['speedup']:.2f}", flush=True)

    for model, shapes in GN.items():
        for shape in shapes[:2] if quick else shapes:
            for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
                x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
                w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
                b = torch.randn(shape[1], device="cuda", dtype=torch.float16)
                add("group_norm_silu", model, shape, layout, lambda: ops.group_norm_silu(x, 32, w, b),
                    lambda: F.silu(F.group_norm(x, 32, w, b)), 2 * x.numel() * 2, "GB/s")
                del x
    for model, shapes in ATTN.items():
        for bsz, heads, lq, lk, d in shapes[:2] if quick else shapes:
            q = torch.randn(bsz, heads, lq, d, device="cuda", dtype=torch.float16)
            k = torch.randn(bsz, heads, lk, d, device="cuda", dtype=torch.float16)
            v = torch.randn(bsz, heads, lk, d, device="cuda", dtype=torch.float16)
            add("attention", model, (bsz, heads, lq, lk, d), "fp16", lambda: ops.attention(q, k, v),
                lambda: F.scaled_dot_product_attention(q, k, v), 4 * bsz * heads * lq * lk * d, "TFLOP/s")
    try:
        import diffusers

        sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
        sched.set_timesteps(50, device="cuda")
    except ImportError:
        sched = None
        print("diffusers is not importable: the cfg_ddim_step rows compare against our unfused reference instead")
    for model, shapes in LATENTS.items():
        for shape in shapes:
            u, t, x = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
            a_t, a_prev = torch.tensor(0.3, device="cuda"), torch.tensor(0.4, device="cuda")
            timestep = sched.timesteps[10] if sched is not None else None
            eager = (lambda: sched.step(u + 7.5 * (t - u), timestep, x)) if sched is not None else \
                (lambda: ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev, backend="reference"))
            add("cfg_ddim_step", model, shape, "vs diffusers" if sched is not None else "vs reference",
                lambda: ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev), eager, 5 * u.numel() * 2, "GB/s")
            # The same op as the pipeline runs it, inside a CUDA graph: the kernel's own time, no Python launch cost.
            graph_ms = graphed_ms(lambda: ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev))
            rows[-1]["ours_graphed_ms"] = graph_ms
            rows[-1]["ours_graphed_fraction_of_ceiling"] = 5 * u.numel() * 2 / (graph_ms * 1e-3) / 1e9 / copy_gbs
            rows[-1]["graphed_speedup_vs_eager"] = rows[-1].get("eager_ms", float("nan")) / graph_ms
            print(f"{'':16s} {'':20s} {'':22s} {'in a CUDA graph':14s} ours {graph_ms:8.4f} ms "
                  f"({rows[-1]['ours_graphed_fraction_of_ceiling']:5.1%} of copy)  "
                  f"x{rows[-1]['graphed_speedup_vs_eager']:.1f} vs eager", flush=True)
    return {"copy_GBps": copy_gbs, "matmul_fp16_TFLOPs": mm_tflops}, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_kernels.jsonl"))
    parser.add_argument("--quick", action="store_true", help="two shapes per group")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA GPU")
    import triton

    ceiling, rows = run(args.quick)
    record = {"benchmark": "gpu_kernels", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "ceilings": ceiling, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
