"""Our Stable Diffusion pipeline: text encoding, classifier-free guidance, the denoising loop and VAE decode.

Same seed and weights give the same image as diffusers' StableDiffusionPipeline with the same scheduler (the
folder's own, any of ``diffusion_fast.schedulers``): the initial latents are drawn the way diffusers draws them,
prompts are tokenized and encoded the same way, and the scheduler reproduces diffusers' arithmetic. (SDXL's
pipeline, ``pipeline_xl.py``, runs this loop with its own text conditioning.) What differs is how the work runs:

- each scheduler's update is one fused op per step; with DDIM the CFG combine joins it (``DDIMScheduler.step_cfg``);
- timesteps and coefficient tables stay on the device, so the loop never waits on the host;
- on CUDA the whole denoising step (UNet on the doubled batch, CFG, DDIM update) is captured once per
  (shape, dtype, guidance) as a CUDA graph and replayed for every step. Where the step holds host-side state or
  fresh noise (a non-DDIM scheduler, ``eta > 0``), the UNet call alone is graphed and the scheduler runs eagerly; on
  the CPU and on the reference backend the loop runs eagerly;
- ``channels_last="auto"`` runs the UNet and VAE in channels_last where it was measured to pay: on the CPU
  (``diffusion-fast bench`` times both layouts) and on CUDA (three H200 runs of ``benchmarks/gpu_e2e.py`` timed it at
  1.34x to 1.37x NCHW). Other devices keep NCHW. The conv weights are converted once, and the activations follow.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .ip_adapter import IPAdapterMixin, ip_adapter_call
from .lora import LoraLoaderMixin, lora_call_scale
from .models.layers import guidance_scale_embedding
from .pipeline_common import (OUTPUT_TYPES, CallState, ModelSwitches, StableDiffusionPipelineOutput, StepCallback,
                              auto_or_bool_setting, check_size, from_pipe, postprocess, rescale_noise_cfg, takes)
from .pipeline_folder import ComponentLoader, check_model_config, read_model_index, resolve_dtype
from .pipeline_graphs import GraphedLoop
from .pipeline_text import TextEncoding
from .safety_checker import run_safety_checker
from .schedulers import DDIMScheduler
from .schedulers.common import randn_tensor
from .textual_inversion import TextualInversionLoaderMixin


class StableDiffusionPipeline(GraphedLoop, TextEncoding, LoraLoaderMixin, TextualInversionLoaderMixin, IPAdapterMixin,
                              ModelSwitches, CallState):
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")  # diffusers' names
    safety_checker = None  # diffusers' StableDiffusionSafetyChecker where the folder has one (safety_checker.py)
    _guidance_rescale = 0.0  # set by each call that takes it, as diffusers keeps it (SD img2img takes none)
    _cond_names = ("add_text_embeds", "add_time_ids")  # diffusers' names of the UNet's extra inputs (``cond``)
    _unet_takes_mask = False  # (inpainting's 9-channel UNet)
    _unet_takes_image = False  # (InstructPix2Pix's 8-channel UNet)
    _begins_at_zero = False  # diffusers' SD pipeline lets a step-index scheduler find its start from the timestep

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, cuda_graph="auto", channels_last="auto"):
        self.channels_last = channels_last  # validated by the property setters below
        self._layout = torch.contiguous_format  # the models' current memory format
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = (
            unet, vae, text_encoder, tokenizer, scheduler)
        self._check_components()
        self.cuda_graph = cuda_graph
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._progress = {}
        self._graphs = self._graphed_for = None  # {"step": ..., "unet": ...} GraphedCallables, and their components
        self._interrupt = False

    def _check_components(self):
        """The UNet must be conditioned on what this pipeline gives it: one CLIP text encoder's hidden states."""
        unet, text_encoder = self.unet, self.text_encoder
        check_model_config("unet", unet, "cross_attention_dim", "a UNet2DConditionModel")
        check_model_config("text_encoder", text_encoder, "hidden_size", "a transformers CLIPTextModel")
        width, cross = text_encoder.config.hidden_size, unet.config.cross_attention_dim
        per_block = cross if isinstance(cross, (list, tuple)) else [cross]
        if any(c != width for c in per_block) or unet.config.addition_embed_type is not None:
            extra = (f", addition_embed_type={unet.config.addition_embed_type!r}"
                     if unet.config.addition_embed_type is not None else "")
            raise ValueError(f"unet (cross_attention_dim={cross}{extra}) does not fit text_encoder (hidden_size="
                             f"{width}): this pipeline conditions the UNet on one CLIP text encoder's hidden states "
                             "and nothing else (SD 1.x/2.x; for SDXL, diffusion_fast.StableDiffusionXLPipeline)")
        unet_in, latent = unet.config.in_channels, self.vae.config.latent_channels
        if unet_in != latent and not (self._unet_takes_mask or self._unet_takes_image):
            kind = {2 * latent: "an InstructPix2Pix UNet, for diffusion_fast.StableDiffusionInstructPix2PixPipeline",
                    2 * latent + 1: "an inpainting UNet, for diffusion_fast.StableDiffusionInpaintPipeline",
                    latent + 1: "a depth-to-image UNet, for diffusion_fast.StableDiffusionDepth2ImgPipeline",
                    latent + 3: "an x4 upscaler UNet, for diffusion_fast.StableDiffusionUpscalePipeline"}.get(
                unet_in, "a UNet this pipeline cannot run")
            raise ValueError(f"unet has {unet_in} input channels and the VAE's latents {latent}: {kind}")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto",
                        channels_last="auto", **components):
        """Load a diffusers-layout folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
        A component passed by name (``vae=other.vae``) is used as it is, not loaded, as in diffusers."""
        from transformers import CLIPTextModel

        folder, index = read_model_index(folder)
        if "text_encoder_2" in index:
            raise ValueError(f"{folder!r} is a {index.get('_class_name', 'pipeline')} folder with two text "
                             "encoders (SDXL): load it with diffusion_fast.StableDiffusionXLPipeline (this class runs "
                             "SD 1.x/2.x checkpoints, one CLIP text encoder)")
        checker = ("safety_checker", "feature_extractor")  # (loaded where the folder lists them, as diffusers)
        load = ComponentLoader(folder, index, ("unet", "vae", "text_encoder", "tokenizer", "scheduler", *checker),
                               checker, components, dtype, device, variant)
        pipe = cls(load("unet"), load("vae"), load("text_encoder", CLIPTextModel), load("tokenizer"),
                   load("scheduler"), cuda_graph=cuda_graph, channels_last=channels_last)
        pipe.safety_checker, pipe.feature_extractor = load("safety_checker"), load("feature_extractor")
        return pipe

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """diffusers' ``from_pipe``: this class of pipeline on ``pipe``'s components (shared, not copied), e.g.
        ``StableDiffusionImg2ImgPipeline.from_pipe(pipe)``; ``kwargs`` replace components or settings
        (``controlnet=net``, ``vae=taesd``, ``pag_applied_layers=["mid"]``)."""
        return from_pipe(cls, pipe, kwargs)

    @classmethod
    def from_tiny(cls, variant="sd1", seed=0, dtype=None, device=None, *, cuda_graph="auto", channels_last="auto"):
        """A small SD-architecture pipeline with random weights (the built-in default model)."""
        import tempfile

        from . import tiny

        with tempfile.TemporaryDirectory(prefix="diffusion-fast-tiny-") as folder:
            tiny.write_tiny_pipeline(folder, variant, seed)
            return cls.from_pretrained(folder, dtype=dtype, device=device, cuda_graph=cuda_graph,
                                       channels_last=channels_last)

    cuda_graph = auto_or_bool_setting("cuda_graph", '"auto" (capture on CUDA where possible), True (CUDA required) '
                                                     'or False.')
    channels_last = auto_or_bool_setting("channels_last", '"auto" (channels_last on the CPU and CUDA), True or '
                                                           "False: the UNet's and VAE's memory format.")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _models(self):
        """The models ``to`` moves; the first ones are those a graph reads and ``channels_last`` converts."""
        return {"graphed": (self.unet,), "converted": (self.unet, self.vae), "moved": (self.unet, self.vae,
                                                                                       self.text_encoder)}

    def to(self, device=None, dtype=None):
        dtype = resolve_dtype(dtype)
        for module in (*self._models()["moved"], self.image_encoder, self.safety_checker):  # (when there)
            if module is not None:  # (an SDXL refiner has no first text encoder)
                module.to(device=device, dtype=dtype)
        self._graphs = self._graphed_for = None
        return self

    def set_progress_bar_config(self, **kwargs):
        self._progress = kwargs

    # ---- the pieces of a call -----------------------------------------------------------------------------------
    def _check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                      num_images_per_prompt, prompt_embeds, negative_prompt_embeds, latents, output_type):
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: give a prompt (str or list of str) or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("prompt and prompt_embeds: give one, not both")
        if prompt is not None:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise ValueError("prompt is an empty list: give at least one prompt")
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt and negative_prompt_embeds: give one, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        check_size(self.vae_scale_factor, height=height, width=width)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
            raise TypeError(f"guidance_scale must be a finite float, got {guidance_scale!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt <= 0:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        shape = (batch * num_images_per_prompt, self.unet.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        return shape

    # ---- the denoising step, eager or graphed -------------------------------------------------------------------
    def _guided(self, guidance_scale):
        """Whether the loop runs classifier-free guidance (two UNet halves), as diffusers decides: a scale above 1,
        and not an LCM-distilled UNet (``time_cond_proj_dim``), which takes the scale as a condition instead."""
        return guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def _guidance_cond(self, guidance_scale, latents):
        """An LCM-distilled UNet's condition: the embedding of ``guidance_scale - 1`` (diffusers' SD pipelines and
        its LatentConsistencyModelPipeline alike) for each sample, as a one-tuple (the step's last graph input);
        () for any other UNet."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return ()
        w = torch.full((latents.shape[0],), float(guidance_scale) - 1.0)
        return (guidance_scale_embedding(w, dim).to(device=latents.device, dtype=latents.dtype),)

    def _denoise_step(self, latents, t, embeds, cond, guidance_scale, do_cfg, eta, generator, unet=None):
        """``cond``: the UNet's added conditioning tensors (SDXL's pooled text embeds and time ids), or ()."""
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        noise_pred = (self._model_call if unet is None else unet)(model_input, t, embeds, *cond)
        rescale = do_cfg and self._guidance_rescale > 0  # (as diffusers: a rescale of 0 or less does nothing)
        if do_cfg and isinstance(self.scheduler, DDIMScheduler) and not rescale:
            uncond, text = noise_pred.chunk(2)
            return self.scheduler.step_cfg(uncond, text, guidance_scale, t, latents, eta=eta, generator=generator).prev_sample
        if do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
            if rescale:
                noise_pred = rescale_noise_cfg(noise_pred, text, self._guidance_rescale)
        return self._scheduler_step(noise_pred, t, latents, eta, generator)

    def _scheduler_step(self, noise_pred, t, latents, eta, generator):
        """The scheduler's step from the guided prediction, given ``eta`` (DDIM's, TCD's) and the generator where it
        takes them (diffusers' prepare_extra_step_kwargs)."""
        step = self.scheduler.step
        kwargs = {name: value for name, value in (("eta", eta), ("generator", generator)) if takes(step, name)}
        return self._scheduler_output(step(noise_pred, t, latents, **kwargs))

    def _scheduler_output(self, output):
        """The latents from a scheduler step's output (the LCM pipelines also read its x0 there)."""
        return output.prev_sample

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet call (graphed when the step itself cannot be, see ``_graph_mode``); ``cond``: SDXL's pooled
        text embeds and time ids; ``timestep_cond``: an LCM-distilled UNet's guidance-scale embedding."""
        if not cond:
            return self.unet(model_input, t, embeds, timestep_cond=timestep_cond)
        text_embeds, time_ids = cond
        return self.unet(model_input, t, embeds, {"text_embeds": text_embeds, "time_ids": time_ids},
                         timestep_cond=timestep_cond)

    def _set_guidance_rescale(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise TypeError(f"guidance_rescale must be a finite float (0 to 1: how much of the rescaled guidance to "
                            f"mix in), got {value!r}")
        self._guidance_rescale = float(value)

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale is not None and self._guided(self._guidance_scale)

    def _callback(self, fn, inputs):
        """The step callback, its tensor names checked (before any work); None without one."""
        return None if fn is None else StepCallback(fn, inputs, self._callback_tensor_inputs, {})

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5, eta=0.0,
                 generator=None, height=None, width=None, num_images_per_prompt=1, prompt_embeds=None,
                 negative_prompt_embeds=None, latents=None, output_type="pil", timesteps=None, sigmas=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), guidance_rescale=0.0,
                 clip_skip=None):
        height = height if height is not None else self.unet.config.sample_size * self.vae_scale_factor
        width = width if width is not None else self.unet.config.sample_size * self.vae_scale_factor
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, latents, output_type)
        self._set_guidance_rescale(guidance_rescale)
        clip_skip = self._check_clip_skip(clip_skip)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        embeds = self._text_embeds(prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                                   negative_prompt_embeds, clip_skip, callback)
        return self._sample(shape, embeds, (), num_inference_steps, guidance_scale, do_cfg, eta, generator, latents,
                            output_type, timesteps, sigmas, callback)

    def _set_timesteps(self, num_inference_steps, device, timesteps=None, sigmas=None):
        """diffusers' retrieve_timesteps: the scheduler's schedule of ``num_inference_steps``, or custom ``timesteps``
        or ``sigmas`` (e.g. an "Align Your Steps" schedule) where its set_timesteps takes them. Returns the number
        of steps as diffusers counts them then (the schedule's length)."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("timesteps and sigmas: give one, not both")
        for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
            if values is None:
                continue
            if not takes(self.scheduler.set_timesteps, name):
                raise ValueError(f"{name}: {type(self.scheduler).__name__} takes no custom {name} (custom timesteps: "
                                 "Euler, Heun, DPM-Solver++, DDPM, LCM; custom sigmas: Euler)")
            self.scheduler.set_timesteps(device=device, **{name: values})
            return len(self.scheduler.timesteps)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return num_inference_steps

    def _sample(self, shape, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta, generator, latents,
                output_type, timesteps=None, sigmas=None, callback=None, denoising_end=None):
        """Text-to-image from the text conditioning (``embeds``, and ``cond``: the UNet's added conditioning tensors,
        or ()): the schedule (up to ``denoising_end``), the initial noise drawn as diffusers draws it, the loop, the
        decode."""
        device = self.device
        num_inference_steps = self._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        if self._begins_at_zero and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)  # (SDXL's, as diffusers': the first step reads no timestep either)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        latents = latents.to(device=device, dtype=embeds.dtype) * self.scheduler.init_noise_sigma
        timesteps = self._end_at(self.scheduler.timesteps, denoising_end)
        return self._denoise(latents, timesteps, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta,
                             generator, output_type, callback)

    def _cutoff(self, fraction):
        """diffusers' discrete timestep cutoff of a denoising_start / denoising_end fraction."""
        n_train = self.scheduler.config.num_train_timesteps
        return int(round(n_train - fraction * n_train))

    def _end_at(self, timesteps, denoising_end):
        """diffusers' denoising_end: the steps whose timestep is at or above the fraction's cutoff (an ensemble of
        experts' first, high-noise part; a refiner with ``denoising_start`` at the same fraction does the rest)."""
        if denoising_end is None:
            return timesteps
        steps = int((timesteps >= self._cutoff(denoising_end)).sum())
        if steps == 0:
            raise ValueError(f"denoising_end={denoising_end} leaves no denoising step of this schedule: raise it")
        return timesteps[:steps]

    def _denoise(self, latents, timesteps, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta, generator,
                 output_type, callback=None):
        """The denoising loop over ``timesteps`` (the schedule, or its tail for img2img) and the decode; ``callback``
        (a StepCallback) after each step, and ``pipe._interrupt`` set there skips the rest, as in diffusers."""
        device = self.device
        self._apply_layout(device)
        mode = self._graph_mode(device, eta)
        graphs = self._graphs_for_components() if mode else None
        graphed = mode == "step"

        # the call's graph inputs after the step's own: IP-Adapters' image tokens, then an LCM's guidance embedding
        # (_model_call takes them apart)
        call_inputs = (*self._ip_adapter_tokens(latents.shape[0], do_cfg), *self._guidance_cond(guidance_scale, latents))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        self._interrupt = False
        self._guidance_scale, self._num_timesteps = guidance_scale, len(timesteps)
        for i, t in enumerate(tqdm(timesteps, **{"desc": "denoising", **self._progress})):
            if self._interrupt:
                continue
            if self._guidance_scale != guidance_scale:  # a step callback set it: diffusers' CFG cutoff callbacks
                guidance_scale = self._guidance_scale  # (which also cut the embeddings to the prompt's rows)
                do_cfg = do_cfg and self._guided(guidance_scale)
            step_cond = (*self._step_cond(i, len(timesteps), cond), *call_inputs)
            if graphed:  # replays write a static buffer, which the next replay copies in as its input
                latents = graphs["step"](latents, t, embeds, float(guidance_scale), do_cfg, num_inference_steps,
                                         *step_cond)
            else:
                latents = self._denoise_step(latents, t, embeds, step_cond, guidance_scale, do_cfg, eta, generator,
                                             graphs["unet"] if mode == "unet" else None)  # hands out copies
            latents = self._after_step(i, timesteps, latents)
            if callback is not None:
                latents, embeds, cond = callback(self, i, t, latents, embeds, cond, graphed)
        latents = latents.clone() if graphed else latents
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=latents, seconds=seconds)
        images, flags = run_safety_checker(self.safety_checker, self.feature_extractor, self._decode(latents))
        return StableDiffusionPipelineOutput(images=postprocess(images, output_type), seconds=seconds,
                                             nsfw_content_detected=flags)

    def _step_cond(self, i, steps, cond):
        """The UNet's added conditioning for step ``i`` of the ``steps`` the loop runs (a ControlNet's scales for that
        step join it)."""
        return cond

    def _after_step(self, i, timesteps, latents):
        """The latents after step ``i`` (inpainting with a 4-channel UNet puts the kept region back here)."""
        return latents

    def _decode(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor)
