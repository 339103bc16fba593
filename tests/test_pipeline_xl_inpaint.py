"""Our StableDiffusionXLInpaintPipeline against diffusers' on tiny SDXL models: an inpainting UNet (9 input channels)
and a plain 4-channel one, written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference of diffusers' for the same seed, image, mask and
weights, on both the fast and the reference path (latents, where compared, within 1e-4).
"""
import numpy as np
import pytest
import torch
from _fake_graphs import use_fake_graphs
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusionXLInpaintPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# an odd-sized image and a mask with a soft edge, both resized to the 40x48 output (a size of its own: not the
# UNet's default) and the mask binarized at 0.5
_rng = np.random.default_rng(2)
IMAGE = Image.fromarray(_rng.integers(0, 255, (42, 50, 3), dtype=np.uint8))
_mask = np.zeros((42, 50), dtype=np.uint8)
_mask[8:30, 10:40] = 255
_mask[6:8, 10:40] = 120
MASK = Image.fromarray(_mask)


@pytest.fixture(scope="module", params=[9, 4], ids=["inpainting-unet", "plain-unet"])
def pair(request, tmp_path_factory):
    """(diffusers' StableDiffusionXLInpaintPipeline, ours) on the tiny SDXL components with a UNet of
    ``request.param`` input channels, loaded from one saved folder."""
    import diffusers

    base = _tiny_diffusers.sdxl_pipeline(seed=1)
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(**dict(_tiny_diffusers.SDXL_TINY, in_channels=request.param))
    folder = tmp_path_factory.mktemp(f"xl-inpaint-{request.param}")
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    diffusers.StableDiffusionXLInpaintPipeline(**dict(components, unet=unet)).save_pretrained(folder)
    theirs = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    ours = diffusion_fast.load_pipeline(folder)  # picked by the folder's class name
    assert type(ours) is StableDiffusionXLInpaintPipeline
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    return theirs, ours


def _both(pair, backend_name="fast", **kwargs):
    theirs, ours = pair
    kwargs = dict(dict(prompt="a red cube", image=IMAGE, mask_image=MASK, height=40, width=48, num_inference_steps=5,
                       output_type="np"), **kwargs)
    a = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    with diffusion_fast.backend(backend_name):
        b = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert a.shape == b.shape
    return np.abs(np.asarray(a) - np.asarray(b)).max()


@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},  # diffusers' default strength 0.9999: the schedule's first step skipped, the image's latents noised
    dict(strength=1.0, negative_prompt="blurry", negative_prompt_2="dark"),  # from pure noise
    dict(prompt=["a", "b"], num_images_per_prompt=2, strength=0.6),  # two prompts of two images
    dict(guidance_scale=1.0, original_size=(96, 64), crops_coords_top_left=(8, 4)),  # no guidance; size ids
]))
def test_same_image_as_diffusers(pair, backend_name, kwargs):
    assert _both(pair, backend_name, **kwargs) <= PIPELINE_FP32_MAX_ABS


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])  # Euler: init_noise_sigma > 1
@pytest.mark.parametrize("kwargs", [
    dict(denoising_end=0.5, output_type="latent"),  # the base's part of a base + refiner split
    dict(denoising_start=0.6),  # the refiner's part: the image's latents taken un-noised (and unscaled)
])
def test_denoising_start_and_end_as_diffusers(pair, kwargs, scheduler):
    with _tiny_diffusers.swapped_schedulers(scheduler, pair[:1], pair[1:]):
        difference = _both(pair, **kwargs)
    assert difference <= (1e-4 if kwargs.get("output_type") == "latent" else PIPELINE_FP32_MAX_ABS)


def test_the_mask_decides_what_changes(pair):
    """Moving the mask moves the image (a mask left out, or inverted, fails this)."""
    _, ours = pair
    shifted = Image.fromarray(np.roll(_mask, 12, axis=1))
    call = lambda mask: ours("a", image=IMAGE, mask_image=mask, height=40, width=48, num_inference_steps=3,  # noqa
                             output_type="np", generator=torch.Generator().manual_seed(3)).images
    assert np.abs(call(MASK) - call(shifted)).max() > 0.02


@pytest.mark.parametrize("scheduler, cfg", [
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),  # as SDXL ships it
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
])
def test_other_schedulers_same_image_as_diffusers(pair, scheduler, cfg):
    with _tiny_diffusers.swapped_schedulers(scheduler, pair[:1], pair[1:], **cfg):
        assert _both(pair, strength=0.75) <= PIPELINE_FP32_MAX_ABS


def test_step_callback_sees_diffusers_tensors(pair):
    theirs, ours = pair
    seen = {"theirs": [], "ours": []}
    names = ["latents", "add_time_ids", "mask", "masked_image_latents"]

    def recorder(name):
        def callback(pipe, step, t, tensors):
            seen[name].append({k: v.clone() for k, v in tensors.items()})
            return {"latents": tensors["latents"] * 0.98}  # a replacement feeds the next step
        return callback

    for name, pipe in (("theirs", theirs), ("ours", ours)):
        pipe(prompt="a", image=IMAGE, mask_image=MASK, height=40, width=48, num_inference_steps=3, output_type="np",
             generator=torch.Generator().manual_seed(3), callback_on_step_end=recorder(name),
             callback_on_step_end_tensor_inputs=names)
    for mine, its in zip(seen["ours"], seen["theirs"], strict=True):
        for name in names:
            torch.testing.assert_close(mine[name], its[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode, scheduler", [("step", "DDIMScheduler"), ("unet", "EulerDiscreteScheduler")])
def test_graphed_loop_gives_the_eager_image(pair, monkeypatch, mode, scheduler):
    """The added conditioning, the mask and the masked image's latents are graph inputs; a plain UNet's blend runs
    on the graph's output. Capture is stood in for on the CPU."""
    _, ours = pair
    saved = ours.scheduler
    try:
        ours.scheduler = getattr(diffusion_fast.schedulers, scheduler).from_config(saved.config)
        call = lambda: ours(prompt="a", image=IMAGE, mask_image=MASK, height=40, width=48,  # noqa: E731
                            num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(3)).images
        eager = call()
        monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: mode)
        ours._graphs = None
        graphed = use_fake_graphs(ours._graphs_for_components()[mode])
        torch.testing.assert_close(call(), eager, rtol=0, atol=0)
        assert graphed.captures == 1
    finally:
        ours.scheduler, ours._graphs = saved, None


def test_padding_mask_crop_as_diffusers(pair):
    """padding_mask_crop on SDXL: the box around the mask inpainted at the 40x48 output size and pasted back; PIL
    output within one 8-bit level of diffusers'."""
    _, ours = pair
    theirs = pair[0]
    kwargs = dict(prompt="a red cube", image=IMAGE, mask_image=MASK, height=40, width=48, num_inference_steps=5,
                  padding_mask_crop=6)
    a = np.asarray(theirs(generator=torch.Generator().manual_seed(3), **kwargs).images[0], dtype=np.int16)
    b = np.asarray(ours(generator=torch.Generator().manual_seed(3), **kwargs).images[0], dtype=np.int16)
    assert a.shape == b.shape == (42, 50, 3) and np.abs(a - b).max() <= 1
    assert np.array_equal(b[_mask == 0], np.asarray(IMAGE)[_mask == 0])


def test_a_vae_with_latents_mean_as_diffusers(pair):
    """A VAE whose config has latents_mean / latents_std (Playground v2.5's): SDXL inpainting applies them at the
    decode only, not at the encode (diffusers' own asymmetry, unlike image-to-image); the image is diffusers'."""
    import diffusers

    from diffusion_fast.models import AutoencoderKL

    theirs, ours = pair
    stats = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])
    saved = theirs.vae, ours.vae
    before = _both(pair, output_type="np")
    try:
        theirs.vae = diffusers.AutoencoderKL.from_config(dict(saved[0].config, **stats))
        theirs.vae.load_state_dict(saved[0].state_dict())
        ours.vae = AutoencoderKL.from_config(dict(saved[1].config, **stats))
        ours.vae.load_state_dict(saved[1].state_dict())
        assert _both(pair) <= PIPELINE_FP32_MAX_ABS
        kwargs = dict(prompt="a red cube", image=IMAGE, mask_image=MASK, height=40, width=48, num_inference_steps=5,
                      output_type="np")
        with_stats = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    finally:
        theirs.vae, ours.vae = saved
    plain = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert before <= PIPELINE_FP32_MAX_ABS and np.abs(with_stats - plain).max() > 0.02  # (the statistics matter)


def test_bad_inputs(pair):
    _, ours = pair
    for kwargs, error, message in [
        (dict(mask_image=None), ValueError, "image and mask_image: give both"),
        (dict(strength=-0.5), ValueError, r"strength must be in \[0, 1\], got -0.5"),
        (dict(denoising_start=1.0), ValueError, "denoising_start must be a fraction"),
        (dict(prompt=["a", "b", "c"], mask_image=[MASK, MASK]), ValueError,
         "mask_image has 2 images, which does not divide the batch of 3"),
        (dict(original_size=(64,)), ValueError, r"original_size must be a \(height, width\) pair"),
    ]:
        with pytest.raises(error, match=message):
            ours(**dict(dict(prompt="a", image=IMAGE, mask_image=MASK, num_inference_steps=2), **kwargs))
    if ours.unet.config.in_channels == 9:  # refused by the text-to-image and image-to-image pipelines by name
        parts = (ours.unet, ours.vae, ours.text_encoder, ours.text_encoder_2, ours.tokenizer, ours.tokenizer_2,
                 ours.scheduler)
        for cls in (diffusion_fast.StableDiffusionXLPipeline, diffusion_fast.StableDiffusionXLImg2ImgPipeline):
            with pytest.raises(ValueError, match="unet has 9 input channels.*StableDiffusionXLInpaintPipeline"):
                cls(*parts)


def test_latents_as_the_image(pair):
    """Latents given as the image (diffusers cannot mask them and passes no masked image): a plain UNet runs as in
    diffusers; an inpainting UNet without masked_image_latents is refused by name (diffusers fails inside)."""
    theirs, ours = pair
    latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(8))
    if ours.unet.config.in_channels == 9:
        with pytest.raises(ValueError, match="given as latents, it cannot be masked .* needs masked_image_latents"):
            ours("a", image=latents, mask_image=MASK, height=40, width=48, num_inference_steps=2)
        return
    assert _both(pair, image=latents, strength=0.6) <= PIPELINE_FP32_MAX_ABS
    with pytest.raises(ValueError, match=r"image: latents of size \(10, 12\) for a 32x32 output"):
        ours("a", image=latents, mask_image=MASK, height=32, width=32, num_inference_steps=2)
