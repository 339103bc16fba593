"""Our Stable Diffusion XL pipeline: two CLIP text encoders, the pooled-text and size conditioning, the same loop.

Same seed and weights give the same image as diffusers' StableDiffusionXLPipeline (without its invisible watermark,
which diffusers applies only when the ``invisible-watermark`` package is installed):

- each prompt goes through both text encoders (``prompt_2`` through the second, defaulting to ``prompt``); their
  penultimate hidden states are concatenated, and the second encoder's projected output is the pooled embedding;
- with no negative prompt and ``force_zeros_for_empty_prompt`` (the folder's setting, SDXL's default) the
  negative embeddings are zeros, as in diffusers;
- the UNet's added conditioning is the pooled embedding and the six "time ids" (original size, crop corner,
  target size), built and batched exactly as diffusers builds them;
- an fp16 VAE with ``force_upcast`` (SDXL's VAE overflows in fp16) decodes in fp32, and ``latents_mean`` /
  ``latents_std`` are applied where the VAE config has them.

The denoising loop is ``StableDiffusionPipeline``'s: fused scheduler steps, device-side tables, and on CUDA the
whole step (or the UNet call) replayed from a CUDA graph, the added conditioning among the graph's inputs.
"""
from __future__ import annotations

import warnings

import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .pipeline import StableDiffusionPipeline
from .pipeline_common import check_denoising_bounds
from .pipeline_folder import ComponentLoader, check_model_config, read_model_index, resolve_dtype

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _size_pair(name, value):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{name} must be a (height, width) pair of non-negative ints, got {value!r}")
    return tuple(value)


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")  # diffusers' names
    _begins_at_zero = True  # diffusers' SDXL pipeline tells a step-index scheduler its run starts at index 0
    _takes_aesthetic_score = False  # (image-to-image's refiner conditioning)

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, *,
                 force_zeros_for_empty_prompt=True, requires_aesthetics_score=False, cuda_graph="auto",
                 channels_last="auto"):
        """``text_encoder`` and ``tokenizer`` may both be None (an SDXL refiner: the second encoder alone).
        ``requires_aesthetics_score``: the refiner's time ids, an aesthetic score in place of the target size
        (image-to-image only, as the refiner is)."""
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        if self.requires_aesthetics_score and not self._takes_aesthetic_score:
            raise ValueError(f"requires_aesthetics_score: an SDXL refiner's UNet, which {type(self).__name__} cannot "
                             "condition; it refines images: diffusion_fast.StableDiffusionXLImg2ImgPipeline")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, cuda_graph=cuda_graph,
                         channels_last=channels_last)

    def _check_components(self):
        """The UNet must take the encoders' hidden states (both, or the second alone as a refiner's does) and SDXL's
        added conditioning of the second's pooled projection and six time ids, or five with an aesthetic score
        (diffusers checks the last at the first call; here the pipeline is refused)."""
        unet, te, te2 = self.unet, self.text_encoder, self.text_encoder_2
        check_model_config("unet", unet, "cross_attention_dim", "a UNet2DConditionModel")
        if (te is None) != (self.tokenizer is None):
            raise ValueError("text_encoder and tokenizer: give both, or neither (an SDXL refiner)")
        if te is not None:
            check_model_config("text_encoder", te, "hidden_size", "a transformers CLIPTextModel")
        check_model_config("text_encoder_2", te2, "projection_dim", "a transformers CLIPTextModelWithProjection")
        c = unet.config
        widths = [e.config.hidden_size for e in (te, te2) if e is not None]
        cross = c.cross_attention_dim
        per_block = cross if isinstance(cross, (list, tuple)) else [cross]
        if any(w != sum(widths) for w in per_block):
            raise ValueError(f"unet (cross_attention_dim={c.cross_attention_dim}) does not fit the text encoders "
                             f"(hidden sizes {' + '.join(map(str, widths))} = {sum(widths)})")
        latent = self.vae.config.latent_channels
        if c.in_channels != latent and not (self._unet_takes_mask or self._unet_takes_image):
            kind = ("an InstructPix2Pix UNet, for diffusion_fast.StableDiffusionXLInstructPix2PixPipeline"
                    if c.in_channels == 2 * latent else
                    "an inpainting UNet, for diffusion_fast.StableDiffusionXLInpaintPipeline")
            raise ValueError(f"unet has {c.in_channels} input channels and the VAE's latents {latent}: {kind}")
        if c.addition_embed_type != "text_time":
            raise ValueError(f"unet has addition_embed_type={c.addition_embed_type!r}: an SDXL UNet takes the pooled "
                             "text embedding and time ids ('text_time')")
        ids = 5 if self.requires_aesthetics_score else 6
        passed = ids * c.addition_time_embed_dim + te2.config.projection_dim
        if passed != c.projection_class_embeddings_input_dim:
            hint = ""
            if passed - c.projection_class_embeddings_input_dim == c.addition_time_embed_dim:
                hint = (": five time ids with an aesthetic score fit it, an SDXL refiner's UNet, for "
                        "StableDiffusionXLImg2ImgPipeline(..., requires_aesthetics_score=True)")
            elif c.projection_class_embeddings_input_dim - passed == c.addition_time_embed_dim:
                hint = ": six time ids fit it (a base UNet): requires_aesthetics_score=False"
            raise ValueError(f"unet expects an added embedding of {c.projection_class_embeddings_input_dim} values "
                             f"(projection_class_embeddings_input_dim), but {ids} time ids of "
                             f"{c.addition_time_embed_dim} "
                             f"and text_encoder_2's projection_dim {te2.config.projection_dim} make {passed}{hint}")

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto",
                        channels_last="auto", **components):
        """Load a diffusers SDXL folder: model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
        tokenizer_2/, scheduler/ (a refiner's has no text_encoder/ or tokenizer/). A component passed by name
        (``text_encoder_2=base.text_encoder_2, vae=base.vae``, as diffusers' refiner example shares them) is used
        as it is, not loaded."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        folder, index = read_model_index(folder)
        refiner = bool(index.get("requires_aesthetics_score", False))
        if refiner and not cls._takes_aesthetic_score:
            raise ValueError(f"{folder!r} is an SDXL refiner (requires_aesthetics_score): it refines images; load it "
                             "with diffusion_fast.StableDiffusionXLImg2ImgPipeline or diffusion_fast.load_pipeline")
        load = ComponentLoader(folder, index, COMPONENTS, ("text_encoder", "tokenizer"), components, dtype, device,
                               variant)
        options = {"requires_aesthetics_score": True} if refiner else {}
        return cls(load("unet"), load("vae"), load("text_encoder", CLIPTextModel),
                   load("text_encoder_2", CLIPTextModelWithProjection), load("tokenizer"), load("tokenizer_2"),
                   load("scheduler"), force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                   cuda_graph=cuda_graph, channels_last=channels_last, **options)

    def to(self, device=None, dtype=None):
        self.text_encoder_2.to(device=device, dtype=resolve_dtype(dtype))
        return super().to(device, dtype)

    # ---- text conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_both(self, texts, texts_2, device, max_length=None, clip_skip=None):
        """(both encoders' penultimate hidden states, concatenated, or ``clip_skip`` layers before them; the second
        encoder's pooled projection). Without a first encoder (a refiner) the second takes ``texts``, as diffusers
        pairs them."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        pairs = [pair for pair in pairs if pair[1] is not None]
        hidden, pooled = [], None
        for batch, (tokenizer, encoder) in zip((texts, texts_2), pairs):
            ids = tokenizer(self.maybe_convert_prompt(batch, tokenizer), padding="max_length",
                            max_length=max_length or tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # diffusers' rule: the first 2-d output (the projection)
                pooled = out[0]
            hidden.append(out.hidden_states[-(2 + (clip_skip or 0))])  # (no final layer norm: diffusers' SDXL)
        return torch.cat(hidden, dim=-1), pooled

    def encode_prompt(self, prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt=None,
                      negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip=None):
        """(prompt_embeds, negative_prompt_embeds, pooled, negative pooled) as diffusers computes them, repeated
        per image; the negative ones None without guidance. ``clip_skip`` skips layers for the prompt alone, as
        diffusers does."""
        if prompt_embeds is None:
            texts_2 = prompt_2 or prompt
            if len(texts_2) == 1 and len(prompt) > 1:  # one second prompt for every prompt (diffusers fails here)
                texts_2 = list(texts_2) * len(prompt)
            prompt_embeds, pooled_prompt_embeds = self._encode_both(prompt, texts_2, device, clip_skip=clip_skip)
        batch = prompt_embeds.shape[0]
        dtype = self.text_encoder_2.dtype
        if do_cfg and negative_prompt_embeds is None:
            if negative_prompt is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negative = negative_prompt or ""
                negative_2 = negative_prompt_2 or negative
                negative, negative_2 = ([n] * batch if isinstance(n, str) else list(n) for n in (negative, negative_2))
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_both(
                    negative, negative_2, device, max_length=prompt_embeds.shape[1])
        def per_image(t):
            return t.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)

        if not do_cfg:
            return per_image(prompt_embeds), None, per_image(pooled_prompt_embeds), None
        return tuple(per_image(t) for t in (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                            negative_pooled_prompt_embeds))

    def _time_ids(self, original_size, crops_coords_top_left, last, dtype):
        """SDXL's size conditioning, one row: original size, crop corner, and the target size (a pair) or a refiner's
        aesthetic score (one value)."""
        return torch.tensor([list(original_size + crops_coords_top_left + tuple(last))], dtype=dtype)

    def _check_xl_inputs(self, prompt, prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                         pooled_prompt_embeds, negative_pooled_prompt_embeds):
        """What SDXL adds to the SD pipeline's checks (``_check_inputs`` ran first)."""
        batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if value is None or isinstance(value, str):  # (one str serves every prompt)
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__}")
            if len(value) != batch:
                raise ValueError(f"{name} has {len(value)} entries but there are {batch} prompts")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the second text encoder's projection)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("prompt_2 and prompt_embeds: give one, not both")

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 num_inference_steps=50, guidance_scale=5.0, eta=0.0, generator=None, height=None, width=None,
                 num_images_per_prompt=1, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, latents=None, output_type="pil", original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, timesteps=None, sigmas=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), guidance_rescale=0.0,
                 denoising_end=None, clip_skip=None):
        """``denoising_end`` (a fraction in (0, 1)): stop there, as the first expert of diffusers' base + refiner
        ensemble does; with ``output_type="latent"`` the refiner's ``denoising_start`` picks up the latents."""
        check_denoising_bounds(denoising_end=denoising_end)
        height = height if height is not None else self.unet.config.sample_size * self.vae_scale_factor
        width = width if width is not None else self.unet.config.sample_size * self.vae_scale_factor
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, latents, output_type)
        self._set_guidance_rescale(guidance_rescale)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        embeds, cond = self._text_conditioning(
            shape, do_cfg, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
            (height, width), original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        return self._sample(shape, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta, generator, latents,
                            output_type, timesteps, sigmas, callback, denoising_end)

    def _text_conditioning(self, shape, do_cfg, prompt, prompt_2, negative_prompt, negative_prompt_2,
                           num_images_per_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                           negative_pooled_prompt_embeds, clip_skip, size, original_size, crops_coords_top_left,
                           target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size):
        """Text-to-image's conditioning for the loop, checked: (the text embeddings, (pooled embeddings, time ids)),
        negative first with guidance; the sizes default to the output ``size`` (height, width), as in diffusers."""
        clip_skip = self._check_clip_skip(clip_skip)
        self._check_xl_inputs(prompt, prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        sizes = {name: _size_pair(name, value) for name, value in (
            ("original_size", original_size or size), ("crops_coords_top_left", crops_coords_top_left),
            ("target_size", target_size or size), ("negative_crops_coords_top_left", negative_crops_coords_top_left))}
        prompt, prompt_2 = ([p] if isinstance(p, str) else p for p in (prompt, prompt_2))
        device = self.device
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)
        time_ids = self._time_ids(sizes["original_size"], sizes["crops_coords_top_left"], sizes["target_size"],
                                  embeds.dtype)
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._time_ids(_size_pair("negative_original_size", negative_original_size),
                                               sizes["negative_crops_coords_top_left"],
                                               _size_pair("negative_target_size", negative_target_size), embeds.dtype)
        if do_cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([negative_time_ids, time_ids])
        time_ids = time_ids.to(device).repeat(shape[0], 1)  # as diffusers: the (negative, positive) pair, repeated
        return embeds.to(self.dtype), (pooled.to(device), time_ids)

    def _decode(self, latents):
        """diffusers' SDXL decode: an fp16 VAE with force_upcast decodes in fp32 (and goes back to fp16);
        latents_mean / latents_std where the VAE config has them."""
        vae, c = self.vae, self.vae.config
        upcast = vae.dtype == torch.float16 and c.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.float()
        if c.latents_mean is not None and c.latents_std is not None:
            mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(c.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / c.scaling_factor + mean
        else:
            latents = latents / c.scaling_factor
        try:
            return vae.decode(latents)
        finally:
            if upcast:
                vae.to(dtype=torch.float16)


def load_pipeline(folder, **kwargs):
    """Our pipeline for a diffusers folder, by what it holds: ``StableDiffusionXLPipeline`` for an SDXL folder (two
    text encoders), ``StableDiffusionXLImg2ImgPipeline`` for an SDXL refiner (``requires_aesthetics_score``),
    ``StableDiffusionXLInpaintPipeline`` / ``StableDiffusionInpaintPipeline`` for an SDXL / SD inpainting folder
    (diffusers' class name), ``StableDiffusionXLControlNetPipeline`` / ``StableDiffusionControlNetPipeline`` /
    ``...Img2ImgPipeline`` / ``...InpaintPipeline`` for a folder diffusers saved such a ControlNet pipeline in
    (``StableDiffusionXLControlNetUnion...Pipeline`` for a ControlNet-Union one),
    ``StableDiffusion(XL)AdapterPipeline`` for one it saved a T2I-Adapter pipeline in,
    ``LatentConsistencyModel(Img2Img)Pipeline`` for an LCM's (diffusers' class name),
    ``StableDiffusion(XL)InstructPix2PixPipeline`` for an InstructPix2Pix one, ``StableDiffusionUpscalePipeline`` for
    an x4 upscaler's, ``StableDiffusionDepth2ImgPipeline`` for a depth-to-image one,
    ``StableDiffusionImageVariationPipeline`` for an image-variation one, ``StableDiffusion3(Img2Img|Inpaint|ControlNet|ControlNetInpainting|PAG|PAGImg2Img)Pipeline`` for an
    SD3 or SD3.5 one (a transformer, three text encoders; another transformer pipeline, Flux or PixArt, is refused by
    name),
    ``StableDiffusion(XL)(ControlNet)PAG...Pipeline`` for a perturbed-attention guidance one (its
    applied layers "mid", as diffusers loads it), else ``StableDiffusionPipeline``; ``kwargs`` go to its ``from_pretrained``. A class diffusers saved that is not
    mirrored here (an Attend-and-Excite pipeline, say) loads as the pipeline its components run, with a warning."""
    from .pipeline_controlnet import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
    from .pipeline_controlnet_image import (StableDiffusionControlNetImg2ImgPipeline,
                                            StableDiffusionControlNetInpaintPipeline,
                                            StableDiffusionXLControlNetImg2ImgPipeline,
                                            StableDiffusionXLControlNetInpaintPipeline)
    from .pipeline_controlnet_union import (StableDiffusionXLControlNetUnionImg2ImgPipeline,
                                            StableDiffusionXLControlNetUnionInpaintPipeline,
                                            StableDiffusionXLControlNetUnionPipeline)
    from .pipeline_img2img import StableDiffusionXLImg2ImgPipeline
    from .pipeline_inpaint import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
    from .pipeline_lcm import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
    from .pipeline_pag import PAG_PIPELINES
    from .pipeline_pix2pix import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline
    from .pipeline_t2i_adapter import StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline
    from .pipeline_upscale import StableDiffusionUpscalePipeline
    from .pipeline_depth2img import StableDiffusionDepth2ImgPipeline
    from .pipeline_variation import StableDiffusionImageVariationPipeline

    folder, components = read_model_index(folder)
    name = str(components.get("_class_name", ""))
    inpainting = "Inpaint" in name
    if "transformer" in components:
        from .pipeline_sd3 import StableDiffusion3Pipeline
        from .pipeline_sd3_img2img import StableDiffusion3Img2ImgPipeline
        from .pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline
        from .pipeline_sd3_controlnet_inpaint import StableDiffusion3ControlNetInpaintingPipeline
        from .pipeline_sd3_inpaint import StableDiffusion3InpaintPipeline
        from .pipeline_sd3_pag import StableDiffusion3PAGImg2ImgPipeline, StableDiffusion3PAGPipeline

        cls = {c.__name__: c for c in (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline,
                                       StableDiffusion3InpaintPipeline, StableDiffusion3ControlNetPipeline,
                                       StableDiffusion3ControlNetInpaintingPipeline, StableDiffusion3PAGPipeline,
                                       StableDiffusion3PAGImg2ImgPipeline)}.get(name)
        if cls is None:
            raise ValueError(f"{folder!r} holds a {name or 'pipeline'} (a diffusion transformer), which is not "
                             "supported: of the transformer pipelines, StableDiffusion3Pipeline and its "
                             "image-to-image, inpainting, ControlNet (and ControlNet inpainting) and PAG ones (SD3, "
                             "SD3.5) are")
    elif name in PAG_PIPELINES:  # (ControlNet ones too)
        cls = PAG_PIPELINES[name]
    elif "adapter" in components and "AdapterPipeline" in name:
        cls = StableDiffusionXLAdapterPipeline if "text_encoder_2" in components else StableDiffusionAdapterPipeline
    elif "controlnet" in components and "ControlNetUnion" in name:
        cls = (StableDiffusionXLControlNetUnionInpaintPipeline if inpainting else
               StableDiffusionXLControlNetUnionImg2ImgPipeline if "Img2Img" in name else
               StableDiffusionXLControlNetUnionPipeline)
    elif "controlnet" in components and "ControlNet" in name:
        xl = "text_encoder_2" in components
        kind = "inpainting" if inpainting else "image-to-image" if "Img2Img" in name else "text-to-image"
        cls = {("text-to-image", False): StableDiffusionControlNetPipeline,
               ("text-to-image", True): StableDiffusionXLControlNetPipeline,
               ("image-to-image", False): StableDiffusionControlNetImg2ImgPipeline,
               ("image-to-image", True): StableDiffusionXLControlNetImg2ImgPipeline,
               ("inpainting", False): StableDiffusionControlNetInpaintPipeline,
               ("inpainting", True): StableDiffusionXLControlNetInpaintPipeline}[kind, xl]
    elif name == "StableDiffusionXLInstructPix2PixPipeline":
        cls = StableDiffusionXLInstructPix2PixPipeline
    elif "text_encoder_2" in components and inpainting:
        cls = StableDiffusionXLInpaintPipeline
    elif "text_encoder_2" in components and components.get("requires_aesthetics_score", False):
        cls = StableDiffusionXLImg2ImgPipeline
    elif "text_encoder_2" in components:
        cls = StableDiffusionXLPipeline
    elif inpainting:
        cls = StableDiffusionInpaintPipeline
    elif name.startswith("LatentConsistencyModel"):
        cls = LatentConsistencyModelImg2ImgPipeline if "Img2Img" in name else LatentConsistencyModelPipeline
    elif name == "StableDiffusionInstructPix2PixPipeline":
        cls = StableDiffusionInstructPix2PixPipeline
    elif name == "StableDiffusionUpscalePipeline":
        cls = StableDiffusionUpscalePipeline
    elif name == "StableDiffusionDepth2ImgPipeline":
        cls = StableDiffusionDepth2ImgPipeline
    elif name == "StableDiffusionImageVariationPipeline":
        cls = StableDiffusionImageVariationPipeline
    else:
        cls = StableDiffusionPipeline
    # diffusers' image-to-image classes are saved with the same components their text-to-image ones load
    same_components = {"StableDiffusionImg2ImgPipeline": StableDiffusionPipeline,
                       "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLPipeline}
    if name and name != cls.__name__ and same_components.get(name) is not cls:
        warnings.warn(f"{folder}: diffusers saved a {name} there, which is not mirrored here; loaded as "
                      f"{cls.__name__}, what its components run (without what that class adds)",
                      stacklevel=2)
    return cls.from_pretrained(folder, **kwargs)
