"""End-to-end SD3 sampling benchmark on a CUDA GPU, one command:

    python benchmarks/gpu_e2e_sd3.py [--steps 28] [--repeats 3] [--out benchmarks/results/gpu_e2e_sd3.jsonl]
                                     [--dry-run]

SD3.5 Medium's architecture with random weights (nothing is downloaded: a 24-block MMDiT with RMSNorm on queries
and keys and the second attention in blocks 0-12, CLIP-L- and CLIP-G-shaped text encoders, SD3's 16-channel VAE;
no T5, whose zeros take its place as diffusers does for a folder saved without it: the loop is what is timed), fp16,
1024x1024, CFG 7.0, 28 flow-matching Euler steps, batch 1. Measured side by side in one run, medians of --repeats
whole calls (text encoding and the loop, latents out): diffusers eager (SDPA), diffusers + diffusion_fast.accelerate,
and our pipeline (fast with the transformer call CUDA-graphed, fast without graphs, reference); then the same with an
SD3 ControlNet (InstantX's kind, 6 joint blocks, random weights) guiding every step: our ControlNet pipeline (nets
and transformer in one CUDA graph), diffusers' eager and under accelerate, their speedup against diffusers' ControlNet
pipeline (``--no-controlnet`` leaves them out). Quality: PSNR of our
fp16 image and of diffusers' fp16 image against our fp32 reference-path image from one float32 noise (TF32 off), and
of the accelerated image against diffusers'. Appends one JSON record to --out and prints a table.

--dry-run runs the same code on the CPU with a tiny SD3.5-shaped model (fp32, 2 steps, 1 repeat) and marks its
record ``dry_run``: its figures mean nothing, but a slip in this script shows up in the CPU test suite
(tests/test_gpu_benchmark_code.py) rather than in a scarce GPU session.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import diffusion_fast
from diffusion_fast import backend, tiny
from diffusion_fast.numerics import psnr, strict_fp32
from diffusion_fast.models import SD3ControlNetModel
from diffusion_fast.pipeline_sd3 import StableDiffusion3Pipeline
from diffusion_fast.pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_e2e import free, record_header, timed  # noqa: E402  (the SD1.5 benchmark's timing and record fields)

PROMPT = "a photograph of an astronaut riding a horse"
OURS_CONTROLNET = "diffusion_fast SD3 ControlNet pipeline (fast, CUDA graph)"
DIFFUSERS_CONTROLNET = "diffusers SD3 ControlNet eager (SDPA)"
ACCELERATED_CONTROLNET = "diffusers SD3 ControlNet + diffusion_fast.accelerate"
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
# the dry run's: SD3.5's block kinds at a toy size (head dim 16: the Triton kernel's smallest)
TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40, out_channels=16,
            pos_embed_max_size=12, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def write_random_sd3(folder, dry_run, device):
    """An SD3 folder (diffusers' save_pretrained) with random weights: SD3.5 Medium's shapes, or TINY's."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    base = tiny.text_encoder_config("sd1")
    widths = ((16, 2, 2), (24, 2, 2)) if dry_run else ((768, 12, 12), (1280, 20, 32))  # (width, heads, layers)
    with torch.device(device):  # (random init of billions of parameters on the GPU, not the CPU)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**dict(
            base, hidden_size=w, intermediate_size=4 * w, num_attention_heads=h, num_hidden_layers=n,
            projection_dim=w, hidden_act="gelu"))) for w, h, n in widths]
        transformer = diffusers.SD3Transformer2DModel(**(TINY if dry_run else SD35_MEDIUM))
        vae = diffusers.AutoencoderKL(**(dict(tiny.vae_config(), latent_channels=16, use_quant_conv=False,
                                              use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
                                         if dry_run else SD3_VAE))
    for p in transformer.parameters():  # (diffusers zero-initialises the modulations: every path gets a say)
        torch.nn.init.normal_(p, std=0.02)
    tokenizer_folder = os.path.join(folder, "tokenizer")
    tiny.write_tokenizer(tokenizer_folder)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.float32 if dry_run else torch.float16).save_pretrained(folder)


def write_random_controlnet(folder, dry_run, device):
    """An SD3 ControlNet folder with random weights (InstantX's kind: joint blocks on the transformer's shapes, 6 of
    them; the dry run's 2)."""
    import diffusers

    torch.manual_seed(1)
    config = {k: v for k, v in (TINY if dry_run else SD35_MEDIUM).items() if k != "dual_attention_layers"}
    with torch.device(device):
        net = diffusers.SD3ControlNetModel(**dict(config, num_layers=2 if dry_run else 6))
    for p in net.parameters():  # (diffusers zero-initialises its output maps: give them a say)
        torch.nn.init.normal_(p, std=0.02)
    net.to(torch.float32 if dry_run else torch.float16).save_pretrained(folder)


def control_image(size):
    """A size x size RGB control image (diagonal ramps: edges for a canny-like net to follow)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size)
    return Image.fromarray(np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8))


def controlnet_rows(folder, args, call, device, dtype, add, attempt):
    """Our SD3 ControlNet pipeline and diffusers' (eager, and under accelerate) with one random net: their rows."""
    import diffusers

    net_folder = os.path.join(folder, "controlnet-random")
    write_random_controlnet(net_folder, args.dry_run, device)
    image = control_image(call["height"])
    ours = StableDiffusion3ControlNetPipeline.from_pretrained(
        folder, dtype=dtype, device=device, controlnet=SD3ControlNetModel.from_pretrained(net_folder, dtype, device))
    ours.set_progress_bar_config(disable=True)

    def run(pipe):
        torch.manual_seed(0)  # (the control image's posterior sample: the global generator, in both)
        return pipe(PROMPT, control_image=image, generator=torch.Generator().manual_seed(0), output_type="latent",
                    **call).images

    attempt(OURS_CONTROLNET, lambda: add(OURS_CONTROLNET, *timed(lambda: run(ours), args.repeats, device)))
    ours = None
    free(device)
    pipe = diffusers.StableDiffusion3ControlNetPipeline.from_pretrained(
        folder, torch_dtype=dtype, text_encoder_3=None, tokenizer_3=None,
        controlnet=diffusers.SD3ControlNetModel.from_pretrained(net_folder, torch_dtype=dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    add(DIFFUSERS_CONTROLNET, *timed(lambda: run(pipe), args.repeats, device))

    def accelerated():
        diffusion_fast.accelerate(pipe)
        add(ACCELERATED_CONTROLNET, *timed(lambda: run(pipe), args.repeats, device),
            report=str(getattr(pipe, "_diffusion_fast_report", "")))
        diffusion_fast.restore(pipe)

    attempt(ACCELERATED_CONTROLNET, accelerated)
    free(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_e2e_sd3.jsonl"))
    parser.add_argument("--no-controlnet", action="store_true", help="leave out the SD3 ControlNet rows")
    parser.add_argument("--dry-run", action="store_true",
                        help="this script's code on the CPU with a tiny model (fp32, 2 steps): no figures")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.repeats = 2, 1
    elif not torch.cuda.is_available():
        sys.exit("gpu_e2e_sd3.py needs a CUDA GPU (--dry-run runs its code on the CPU)")
    import diffusers

    device, dtype = (torch.device("cpu"), torch.float32) if args.dry_run else (torch.device("cuda"), torch.float16)
    size = 32 if args.dry_run else 1024
    steps, folder = args.steps, tempfile.mkdtemp(prefix="sd3-random-")
    t0 = time.perf_counter()
    write_random_sd3(folder, args.dry_run, device)
    print(f"wrote {'tiny SD3.5' if args.dry_run else 'SD3.5 Medium'}-shaped random weights to {folder} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    rows, notes = [], []
    call = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=7.0)
    side = size // (4 if args.dry_run else 8)  # the latents' (the tiny VAE scales by 4, SD3's by 8)
    noise = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(0))  # one float32 noise for all

    def add(system, seconds, times, **extra):
        rows.append({"system": system, "it_per_s": steps / seconds, "median_s": seconds,
                     "times_s": [round(t, 4) for t in times], **extra})
        print(f"{system:50s} {steps / seconds:8.2f} it/s  (median {seconds:.3f} s)", flush=True)

    def attempt(label, fn):
        try:
            return fn()
        except Exception as exc:  # one failing system must not hide the others
            notes.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
            print(notes[-1], flush=True)
            return None

    # ---- our pipeline --------------------------------------------------------------------------------------------
    ours = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, device=device)
    ours.set_progress_bar_config(disable=True)

    def run_ours(name, graph, output_type="latent", latents=None):
        ours.cuda_graph = "auto" if graph else False
        with backend(name):
            return ours(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type,
                        latents=latents, **call).images

    for label, name, graph in (("diffusion_fast SD3 pipeline (fast, CUDA graph)", "fast", True),
                               ("diffusion_fast SD3 pipeline (fast, no graph)", "fast", False),
                               ("diffusion_fast SD3 pipeline (reference)", "reference", False)):
        attempt(label, lambda: add(label, *timed(lambda: run_ours(name, graph), args.repeats, device)))
    img_fast = attempt("our fp16 image", lambda: run_ours("fast", True, "np", noise.to(device, dtype)))
    ours = None
    free(device)
    ref32 = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32, device=device)
    ref32.set_progress_bar_config(disable=True)
    with backend("reference"), strict_fp32():
        img_ref32 = ref32(PROMPT, output_type="np", latents=noise.to(device), **call).images
    ref32 = None
    free(device)

    # ---- diffusers -----------------------------------------------------------------------------------------------
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(  # (saved without T5: diffusers needs the Nones)
        folder, torch_dtype=dtype, text_encoder_3=None, tokenizer_3=None).to(device)
    pipe.set_progress_bar_config(disable=True)

    def run_diffusers(output_type="latent"):
        latents = noise.to(device, dtype) if output_type == "np" else None
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, latents=latents,
                    **call).images

    add("diffusers eager (SDPA)", *timed(run_diffusers, args.repeats, device))
    img_diffusers = run_diffusers("np")
    img_accel = None

    def accelerated():
        nonlocal img_accel
        diffusion_fast.accelerate(pipe)
        add("diffusers + diffusion_fast.accelerate", *timed(run_diffusers, args.repeats, device),
            report=str(getattr(pipe, "_diffusion_fast_report", "")))
        img_accel = run_diffusers("np")
        diffusion_fast.restore(pipe)

    attempt("accelerate", accelerated)
    pipe = None
    free(device)
    if not args.no_controlnet:
        attempt("SD3 ControlNet rows", lambda: controlnet_rows(folder, args, call, device, dtype, add, attempt))

    quality = {"psnr_diffusers_fp16_vs_our_fp32_reference_db": psnr(img_diffusers, img_ref32)}
    if img_fast is not None:
        quality["psnr_ours_fp16_vs_fp32_reference_db"] = psnr(img_fast, img_ref32)
        quality["psnr_ours_fp16_vs_diffusers_fp16_db"] = psnr(img_fast, img_diffusers)
    if img_accel is not None:
        quality["psnr_accelerated_vs_diffusers_fp16_db"] = psnr(img_accel, img_diffusers)
    eager = next(r["it_per_s"] for r in rows if r["system"].startswith("diffusers eager"))
    for r in rows:
        r["speedup_vs_diffusers_eager"] = r["it_per_s"] / eager
    controlnet_eager = next((r["it_per_s"] for r in rows if r["system"] == DIFFUSERS_CONTROLNET), None)
    for r in rows:
        if controlnet_eager and r["system"] in (OURS_CONTROLNET, ACCELERATED_CONTROLNET):
            r["speedup_vs_diffusers_controlnet"] = r["it_per_s"] / controlnet_eager
    record = {
        **record_header(args.dry_run),
        "config": (f"tiny SD3.5-shaped model, random weights, fp32, {size}x{size}, CFG 7, {steps} flow-matching Euler "
                   "steps, batch 1 (dry run)" if args.dry_run else
                   f"SD3.5 Medium architecture (no T5), random weights, fp16, {size}x{size}, CFG 7, {steps} "
                   "flow-matching Euler steps, batch 1"),
        "rows": rows, "quality": quality, "first_image_seconds": None, "notes": notes,
        **({"dry_run": True} if args.dry_run else {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print("\n" + "\n".join(f"{r['system']:50s} {r['it_per_s']:8.2f} it/s  {r['speedup_vs_diffusers_eager']:5.2f}x"
                            for r in rows))
    print(json.dumps(quality, indent=1), "\nnotes:", notes)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
