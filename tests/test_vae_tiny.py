"""AutoencoderTiny (TAESD): our model against diffusers' on tiny configs written by save_pretrained, and our pipelines
with it as their VAE against diffusers' with theirs.

Stated tolerance: the model within 1e-5 of diffusers' (fp32; the same convolutions in the same order); pipeline images
within 1e-3 max abs pixel difference (pixels in [0, 1]).
"""
import copy

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import AutoencoderKL, AutoencoderTiny, tiny
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS
from diffusion_fast.pipeline_folder import vae_class

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# TAESD's layout (four stages: 8 pixels a latent, as diffusers' tiling assumes), narrower and with fewer blocks
TAESD_TINY = dict(encoder_block_out_channels=[16, 16, 16, 16], decoder_block_out_channels=[16, 16, 16, 16],
                  num_encoder_blocks=[1, 2, 2, 2], num_decoder_blocks=[2, 2, 2, 1])
# in the tiny pipelines too, which then take 8 pixels a latent from it (their own KL VAE takes 4), as diffusers' do
TAESD_PIPELINE = TAESD_TINY
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50, 3), dtype=np.uint8))  # cut to 48x40
MASK = Image.fromarray(((np.indices((40, 48)).sum(0) % 13) < 6).astype(np.uint8) * 255)


def _taesd(config, seed):
    """diffusers' AutoencoderTiny with random weights from ``seed``, scaled so that activations stay O(1)."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderTiny(**config)
    with torch.no_grad():
        for conv in vae.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(std=(1.0 / conv.weight[0].numel()) ** 0.5)
    return vae


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    theirs = _taesd(TAESD_TINY, 0)
    folder = tmp_path_factory.mktemp("taesd")
    theirs.save_pretrained(folder)
    return theirs, AutoencoderTiny.from_pretrained(folder), str(folder)


# ---- the model ----------------------------------------------------------------------------------------------------
def test_encode_decode_and_round_trip_match_diffusers(pair):
    """Batch 3 at 40x56 (5x7 latents: odd), the round trip through 8-bit latents too."""
    theirs, ours, _ = pair
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        latents = ours.encode(x)
        torch.testing.assert_close(latents.latents, theirs.encode(x).latents, rtol=1e-5, atol=1e-5)
        assert latents.latent_dist.sample(torch.Generator().manual_seed(0)) is latents.latents  # nothing drawn
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("what", ["encode", "decode"])
def test_tiling_and_slicing_match_diffusers(pair, what):
    """Tiles of 32 pixels (4 latents) over 72x88 pixels: three tile rows and four columns, the last ones partial, so
    every mask case (first row and column unblended, ramps below and to the right) is taken; slicing gives the
    same result."""
    theirs, ours, _ = pair
    x = (torch.rand(2, 3, 72, 88, generator=torch.Generator().manual_seed(1)) * 2 - 1 if what == "encode" else
         torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(2)) * 2)
    for vae in (theirs, ours):
        vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    try:
        with torch.no_grad():
            plain = getattr(ours, what)(x)
            for vae in (theirs, ours):
                vae.enable_tiling()
            out = getattr(theirs, what)(x)
            expected = out.latents if what == "encode" else out.sample
            tiled = getattr(ours, what)(x)
            tiled = tiled.latents if what == "encode" else tiled
            torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-5)
            plain = plain.latents if what == "encode" else plain
            assert (tiled - plain).abs().max() > 1e-4  # the blend is real
            ours.enable_slicing()
            sliced = getattr(ours, what)(x)
            torch.testing.assert_close(sliced.latents if what == "encode" else sliced, tiled, rtol=0, atol=1e-5)
    finally:
        for vae in (theirs, ours):
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
        ours.disable_slicing()


@pytest.mark.skipif(not ON_GPU, reason="fp16 and bf16 decode on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_decode_on_gpu_meets_the_2x_rule(pair, dtype):
    """Our decode in fp16/bf16 on CUDA (channels_last, as the pipelines run it there when asked) against the float64
    decode: within 2x diffusers' decode in the same dtype, plus a floor."""
    from _numerics import assert_2x_rule

    # copies: the fixture is shared, and a round trip through fp16 rounds the weights (on an H200 the fp32 image
    # comparison that ran after this on the same worker was then 3 levels off)
    theirs, ours = (copy.deepcopy(model) for model in pair[:2])
    z = torch.randn(3, 4, 9, 7, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        ref64 = ours.to(DEVICE, torch.float64).decode(z.to(DEVICE, torch.float64))
        torch_out = theirs.to(DEVICE, dtype).decode(z.to(DEVICE, dtype)).sample
        ours.to(DEVICE, dtype).to(memory_format=torch.channels_last)
        out = ours.decode(z.to(DEVICE, dtype))
    assert_2x_rule(out.double(), ref64, torch_out.double(), floor=1e-2, what=f"TAESD decode {dtype}")


def test_loading_refuses_the_wrong_class_by_name(pair, tmp_path):
    _, _, folder = pair
    with pytest.raises(ValueError, match="an AutoencoderTiny's .TAESD.: load it with diffusion_fast.AutoencoderTiny"):
        AutoencoderKL.from_pretrained(folder)
    diffusers.AutoencoderKL(**tiny.vae_config()).save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="this config is an AutoencoderKL's"):
        AutoencoderTiny.from_pretrained(tmp_path / "kl")
    assert vae_class(folder) is AutoencoderTiny and vae_class(tmp_path / "kl") is AutoencoderKL
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "ConsistencyDecoderVAE"}')
    with pytest.raises(ValueError, match="holds a ConsistencyDecoderVAE, which is not supported"):
        vae_class(tmp_path / "other")
    with pytest.raises(ValueError, match="upsample_fn='bilinear' is not supported"):
        AutoencoderTiny.from_config(dict(TAESD_TINY, upsample_fn="bilinear"))
    with pytest.raises(ValueError, match="num_encoder_blocks .3. must have the same"):
        AutoencoderTiny.from_config(dict(TAESD_TINY, num_encoder_blocks=[1, 2, 2]))


def test_bad_inputs_name_the_argument(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match=r"x must be a \(B, 3, H, W\) tensor, got \(1, 4, 8, 8\)"):
        ours.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"z must be a \(B, 4, H, W\) tensor, got \(4, 8, 8\)"):
        ours.decode(torch.zeros(4, 8, 8))


# ---- our pipelines with it -------------------------------------------------------------------------------------------
def _with_taesd(theirs, folder, cls):
    """diffusers' pipeline built again with a TAESD as its VAE (its scale factor then read from it: 8, where the tiny
    KL VAE's is 4), saved (model_index names AutoencoderTiny), and ours loaded."""
    extra = {"requires_safety_checker": False} if "safety_checker" in theirs.components else {}
    theirs = type(theirs)(**dict(theirs.components, vae=_taesd(TAESD_PIPELINE, 3)), **extra)
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, cls)
    assert isinstance(ours.vae, AutoencoderTiny)
    return theirs, ours


def _run(pipe, **kwargs):
    kwargs = dict(dict(prompt="a red cube", num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                       output_type="np"), **kwargs)
    out = pipe(**kwargs).images
    return out.numpy() if torch.is_tensor(out) else out


def _assert_as_diffusers(theirs, ours, **kwargs):
    a, b = _run(theirs, **kwargs), _run(ours, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, np.abs(a - b).max()
    return b


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory):
    return _with_taesd(_tiny_diffusers.pipeline("sd1", seed=1), tmp_path_factory.mktemp("sd-taesd"),
                       diffusion_fast.StableDiffusionPipeline)


def test_sd_text_to_image_matches_diffusers(sd_pair):
    _assert_as_diffusers(*sd_pair, guidance_scale=6.0, num_images_per_prompt=2)


def test_sd_image_to_image_matches_diffusers(sd_pair):
    """The image's latents are the encoder's (nothing drawn), so the noise drawn next is diffusers' too."""
    theirs, ours = sd_pair
    kwargs = dict(image=IMAGE, strength=0.7)
    img2img = [diffusers.StableDiffusionImg2ImgPipeline(**theirs.components),
               diffusion_fast.StableDiffusionImg2ImgPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer,
                                                             ours.scheduler)]
    for pipe in img2img:
        pipe.set_progress_bar_config(disable=True)
    _assert_as_diffusers(*img2img, **kwargs)


def test_sd_inpainting_matches_diffusers(sd_pair):
    """A plain (4-channel) UNet inpainting: the image's latents, encoded by TAESD, put back outside the mask."""
    theirs, ours = sd_pair
    inpaint = [diffusers.StableDiffusionInpaintPipeline(**theirs.components),
               diffusion_fast.StableDiffusionInpaintPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer,
                                                             ours.scheduler)]
    for pipe in inpaint:
        pipe.set_progress_bar_config(disable=True)
    _assert_as_diffusers(*inpaint, image=IMAGE, mask_image=MASK, strength=0.9)


def test_vae_switches_match_diffusers(sd_pair):
    """diffusers' pipeline switches reach the tiny VAE: slicing (the same image) and tiling (TAESD's own blend, over
    tiles of 8 latents of the 16x16 at 128x128, three a side)."""
    theirs, ours = sd_pair
    size = dict(num_images_per_prompt=2, height=128, width=128)
    base = _run(ours, **size)
    for pipe in (theirs, ours):
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 64, 8
        with pytest.raises(ValueError, match="fuse_qkv_projections"):  # (TAESD has no attention)
            pipe.fuse_qkv_projections()
        pipe.fuse_qkv_projections(vae=False)
    theirs.vae.enable_tiling()  # (diffusers 0.42's pipelines dropped their enable_vae_* switches)
    theirs.vae.enable_slicing()
    ours.enable_vae_tiling()
    ours.enable_vae_slicing()
    try:
        tiled = _assert_as_diffusers(theirs, ours, **size)
        assert np.abs(tiled - base).max() > 1e-3
    finally:
        for vae in (theirs.vae, ours.vae):
            vae.disable_tiling()
            vae.disable_slicing()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
        for pipe in (theirs, ours):
            pipe.unfuse_qkv_projections(vae=False)


def test_sdxl_matches_diffusers(tmp_path):
    """taesdxl in an SDXL pipeline: no upcast (force_upcast is False) and no latents mean/std, as in diffusers."""
    _assert_as_diffusers(*_with_taesd(_tiny_diffusers.sdxl_pipeline(seed=1), tmp_path,
                                      diffusion_fast.StableDiffusionXLPipeline), guidance_scale=5.0)


def test_lcm_with_taesd_matches_diffusers(tmp_path):
    """The real-time recipe: an LCM's 4 steps and TAESD's decode."""
    _assert_as_diffusers(*_with_taesd(_tiny_diffusers.lcm_pipeline(seed=1), tmp_path,
                                      diffusion_fast.LatentConsistencyModelPipeline))


def test_controlnet_matches_diffusers(tmp_path):
    """A ControlNet pipeline with TAESD: the conditioning image at 8x the latents (a net whose embedding downsamples
    8x), as the scale factor read from TAESD sizes it."""
    theirs = _tiny_diffusers.controlnet_pipeline(seed=1)
    torch.manual_seed(5)
    theirs.controlnet = _tiny_diffusers.random_controlnet(theirs.unet, widths=(8, 16, 32, 32))
    _assert_as_diffusers(*_with_taesd(theirs, tmp_path, diffusion_fast.StableDiffusionControlNetPipeline),
                         image=IMAGE.resize((64, 64)))


def test_accelerate_leaves_taesd_alone_and_keeps_the_image(sd_pair):
    theirs, _ = sd_pair
    before = _run(theirs)
    diffusion_fast.accelerate(theirs)
    try:
        assert np.abs(_run(theirs) - before).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs), before)


# ---- the CLI ------------------------------------------------------------------------------------------------------
def test_generate_with_a_taesd_vae_gives_diffusers_image(pair, tmp_path, capsys):
    """--vae TAESD_DIR on a plain SD folder: diffusers' image with that VAE, from the same seed, within one 8-bit
    level (the output 8 pixels a latent: the pipeline's scale factor read from the VAE given)."""
    from diffusion_fast.cli import main

    their_vae, _, vae_folder = pair
    base = _tiny_diffusers.pipeline("sd1", seed=1)
    base.save_pretrained(tmp_path / "sd")
    theirs = diffusers.StableDiffusionPipeline(**dict(base.components, vae=their_vae), requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(tmp_path / "sd"), "--vae", vae_folder, "--steps", "3", "--seed", "2",
                 "--output", str(out), "--no-progress"]) == 0
    expected = theirs("a photograph of an astronaut riding a horse", num_inference_steps=3,
                      generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (64, 64, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--vae", "/no/such/vae"], "is not a VAE folder"),  # (argparse's check)
    (["--vae", "TAESD"], "--vae: give --model too"),
])
def test_generate_vae_bad_options_one_line(pair, capsys, argv, message):
    from diffusion_fast.cli import main

    argv = ["generate", *[pair[2] if a == "TAESD" else a for a in argv], "--steps", "1", "--no-progress"]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
