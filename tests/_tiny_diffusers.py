"""Tiny diffusers pipelines built offline, as the reference in tests (configs from diffusion_fast.tiny)."""
import contextlib
import functools
import os
import tempfile

import torch

from diffusion_fast import tiny

# SDXL-shaped, tiny: text_time conditioning, per-block transformer depth (1, 2), linear projections, a down block
# without attention first (SDXL's order), head dims 16 and 16. Cross width 40 = the two text encoders' 16 + 24;
# the added embedding takes the pooled 24 plus six 8-wide time ids.
SDXL_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
    use_linear_projection=True, cross_attention_dim=40, norm_num_groups=16, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
)


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


def sdxl_pipeline(seed=0):
    """A diffusers StableDiffusionXLPipeline (fp32, CPU, DDIMScheduler): two text encoders (16 and 24 wide, the second
    with a 24-wide projection), the SDXL_TINY UNet and the tiny VAE, random weights from ``seed``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    base = tiny.text_encoder_config("sd1")
    text_encoder = CLIPTextModel(CLIPTextConfig(**dict(base, hidden_size=16, intermediate_size=32,
                                                       num_attention_heads=2)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(base, hidden_size=24, intermediate_size=48,
                                                                       num_attention_heads=2, projection_dim=24)))
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**tiny.vae_config()), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=UNet2DConditionModel(**SDXL_TINY),
        scheduler=DDIMScheduler(**tiny.scheduler_config("sd1")),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


@contextlib.contextmanager
def swapped_schedulers(name, theirs, ours, **fields):
    """diffusers' scheduler class ``name`` on every pipeline in ``theirs`` (built from the first one's scheduler config
    with ``fields`` over it) and ours from the same config on every pipeline in ``ours``; each pipeline's own
    scheduler is put back afterwards."""
    import diffusers

    import diffusion_fast

    pipes = [*theirs, *ours]
    saved = [pipe.scheduler for pipe in pipes]
    config = getattr(diffusers, name).from_config(theirs[0].scheduler.config, **fields).config
    try:
        for pipe in theirs:
            pipe.scheduler = getattr(diffusers, name).from_config(config)
        for pipe in ours:
            pipe.scheduler = diffusion_fast.schedulers.load_scheduler(dict(config))
        yield
    finally:
        for pipe, scheduler in zip(pipes, saved):
            pipe.scheduler = scheduler


def sdxl_refiner_pipeline(base, seed=0):
    """A diffusers StableDiffusionXLImg2ImgPipeline shaped as SDXL's refiner, sharing ``base``'s second text encoder,
    tokenizer and VAE (as diffusers' base + refiner example does): no first text encoder, a UNet of its own (cross
    width 24, the second encoder's alone; five 8-wide time ids: sizes, crop corner and the aesthetic score) with
    random weights from ``seed``, requires_aesthetics_score and no zeroed negative prompt, as the refiner ships."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(SDXL_TINY, cross_attention_dim=24,
                                       projection_class_embeddings_input_dim=24 + 5 * 8))
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def controlnet_pipeline(seed=0, nets=1, variant="sd1"):
    """A diffusers StableDiffusion(XL)ControlNetPipeline on the tiny SD1 (or SDXL) components, with ``nets``
    ControlNets built from its UNet (a MultiControlNetModel when nets > 1). A ControlNet's zero convolutions start at
    zero, so it would add nothing, and so does its conditioning embedding's last convolution, so the conditioning
    image would change nothing; here they are random, so the residuals and the image change the output. Images are
    4x the latent size (the tiny VAE's factor): two stride-2 convolutions in the conditioning embedding."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    base = pipeline("sd1", seed) if variant == "sd1" else sdxl_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnets = [random_controlnet(base.unet) for _ in range(nets)]
    cls = StableDiffusionControlNetPipeline if variant == "sd1" else StableDiffusionXLControlNetPipeline
    pipe = cls(**base.components, controlnet=controlnets[0] if nets == 1 else controlnets)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def random_controlnet(unet, widths=(8, 16, 32)):
    """A diffusers ControlNetModel built from ``unet`` with random zero convolutions and conditioning embedding (see
    controlnet_pipeline), drawn from torch's global generator; ``widths``: the embedding's, one stride-2 convolution
    between each two (the tiny VAE's 4x; a fourth width for TAESD's 8x)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    with torch.no_grad():
        for zero_conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            zero_conv.weight.normal_(std=0.05)
        for conv in net.controlnet_cond_embedding.modules():  # He-initialised, so the image's features carry
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(std=(2 / conv.weight[0].numel()) ** 0.5)
    return net


# ---- ControlNet comparisons (tests/test_pipeline_controlnet*.py) -----------------------------------------------
def per_net(nets, one, *more):
    """A ControlNet call argument: ``one`` for a single net, else the list of one per net."""
    return one if nets == 1 else [one, *more]


def saved_pair(theirs, folder, cls):
    """(diffusers' pipeline, ours loaded by load_pipeline from the folder it is saved in, checked to be ``cls``)."""
    import diffusion_fast

    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(folder)
    ours = diffusion_fast.load_pipeline(folder)
    ours.set_progress_bar_config(disable=True)
    assert type(ours) is cls, type(ours)
    return theirs, ours


def assert_as_diffusers_with_nets_that_matter(run, theirs, ours, nets, tolerance, **kwargs):
    """``run(pipe, **kwargs)`` gives the same images for ours as for diffusers' within ``tolerance``, and far from
    ours with every net at scale 0 (so a dropped or misplaced residual cannot pass)."""
    import numpy as np

    b = run(ours, **kwargs)
    a = run(theirs, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= tolerance, np.abs(a - b).max()
    off = run(ours, **dict(kwargs, controlnet_conditioning_scale=per_net(nets, 0.0, 0.0)))
    assert np.abs(off - b).max() > 0.005  # the residuals matter
    return b


# ---- IP-Adapters (tests/test_ip_adapter.py) ---------------------------------------------------------------------
@contextlib.contextmanager
def ip_adapter_loaded(pipes, folder, unet, seed=7):
    """A plain IP-Adapter for the diffusers ``unet`` written to ``folder`` and loaded into each of ``pipes`` for the
    block's duration, unloaded after it."""
    weights = write_ip_adapter(folder, unet, "plain", seed=seed)
    try:
        for pipe in pipes:
            pipe.load_ip_adapter(str(folder), "", weights)
        yield
    finally:
        for pipe in pipes:
            pipe.unload_ip_adapter()


def write_ip_adapter(folder, unet, kind="plain", seed=0, file_name=None):
    """An IP-Adapter for the diffusers ``unet`` in the original files' layout (h94/IP-Adapter's keys: image_proj.*,
    ip_adapter.<id>.to_k_ip/to_v_ip with odd ids over the UNet's attention processors), random weights from
    ``seed``, plus a tiny CLIP image encoder in ``folder/image_encoder`` (hidden 32, projection 24, 32x32 images).
    ``kind``: "plain" (4 tokens from the image embedding) or "plus" (a 4-layer resampler, as diffusers always builds
    it, over the encoder's hidden states: 4 queries, one 64-wide head). Returns the weights' file name."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    if not os.path.isdir(os.path.join(folder, "image_encoder")):
        CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=3, num_attention_heads=2,
            image_size=32, patch_size=8)).save_pretrained(os.path.join(folder, "image_encoder"))
    cross = unet.config.cross_attention_dim
    cross = cross if isinstance(cross, int) else cross[0]

    def norm(prefix, dim):
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = 1 + 0.1 * torch.randn(dim), 0.1 * torch.randn(dim)

    state = {}
    if kind == "plain":
        state["image_proj.proj.weight"], state["image_proj.proj.bias"] = torch.randn(4 * cross, 24) * 0.2, torch.randn(4 * cross) * 0.1
        norm("image_proj.norm", cross)
    else:
        hidden = 64
        state["image_proj.latents"] = torch.randn(1, 4, hidden) / 8
        state["image_proj.proj_in.weight"], state["image_proj.proj_in.bias"] = torch.randn(hidden, 32) * 0.2, torch.randn(hidden) * 0.1
        state["image_proj.proj_out.weight"], state["image_proj.proj_out.bias"] = torch.randn(cross, hidden) * 0.2, torch.randn(cross) * 0.1
        norm("image_proj.norm_out", cross)
        for n in range(4):
            for part in ("0.norm1", "0.norm2", "1.0"):
                norm(f"image_proj.layers.{n}.{part}", hidden)
            for part, shape in (("0.to_q", (hidden, hidden)), ("0.to_kv", (2 * hidden, hidden)),
                                ("0.to_out", (hidden, hidden)), ("1.1", (4 * hidden, hidden)), ("1.3", (hidden, 4 * hidden))):
                state[f"image_proj.layers.{n}.{part}.weight"] = torch.randn(*shape) * 0.15
    modules = dict(unet.named_modules())
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden_size = modules[name[:-len(".processor")]].to_q.out_features
            for part in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{part}.weight"] = torch.randn(hidden_size, cross) * 0.3
            key_id += 2
    file_name = file_name or f"ip-adapter-{kind}.safetensors"
    save_file(state, os.path.join(folder, file_name))
    return file_name


# ---- T2I-Adapters (tests/test_pipeline_t2i_adapter.py, benchmarks/test_bench_cpu.py) ------------------------------
# UNets of three levels, as SD 1.5's four and SDXL's three place the maps: SD's last block (no attention, no
# downsampler) takes its map after the block; SDXL's first (no attention) after its downsampler, and its 4th map goes
# to the mid block
ADAPTER_SD_UNET = dict(tiny.unet_config("sd1"), layers_per_block=1, block_out_channels=[32, 64, 64],
                       down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
ADAPTER_XL_UNET = dict(SDXL_TINY, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4],
                       transformer_layers_per_block=[1, 2, 2],
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
# the tiny VAE's scale is 4: an SD adapter unshuffles by 4 (latent size), SDXL's by 8, as 8 and 16 at full size
ADAPTERS = {
    "full": dict(channels=[32, 64, 64], downscale_factor=4, adapter_type="full_adapter"),
    "light": dict(channels=[32, 64], downscale_factor=4, adapter_type="light_adapter"),
    "sketch": dict(in_channels=1, channels=[32, 64, 64], downscale_factor=4, adapter_type="full_adapter"),
    "xl": dict(channels=[32, 64, 64, 64], downscale_factor=8, adapter_type="full_adapter_xl"),
}


def diffusers_adapter(kind, seed):
    """A diffusers T2IAdapter of ``kind`` (see ADAPTERS) with random weights from ``seed``."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.T2IAdapter(**ADAPTERS[kind])


def adapter_pipeline(variant, kinds, seed=4):
    """A diffusers StableDiffusion(XL)AdapterPipeline (fp32) on the tiny components with a three-level UNet
    (ADAPTER_SD_UNET / ADAPTER_XL_UNET) and the adapters of ``kinds`` (a MultiAdapter for several), random weights
    from ``seed``."""
    import diffusers

    base = pipeline("sd1", seed=seed) if variant == "sd1" else sdxl_pipeline(seed=seed)
    components = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor",
                                                                          "image_encoder")}
    torch.manual_seed(seed + 1)
    components["unet"] = diffusers.UNet2DConditionModel(**(ADAPTER_SD_UNET if variant == "sd1" else ADAPTER_XL_UNET))
    adapters = [diffusers_adapter(kind, seed + 2 + i) for i, kind in enumerate(kinds)]
    adapter = adapters[0] if len(adapters) == 1 else diffusers.MultiAdapter(adapters)
    if variant == "sd1":
        pipe = diffusers.StableDiffusionAdapterPipeline(**components, adapter=adapter, safety_checker=None,
                                                        feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLAdapterPipeline(**components, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


# ---- ControlNet-Union (tests/test_pipeline_controlnet_union.py) -------------------------------------------------
def union_controlnet(seed=0):
    """A diffusers ControlNetUnionModel shaped as the SDXL_TINY UNet (its token width the UNet's first width, 32,
    over 2 heads), random weights from ``seed``: the zero-initialised parts (zero convolutions, the conditioning
    embedding's last convolution, the token projection) drawn too, so every part moves the residuals."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    config = {k: v for k, v in SDXL_TINY.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    net = ControlNetUnionModel(**config, conditioning_embedding_out_channels=(8, 16, 32), num_trans_channel=32,
                               num_trans_head=2, num_proj_channel=32)
    with torch.no_grad():
        for param in net.parameters():
            if param.abs().max() == 0:
                param.normal_(std=0.05)
        for conv in net.controlnet_cond_embedding.modules():  # He-initialised, so the image's features carry
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(std=(2 / conv.weight[0].numel()) ** 0.5)
    return net


def controlnet_union_pipeline(seed=4):
    """A diffusers StableDiffusionXLControlNetUnionPipeline on the tiny SDXL components with union_controlnet."""
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    base = sdxl_pipeline(seed)
    pipe = StableDiffusionXLControlNetUnionPipeline(**base.components, controlnet=union_controlnet(seed + 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


# ---- latent consistency models (tests/test_pipeline_lcm.py, benchmarks/test_bench_cpu.py) -------------------------
LCM_COND_DIM = 32  # LCM_Dreamshaper_v7's time_cond_proj_dim is 256; any even width >= 4 works the same way


def lcm_unet(config, seed):
    """A diffusers UNet of ``config`` with LCM's guidance-scale projection (``time_cond_proj_dim``), random weights
    from ``seed`` (the projection too, so the guidance scale moves the image)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(config, time_cond_proj_dim=LCM_COND_DIM))


def lcm_pipeline(seed=1):
    """diffusers' LatentConsistencyModelPipeline on the tiny SD1 components with an LCM UNet and LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    base = pipeline("sd1", seed=seed)
    pipe = LatentConsistencyModelPipeline(**dict(base.components, unet=lcm_unet(tiny.unet_config("sd1"), seed + 1),
                                                 scheduler=LCMScheduler(**tiny.scheduler_config("sd1"))),
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- InstructPix2Pix (tests/test_pipeline_pix2pix.py) --------------------------------------------------------------
def pix2pix_pipeline(seed=2):
    """diffusers' StableDiffusionInstructPix2PixPipeline on the tiny SD1 components with an 8-channel UNet (the
    latents beside the image's) and Euler ancestral, timbrooks/instruct-pix2pix's scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    base = pipeline("sd1", seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**dict(tiny.unet_config("sd1"), in_channels=8))
    pipe = StableDiffusionInstructPix2PixPipeline(
        **dict(base.components, unet=unet, scheduler=EulerAncestralDiscreteScheduler.from_config(base.scheduler.config)),
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pix2pix_pipeline(seed=6, is_cosxl_edit=False):
    """diffusers' StableDiffusionXLInstructPix2PixPipeline on the tiny SDXL components with an 8-channel UNet and
    Euler ancestral (diffusers/sdxl-instructpix2pix-768's scheduler)."""
    from diffusers import (EulerAncestralDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline,
                           UNet2DConditionModel)

    base = sdxl_pipeline(seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**dict(SDXL_TINY, in_channels=8))
    parts = {k: base.components[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        **parts, unet=unet, scheduler=EulerAncestralDiscreteScheduler.from_config(base.scheduler.config),
        is_cosxl_edit=is_cosxl_edit)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- perturbed-attention guidance (tests/test_pipeline_pag.py) -----------------------------------------------------
def pag_pipeline(xl=False, seed=3, layers="mid"):
    """diffusers' StableDiffusion(XL)PAGPipeline on the tiny SD1 (or SDXL) components."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

    if xl:
        pipe = StableDiffusionXLPAGPipeline(**sdxl_pipeline(seed).components, pag_applied_layers=layers)
    else:
        pipe = StableDiffusionPAGPipeline(**pipeline("sd1", seed=seed).components, pag_applied_layers=layers,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the x4 upscaler (tests/test_pipeline_upscale.py) -------------------------------------------------------------
def upscale_unet_config():
    """The tiny SD2 UNet shaped as stabilityai/stable-diffusion-x4-upscaler's: 7 input channels (the latents and the
    RGB image), a class embedding of 1000 noise levels, and only-cross attention in its first (highest-resolution)
    attention block and the last up block, beside ordinary ones (both kinds in one model)."""
    return dict(tiny.unet_config("sd2"), in_channels=7, num_class_embeds=1000,
                only_cross_attention=[True, False, False])


def upscale_pipeline(seed=5):
    """diffusers' StableDiffusionUpscalePipeline on the tiny SD2 components (its VAE's 3 blocks scale by 4, as the
    upscaler's does; scaling factor 0.08333), DDIM (v-prediction) as the upscaler ships and its DDPM low-res
    scheduler (beta 0.0001 to 0.02, scaled linear)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    base = pipeline("sd2", seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**upscale_unet_config())
    vae = AutoencoderKL(**dict(tiny.vae_config(), scaling_factor=0.08333))
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, low_res_scheduler=low_res,
        scheduler=base.scheduler, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- parametrizing the comparisons --------------------------------------------------------------------------------
def fast_and_one_reference(cases, ids=None):
    """pytest params (case, backend name): every case on the fast backend, and the first (the pipeline's defaults)
    on the reference backend too. The backend swaps the ops, not the pipeline's logic, which the cases vary: their
    cross product would run each case's logic twice for nothing more (and took a fifth of the suite's pipeline
    comparisons)."""
    import pytest

    ids = ids or [str(c) if isinstance(c, str) else f"kwargs{i}" for i, c in enumerate(cases)]
    return ([pytest.param(c, "fast", id=f"{i}-fast") for c, i in zip(cases, ids)]
            + [pytest.param(cases[0], "reference", id=f"{ids[0]}-reference")])


# ---- depth-to-image (tests/test_pipeline_depth2img.py) -------------------------------------------------------------
def tiny_depth_estimator(seed=7):
    """transformers' DPTForDepthEstimation, tiny (a 4-layer ViT on 32x32 pixels, 8x8 patches) with its image
    processor. Its weights are redrawn (variance-preserving, biases 0, the last one 1): at transformers' random init
    the map barely depends on the image and is ~1e-9, mostly 0 (constant after resizing, which both pipelines scale
    to NaN); here it varies with the image across the map."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    model = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16)).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                fan_in = (layer.weight[:, 0] if isinstance(layer, torch.nn.ConvTranspose2d) else layer.weight[0]).numel()
                layer.weight.normal_(std=fan_in ** -0.5)
                if layer.bias is not None:
                    layer.bias.zero_()
        [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1].bias.fill_(1.0)  # (before a ReLU)
    return model, DPTImageProcessor(size={"height": 32, "width": 32})


def depth2img_pipeline(seed=8):
    """diffusers' StableDiffusionDepth2ImgPipeline on the tiny SD2 components (v-prediction, as stabilityai's depth
    model) with a 5-channel UNet (the latents beside the depth map) and the tiny depth estimator."""
    from diffusers import StableDiffusionDepth2ImgPipeline, UNet2DConditionModel

    base = pipeline("sd2", seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**dict(tiny.unet_config("sd2"), in_channels=5))
    estimator, processor = tiny_depth_estimator(seed + 2)
    pipe = StableDiffusionDepth2ImgPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                            unet=unet, scheduler=base.scheduler, depth_estimator=estimator,
                                            feature_extractor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Comparison:
    """A test file's comparison of our pipeline with diffusers' on the same call. ``run(pipe, backend_name="fast",
    **kwargs)`` calls ``pipe`` with the file's ``defaults`` (a fresh generator seeded 3 and numpy output unless they
    say otherwise) updated by ``kwargs``, on ``backend_name``, and returns numpy images; ``as_diffusers(theirs, ours,
    backend_name="fast", **kwargs)`` runs both (diffusers' on the fast backend, which touches nothing of theirs),
    asserts the fp32 tolerance and returns ours; ``moved(a, b)``: whether an image moved (past 0.005)."""

    def __init__(self, **defaults):
        self.defaults = dict(output_type="np", **defaults)

    def run(self, pipe, backend_name="fast", **kwargs):
        import diffusion_fast

        kwargs = {**self.defaults, "generator": torch.Generator().manual_seed(3), **kwargs}
        with diffusion_fast.backend(backend_name):
            out = pipe(**kwargs).images
        return out.numpy() if torch.is_tensor(out) else out

    def as_diffusers(self, theirs, ours, backend_name="fast", **kwargs):
        import numpy as np

        from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

        b = self.run(ours, backend_name, **kwargs)
        a = self.run(theirs, **kwargs)
        assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, np.abs(a - b).max()
        return b

    @staticmethod
    def moved(a, b):
        import numpy as np

        return np.abs(a - b).max() > 0.005


def sd3_controlnet(kind="instantx", seed=20, layers=2):
    """diffusers' SD3ControlNetModel on the SD35_TINY shape, ``layers`` blocks, every weight drawn (diffusers
    zero-initialises the output maps): ``kind="instantx"`` (InstantX's SD3 nets: joint blocks with the text, their own
    patch embedding, zeros for the pooled text), ``"inpaint"`` (that kind with the mask as an extra channel) or
    ``"large"`` (SD3.5 Large's: image-only blocks, the transformer's patch embedding, the pooled text)."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    config = dict(SD35_TINY, num_layers=layers)
    if kind == "inpaint":  # (alimama's SD3 inpainting net: the mask as one extra conditioning channel)
        config.update(extra_conditioning_channels=1)
    if kind == "large":
        config.update(joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None, dual_attention_layers=(),
                      qk_norm=None, force_zeros_for_pooled_projection=False)
    net = SD3ControlNetModel(**config)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


# ---- SD3 IP-Adapters (tests/test_pipeline_sd3_ip_adapter.py, benchmarks/test_bench_cpu.py) --------------------
_INSTANTX = (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_kv", "0.to_kv"),
             ("attn.to_out.0", "0.to_out"), ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"), ("ff.net.2", "1.3"),
             ("adaln_proj", "2.1"))


def siglip(seed=5):
    """A tiny SigLIP vision model (32x32 images, 8x8 patches: 16 tokens of width 16) and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    return SiglipVisionModel(config).eval(), SiglipImageProcessor(size={"height": 32, "width": 32})


def sd3_ip_adapter_file(folder, layers=3, seed=6, width=32, head_dim=8):
    """A random SD3 IP-Adapter written as InstantX ships SD3.5-Large-IP-Adapter's ip-adapter.bin: diffusers'
    projection (1 head of 64, 4 queries, a 32-wide hidden state and timestep input) under InstantX's key names, and
    one attention per joint block under "i."."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(seed)
    projection = IPAdapterTimeImageProjection(embed_dim=16, output_dim=width, hidden_dim=32, heads=1, num_queries=4,
                                              timestep_in_dim=32)
    blocks = [SD3IPAdapterJointAttnProcessor2_0(hidden_size=width, ip_hidden_states_dim=width, head_dim=head_dim,
                                                timesteps_emb_dim=32) for _ in range(layers)]
    for module in (projection, *blocks):  # (norm weights around 1, everything else around 0)
        for name, p in module.named_parameters():
            torch.nn.init.normal_(p, mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.2)
    image_proj = {}
    for key, value in projection.state_dict().items():
        if key.startswith("layers."):
            index, rest = key.split(".", 2)[1:]
            for ours, theirs in _INSTANTX:
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
            key = f"layers.{index}.{rest}"
        image_proj[key] = value.clone()
    ip = {f"{i}.{k}": v.clone() for i, block in enumerate(blocks) for k, v in block.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": image_proj, "ip_adapter": ip}, folder / "ip-adapter.bin")
    return str(folder)


def sd3_ip_pipeline():
    """diffusers' tiny SD3 pipeline with SD3.5 Large's block kind (q/k RMSNorm, no second attention) and SigLIP."""
    import diffusers

    components = sd3_pipeline(variant="sd3").components
    torch.manual_seed(12)
    transformer = diffusers.SD3Transformer2DModel(**dict(SD3_TINY, qk_norm="rms_norm"))
    for p in transformer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    encoder, processor = siglip()
    components.update(transformer=transformer, image_encoder=encoder, feature_extractor=processor)
    pipe = diffusers.StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_accelerate_keeps_images(pipe, run, **kwargs):
    """``accelerate(pipe)`` (its attention too, on the CPU) fuses the scheduler's step and keeps ``run(pipe,
    **kwargs)``'s images within the fp32 tolerance; ``restore`` gives them back bit for bit."""
    import numpy as np

    import diffusion_fast
    from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

    pipe.set_progress_bar_config(disable=True)
    before = run(pipe, **kwargs)
    diffusion_fast.accelerate(pipe, attention=True)
    assert pipe._diffusion_fast_report["scheduler"] == 1
    assert np.abs(run(pipe, **kwargs) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(run(pipe, **kwargs), before)


# ---- image variations (tests/test_pipeline_variation.py) -----------------------------------------------------------
def variation_pipeline(seed=9):
    """diffusers' StableDiffusionImageVariationPipeline on the tiny SD1 UNet and VAE, with a tiny CLIP image encoder
    (32x32 pixels, 8x8 patches) projecting to the UNet's cross-attention width (32) and its image processor."""
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    base = pipeline("sd1", seed=seed)
    torch.manual_seed(seed + 1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=24, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=32)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImageVariationPipeline(vae=base.vae, image_encoder=encoder, unet=base.unet,
                                                 scheduler=base.scheduler, safety_checker=None,
                                                 feature_extractor=processor, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Stable Diffusion 3 (tests/test_pipeline_sd3.py) ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _t5_tokenizer_dir():
    """A T5 tokenizer folder written offline: a unigram vocabulary of letters, word-initial letters and the specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters] + \
        [("\u2581" + c, -1.5) for c in letters] + [("\u2581", -2.0)]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    folder = os.path.join(tempfile.mkdtemp(prefix="df-t5tok-"), "tokenizer_3")
    T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(folder)
    return folder


SD3_TINY = dict(  # 4 heads of 8 (head dim 8), 3 blocks, 16 latent channels, a 12x12 position table
    sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40, out_channels=16,
    pos_embed_max_size=12,
)
SD35_TINY = dict(SD3_TINY, dual_attention_layers=(0, 1), qk_norm="rms_norm")  # SD3.5 Medium's shape


def sd3_pipeline(seed=10, variant="sd3", t5=True, in_channels=16):
    """diffusers' StableDiffusion3Pipeline (fp32, CPU, shift 3): two CLIP encoders with projections (16 and 24 wide:
    40 together, padded to T5's 48), a 2-layer T5 (or none), the SD3_TINY (``variant="sd3.5"``: SD35_TINY)
    transformer and a 16-channel VAE without quant convs, with SD3's scaling and shift factors. ``in_channels=33``:
    an inpainting transformer (the latents, the mask and the masked image's latents in, 16 channels out)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    base = tiny.text_encoder_config("sd1")
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**dict(
        base, hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, projection_dim=width)))
        for width in (16, 24)]
    t5_encoder = T5EncoderModel(T5Config(vocab_size=60, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                         relative_attention_num_buckets=8)).eval() if t5 else None  # (no dropout)
    vae = AutoencoderKL(**dict(tiny.vae_config(), latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                               scaling_factor=1.5305, shift_factor=0.0609))
    transformer = SD3Transformer2DModel(**dict(SD35_TINY if variant == "sd3.5" else SD3_TINY,
                                               in_channels=in_channels))
    for p in transformer.parameters():  # (diffusers zero-initialises the modulations: give every path a say)
        torch.nn.init.normal_(p, std=0.1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer(), text_encoder_2=encoders[1], tokenizer_2=tokenizer(),
        text_encoder_3=t5_encoder, tokenizer_3=AutoTokenizer.from_pretrained(_t5_tokenizer_dir()) if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)
