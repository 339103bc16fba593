"""``diffusion-fast generate``: load a model (or the built-in tiny one), its LoRAs, embeddings and IP-Adapters, pick
the pipeline by the inputs (text-to-image, image-to-image, inpainting, ControlNet and ControlNet-Union, T2I-Adapter,
SDXL base + refiner), run the fast path (and the reference path to compare), print it/s and write PNGs. Bad values
raise UsageError, which ``cli.main`` prints as one line."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from .cli import KARRAS_SCHEDULERS, SCHEDULER_CHOICES, UsageError, _device, _dtype
from .generate_guidance import (load_ip_adapters, open_image, read_adapter_images, read_control_images,
                                read_ip_adapter_images, with_t2i_adapters)
from .generate_model import (default_steps, depth_options, load_loras, model_components, pag_options, pix2pix_options,
                             upscale_options, variation_options)


def _check_scheduler_options(args, scheduler_name):
    if args.eta != 0 and scheduler_name not in ("DDIMScheduler", "TCDScheduler"):
        raise UsageError(f"--eta is DDIM's and TCD's; the scheduler is {scheduler_name} (--scheduler ddim or tcd)")
    if args.karras and scheduler_name not in KARRAS_SCHEDULERS:
        raise UsageError(f"--karras is for Euler, Heun, LMS, DPM2, DPM-Solver++, UniPC and DEIS; the scheduler is "
                         f"{scheduler_name} (--scheduler euler, heun, lms, dpm2, dpm2-a, dpm++-2m, dpm++-2m-sde, "
                         "unipc or deis)")


def _init_image(args):
    """--image as an RGB PIL image (None without it); --strength and --height/--width checked against it."""
    if args.image is None:
        if args.strength is not None:
            raise UsageError("--strength is for image-to-image: give --image too")
        return None
    if args.height is not None or args.width is not None:
        raise UsageError("--height/--width: with --image the output has the image's size (resize the image instead)")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    return open_image("--image", args.image).convert("RGB")


def _mask_image(args, init_image):
    """--mask as a PIL image (None without it), checked against --image (and --padding-mask-crop against it)."""
    if args.mask is None:
        if args.padding_mask_crop is not None:
            raise UsageError("--padding-mask-crop is for inpainting: give --image and --mask too")
        return None
    if init_image is None:
        raise UsageError("--mask is for inpainting: give --image too")
    mask = open_image("--mask", args.mask)
    if mask.size != init_image.size:
        raise UsageError(f"--mask is {mask.size[0]}x{mask.size[1]} and --image {init_image.size[0]}x"
                         f"{init_image.size[1]}: give them the same size")
    return mask


def _with_controlnets(args, pipe, images, dtype, device, kind="text-to-image"):
    """The pipeline for a ``kind`` run ("text-to-image", "image-to-image" or "inpainting"): a ControlNet one on
    ``pipe``'s components with the --controlnet folders, or with the model folder's own nets (diffusers saved a
    ControlNet pipeline there); ``images`` (--control-image) one per net. Without nets, the plain one."""
    from .models import ControlNetModel, ControlNetUnionModel
    from .pipeline_controlnet import (ControlNetGuidance, StableDiffusionControlNetPipeline,
                                      StableDiffusionXLControlNetPipeline)
    from .pipeline_controlnet_union import (StableDiffusionXLControlNetUnionImg2ImgPipeline,
                                            StableDiffusionXLControlNetUnionInpaintPipeline,
                                            StableDiffusionXLControlNetUnionPipeline)
    from .pipeline_controlnet_image import (StableDiffusionControlNetImg2ImgPipeline,
                                            StableDiffusionControlNetInpaintPipeline,
                                            StableDiffusionXLControlNetImg2ImgPipeline,
                                            StableDiffusionXLControlNetInpaintPipeline)

    own = isinstance(pipe, ControlNetGuidance)  # the folder's own nets
    if not args.controlnet and not own:
        if images is not None:
            raise UsageError("--control-image is for ControlNet: give --controlnet too (or a --model folder "
                             "diffusers saved a ControlNet pipeline in)")
        return {"text-to-image": lambda: _text2img(pipe), "image-to-image": lambda: _img2img(pipe),
                "inpainting": lambda: _inpaint(pipe)}[kind]()
    if args.controlnet:
        nets = [(ControlNetUnionModel if _is_union(path) else ControlNetModel).from_pretrained(
            path, dtype=dtype, device=device) for path in args.controlnet]
        if len(nets) > 1 and any(isinstance(net, ControlNetUnionModel) for net in nets):
            raise UsageError("--controlnet: a ControlNet-Union net guides alone (several union nets are not "
                             "mirrored): give one --controlnet with a --control-mode per --control-image")
        controlnet = nets[0] if len(nets) == 1 else nets
    else:
        controlnet = pipe.controlnet
        if not isinstance(controlnet, ControlNetUnionModel) and (images is None or len(images) != len(pipe._nets)):
            raise UsageError(f"{args.model} is a ControlNet pipeline with {len(pipe._nets)} ControlNet"
                             f"{'s' if len(pipe._nets) > 1 else ''}: give --control-image for each")
    xl = hasattr(pipe, "text_encoder_2")
    union = isinstance(controlnet, ControlNetUnionModel)
    if union != bool(args.control_mode):
        raise UsageError("--control-mode: give one per --control-image for a ControlNet-Union net" if union else
                         "--control-mode is for a ControlNet-Union net (this ControlNet takes none)")
    if union and not xl:
        raise UsageError("--controlnet: a ControlNet-Union net is an SDXL net: give an SDXL --model")
    cls = {"text-to-image": StableDiffusionXLControlNetUnionPipeline, "inpainting":
           StableDiffusionXLControlNetUnionInpaintPipeline, "image-to-image":
           StableDiffusionXLControlNetUnionImg2ImgPipeline}[kind] if union else {
        "image-to-image": StableDiffusionXLControlNetImg2ImgPipeline if xl else
        StableDiffusionControlNetImg2ImgPipeline,
        "inpainting": StableDiffusionXLControlNetInpaintPipeline if xl else StableDiffusionControlNetInpaintPipeline,
        "text-to-image": StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline}[kind]
    if type(pipe) is not cls:
        try:
            pipe = cls.from_pipeline(pipe, controlnet, cuda_graph=pipe.cuda_graph, channels_last=pipe.channels_last)
        except ValueError as exc:
            raise UsageError(f"--controlnet: {exc}") from None
    count, each = (len(images), "control mode") if union else (len(pipe._nets), "ControlNet")
    if len(args.controlnet_scale) not in (0, 1, count):
        raise UsageError(f"--controlnet-scale: give one for all {each}s or one per {each} ({count}); got "
                         f"{len(args.controlnet_scale)}")
    return pipe


def _is_union(folder):
    """Whether a --controlnet folder holds a ControlNet-Union net (its config's class name, as diffusers saves it)."""
    import json

    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("_class_name") == "ControlNetUnionModel"


def _with_components(pipe, sd_cls, xl_cls):
    """``pipe``'s components in ``sd_cls`` (SD 1.x/2.x) or ``xl_cls`` (SDXL) (``from_pipe``); ``pipe`` itself when
    it is one."""
    if isinstance(pipe, (sd_cls, xl_cls)):
        return pipe
    return (xl_cls if hasattr(pipe, "text_encoder_2") else sd_cls).from_pipe(pipe)


def _inpaint(pipe):
    """The inpainting pipeline on a loaded pipeline's components (SD 1.x/2.x or SDXL)."""
    from .pipeline_inpaint import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    return _with_components(pipe, StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline)


def _text2img(pipe):
    """The pipeline for a text-to-image run: ``pipe``, or on an LCM image-to-image folder's components (diffusers
    saves the same ones) the LCM text-to-image one."""
    from .pipeline_lcm import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

    if type(pipe) is not LatentConsistencyModelImg2ImgPipeline:
        return pipe
    return LatentConsistencyModelPipeline.from_pipe(pipe)


def _img2img(pipe):
    """The image-to-image pipeline on a loaded pipeline's components (SD 1.x/2.x or SDXL); an SDXL refiner already
    is one; an LCM's is diffusers' LatentConsistencyModelImg2ImgPipeline (the LCM scheduler's own strength)."""
    from .pipeline_img2img import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
    from .pipeline_lcm import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

    lcm = isinstance(pipe, LatentConsistencyModelPipeline)
    return _with_components(pipe, LatentConsistencyModelImg2ImgPipeline if lcm else StableDiffusionImg2ImgPipeline,
                            StableDiffusionXLImg2ImgPipeline)


def _refiner(args, pipe, dtype, device):
    """--refiner: its SDXL image-to-image pipeline (None without it), checked against the base and the options."""
    from .pipeline_xl import StableDiffusionXLPipeline, load_pipeline

    if args.refiner is None:
        if args.refiner_start is not None:
            raise UsageError("--refiner-start is for an SDXL base + refiner: give --refiner too")
        return None
    if not 0 < (args.refiner_start or 0.8) < 1:
        raise UsageError(f"--refiner-start must be a fraction strictly between 0 and 1, got {args.refiner_start}")
    if type(pipe) is not StableDiffusionXLPipeline or args.image is not None:
        raise UsageError("--refiner: the refiner takes over an SDXL base's text-to-image run; give an SDXL --model "
                         "and no --image")
    refiner = load_pipeline(args.refiner, dtype=dtype, device=device,  # (a --vae VAE is shared, as the base's)
                            **({"vae": pipe.vae} if args.vae else {}))
    if not hasattr(refiner, "text_encoder_2"):
        raise UsageError(f"--refiner: {args.refiner} is not an SDXL folder")
    return _img2img(refiner)


def _refiner_embeddings(embeddings, refiner):
    """--embedding for the refiner (``embeddings``: (path, state read, token)): an SDXL embedding's clip_g vectors go
    into its text encoder (its only one, the base's second); an embedding for one encoder stays the base's, said in
    one line (the refiner reads its token as plain text, as it would in diffusers)."""
    from .textual_inversion import is_sdxl_embedding

    for path, state, token in embeddings:
        if is_sdxl_embedding(state):
            refiner.load_textual_inversion(state, token=token)
        else:
            print(f"embedding {path}: the base's first text encoder only (not an SDXL clip_l + clip_g file), so not "
                  "loaded into the refiner")


def _ensemble(base, refiner, fraction, prompt, **kwargs):
    """diffusers' ensemble of expert denoisers: the base's first ``fraction`` as latents, the refiner's rest (the
    whole of a warm-up's one step each, not split); seconds are the two loops'."""
    from .pipeline_common import StableDiffusionPipelineOutput

    split = kwargs["num_inference_steps"] > 1
    first = base(prompt, **dict(kwargs, output_type="latent", denoising_end=fraction if split else None))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width")}  # (the latents' size)
    second = refiner(prompt, image=first.images,
                     **dict(kwargs, **({"denoising_start": fraction} if split else {"strength": 1.0})))
    return StableDiffusionPipelineOutput(images=second.images, seconds=first.seconds + second.seconds)


def generate(args) -> int:
    from . import backend
    from .pipeline import StableDiffusionPipeline
    from .generate_sd3 import sd3_run
    from .pipeline_lcm import LatentConsistencyModelPipeline
    from .pipeline_sd3 import StableDiffusion3Pipeline
    from .pipeline_t2i_adapter import AdapterGuidance
    from .pipeline_variation import StableDiffusionImageVariationPipeline
    from .pipeline_xl import load_pipeline
    from .schedulers import SCHEDULERS
    from .textual_inversion import read_embedding

    if args.scheduler != "model":  # known before loading anything
        _check_scheduler_options(args, SCHEDULER_CHOICES[args.scheduler][0])
    init_image = _init_image(args)
    mask_image = _mask_image(args, init_image)
    control_images = read_control_images(args)
    ip_images = read_ip_adapter_images(args)
    adapter_images = read_adapter_images(args)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    compare = args.compare or args.model is None
    t0 = time.perf_counter()
    components = model_components(args, dtype, device)
    if args.model:  # SD 1.x/2.x, SDXL or SD3, by the folder
        pipe = load_pipeline(args.model, dtype=dtype, device=device, **components)
    else:
        pipe = StableDiffusionPipeline.from_tiny("sd1", seed=args.seed, dtype=dtype, device=device)
    if isinstance(pipe, StableDiffusion3Pipeline):
        run, steps = sd3_run(args, pipe, init_image, mask_image, control_images, ip_images)
        print(f"loaded {args.model} on {device} in {dtype} in {time.perf_counter() - t0:.1f} s; scheduler "
              f"{type(pipe.scheduler).__name__}")
        return _report_and_write(args, run, steps, compare)
    steps = default_steps(args, pipe)
    loaded = pipe  # (the folder's own pipeline; the run's may be another on its components)
    # None but for an InstructPix2Pix model, an x4 upscaler, a depth-to-image or an image-variation model
    edit = (pix2pix_options(args, pipe, init_image) or upscale_options(args, pipe, init_image)
            or depth_options(args, pipe, init_image) or variation_options(args, pipe, init_image))
    load_loras(args, pipe)
    embeddings = [(path, read_embedding(path), token) for path, token in args.embedding]  # (each file read once)
    for _, state, token in embeddings:
        pipe.load_textual_inversion(state, token=token)
    if args.embedding:
        print(f"loaded {len(args.embedding)} textual inversion embedding{'s' if len(args.embedding) > 1 else ''}")
    if isinstance(pipe, AdapterGuidance) and (init_image is not None or control_images is not None):
        raise UsageError(f"{args.model} is a T2I-Adapter pipeline: it guides text-to-image alone (leave out --image "
                         "and --control-image)")
    if edit is not None:
        pass  # (the folder's pipeline edits or upscales --image)
    elif mask_image is not None:
        pipe = _with_controlnets(args, pipe, control_images, dtype, device, kind="inpainting")
    elif getattr(pipe, "_unet_takes_mask", False):
        raise UsageError(f"{args.model} is an inpainting model: give --image and --mask")
    elif init_image is not None:
        pipe = _with_controlnets(args, pipe, control_images, dtype, device, kind="image-to-image")
    elif getattr(pipe, "requires_aesthetics_score", False):
        raise UsageError(f"{args.model} is an SDXL refiner: give --image to refine, or use it as --refiner of an "
                         "SDXL base")
    elif adapter_images is not None or isinstance(pipe, AdapterGuidance):
        pipe = with_t2i_adapters(args, pipe, adapter_images, dtype, device)
    else:
        pipe = _with_controlnets(args, pipe, control_images, dtype, device)
    pipe, pag = pag_options(args, loaded, pipe)
    if ip_images is not None:
        load_ip_adapters(args, pipe)
    refiner = _refiner(args, pipe, dtype, device)
    if refiner is not None:
        _refiner_embeddings(embeddings, refiner)
    name, fields = SCHEDULER_CHOICES.get(args.scheduler, (type(pipe.scheduler).__name__, {}))
    _check_scheduler_options(args, name)
    if args.scheduler != "model" and type(pipe.scheduler).__name__.startswith("EDM"):
        raise UsageError(f"{args.model} samples with {type(pipe.scheduler).__name__} (an EDM model such as Playground "
                         f"v2.5 or CosXL): --scheduler {args.scheduler} would sample on sigmas it was not trained on; "
                         "leave --scheduler out to use its own")
    fields = dict(fields, **({"use_karras_sigmas": True} if args.karras else {}))
    if args.scheduler != "model" or fields:
        pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config, **fields)
        if refiner is not None:
            refiner.scheduler = SCHEDULERS[name].from_config(refiner.scheduler.config, **fields)
    print(f"loaded {'built-in tiny SD1-shaped model (random weights)' if not args.model else args.model} "
          f"on {device} in {dtype} in {time.perf_counter() - t0:.1f} s; scheduler {type(pipe.scheduler).__name__}")
    pipe.set_progress_bar_config(disable=args.no_progress)
    if refiner is not None:
        refiner.set_progress_bar_config(disable=args.no_progress)
        print(f"refiner {args.refiner} takes over at {args.refiner_start or 0.8:g} of the schedule")

    options = {} if args.guidance is None else {"guidance_scale": args.guidance}  # else the pipeline's default
    denoised = steps  # the steps that run: with --image, the schedule's last `strength` part
    options.update(pag)  # (perturbed-attention guidance's scales, or none)
    if edit is not None:  # instruction editing, upscaling, depth-to-image: the image's size (4x), the schedule
        options.update(edit)  # (its `strength` part for depth-to-image)
        denoised = min(int(steps * edit["strength"]), steps) if "strength" in edit else steps
    elif init_image is None:
        options.update(height=args.height, width=args.width)
    elif mask_image is not None:  # inpainting: the image's size, cut to a multiple of 8; the pipeline's strength
        strength = args.strength if args.strength is not None else 0.9999 if hasattr(pipe, "text_encoder_2") else 1.0
        width, height = (x - x % 8 for x in init_image.size)
        if width == 0 or height == 0:
            raise UsageError(f"--image is {init_image.size[0]}x{init_image.size[1]}: smaller than 8 pixels")
        if args.padding_mask_crop is not None:  # the box at the model's size (or --height/--width), pasted back
            width, height = args.width, args.height
            options.update(padding_mask_crop=args.padding_mask_crop)
        options.update(image=init_image, mask_image=mask_image, strength=strength, height=height, width=width)
        denoised = min(int(steps * strength), steps)
    else:  # img2img: the image's own size; a warm-up step of a strength-cut schedule needs the whole schedule
        strength = args.strength if args.strength is not None else 0.3 if hasattr(pipe, "text_encoder_2") else 0.8
        options.update(image=init_image, strength=strength)
        # (an LCM spaces all its steps over the strength part)
        denoised = steps if isinstance(pipe, LatentConsistencyModelPipeline) else min(int(steps * strength), steps)
    if control_images is not None:  # the first image (or --image) sets the size, unless --height/--width do
        # (the pipeline's, as diffusers: SD's ControlNet inpainting 0.5, SDXL's 1.0)
        default = 1.0 if init_image is None else 0.8 if mask_image is None else 1.0 if hasattr(
            pipe, "text_encoder_2") else 0.5
        scales = args.controlnet_scale or [default]
        union = bool(args.control_mode)  # (a union net's images go with their modes)
        options.update({"control_image" if init_image is not None or union else "image":
                        control_images[0] if len(control_images) == 1 else control_images},
                       controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales)
        if union:
            options.update(control_mode=args.control_mode[0] if len(args.control_mode) == 1 else args.control_mode)

    if adapter_images is not None:  # the first image sets the size, unless --height/--width do
        scales = args.adapter_scale or [1.0]
        options.update(image=adapter_images[0] if len(adapter_images) == 1 else adapter_images,
                       adapter_conditioning_scale=scales[0] if len(scales) == 1 else scales,
                       adapter_conditioning_factor=1.0 if args.adapter_factor is None else args.adapter_factor)
    if ip_images is not None:
        options.update(ip_adapter_image=ip_images[0] if len(ip_images) == 1 else ip_images)

    varies = isinstance(pipe, StableDiffusionImageVariationPipeline)  # (no prompt: it varies --image)

    def run(path_name, num_steps=steps):
        generator = torch.Generator("cpu").manual_seed(args.seed)
        extra = dict(options, strength=1.0) if num_steps != steps and "strength" in options else options
        pasted = "padding_mask_crop" in extra  # (diffusers pastes into the image as PIL only)
        kwargs = dict(num_inference_steps=num_steps, generator=generator, num_images_per_prompt=args.batch,
                      output_type="pil" if pasted else "np", **extra)
        if args.clip_skip is not None:  # (InstructPix2Pix takes none: refused above)
            kwargs.update(clip_skip=args.clip_skip)
        if not isinstance(pipe, LatentConsistencyModelPipeline):  # (which takes neither: see default_steps)
            kwargs.update(eta=args.eta, **({} if varies else {"negative_prompt": args.negative_prompt}))
        with backend(path_name):
            if refiner is not None:
                return _ensemble(pipe, refiner, args.refiner_start or 0.8, args.prompt, **kwargs)
            output = pipe(**kwargs) if varies else pipe(args.prompt, **kwargs)
        if pasted:
            output.images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in output.images])
        return output

    return _report_and_write(args, run, denoised, compare)


def _report_and_write(args, run, denoised, compare) -> int:
    """Run the fast path (and with ``compare`` the reference one, both warmed up first), print their speed and
    difference, and write the fast path's images as PNGs."""
    from .numerics import max_abs_err, psnr

    if compare:
        # Untimed one-step runs first, so the speedup compares sampling, not one-time costs that only the path run
        # first would pay (weights moved to channels_last, Triton compiles, CUDA graph capture, thread-pool start).
        t0 = time.perf_counter()
        for path_name in ("fast", "reference"):
            run(path_name, 1)
        print(f"warm-up (1 step per path, untimed below): {time.perf_counter() - t0:.1f} s")
    fast = run("fast")
    print(f"fast path:      {denoised} steps in {fast.seconds:.3f} s ({denoised / fast.seconds:.2f} it/s)")
    if compare:
        ref = run("reference")
        print(f"reference path: {denoised} steps in {ref.seconds:.3f} s ({denoised / ref.seconds:.2f} it/s)")
        diff = max_abs_err(torch.from_numpy(fast.images), torch.from_numpy(ref.images))
        print(f"speedup {ref.seconds / fast.seconds:.2f}x; max abs pixel difference {diff:.2e} "
              f"(pixels in [0, 1]); PSNR {psnr(fast.images, ref.images):.1f} dB")
    from PIL import Image

    flagged = [i for i, f in enumerate(fast.nsfw_content_detected or ()) if f]
    if flagged:
        print(f"safety checker: image{'s' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))} flagged, "
              "written black (--no-safety-checker turns it off)")
    images = (fast.images * 255).round().astype("uint8")
    root, ext = os.path.splitext(args.output)
    ext = ext or ".png"
    for i, img in enumerate(images):
        path = f"{root}{ext}" if len(images) == 1 else f"{root}_{i}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(img).save(path)
        print(f"wrote {path}")
    return 0
