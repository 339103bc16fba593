"""End-to-end sampling benchmark on a CUDA GPU, one command:

    python benchmarks/gpu_e2e.py [--steps 50] [--repeats 3] [--out benchmarks/results/gpu_e2e.jsonl] [--no-compile]
                                 [--dry-run]

SD1.5's architecture with random weights (nothing is downloaded), fp16, 512x512, CFG 7.5, DDIM, batch 1. Measured
side by side in one run, medians of --repeats whole calls (text encoding and the loop, latents out, no VAE decode):
diffusers eager (SDPA), diffusers + torch.compile (default mode; skipped with --no-compile), diffusers +
diffusion_fast.accelerate (its default channels_last, and NCHW), and our pipeline (fast with CUDA graphs in both
memory formats, fast with only the UNet graphed as for a non-DDIM scheduler, fast without graphs, reference); and
perturbed-attention guidance on the mid block beside CFG, diffusers' PAG pipeline and ours (its speedup against
diffusers' PAG row too). Quality: PSNR of our fp16 image (and diffusers' fp16 image) against our fp32 reference-path
image from the same float32 noise (in torch 2.11 a float16 randn is not the float32 one rounded, so a shared seed
alone would compare different images), computed with TF32 off (and how far TF32, PyTorch's default for fp32
convolutions, moves that image). Also the time from a fresh process start to its first image (``diffusion-fast
generate`` in a subprocess, cold Triton cache or not as found). Appends one JSON record to --out and prints a table.

--dry-run runs the same code on the CPU with the built-in tiny model (fp32, 2 steps, 1 repeat, no torch.compile) and
marks its record ``dry_run`` (the results tables skip it): its figures mean nothing, but a slip in this script shows
up in the CPU test suite (tests/test_gpu_benchmark_code.py) rather than in a scarce GPU session.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import diffusion_fast
from diffusion_fast import backend, tiny
from diffusion_fast.numerics import psnr, seed_latents, strict_fp32
from diffusion_fast.pipeline import StableDiffusionPipeline
from diffusion_fast.pipeline_pag import StableDiffusionPAGPipeline

PROMPT = "a photograph of an astronaut riding a horse"
OURS_PAG = "diffusion_fast PAG pipeline (fast, UNet graph; mid block, scale 3)"
DIFFUSERS_PAG = "diffusers PAG eager (SDPA; mid block, scale 3)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, repeats, device):
    fn()  # warm-up: Triton compilation/autotune, graph capture, cuDNN algorithm choice
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def record_header(dry_run):
    """What every end-to-end record starts with: its kind, the date, the GPU and the versions."""
    import diffusers
    import triton

    return {"benchmark": "gpu_e2e", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "gpu": "none (--dry-run on the CPU)" if dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__}


def first_image_seconds(folder, steps):
    """Seconds from starting a fresh process to its first image written, as a new user would see it."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "diffusion_fast.cli", "generate", "--model", folder, "--steps", str(steps),
             "--no-progress", "--output", os.path.join(out, "first.png")],
            capture_output=True, text=True, timeout=600,
        )
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, proc.stderr[-2000:]
    return seconds, proc.stdout[-500:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_e2e.jsonl"))
    parser.add_argument("--no-compile", action="store_true", help="skip diffusers + torch.compile")
    parser.add_argument("--folder", default=None, help="reuse an SD-layout folder instead of writing a random one")
    parser.add_argument("--dry-run", action="store_true",
                        help="this script's code on the CPU with the tiny model (fp32, 2 steps): no figures")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.repeats, args.no_compile = 2, 1, True
    elif not torch.cuda.is_available():
        sys.exit("gpu_e2e.py needs a CUDA GPU (--dry-run runs its code on the CPU)")
    import diffusers

    device, dtype = (torch.device("cpu"), torch.float32) if args.dry_run else (torch.device("cuda"), torch.float16)
    steps = args.steps
    folder = args.folder or tempfile.mkdtemp(prefix="sd15-random-")
    if not args.folder:
        t0 = time.perf_counter()
        if args.dry_run:
            tiny.write_tiny_pipeline(folder, "sd1", seed=0)
        else:
            tiny.write_sd15_pipeline(folder, seed=0)
        print(f"wrote {'tiny' if args.dry_run else 'SD1.5'}-architecture random weights to {folder} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    rows, notes = [], []

    def add(system, seconds, times, **extra):
        rows.append({"system": system, "it_per_s": steps / seconds, "median_s": seconds,
                     "times_s": [round(t, 4) for t in times], **extra})
        print(f"{system:45s} {steps / seconds:8.2f} it/s  (median {seconds:.3f} s)", flush=True)

    def gen():
        return torch.Generator("cpu").manual_seed(0)

    # ---- our pipeline --------------------------------------------------------------------------------------------
    ours = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, device=device)
    ours.set_progress_bar_config(disable=True)
    # The images compared across dtypes start from one float32 noise: in torch 2.11 a float16 randn is not the
    # float32 one rounded, so the same seed would give each dtype a different image (numerics.seed_latents).
    noise = seed_latents(ours.unet.config, 0)

    def run_ours(name, graph=True, channels_last="auto", eta=0.0):
        ours.cuda_graph = "auto" if graph else False
        ours.channels_last = channels_last
        with backend(name):
            return ours(PROMPT, num_inference_steps=steps, generator=gen(), output_type="latent", eta=eta)

    for label, name, graph, layout, eta in (
            # "auto" is channels_last on CUDA (records before 2026-12-04: NCHW, then labelled "(fast, CUDA graph)")
            ("diffusion_fast pipeline (fast, CUDA graph, channels_last)", "fast", True, "auto", 0.0),
            ("diffusion_fast pipeline (fast, CUDA graph, NCHW)", "fast", True, False, 0.0),
            # eta > 0 draws fresh noise each step, so only the UNet call is graphed: the speed a non-DDIM
            # scheduler (Euler, DDPM) gets, on the same UNet and step count
            ("diffusion_fast pipeline (fast, UNet-only graph: DDIM eta 0.5)", "fast", True, "auto", 0.5),
            ("diffusion_fast pipeline (fast, no graph)", "fast", False, "auto", 0.0),
            ("diffusion_fast pipeline (reference)", "reference", False, "auto", 0.0)):
        try:
            add(label, *timed(lambda: run_ours(name, graph, layout, eta), args.repeats, device))
        except Exception as exc:  # one failing system must not hide the others
            notes.append(f"{label}: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
    ours.cuda_graph, ours.channels_last = "auto", "auto"
    # perturbed-attention guidance beside CFG (the UNet on 3 copies of the batch), on the same components
    pag = StableDiffusionPAGPipeline.from_pipe(ours)  # (the mid block, as diffusers' default)

    def run_pag():
        with backend("fast"):
            return pag(PROMPT, num_inference_steps=steps, generator=gen(), output_type="latent", pag_scale=3.0)

    try:
        add(OURS_PAG, *timed(run_pag, args.repeats, device))
    except Exception as exc:
        notes.append(f"{OURS_PAG}: {type(exc).__name__}: {exc}")
        print(notes[-1], flush=True)
    pag = None  # (its graphs freed)
    with backend("fast"):
        img_fast = ours(PROMPT, num_inference_steps=steps, latents=noise, output_type="np").images  # channels_last
        ours.channels_last = False  # NCHW's image too, the layout "auto" picked on CUDA before
        img_fast_nchw = ours(PROMPT, num_inference_steps=steps, latents=noise, output_type="np").images
        ours.channels_last = "auto"
    ours = None  # (freed before the next pipeline loads)
    free(device)
    ref32 = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, device=device)
    ref32.set_progress_bar_config(disable=True)
    with backend("reference"):
        with strict_fp32():  # the fp32 reference in IEEE fp32 (PyTorch's default lets cuDNN convolutions use TF32)
            img_ref32 = ref32(PROMPT, num_inference_steps=steps, latents=noise, output_type="np").images
        img_ref32_tf32 = ref32(PROMPT, num_inference_steps=steps, latents=noise, output_type="np").images
    ref32 = None
    free(device)

    # ---- diffusers (from_pipe gets the dtype: its default, float32, would cast the shared UNet in place) ----------
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run_diffusers(output_type="latent"):
        if output_type == "np":  # an image compared across dtypes: the shared noise, in this pipeline's dtype
            return pipe(PROMPT, num_inference_steps=steps, latents=noise.to(device, dtype), output_type="np").images
        return pipe(PROMPT, num_inference_steps=steps, generator=gen(), output_type=output_type).images

    add("diffusers eager (SDPA)", *timed(run_diffusers, args.repeats, device))
    try:
        pag = diffusers.StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers="mid", torch_dtype=dtype)
        pag.set_progress_bar_config(disable=True)
        add(DIFFUSERS_PAG, *timed(lambda: pag(PROMPT, num_inference_steps=steps, generator=gen(), pag_scale=3.0,
                                              output_type="latent"), args.repeats, device))
        pag = None
    except Exception as exc:
        notes.append(f"{DIFFUSERS_PAG}: {type(exc).__name__}: {exc}")
        print(notes[-1], flush=True)
    try:  # (a failure here must not lose the timings above: the H200 run's record was lost that way)
        img_diffusers = run_diffusers("np")
    except Exception as exc:
        notes.append(f"diffusers fp16 image: {type(exc).__name__}: {str(exc)[:300]}")
        print(notes[-1], flush=True)
        img_diffusers = None
    img_accel = {}
    for label, layout in (("diffusers + diffusion_fast.accelerate", "auto"),  # channels_last on CUDA
                          ("diffusers + diffusion_fast.accelerate (NCHW)", False)):
        try:
            diffusion_fast.accelerate(pipe, channels_last=layout)
            add(label, *timed(run_diffusers, args.repeats, device),
                report=str(getattr(pipe, "_diffusion_fast_report", "")))
            img_accel[layout] = run_diffusers("np")
            diffusion_fast.restore(pipe)
        except Exception as exc:
            notes.append(f"{label}: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
    if not args.no_compile:
        try:
            original = pipe.unet
            pipe.unet = torch.compile(pipe.unet)
            t0 = time.perf_counter()
            run_diffusers()
            compile_s = time.perf_counter() - t0
            add("diffusers + torch.compile (default mode)", *timed(run_diffusers, args.repeats, device),
                compile_seconds=round(compile_s, 1))
            pipe.unet = original
        except Exception as exc:
            notes.append(f"torch.compile: {type(exc).__name__}: {str(exc)[:300]}")
            print(notes[-1], flush=True)
    pipe = None
    free(device)
    # diffusers in fp32 on this GPU (TF32 off, like our reference): is our fp32 reference the image diffusers makes?
    pipe32 = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe32.scheduler = diffusers.DDIMScheduler.from_config(pipe32.scheduler.config)
    pipe32.set_progress_bar_config(disable=True)
    with strict_fp32():
        img_diffusers32 = pipe32(PROMPT, num_inference_steps=steps, latents=noise.to(device), output_type="np").images
    pipe32 = None
    free(device)

    first_s, first_log = first_image_seconds(folder, steps)
    ours_db = psnr(img_fast, img_ref32)
    quality = {"psnr_ours_fp16_vs_fp32_reference_db": ours_db,  # the default layout (NCHW on CUDA before 2026-12-04)
               "psnr_ours_fp16_channels_last_vs_fp32_reference_db": ours_db,
               "psnr_ours_fp16_nchw_vs_fp32_reference_db": psnr(img_fast_nchw, img_ref32),
               "psnr_diffusers_fp32_vs_our_fp32_reference_db": psnr(img_diffusers32, img_ref32),
               "psnr_our_fp32_reference_with_tf32_vs_without_db": psnr(img_ref32_tf32, img_ref32)}
    if img_diffusers is not None:
        quality["psnr_diffusers_fp16_vs_our_fp32_reference_db"] = psnr(img_diffusers, img_ref32)
        quality["psnr_ours_fp16_vs_diffusers_fp16_db"] = psnr(img_fast, img_diffusers)
        if "auto" in img_accel:
            quality["psnr_accelerated_vs_diffusers_fp16_db"] = psnr(img_accel["auto"], img_diffusers)
        if False in img_accel:
            quality["psnr_accelerated_nchw_vs_diffusers_fp16_db"] = psnr(img_accel[False], img_diffusers)
    eager = next(r["it_per_s"] for r in rows if r["system"].startswith("diffusers eager"))
    for r in rows:
        r["speedup_vs_diffusers_eager"] = r["it_per_s"] / eager
    pag_rows = {r["system"]: r for r in rows if r["system"] in (OURS_PAG, DIFFUSERS_PAG)}
    if len(pag_rows) == 2:  # PAG against PAG: the same work (3 copies of the batch)
        pag_rows[OURS_PAG]["speedup_vs_diffusers_pag"] = (pag_rows[OURS_PAG]["it_per_s"]
                                                          / pag_rows[DIFFUSERS_PAG]["it_per_s"])
    record = {
        **record_header(args.dry_run),
        "config": (f"tiny SD1-shaped model, random weights, fp32, CFG 7.5, {steps} DDIM steps, batch 1 (dry run)"
                   if args.dry_run else
                   f"SD1.5 architecture, random weights, fp16, 512x512, CFG 7.5, {steps} DDIM steps, batch 1"),
        "rows": rows, "quality": quality, "first_image_seconds": first_s, "notes": notes,
        **({"dry_run": True} if args.dry_run else {}),
    }
    if first_s is None:
        notes.append(f"first-image subprocess failed: {first_log}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print("\n" + "\n".join(f"{r['system']:45s} {r['it_per_s']:8.2f} it/s  {r['speedup_vs_diffusers_eager']:5.2f}x"
                            for r in rows))
    print(json.dumps(quality, indent=1), f"\nfirst image from process start: {first_s} s", "\nnotes:", notes)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
