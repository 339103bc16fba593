"""Tiny diffusers pipelines built offline, as the reference in tests (configs from diffusion_fast.tiny)."""
import functools
import os
import tempfile

import torch

from diffusion_fast import tiny


@functools.lru_cache(maxsize=None)
def _tokenizer_dir():
    folder = os.path.join(tempfile.mkdtemp(prefix="df-tok-"), "tokenizer")
    tiny.write_tokenizer(folder)
    return folder


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir())


def pipeline(variant="sd1", seed=0, scheduler_overrides=None):
    """A diffusers StableDiffusionPipeline (fp32, CPU, DDIMScheduler) with random weights from ``seed``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny.unet_config(variant))
    vae = AutoencoderKL(**tiny.vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config(variant)))
    scheduler = DDIMScheduler(**dict(tiny.scheduler_config(variant), **(scheduler_overrides or {})))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def saved_pipeline(folder, variant="sd1", seed=0):
    """Build the diffusers pipeline and write it with save_pretrained; returns (pipe, folder)."""
    pipe = pipeline(variant, seed)
    pipe.save_pretrained(folder)
    return pipe, str(folder)
