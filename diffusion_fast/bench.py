"""``diffusion-fast bench``: kernel throughput and end-to-end sampling speed, measured side by side in one run.

Kernels: each op on the config's shapes, three ways — our fast path, our reference, and PyTorch eager (F.group_norm +
F.silu; F.scaled_dot_product_attention; the unfused CFG combine + DDIM arithmetic). End to end: our pipeline fast and
reference, and diffusers eager and diffusers + ``diffusion_fast.accelerate`` when diffusers is installed, all from the
same random weights, timed round robin (each system once per round). Medians of ``--repeats`` runs (kernels: at
least 20). Writes a CSV and a PNG bar chart of speedups; prints a table.
"""
from __future__ import annotations

import csv
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from . import backend, ops, reference
from .pipeline_graphs import wants_channels_last

CONFIGS = {
    # (group-norm shapes, attention (B, H, Lq, Lk, D) shapes, latent shapes); GroupNorm groups in GROUPS
    "tiny": ([(2, 48, 32, 32), (2, 64, 16, 16)], [(2, 4, 1024, 1024, 12), (2, 4, 1024, 77, 12)], [(2, 4, 32, 32)]),
    "sd15": ([(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 128, 128)],
             [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160)],
             [(1, 4, 64, 64), (2, 4, 64, 64)]),
}


GROUPS = {"tiny": 16, "sd15": 32}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_rows(config, device, dtype, repeats):
    gn_shapes, attn_shapes, latent_shapes = CONFIGS[config]
    groups = GROUPS[config]
    rows = []
    esize = torch.finfo(dtype).bits // 8

    def add(op, shape, impls, amount, unit):
        eager_s = None
        for impl, fn in impls:
            seconds = median_seconds(fn, device, max(repeats, 20))  # kernels are cheap: at least 20 samples
            eager_s = seconds if impl == "pytorch eager" else eager_s
            rows.append({"section": "kernel", "op": op, "shape": "x".join(map(str, shape)), "impl": impl,
                         "dtype": str(dtype).replace("torch.", ""), "median_ms": seconds * 1e3,
                         "throughput": amount / seconds / 1e9 if unit == "GB/s" else amount / seconds / 1e12,
                         "unit": unit})
        for r in rows[-len(impls):]:
            r["speedup_vs_eager"] = eager_s / (r["median_ms"] / 1e3) if eager_s else float("nan")

    for shape in gn_shapes:
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w, b = torch.randn(shape[1], device=device, dtype=dtype), torch.randn(shape[1], device=device, dtype=dtype)
            add(f"group_norm_silu {layout}", shape, [
                ("fast", lambda: ops.group_norm_silu(x, groups, w, b)),
                ("reference", lambda: ops.group_norm_silu(x, groups, w, b, backend="reference")),
                ("pytorch eager", lambda: F.silu(F.group_norm(x, groups, w, b))),
            ], 2 * x.numel() * esize, "GB/s")
    for bsz, heads, lq, lk, d in attn_shapes:
        q = torch.randn(bsz, heads, lq, d, device=device, dtype=dtype)
        k, v = (torch.randn(bsz, heads, lk, d, device=device, dtype=dtype) for _ in range(2))
        add("attention", (bsz, heads, lq, lk, d), [
            ("fast", lambda: ops.attention(q, k, v)),
            ("reference", lambda: reference.attention(q, k, v)),
            ("pytorch eager", lambda: F.scaled_dot_product_attention(q, k, v)),
        ], 4 * bsz * heads * lq * lk * d, "TFLOP/s")
    for shape in latent_shapes:
        u, t, s = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        a_t, a_prev = torch.tensor(0.3, device=device), torch.tensor(0.4, device=device)
        add("cfg_ddim_step", shape, [
            ("fast", lambda: ops.cfg_ddim_step(u, t, 7.5, s, a_t, a_prev)),
            ("reference", lambda: ops.cfg_ddim_step(u, t, 7.5, s, a_t, a_prev, backend="reference")),
            ("pytorch eager", lambda: reference.cfg_ddim_step(u, t, 7.5, s, a_t, a_prev)),
        ], 5 * u.numel() * esize, "GB/s")
    return rows


def _write_random_folder(config, folder, seed):
    from . import tiny

    if config == "tiny":
        return tiny.write_tiny_pipeline(folder, "sd1", seed)
    return tiny.write_sd15_pipeline(folder, seed)


def e2e_rows(config, device, dtype, steps, repeats, seed=0):
    from .pipeline import StableDiffusionPipeline

    rows = []
    with tempfile.TemporaryDirectory(prefix="diffusion-fast-bench-") as folder:
        _write_random_folder(config, folder, seed)
        # one pipeline per memory format, so the round robin never converts weights (or recaptures graphs) between runs
        layouts = {"NCHW": False, "channels_last": True}
        auto = "channels_last" if wants_channels_last("auto", device) else "NCHW"  # what "auto" picks here
        pipes = {name: StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, device=device,
                                                               channels_last=flag) for name, flag in layouts.items()}
        for p in pipes.values():
            p.set_progress_bar_config(disable=True)
        height = pipes[auto].unet.config.sample_size * pipes[auto].vae_scale_factor

        def run_ours(layout, name):
            with backend(name):
                return pipes[layout]("a photo", num_inference_steps=steps, output_type="latent",
                                     generator=torch.Generator("cpu").manual_seed(seed)).seconds

        systems = [(f"diffusion_fast pipeline (fast, {layout}{', the auto choice' if layout == auto else ''})",
                    lambda layout=layout: run_ours(layout, "fast")) for layout in layouts]
        systems.append(("diffusion_fast pipeline (reference)", lambda: run_ours(auto, "reference")))
        try:
            import diffusers
        except ImportError:
            diffusers = None
            print("bench: diffusers is not installed; skipping the diffusers rows (pip install diffusers)")
        if diffusers is not None:
            from .diffusers_patch import accelerate, restore

            pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            pipe.set_progress_bar_config(disable=True)

            def run_diffusers():
                _sync(device)
                t0 = time.perf_counter()
                pipe("a photo", num_inference_steps=steps, height=height, width=height,
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
                _sync(device)
                return time.perf_counter() - t0

            systems += [("diffusers eager", run_diffusers), ("diffusers + accelerate", run_diffusers)]
        def timed(name, fn):
            if name == "diffusers + accelerate":
                accelerate(pipe)
            try:
                return fn()
            finally:
                if name == "diffusers + accelerate":
                    restore(pipe)

        for name, fn in systems:
            timed(name, fn)  # warm-up: kernel compilation, graph capture
        # round robin: every system once per round, so drifts in machine load hit all of them alike
        times = {name: [] for name, _ in systems}
        for _ in range(repeats):
            for name, fn in systems:
                times[name].append(timed(name, fn))
        for name, _ in systems:
            seconds = statistics.median(times[name])
            rows.append({"section": "e2e", "op": f"{config} {height}px, {steps} DDIM steps, CFG 7.5", "impl": name,
                         "dtype": str(dtype).replace("torch.", ""), "median_ms": seconds * 1e3,
                         "throughput": steps / seconds, "unit": "it/s", "shape": f"1x{height}x{height}"})
    base = next((r["throughput"] for r in rows if r["impl"] == "diffusers eager"), None)
    for r in rows:
        r["speedup_vs_eager"] = r["throughput"] / base if base else float("nan")
    return rows


def write_csv(rows, path):
    fields = ["section", "op", "shape", "dtype", "impl", "median_ms", "throughput", "unit", "speedup_vs_eager"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in fields})


def write_plot(rows, path, title):
    """A horizontal bar chart of speedup vs PyTorch/diffusers eager, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    bars = [(f"{r['op']} {r['shape']} [{r['impl']}]", r["speedup_vs_eager"]) for r in rows
            if r.get("speedup_vs_eager") == r.get("speedup_vs_eager") and r["impl"] not in ("pytorch eager", "diffusers eager")]
    width, row_h, label_w = 1100, 18, 620
    img = Image.new("RGB", (width, 40 + row_h * max(1, len(bars))), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), f"{title} - speedup vs eager (line at 1x)", fill="black")
    top = max([s for _, s in bars] + [1.0])
    scale = (width - label_w - 80) / top
    for i, (label, s) in enumerate(bars):
        y = 32 + i * row_h
        draw.text((10, y + 2), label[:95], fill="black")
        draw.rectangle([label_w, y + 3, label_w + s * scale, y + row_h - 3], fill="#2a7" if s >= 1 else "#c44")
        draw.text((label_w + s * scale + 4, y + 2), f"{s:.2f}x", fill="black")
    one = label_w + scale
    draw.line([one, 28, one, img.height], fill="gray")
    img.save(path)


def run_bench(args, device, dtype) -> int:
    for path in (args.csv, args.plot, getattr(args, "jsonl", None)):  # fail before the run, not after it
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(f"the folder of {path!r} does not exist")
    steps = args.steps or (10 if args.config == "tiny" else 50)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"diffusion-fast bench --config {args.config} on {name}, {dtype}, torch {torch.__version__}")
    rows = [] if args.skip_kernels else kernel_rows(args.config, device, dtype, args.repeats)
    if not args.skip_e2e:
        rows += e2e_rows(args.config, device, dtype, steps, args.repeats, args.seed)
    print(f"{'op':42s} {'shape':20s} {'impl':36s} {'median ms':>10s} {'throughput':>16s} {'vs eager':>8s}")
    for r in rows:
        print(f"{r['op'][:42]:42s} {r['shape'][:20]:20s} {r['impl']:36s} {r['median_ms']:10.3f} "
              f"{r['throughput']:9.2f} {r['unit']:6s} {r['speedup_vs_eager']:7.2f}x")
    write_csv(rows, args.csv)
    write_plot(rows, args.plot, f"diffusion-fast bench {args.config} on {name}")
    print(f"wrote {args.csv} and {args.plot}")
    if getattr(args, "jsonl", None):
        append_record(rows, args.jsonl, name, dtype, args.config, steps)
        print(f"appended the run to {args.jsonl}")
    return 0


def append_record(rows, path, device_name, dtype, config, steps):
    """One JSON line per run: what ran where (device, versions, date) and every row, for the README's tables."""
    import datetime
    import json
    import platform

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    record = {"benchmark": f"diffusion-fast bench --config {config}", "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "device": device_name, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "diffusers": diffusers_version, "dtype": str(dtype).replace("torch.", ""),
        "steps": steps, "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                  if k != "section"} for r in rows]}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
