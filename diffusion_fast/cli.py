"""The ``diffusion-fast`` command: generate images, benchmark kernels and pipelines, check numerics.

    diffusion-fast generate                      # built-in tiny model: fast vs reference, times, max diff, a PNG
    diffusion-fast generate --model DIR --prompt "a cat" --steps 30 --seed 1 --output cat.png
    diffusion-fast generate --scheduler euler-ancestral   # any of our schedulers, from the model's config
    diffusion-fast generate --scheduler dpm++-2m --karras   # "DPM++ 2M Karras"
    diffusion-fast generate --model DIR --scheduler lcm --steps 4 --guidance 1   # an LCM-LoRA fused in
    diffusion-fast generate --model LCM_DIR --prompt "a cat"   # an LCM-distilled model: 4 steps, guidance 8.5
    diffusion-fast generate --model DIR --image in.png --strength 0.6             # image-to-image
    diffusion-fast generate --model PIX2PIX_DIR --image in.png --prompt "make it snowy"   # instruction editing
    diffusion-fast generate --model X4_UPSCALER_DIR --image small.png --prompt "a cat"   # 4x super-resolution
    diffusion-fast generate --model DEPTH_DIR --image room.png --prompt "a castle hall"   # depth-to-image
    diffusion-fast generate --model VARIATIONS_DIR --image photo.png                    # image variations
    diffusion-fast generate --model DIR --pag-scale 3 --pag-layers mid          # perturbed-attention guidance
    diffusion-fast generate --model DIR --image in.png --mask mask.png            # inpainting
    diffusion-fast generate --model LCM_DIR --vae TAESD_DIR   # TAESD's fast decode instead of the model's VAE
    diffusion-fast generate --model DIR --lora style.safetensors:0.8 --lora detail.safetensors   # LoRAs merged
    diffusion-fast generate --model SDXL_DIR --refiner REFINER_DIR --refiner-start 0.8   # SDXL base + refiner
    diffusion-fast generate --model DIR --embedding neg.pt:bad-hands --negative-prompt bad-hands   # an embedding
    diffusion-fast bench [--config tiny|sd15]    # kernel throughput + end-to-end it/s, CSV + PNG plot
    diffusion-fast check [--model DIR]           # fast vs reference on fresh random inputs; exit 1 on failure

Bad arguments print one line and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

EXIT_USAGE = 2


# --scheduler NAME: (our scheduler class, config fields set over the model's scheduler config)
SCHEDULER_CHOICES = {"ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}),
                     "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as SD1.5 ships it
                     "euler": ("EulerDiscreteScheduler", {}),
                     "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
                     "heun": ("HeunDiscreteScheduler", {}),  # two model calls a step
                     "dpm2": ("KDPM2DiscreteScheduler", {}),  # two model calls a step, one at the midpoint
                     "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
                     "lms": ("LMSDiscreteScheduler", {}),
                     "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
                     "dpm++-2m-sde": ("DPMSolverMultistepScheduler",
                                      {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
                     # single-step DPM-Solver++ (order 2: "DPM++ 2S"); the SDE one is diffusers' "DPM++ SDE"
                     "dpm++-2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
                     "dpm++-sde": ("DPMSolverSinglestepScheduler",
                                   {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
                     "unipc": ("UniPCMultistepScheduler", {}),
                     "deis": ("DEISMultistepScheduler", {}),
                     "lcm": ("LCMScheduler", {}),  # for LCM and LCM-LoRA models (--steps 4 --guidance 1)
                     "tcd": ("TCDScheduler", {})}  # for TCD-LoRA (--steps 4 --guidance 1 --eta 0.3)
# the ones with use_karras_sigmas
KARRAS_SCHEDULERS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                     "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")


class UsageError(Exception):
    """A bad command-line value: reported as one line, exit status 2."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _size(text):
    value = _positive_int(text)
    if value % 8 != 0:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {value}")
    return value


def _model_folder(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"model folder {text!r} does not exist")
    if not os.path.isfile(os.path.join(text, "model_index.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a diffusers pipeline folder (no model_index.json)")
    return text


def _existing_folder(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


def _controlnet_folder(text):
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ControlNet folder (no config.json)")
    return text


def _vae_folder(text):
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a VAE folder (no config.json)")
    return text


def _adapter_folder(text):
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a T2I-Adapter folder (no config.json)")
    return text


def _ip_adapter_file(text):
    if not os.path.isfile(text) or not text.endswith((".safetensors", ".bin")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP-Adapter weights file (.safetensors or .bin)")
    return text


def _lora(text):
    """--lora PATH[:SCALE]: a LoRA file or folder, and its weight (default 1)."""
    path, _, scale = text.rpartition(":")
    try:
        path, scale = (path, float(scale)) if path else (text, 1.0)
    except ValueError:  # a colon that is part of the path
        path, scale = text, 1.0
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"no such LoRA file or folder: {path!r}")
    if scale != scale or abs(scale) == float("inf"):
        raise argparse.ArgumentTypeError(f"the LoRA scale must be a finite number, got {text!r}")
    return path, scale


def _embedding(text):
    """--embedding PATH[:TOKEN]: a textual inversion file or folder, and its token (default: the file's own)."""
    path, sep, token = text.rpartition(":")
    if not sep or not os.path.exists(path):  # no token given, or a colon that is part of the path
        path, token = text, ""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"no such textual inversion file or folder: {path!r}")
    return path, token or None


def _add_common(p, *, model=True):
    if model:
        p.add_argument("--model", type=_model_folder, default=None,
                       help="diffusers-layout SD folder (default: the built-in tiny random model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)


DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images (and compare fast vs reference)")
    _add_common(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=_positive_int, default=None,
                   help="default: 50 (4 for an LCM-distilled model, 100 for an InstructPix2Pix one, 75 for an x4 "
                        "upscaler, as diffusers; 20 for the built-in one)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's, 7.5 for SD 1.x/2.x, 5.0 for SDXL, "
                        "8.5 for an LCM-distilled model)")
    g.add_argument("--vae", type=_vae_folder, default=None, metavar="DIR",
                   help="a diffusers VAE folder instead of the model's: an AutoencoderKL (e.g. sd-vae-ft-mse, "
                        "sdxl-vae-fp16-fix) or an AutoencoderTiny (TAESD, taesdxl: a fast, approximate decode)")
    g.add_argument("--eta", type=float, default=0.0,
                   help="DDIM's eta, or TCD's gamma (0: deterministic; TCD-LoRA's usual 0.3)")
    g.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="skip the text encoder's last N layers for the prompt (diffusers' clip_skip)")
    g.add_argument("--scheduler", choices=("model", *SCHEDULER_CHOICES), default="model",
                   help="the sampler: the model folder's own (default; DDIM for the built-in model) or one of ours, "
                        "built from the model's scheduler config")
    g.add_argument("--karras", action="store_true",
                   help="Karras sigmas (Euler, Heun, LMS, DPM2, DPM-Solver++ multistep and single-step, UniPC, "
                        "DEIS: e.g. --scheduler dpm++-2m --karras)")
    g.add_argument("--height", type=_size, default=None)
    g.add_argument("--width", type=_size, default=None)
    g.add_argument("--batch", type=_positive_int, default=1, help="images per prompt")
    g.add_argument("--image", default=None,
                   help="an initial image file: image-to-image, its size the output's")
    g.add_argument("--mask", default=None,
                   help="with --image: a mask file (white: repaint, black: keep): inpainting")
    g.add_argument("--padding-mask-crop", type=_nonnegative_int, default=None, metavar="N",
                   help="with --mask: inpaint only the box around the mask, padded by N pixels, at the model's size "
                        "(or --height/--width), and paste it back into the image (diffusers' padding_mask_crop)")
    g.add_argument("--image-guidance-scale", type=float, default=None, metavar="S",
                   help="an InstructPix2Pix model's image guidance (default: the pipeline's 1.5): how closely the "
                        "edit keeps to --image")
    g.add_argument("--depth-map", default=None, metavar="FILE",
                   help="a depth-to-image model's depth map for --image, a grayscale image (any size and range: "
                        "scaled to [-1, 1]); default: the model's depth estimator's")
    g.add_argument("--noise-level", type=_nonnegative_int, default=None, metavar="N",
                   help="an x4 upscaler's noise level for --image (default: the pipeline's 20; at most the model's "
                        "max_noise_level, 350): more frees the output from the image's artifacts and detail")
    g.add_argument("--pag-scale", type=float, default=None, metavar="S",
                   help="perturbed-attention guidance (SD, SDXL or SD3; diffusers' default 3): the image guided away "
                        "from one made with --pag-layers' self-attention perturbed")
    g.add_argument("--pag-layers", action="append", default=[], metavar="REGEX",
                   help="with --pag-scale: the self-attention layers PAG perturbs, regexes searched in the UNet's "
                        "module names (default 'mid'; e.g. down_blocks.2, up_blocks.0.attentions.1) or an SD3 "
                        "transformer's (default 'blocks.1', which also matches blocks 10-19 as in diffusers; "
                        "'blocks\\.1\\.' for block 1 alone); repeat for several")
    g.add_argument("--pag-adaptive-scale", type=float, default=None, metavar="A",
                   help="with --pag-scale: lower the PAG scale by A per timestep below 1000 (diffusers' "
                        "pag_adaptive_scale)")
    g.add_argument("--strength", type=float, default=None,
                   help="with --image: how much of the schedule runs, in (0, 1] (default: the pipeline's, 0.8 for "
                        "SD 1.x/2.x, 0.3 for SDXL, 1 for inpainting, 0.9999 for SDXL's, as in diffusers)")
    g.add_argument("--lora", type=_lora, action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (.safetensors file or folder; diffusers, PEFT or kohya format) merged into the weights "
                        "at SCALE (default 1); repeat for several, all active")
    g.add_argument("--embedding", type=_embedding, action="append", default=[], metavar="PATH[:TOKEN]",
                   help="a textual inversion embedding (diffusers or Automatic1111 file, or an SDXL clip_l/clip_g "
                        "one) for the --model's text encoders, under TOKEN (default: the file's own); repeatable")
    g.add_argument("--refiner", type=_model_folder, default=None, metavar="DIR",
                   help="an SDXL refiner folder: the --model SDXL base denoises up to --refiner-start, the refiner "
                        "the rest (diffusers' ensemble of expert denoisers)")
    g.add_argument("--refiner-start", type=float, default=None, metavar="FRACTION",
                   help="with --refiner: the fraction of the schedule where the refiner takes over (default 0.8)")
    g.add_argument("--controlnet", type=_controlnet_folder, action="append", default=[], metavar="DIR",
                   help="a ControlNet folder (diffusers layout) guiding an SD 1.x/2.x text-to-image run; repeat for "
                        "several, each with its --control-image")
    g.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="with --controlnet: its conditioning image (edges, depth, pose...), one per --controlnet, in "
                        "order; it sets the output size unless --height/--width do")
    g.add_argument("--controlnet-scale", type=float, action="append", default=[], metavar="SCALE",
                   help="with --controlnet: its residuals' scale (default 1; one for all, or one per --controlnet)")
    g.add_argument("--control-mode", type=int, action="append", default=[], metavar="MODE",
                   help="with a ControlNet-Union --controlnet (SDXL): each --control-image's control mode, in order "
                        "(xinsir's union nets: 0 openpose, 1 depth, 2 hed/scribble, 3 canny/lineart, 4 normal, "
                        "5 segment)")
    g.add_argument("--t2i-adapter", type=_adapter_folder, action="append", default=[], metavar="DIR",
                   help="a T2I-Adapter folder (diffusers layout, e.g. TencentARC/t2iadapter_depth_sd15v2) guiding a "
                        "text-to-image run; repeat for several (summed), each with its --adapter-image")
    g.add_argument("--adapter-image", action="append", default=[], metavar="FILE",
                   help="with --t2i-adapter: its conditioning image (depth, sketch, pose...; grayscale for a sketch "
                        "adapter), one per --t2i-adapter, in order; it sets the output size unless --height/--width do")
    g.add_argument("--adapter-scale", type=float, action="append", default=[], metavar="SCALE",
                   help="with --t2i-adapter: its feature maps' scale (default 1; one for all, or one per adapter)")
    g.add_argument("--adapter-factor", type=float, default=None, metavar="FRACTION",
                   help="with --t2i-adapter: the first fraction of the steps it guides (default 1: all)")
    g.add_argument("--ip-adapter", type=_ip_adapter_file, action="append", default=[], metavar="FILE",
                   help="an IP-Adapter or IP-Adapter Plus weights file (e.g. h94/IP-Adapter's "
                        "models/ip-adapter_sd15.safetensors; with an SD3 model InstantX's SD3.5-Large-IP-Adapter "
                        "ip-adapter.bin), prompting with --ip-adapter-image; repeatable (SD3: one)")
    g.add_argument("--ip-adapter-image", action="append", default=[], metavar="FILE",
                   help="with --ip-adapter: its image prompt, one per --ip-adapter, in order")
    g.add_argument("--ip-adapter-scale", type=float, action="append", default=[], metavar="SCALE",
                   help="with --ip-adapter: how strongly its image prompts (default 1; an SD3 adapter's 0.5; one "
                        "for all, or one per --ip-adapter)")
    g.add_argument("--image-encoder", type=_existing_folder, default=None, metavar="DIR",
                   help="with --ip-adapter: the image encoder folder, CLIP's (SigLIP's for an SD3 adapter) "
                        "(default: image_encoder/ beside the first --ip-adapter file, as h94/IP-Adapter lays them "
                        "out, or an SD3 model folder's own)")
    g.add_argument("--output", default="diffusion_fast.png", help="PNG path (index appended for a batch)")
    g.add_argument("--compare", action="store_true",
                   help="also run the reference path and print the max difference (always on without --model)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the model folder's safety checker (an SD folder that lists one runs it, as in "
                        "diffusers: a flagged image is written black)")

    b = sub.add_parser("bench", help="kernel throughput and end-to-end it/s, fast vs reference vs eager")
    _add_common(b, model=False)
    b.add_argument("--config", choices=("tiny", "sd15"), default="tiny",
                   help="tiny: small SD-shaped model (CPU-friendly); sd15: SD1.5 shapes with random weights")
    b.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 10 tiny, 50 sd15)")
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.add_argument("--csv", default="diffusion_fast_bench.csv")
    b.add_argument("--plot", default="diffusion_fast_bench.png")
    b.add_argument("--skip-kernels", action="store_true")
    b.add_argument("--skip-e2e", action="store_true")
    b.add_argument("--jsonl", default=None,
                   help="also append the run as one JSON record (machine, versions, rows) to this file")

    c = sub.add_parser("check", help="fast vs reference on fresh random inputs; exit 1 on failure")
    _add_common(c)
    c.add_argument("--steps", type=_positive_int, default=4)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints one usage line and exits 2 on bad arguments
    try:
        if args.command == "generate":
            from .generate import generate

            return generate(args)
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args, _device(args.device), _dtype(args.dtype, _device(args.device)))
        from .check import run_check

        return run_check(args, _device(args.device), _dtype(args.dtype, _device(args.device)))
    except (UsageError, ValueError, TypeError, OSError) as exc:  # OSError: a missing folder, an unwritable file
        if os.environ.get("DIFFUSION_FAST_DEBUG"):
            raise
        print(f"diffusion-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
