"""Image variations: diffusers' StableDiffusionImageVariationPipeline (lambdalabs/sd-image-variations-diffusers), the
same image for the same seed, image and weights.

The UNet is conditioned on an image instead of a text: the CLIP image encoder's projected embedding of it (through
its CLIPImageProcessor), one token, with zeros as the unconditional half. The rest is the SD pipeline's text-to-image
loop: two-way CFG, so DDIM runs the fused CFG step and on a GPU the whole step replays from one CUDA graph.
"""
from __future__ import annotations

import torch

from .ip_adapter import adapter_count
from .pipeline import StableDiffusionPipeline
from .pipeline_folder import ComponentLoader, check_model_config, read_model_index


class StableDiffusionImageVariationPipeline(StableDiffusionPipeline):
    """diffusers' StableDiffusionImageVariationPipeline: its defaults (50 steps, guidance 7.5, the UNet's default
    size). No text encoder: ``image_encoder`` (transformers' CLIPVisionModelWithProjection) conditions the UNet."""
    _callback_tensor_inputs = ("latents", "prompt_embeds")  # (the image embeddings, under the loop's name)

    def __init__(self, unet, vae, image_encoder, scheduler, feature_extractor=None, *, cuda_graph="auto",
                 channels_last="auto"):
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor
        super().__init__(unet, vae, None, None, scheduler, cuda_graph=cuda_graph, channels_last=channels_last)

    def _check_components(self):
        unet, encoder = self.unet, self.image_encoder
        check_model_config("unet", unet, "cross_attention_dim", "a UNet2DConditionModel")
        check_model_config("image_encoder", encoder, "projection_dim", "a transformers CLIPVisionModelWithProjection")
        cross = unet.config.cross_attention_dim
        if any(c != encoder.config.projection_dim for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
            raise ValueError(f"unet (cross_attention_dim={cross}) does not fit image_encoder (projection_dim="
                             f"{encoder.config.projection_dim}): the UNet attends to the image's projected embedding")
        if unet.config.in_channels != self.vae.config.latent_channels or unet.config.addition_embed_type is not None:
            raise ValueError(f"unet (in_channels={unet.config.in_channels}, addition_embed_type="
                             f"{unet.config.addition_embed_type!r}) is not a plain SD UNet: an image-variation UNet "
                             "takes the latents alone and the image embedding")

    def _models(self):
        models = super()._models()
        return dict(models, moved=(self.unet, self.vae))  # (no text encoder; the image encoder moves with to())

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto",
                        channels_last="auto", **components):
        """Load a diffusers StableDiffusionImageVariationPipeline folder: unet/, vae/, image_encoder/, scheduler/,
        feature_extractor/ and a safety checker where the folder lists one."""
        from transformers import CLIPVisionModelWithProjection

        folder, index = read_model_index(folder)
        names = ("unet", "vae", "image_encoder", "scheduler", "feature_extractor", "safety_checker")
        load = ComponentLoader(folder, index, names, ("safety_checker",), components, dtype, device, variant)
        pipe = cls(load("unet"), load("vae"), load("image_encoder", CLIPVisionModelWithProjection), load("scheduler"),
                   load("feature_extractor"), cuda_graph=cuda_graph, channels_last=channels_last)
        pipe.safety_checker = load("safety_checker")
        return pipe

    def _image_embeds(self, image):
        """diffusers' _encode_image: the encoder's projected embedding of each image (PIL or numpy through the
        feature extractor; a tensor taken as its pixel values), one token each: (images, 1, projection_dim)."""
        if image is None:
            raise ValueError("image: give the image to vary (an RGB PIL image, a list of them, or a tensor of the "
                             "image encoder's pixel values)")
        encoder = self.image_encoder
        if not torch.is_tensor(image):
            if self.feature_extractor is None:
                raise ValueError("image: this pipeline has no feature_extractor to prepare it; give pixel values")
            image = self.feature_extractor(images=image, return_tensors="pt").pixel_values
        elif image.dim() != 4 or image.shape[1] != encoder.config.num_channels:
            raise ValueError(f"image: a tensor must be the encoder's (B, {encoder.config.num_channels}, H, W) pixel "
                             f"values, got shape {tuple(image.shape)}")
        return encoder(image.to(device=self.device, dtype=next(encoder.parameters()).dtype)).image_embeds.unsqueeze(1)

    @torch.no_grad()
    def __call__(self, image=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 num_images_per_prompt=1, eta=0.0, generator=None, latents=None, output_type="pil",
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Variations of ``image`` (an RGB PIL image, a list of them, or a tensor of the image encoder's pixel
        values), ``num_images_per_prompt`` of each."""
        if adapter_count(self.unet):
            raise ValueError("IP-Adapter: diffusers' image-variation pipeline takes none; unload_ip_adapter() first")
        height = height if height is not None else self.unet.config.sample_size * self.vae_scale_factor
        width = width if width is not None else self.unet.config.sample_size * self.vae_scale_factor
        embeds = self._image_embeds(image).to(self.dtype)  # (the image embeddings stand where text ones would)
        shape = self._check_inputs(None, None, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, embeds, None, latents, output_type)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)  # (diffusers' repeat + view)
        embeds = torch.cat([torch.zeros_like(embeds), embeds]) if do_cfg else embeds
        return self._sample(shape, embeds, (), num_inference_steps, guidance_scale, do_cfg, eta, generator, latents,
                            output_type, callback=callback)
