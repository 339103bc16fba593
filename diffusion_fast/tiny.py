"""Small SD-architecture configs and an offline CLIP tokenizer: the built-in default model and the test models.

Nothing here downloads anything. The configs are in diffusers' format (the same dicts build diffusers' classes in the
tests and ours in the package), shaped like SD 1.x and SD 2.x but tiny, with deliberately awkward sizes: GroupNorm
with several channels per group, non-power-of-two head dims, a cross-attention width different from the UNet's.
``write_tiny_pipeline(folder, variant)`` writes a complete diffusers-layout folder with random weights.
"""
from __future__ import annotations

import copy
import json
import os

# CLIP's byte-level tokenizer with no merges: every character is a token ("a", or "a</w>" at a word's end).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def byte_vocab() -> dict:
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: str, model_max_length: int = 77):
    """Write a CLIPTokenizer folder (vocab.json, empty merges.txt, configs) and return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(byte_vocab(), f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length, pad_token=EOS)
    tok.save_pretrained(folder)
    return tok


def text_encoder_config(variant: str = "sd1") -> dict:
    vocab = byte_vocab()
    return dict(
        vocab_size=len(vocab),
        hidden_size=32 if variant == "sd1" else 48,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu" if variant == "sd1" else "gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        projection_dim=32,
    )


_UNET = {
    # SD 1.x shape: the legacy attention_head_dim meaning a head COUNT (4 heads over 48 channels: head dim 12, not a
    # power of two; 16 in the mid block), conv projections, 3 and 4 channels per GroupNorm group.
    "sd1": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[48, 64],
        layers_per_block=2,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=16,
        flip_sin_to_cos=True,
        freq_shift=0,
    ),
    # SD 2.x shape: per-block head counts, linear projections, upcast attention, cross width 48.
    "sd2": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[32, 48, 64],
        layers_per_block=1,
        attention_head_dim=[2, 4, 8],
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=48,
        norm_num_groups=16,
        flip_sin_to_cos=True,
        freq_shift=0,
    ),
}

_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
    scaling_factor=0.18215,
)

_SCHEDULER = {
    "sd1": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    ),
    "sd2": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        timestep_spacing="leading",
    ),
}

VARIANTS = tuple(_UNET)

# Stable Diffusion 1.5's real architecture (the published config), for benchmarks with random weights.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)


def sd15_text_encoder_config() -> dict:
    """CLIP ViT-L/14's text tower (SD1.5's text encoder) over our offline byte vocabulary."""
    return dict(text_encoder_config("sd1"), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                num_hidden_layers=12, projection_dim=768)


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def unet_config(variant: str = "sd1") -> dict:
    _check_variant(variant)
    return copy.deepcopy(_UNET[variant])


def vae_config() -> dict:
    return copy.deepcopy(_VAE)


def scheduler_config(variant: str = "sd1") -> dict:
    _check_variant(variant)
    return copy.deepcopy(_SCHEDULER[variant])


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def write_tiny_pipeline(folder: str, variant: str = "sd1", seed: int = 0) -> str:
    """Write a diffusers-layout tiny SD folder with random weights (our classes; diffusers not needed)."""
    _check_variant(variant)
    return write_random_pipeline(folder, unet_config(variant), vae_config(), text_encoder_config(variant),
                                 scheduler_config(variant), seed)


def write_sd15_pipeline(folder: str, seed: int = 0) -> str:
    """Write a diffusers-layout folder with SD1.5's architecture and random weights (fp16 files, ~2 GB)."""
    import torch

    return write_random_pipeline(folder, copy.deepcopy(SD15_UNET), copy.deepcopy(SD15_VAE), sd15_text_encoder_config(),
                                 scheduler_config("sd1"), seed, dtype=torch.float16)


def write_random_pipeline(folder, unet_cfg, vae_cfg, text_cfg, sched_cfg, seed=0, dtype=None) -> str:
    """Write model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ with random weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import AutoencoderKL, UNet2DConditionModel

    # seeded weights, without reseeding the caller's global generator (fork_rng restores it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, cls, config in (
            ("unet", UNet2DConditionModel, dict(unet_cfg, _class_name="UNet2DConditionModel")),
            ("vae", AutoencoderKL, dict(vae_cfg, _class_name="AutoencoderKL")),
        ):
            model = cls.from_config(config)
            _write_json(os.path.join(folder, name, "config.json"), config)
            state = {k: v.to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
            save_file(state, os.path.join(folder, name, "diffusion_pytorch_model.safetensors"))
            del model, state
        CLIPTextModel(CLIPTextConfig(**text_cfg)).save_pretrained(os.path.join(folder, "text_encoder"))
    write_tokenizer(os.path.join(folder, "tokenizer"))
    _write_json(
        os.path.join(folder, "scheduler", "scheduler_config.json"), dict(sched_cfg, _class_name="DDIMScheduler")
    )
    _write_json(
        os.path.join(folder, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
    return folder
