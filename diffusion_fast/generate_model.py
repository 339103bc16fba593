"""``diffusion-fast generate``'s model flags: the components they give the folder's pipeline (``--vae``,
``--no-safety-checker``), the default step count for the model loaded (4 for an LCM), an InstructPix2Pix model's
edit, an x4 upscaler's image and noise level, a depth-to-image model's depth map, and perturbed-attention guidance
(``--pag-*``). Bad values raise UsageError, which ``cli.main`` prints as one line."""
from __future__ import annotations

import math

from .cli import UsageError


def model_components(args, dtype, device):
    """The components given to load_pipeline: --vae's model (ours for its class: AutoencoderKL or AutoencoderTiny),
    and with --no-safety-checker no checker (the folder's then not loaded)."""
    from .pipeline_folder import read_model_index, vae_class

    components = {}
    if args.no_safety_checker:
        listed = args.model is not None and (read_model_index(args.model)[1].get("safety_checker") or [None])[0]
        if not listed:
            raise UsageError(f"--no-safety-checker: {args.model or 'the built-in model'} has no safety checker "
                             "(its model_index.json lists none)")
        components["safety_checker"] = None
    if args.vae is not None:
        if args.model is None:
            raise UsageError("--vae: give --model too (the built-in model's tiny VAE is its own)")
        components["vae"] = vae_class(args.vae).from_pretrained(args.vae, dtype=dtype, device=device)
    return components


def load_loras(args, pipe):
    """Merge every --lora at its scale, all of them active (diffusers activates the last one loaded)."""
    for i, (path, _) in enumerate(args.lora):
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}")
    if args.lora:
        pipe.set_adapters([f"lora_{i}" for i in range(len(args.lora))], [scale for _, scale in args.lora])
        print(f"merged {len(args.lora)} LoRA{'s' if len(args.lora) > 1 else ''}: "
              + ", ".join(f"{path} at {scale:g}" for path, scale in args.lora))


def default_steps(args, pipe):
    """--steps, or the default for the model: 4 for an LCM-distilled one (as diffusers' LCM pipelines), 50, or 20
    for the built-in tiny model. An LCM pipeline takes no negative prompt and no eta, as diffusers' does."""
    from .pipeline_lcm import LatentConsistencyModelPipeline

    lcm = pipe.unet.config.time_cond_proj_dim is not None
    if isinstance(pipe, LatentConsistencyModelPipeline):
        for flag, value, default, why in (
                ("--negative-prompt", args.negative_prompt, None, "it was distilled with the empty one"),
                ("--eta", args.eta, 0.0, "its LCM step draws its own noise")):
            if value != default:
                raise UsageError(f"{args.model} is a latent consistency model (diffusers' LatentConsistencyModel"
                                 f"Pipeline): it takes no {flag} ({why})")
    from .pipeline_pix2pix import _InstructPix2Pix
    from .pipeline_upscale import StableDiffusionUpscalePipeline

    pix2pix = isinstance(pipe, _InstructPix2Pix)
    upscale = isinstance(pipe, StableDiffusionUpscalePipeline)
    return args.steps or (4 if lcm else 100 if pix2pix else 75 if upscale else 50 if args.model else 20)


def _refuse_image_run_flags(args, what, *extra, strength=False):
    """An image-conditioned model's run (editing, upscaling, depth-to-image) takes none of the other runs' flags
    (--strength where it has none), nor ``extra`` (flag, value) pairs. (--height/--width with --image are refused
    for every run.)"""
    flags = (("--mask", args.mask), ("--strength", None if strength else args.strength),
             ("--control-image", args.control_image), ("--adapter-image", args.adapter_image),
             ("--ip-adapter-image", args.ip_adapter_image), ("--refiner", args.refiner), *extra)
    refused = [flag for flag, value in flags if value not in (None, [])]
    if refused:
        raise UsageError(f"{args.model} is {what}: it takes no {', '.join(refused)}")


def pix2pix_options(args, pipe, init_image):
    """An InstructPix2Pix model's call options (the image to edit, --image-guidance-scale), its flags checked; None
    for any other model, which takes no --image-guidance-scale."""
    from .pipeline_pix2pix import StableDiffusionXLInstructPix2PixPipeline, _InstructPix2Pix

    if not isinstance(pipe, _InstructPix2Pix):
        if args.image_guidance_scale is not None:
            model = args.model or "the built-in model"
            raise UsageError(f"--image-guidance-scale is for an InstructPix2Pix model; {model} runs in "
                             f"{type(pipe).__name__}")
        return None
    if init_image is None:
        raise UsageError(f"{args.model} is an InstructPix2Pix model: give --image to edit (and the edit as --prompt)")
    _refuse_image_run_flags(args, f"an InstructPix2Pix model (diffusers' {type(pipe).__name__})",
                            ("--clip-skip", args.clip_skip))
    options = {"image": init_image}
    if isinstance(pipe, StableDiffusionXLInstructPix2PixPipeline):  # (its default is the UNet's size: the edit
        scale = pipe.vae_scale_factor  # keeps the image's, cut to a multiple of the VAE's scale, as SD's does)
        width, height = (x - x % scale for x in init_image.size)
        if width == 0 or height == 0:
            raise UsageError(f"--image is {init_image.size[0]}x{init_image.size[1]}: smaller than {scale} pixels")
        options.update(height=height, width=width)
    if args.image_guidance_scale is not None:
        options["image_guidance_scale"] = args.image_guidance_scale
    return options


def upscale_options(args, pipe, init_image):
    """An x4 upscaler's call options (the image to upscale, --noise-level), its flags checked; None for any other
    model, which takes no --noise-level."""
    from .pipeline_upscale import StableDiffusionUpscalePipeline

    if not isinstance(pipe, StableDiffusionUpscalePipeline):
        if args.noise_level is not None:
            raise UsageError(f"--noise-level is for an x4 upscaler; {args.model or 'the built-in model'} runs in "
                             f"{type(pipe).__name__}")
        return None
    if init_image is None:
        raise UsageError(f"{args.model} is an x4 upscaler: give --image to upscale (and what it shows as --prompt)")
    _refuse_image_run_flags(args, "an x4 upscaler (diffusers' StableDiffusionUpscalePipeline; the output is 4x "
                                  "--image)")
    options = {"image": init_image}
    if args.noise_level is not None:
        if not 0 <= args.noise_level <= pipe.max_noise_level:
            raise UsageError(f"--noise-level must be in [0, {pipe.max_noise_level}] (the model's max_noise_level), "
                             f"got {args.noise_level}")
        options["noise_level"] = args.noise_level
    return options



def depth_options(args, pipe, init_image):
    """A depth-to-image model's call options (the image, its strength, --depth-map read as a grayscale image), its
    flags checked; None for any other model, which takes no --depth-map."""
    from .pipeline_depth2img import StableDiffusionDepth2ImgPipeline

    if not isinstance(pipe, StableDiffusionDepth2ImgPipeline):
        if args.depth_map is not None:
            raise UsageError(f"--depth-map is for a depth-to-image model; {args.model or 'the built-in model'} runs "
                             f"in {type(pipe).__name__}")
        return None
    if init_image is None:
        raise UsageError(f"{args.model} is a depth-to-image model: give --image to remake (its depth kept)")
    _refuse_image_run_flags(args, "a depth-to-image model (diffusers' StableDiffusionDepth2ImgPipeline)",
                            strength=True)
    options = {"image": init_image, "strength": 0.8 if args.strength is None else args.strength}
    if args.depth_map is not None:
        import numpy as np
        import torch
        from PIL import Image

        try:
            depth = Image.open(args.depth_map).convert("F")  # (32-bit float gray: 16-bit depth PNGs keep their range)
        except OSError as exc:
            raise UsageError(f"--depth-map {args.depth_map}: not an image ({exc})") from None
        options["depth_map"] = torch.from_numpy(np.asarray(depth, dtype=np.float32).copy())[None]
    elif pipe.depth_estimator is None:
        raise UsageError(f"{args.model} has no depth estimator: give --depth-map")
    return options


def variation_options(args, pipe, init_image):
    """An image-variation model's call options (the image to vary), its flags checked: it takes no prompt; None for
    any other model."""
    from .cli import DEFAULT_PROMPT
    from .pipeline_variation import StableDiffusionImageVariationPipeline

    if not isinstance(pipe, StableDiffusionImageVariationPipeline):
        return None
    if init_image is None:
        raise UsageError(f"{args.model} is an image-variation model: give --image to vary")
    _refuse_image_run_flags(args, "an image-variation model (diffusers' StableDiffusionImageVariationPipeline; it "
                                  "varies --image, no text)", ("--prompt", None if args.prompt == DEFAULT_PROMPT
                                                               else args.prompt),
                            ("--negative-prompt", args.negative_prompt), ("--clip-skip", args.clip_skip))
    return {"image": init_image}


def pag_options(args, loaded, pipe):
    """Perturbed-attention guidance: with --pag-scale (or a folder diffusers saved a PAG pipeline in, ``loaded``),
    the run's pipeline ``pipe`` (text-to-image, image-to-image or inpainting with SD or SDXL; text-to-image or
    image-to-image with SD3) as our PAG one on its components, with --pag-layers; and the call's PAG options. With
    another kind of run the flags are refused, and a PAG folder's run is said to go without it."""
    from .pipeline_pag import PAG_FOR, PAGSettings
    from .pipeline_sd3_pag import PAG_FOR_SD3

    flags = args.pag_scale is not None or args.pag_layers or args.pag_adaptive_scale is not None
    if not flags and not isinstance(loaded, PAGSettings):
        return pipe, {}
    # the PAG pipeline for the run's (none for a T2I-Adapter, InstructPix2Pix, upscaler, LCM or refiner run, nor
    # for a ControlNet run of a kind diffusers has no PAG pipeline for, nor SD3 inpainting or ControlNets)
    sd3 = hasattr(pipe, "transformer")
    cls = type(pipe) if isinstance(pipe, PAGSettings) else (PAG_FOR_SD3 if sd3 else PAG_FOR).get(type(pipe))
    if cls is None or args.refiner is not None:
        if not flags:  # a PAG folder's ControlNet, T2I-Adapter ... run
            print(f"{args.model} is a PAG pipeline: perturbed-attention guidance does not run with this kind of run "
                  f"({type(pipe).__name__}), so it goes without it")
            return pipe, {}
        if sd3:
            raise UsageError(f"--pag-*: with a Stable Diffusion 3 model perturbed-attention guidance runs "
                             f"text-to-image and image-to-image (diffusers' StableDiffusion3PAG(Img2Img)Pipeline), "
                             f"not this run ({type(pipe).__name__})")
        from .pipeline_controlnet import ControlNetGuidance

        kind = ("an LCM-distilled model (its guidance embedding)" if pipe.unet.config.time_cond_proj_dim else
                f"this --controlnet run ({type(pipe).__name__})" if isinstance(pipe, ControlNetGuidance) else
                f"--t2i-adapter, --refiner, or this model's pipeline ({type(pipe).__name__})")
        raise UsageError(f"--pag-*: perturbed-attention guidance runs text-to-image, image-to-image and inpainting "
                         f"with an SD or SDXL model here, and with --controlnet SD text-to-image and inpainting and "
                         f"SDXL text-to-image and image-to-image (diffusers' PAG ControlNet pipelines), not with "
                         f"{kind}")
    if args.pag_scale is None and not isinstance(loaded, PAGSettings):
        raise UsageError("--pag-layers and --pag-adaptive-scale go with --pag-scale")
    layers = args.pag_layers or getattr(loaded, "pag_applied_layers", None)  # (else the class's: "mid", "blocks.1")
    try:
        pipe = cls.from_pipe(pipe, pag_applied_layers=layers)
    except ValueError as exc:
        raise UsageError(f"--pag-layers: {exc}") from None
    options = {name: value for name, value in (("pag_scale", args.pag_scale),
                                               ("pag_adaptive_scale", args.pag_adaptive_scale)) if value is not None}
    for name, value in options.items():
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    return pipe, options
