"""What the pipelines share around their loops: the output, diffusers' step callback and guidance rescale, the
denoising bounds check, image postprocessing, the settings and signature helpers, and the switches diffusers'
pipelines have for their models (FreeU, VAE slicing and tiling)."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from . import _validate

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class StableDiffusionPipelineOutput:
    images: object  # list of PIL images, a numpy (B, H, W, 3) array, a (B, 3, H, W) tensor, or latents
    seconds: float = 0.0  # wall time of the denoising loop (synchronised)
    nsfw_content_detected: object = None  # a flag per image where a safety checker ran (SD 1.x/2.x), else None


def auto_or_bool_setting(name: str, doc: str) -> property:
    """A pipeline setting that is "auto", True or False, refused at the assignment otherwise."""
    attr = "_" + name
    return property(lambda self: getattr(self, attr),
                    lambda self, value: setattr(self, attr, _validate.auto_or_bool(name, value)), doc=doc)


def checked_model(name: str, convert: str, doc: str) -> property:
    """A guidance model of a pipeline (its ControlNet, its T2I-Adapter): an assigned value goes through the
    pipeline's method ``convert`` and its ``_check_components``; one that does not fit leaves the old one in place."""
    attr = "_" + name

    def assign(self, value):
        old = getattr(self, attr)
        setattr(self, attr, getattr(self, convert)(value))
        try:
            self._check_components()
        except ValueError:
            setattr(self, attr, old)
            raise

    return property(lambda self: getattr(self, attr), assign, doc=doc)


class GuidedComponents:
    """Construction shared by the pipelines that add one guidance model (a ControlNet, a T2I-Adapter) to a plain
    pipeline, whose constructor takes it after the plain pipeline's components: ``from_pipeline(pipe, model)`` builds
    one on a loaded pipeline's components (shared, not copied), and ``from_pretrained(folder, <_guide>=model)``
    loads the plain pipeline from the folder (``_base_pipeline``), and the model too when none is given (the one
    diffusers saved there, ``_load_guide``)."""
    _guide = None  # the constructor's name for the model: "controlnet", "adapter"

    @classmethod
    def from_pipeline(cls, pipe, model, **settings):
        from .pipeline_xl import StableDiffusionXLPipeline

        if hasattr(pipe, "text_encoder_2") != issubclass(cls, StableDiffusionXLPipeline):
            kind = "an SDXL" if hasattr(pipe, "text_encoder_2") else "an SD 1.x/2.x"
            raise ValueError(f"pipe is {kind} pipeline ({type(pipe).__name__}), which {cls.__name__} cannot be built "
                             "on: take the class for its model (SD or SDXL)")
        return cls.from_pipe(pipe, **{cls._guide: model}, **settings)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto",
                        channels_last="auto", **components):
        from .pipeline_folder import read_model_index, resolve_dtype

        model = components.pop(cls._guide, None)
        if model is None:
            model = cls._load_guide(*read_model_index(folder), resolve_dtype(dtype), device, variant)
        base = cls._base_pipeline.from_pretrained(folder, dtype, device, variant=variant, **components)
        return cls.from_pipeline(base, model, cuda_graph=cuda_graph, channels_last=channels_last)


class CallState:
    """The running call's state as diffusers' pipelines keep it for step callbacks: ``guidance_scale`` (a callback
    that sets ``pipe._guidance_scale``, as diffusers' CFG cutoff callbacks do, changes the steps after it; the
    pipeline's ``do_classifier_free_guidance`` reads it), ``num_timesteps`` and ``interrupt``."""
    _guidance_scale = None  # (set by each call)
    _num_timesteps = None
    _interrupt = False

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self):
        """The running (or last) call's number of denoising steps."""
        return self._num_timesteps

    @property
    def interrupt(self):
        """Set ``pipe._interrupt = True`` in a step callback to skip the remaining steps, as in diffusers."""
        return self._interrupt


class StepCallback:
    """diffusers' ``callback_on_step_end``, run after each step: ``fn(pipe, step, timestep, tensors)`` with the named
    tensors; the ones it returns replace the loop's (the latents, the text embeddings, SDXL's added conditioning)."""

    def __init__(self, fn, inputs, allowed, extra, read_only=()):
        if not callable(fn):
            raise TypeError(f"callback_on_step_end must be callable (pipe, step, timestep, tensors) -> dict, got "
                            f"{type(fn).__name__}")
        inputs = list(getattr(fn, "tensor_inputs", inputs))  # a diffusers PipelineCallback names its own
        unknown = [k for k in inputs if k not in allowed]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs has to be in {list(allowed)}, but found {unknown}")
        self.fn, self.inputs, self.extra, self.read_only = fn, inputs, extra, read_only

    def __call__(self, pipe, i, t, latents, embeds, cond, graphed):
        names = pipe._cond_names[:len(cond)]  # (SD's loop has none of SDXL's added conditioning)
        grouped = {}  # a name given to several tensors (several ControlNets' images) names their list
        for name, c in zip(names, cond):
            grouped.setdefault(name, []).append(c)
        named = {"latents": latents.clone() if graphed else latents,  # (a graph's output is overwritten next step)
                 "prompt_embeds": embeds, **self.extra, **{k: v[0] if len(v) == 1 else v for k, v in grouped.items()}}
        outputs = self.fn(pipe, i, t, {k: named[k] for k in self.inputs})
        if not isinstance(outputs, dict):
            raise TypeError(f"callback_on_step_end must return a dict (the tensors it replaces, or {{}}), got "
                            f"{type(outputs).__name__}")
        fixed = sorted(set(outputs) & set(self.read_only))
        if fixed:
            raise ValueError(f"callback_on_step_end returned {fixed}: readable here, not replaceable")
        latents, embeds = outputs.get("latents", latents), outputs.get("prompt_embeds", embeds)
        for name, old in grouped.items():
            new = outputs.get(name, old if len(old) > 1 else old[0])
            new = list(new) if len(old) > 1 else [new]
            if len(new) != len(old):
                raise ValueError(f"callback_on_step_end returned {len(new)} tensors for {name!r}, which has {len(old)}")
            grouped[name] = new
        cond = tuple(grouped[name].pop(0) for name in names)
        return latents, embeds, cond


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' guidance rescale ("Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4): the guided
    prediction scaled to the text prediction's standard deviation per sample, mixed in by ``guidance_rescale``."""
    dims = list(range(1, noise_cfg.ndim))
    rescaled = noise_cfg * (noise_pred_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def check_denoising_bounds(denoising_start=None, denoising_end=None):
    """denoising_start / denoising_end: None or a fraction strictly between 0 and 1, the start before the end
    (diffusers silently ignores a value outside (0, 1), which would run the whole schedule)."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be a fraction of the schedule strictly between 0 and 1 (None: "
                             f"{'from the start' if name == 'denoising_start' else 'to the end'}), got {value!r}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")


def check_size(vae_scale_factor, factor_name="the VAE scale factor", **sizes):
    """Output sizes by name (height, width): positive multiples of 8 and of the VAE's scale factor (SD3's: the VAE's
    times the transformer's patch size, ``factor_name`` saying so)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8 != 0:
            raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
        if value % vae_scale_factor != 0:
            raise ValueError(f"{name} must be a multiple of {factor_name} {vae_scale_factor}, got {value}")


def check_given_size(vae_scale_factor, height, width):
    """check_size for the sizes a call was given (None: to be taken from an image)."""
    check_size(vae_scale_factor, **{k: v for k, v in (("height", height), ("width", width)) if v is not None})


def given_size(image, height, width, scale):
    """(height, width) for an image (or the first of a list) with one or both given: a missing one is the image's
    own, cut to a multiple of ``scale`` (diffusers' get_default_height_width); None for what is not an image (the
    caller's preprocessing names it)."""
    import PIL.Image

    image = numpy_images(image, "image")
    first = image[0] if isinstance(image, (list, tuple)) and image else image
    if isinstance(first, PIL.Image.Image):
        own = (first.size[1], first.size[0])
    elif torch.is_tensor(first):
        own = tuple(first.shape[-2:])
    else:
        return None
    return tuple(given if given is not None else x - x % scale for given, x in zip((height, width), own))


def numpy_images(image, name, grayscale=False):
    """diffusers' image processors on numpy input: an (H, W, C) or (B, H, W, C) float array in [0, 1], or a list of
    them ((H, W) for one channel), as the float32 (B, C, H, W) tensor their tensor path then takes (resized nearest,
    as a tensor is). With ``grayscale`` (a mask processor's), a lone 3-D array is (H, W, 1) or a (B, H, W) batch, as
    there. Anything but numpy is returned as it is."""
    import numpy as np

    arrays = list(image) if isinstance(image, (list, tuple)) else [image]
    if not arrays or not all(isinstance(a, np.ndarray) for a in arrays):
        return image
    if any(a.dtype.kind != "f" for a in arrays):
        raise TypeError(f"{name}: numpy images are floats in [0, 1], as diffusers takes them; got dtype "
                        f"{next(a.dtype for a in arrays if a.dtype.kind != 'f')} (divide by 255 first)")
    if grayscale and not isinstance(image, (list, tuple)) and image.ndim == 3:
        arrays = [image[None] if image.shape[-1] == 1 else image[..., None]]
    if arrays[0].ndim not in (2, 3, 4) or any(a.ndim != arrays[0].ndim for a in arrays):
        raise ValueError(f"{name}: numpy images are (H, W, C) or (B, H, W, C) arrays (or a list of them), got "
                         f"shapes {[a.shape for a in arrays][:4]}")
    batch = np.concatenate(arrays) if arrays[0].ndim == 4 else np.stack(arrays)
    batch = batch[..., None] if batch.ndim == 3 else batch
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()


def from_pipe(cls, pipe, overrides):
    """diffusers' ``from_pipe``: a ``cls`` pipeline on ``pipe``'s components, shared (not copied), each constructor
    argument taken from ``overrides`` or else from ``pipe``'s attribute of that name (settings too: cuda_graph,
    SDXL's force_zeros_for_empty_prompt, PAG's applied layers); the image encoder, feature extractor, safety checker
    and LoRA bookkeeping come along. A component neither gives is named, as is an argument ``cls`` does not take."""
    from .pipeline import StableDiffusionPipeline

    if not isinstance(pipe, StableDiffusionPipeline):
        raise TypeError(f"pipe must be one of diffusion_fast's pipelines, got {type(pipe).__module__}."
                        f"{type(pipe).__name__} (for a diffusers pipeline: diffusion_fast.accelerate(pipe), or "
                        "diffusion_fast.load_pipeline(folder) on the folder it was saved to)")
    positional, keyword = [], []
    for klass in cls.__mro__:  # the constructors down the chain (a mixin's takes *args and adds keywords)
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        if not positional:
            positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        keyword += [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in keyword]
    unknown = sorted(set(overrides) - set(positional) - set(keyword))
    if unknown:
        raise TypeError(f"from_pipe: {cls.__name__} takes no {', '.join(unknown)} (its components and settings: "
                        f"{', '.join(positional + keyword)})")
    missing = [name for name in positional if name not in overrides and not hasattr(pipe, name)]
    if missing:
        raise ValueError(f"from_pipe: {cls.__name__} needs {', '.join(missing)}, which pipe "
                         f"({type(pipe).__name__}) does not have: pass {'them' if len(missing) > 1 else 'it'} as "
                         f"from_pipe(pipe, {missing[0]}=...)")
    args = [overrides[name] if name in overrides else getattr(pipe, name) for name in positional]
    settings = {name: overrides[name] if name in overrides else getattr(pipe, name) for name in keyword
                if name in overrides or hasattr(pipe, name)}
    new = cls(*args, **settings)._image_encoder_of(pipe)
    if hasattr(pipe, "_lora") and new.unet is pipe.unet:  # the same modules: the same merged LoRAs to undo
        new._lora = pipe._lora
    return new


def takes(method, name) -> bool:
    """Whether ``method`` has a parameter ``name``; read once per function (this runs every denoising step)."""
    return name in _parameters(getattr(method, "__func__", method))


@functools.lru_cache(maxsize=None)
def _parameters(function):
    return frozenset(inspect.signature(function).parameters)


_NO_OFFLOAD = ("{name}: our pipelines keep every model on one device (pipe.to(device)); CPU offloading is not "
               "built here. For a GPU too small for the models, run diffusers' pipeline with its {name}() and "
               "diffusion_fast.accelerate(pipe) after it: accelerate works through diffusers' offload hooks")


def _nothing_to_change(name):
    import warnings

    warnings.warn(f"diffusion_fast: {name} changes nothing here: our attention is flash attention, which never "
                  "holds the attention matrix (the memory that attention slicing and xFormers save)", UserWarning,
                  stacklevel=3)


def postprocess(image: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [-1, 1] -> diffusers' output: [0, 1] floats (np/pt) or 8-bit PIL images (its rounding)."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(img) for img in (array * 255).round().astype("uint8")]


class ModelSwitches:
    """diffusers' pipeline switches that act on the models: FreeU on the UNet, slicing and tiling on the VAE, fused
    q/k/v projections on both; its attention-memory switches, which change nothing here (said so), and its CPU
    offloading, refused by name."""

    def enable_attention_slicing(self, slice_size="auto"):
        """diffusers' attention slicing saves the memory of the attention matrix, which our flash attention never
        holds: nothing to change, and a warning says so (a script written for diffusers runs unchanged)."""
        if not (slice_size in ("auto", "max", None) or (isinstance(slice_size, int) and not isinstance(
                slice_size, bool) and slice_size > 0)):
            raise ValueError(f"slice_size must be 'auto', 'max', None or a positive int, got {slice_size!r}")
        _nothing_to_change("enable_attention_slicing")

    def disable_attention_slicing(self):
        _nothing_to_change("disable_attention_slicing")

    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        """diffusers' switch to xFormers' memory-efficient attention: ours already is one (flash attention), so
        nothing changes, and a warning says so."""
        _nothing_to_change("enable_xformers_memory_efficient_attention")

    def disable_xformers_memory_efficient_attention(self):
        _nothing_to_change("disable_xformers_memory_efficient_attention")

    def enable_model_cpu_offload(self, gpu_id=None, device=None):
        raise NotImplementedError(_NO_OFFLOAD.format(name="enable_model_cpu_offload"))

    def enable_sequential_cpu_offload(self, gpu_id=None, device=None):
        raise NotImplementedError(_NO_OFFLOAD.format(name="enable_sequential_cpu_offload"))

    def fuse_qkv_projections(self, unet=True, vae=True):
        """diffusers' ``fuse_qkv_projections``: one q/k/v GEMM per self-attention of the UNet and the VAE (their
        weights concatenated into buffers; names unchanged, LoRAs loaded later refresh them). A VAE without
        attention (TAESD) is refused with ``vae=True``, as diffusers refuses it: pass ``vae=False``."""
        if vae and not hasattr(self.vae, "fuse_qkv_projections"):
            raise ValueError(f"fuse_qkv_projections: vae=True, but the VAE ({type(self.vae).__name__}) has no "
                             "attention to fuse: pass vae=False")
        for fuse, model in ((unet, self.unet), (vae, self.vae)):
            if fuse:
                model.fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet=True, vae=True):
        for fuse, model in ((unet, self.unet), (vae, self.vae)):
            if fuse and hasattr(model, "unfuse_qkv_projections"):
                model.unfuse_qkv_projections()

    def enable_freeu(self, s1, s2, b1, b2):
        """diffusers' ``enable_freeu`` on this pipeline's UNet (``models.freeu``); a graphed UNet is captured again."""
        self.unet.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self):
        self.unet.disable_freeu()

    def enable_vae_slicing(self):
        """diffusers' VAE slicing: a batch decoded one image at a time (``vae.enable_slicing``)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """diffusers' VAE tiling: images larger than the VAE's sample size decoded (and encoded) in overlapping,
        blended tiles (``vae.enable_tiling``)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()
