"""Our StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline against diffusers' on tiny SD1- and
SDXL-shaped weights written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed,
image, strength and weights (as for text-to-image).
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from conftest import NEEDS_SCIPY
from diffusion_fast import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

# diffusers' Euler and DPM-Solver call np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              # diffusers' KDPM2 schedules run numpy functions on tensors
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

# 42x50: not a multiple of the tiny VAE's scale 4, so both cut it to 40x48 with Lanczos resampling
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers' StableDiffusionImg2ImgPipeline, ours) on the same saved weights, and the folder's scheduler."""
    import diffusers

    theirs_t2i, folder = _tiny_diffusers.saved_pipeline(tmp_path_factory.mktemp("tiny-img2img"), "sd1", seed=1)
    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                      requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


def _both(pair, backend_name="fast", generators=None, **kwargs):
    theirs, ours = pair
    kwargs = dict(dict(prompt="a red cube", image=IMAGE, strength=0.6, num_inference_steps=6, output_type="np"),
                  **kwargs)
    make = (lambda: [torch.Generator().manual_seed(i) for i in range(generators)]) if generators else \
        (lambda: torch.Generator().manual_seed(3))
    a = theirs(generator=make(), **kwargs).images
    with diffusion_fast.backend(backend_name):
        b = ours(generator=make(), **kwargs).images
    assert a.shape == b.shape
    return np.abs(a - b).max()


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
@pytest.mark.parametrize("kwargs, generators", [
    ({}, None),
    (dict(strength=1.0), None),  # the whole schedule: the image only sets the noise's mean
    (dict(strength=0.2, negative_prompt="blurry"), None),  # one step of six
    # a [0, 1] tensor batch with two prompts; a [-1, 1] one (kept as it is) duplicated for two images per prompt
    (dict(image=torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1)), prompt=["a", "b"]), None),
    (dict(image=torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1, prompt=["a", "b"],
          num_images_per_prompt=2), None),
    (dict(image=[IMAGE, IMAGE], prompt=["a", "b"]), 2),  # a generator per image: the posterior sampled one by one
    (dict(guidance_scale=1.0), None),  # no guidance
])
def test_same_image_as_diffusers(pair, backend_name, kwargs, generators):
    assert _both(pair, backend_name, generators, **kwargs) <= PIPELINE_FP32_MAX_ABS


# Each scheduler starts mid-schedule its own way: DDIM and DDPM by the timesteps handed to them, the sigma schedulers
# (and Heun's two calls a step) by set_begin_index, PNDM from its state afresh at the tail's first timestep
@pytest.mark.parametrize("scheduler, cfg", [
    ("PNDMScheduler", dict(skip_prk_steps=True)),  # as SD1.5 ships it
    ("PNDMScheduler", dict(skip_prk_steps=False)),  # the Runge-Kutta warm-up, begun mid-schedule
    ("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}), ("HeunDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", {}), ("DEISMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3)),  # strength cuts a 3-call group: begun at a lower order
    ("EDMDPMSolverMultistepScheduler", {}), ("EDMEulerScheduler", {}),  # x + sigma * noise at the begin index
    ("TCDScheduler", {}),  # LCM's schedule cut by strength
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)), ("UniPCMultistepScheduler", {}),
    ("LCMScheduler", {}), ("DDPMScheduler", {}),
    pytest.param("LMSDiscreteScheduler", {}, marks=NEEDS_SCIPY),
])
def test_every_scheduler_same_image_as_diffusers(pair, scheduler, cfg):
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = getattr(diffusers, scheduler).from_config(saved[0].config, **cfg)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        assert _both(pair, num_inference_steps=8, strength=0.7) <= PIPELINE_FP32_MAX_ABS
    finally:
        theirs.scheduler, ours.scheduler = saved


def test_custom_timesteps(pair):
    # diffusers' retrieve_timesteps, then the strength's tail of that schedule
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(saved[0].config)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        assert _both(pair, timesteps=[999, 850, 736, 645, 545, 455, 343, 233, 124, 24]) <= PIPELINE_FP32_MAX_ABS
    finally:
        theirs.scheduler, ours.scheduler = saved


def test_step_callback(pair):
    def callback(pipe, i, t, tensors):
        return {"latents": tensors["latents"] * 0.9} if i == 0 else {}

    assert _both(pair, callback_on_step_end=callback) <= PIPELINE_FP32_MAX_ABS


def test_latents_as_the_image(pair):
    # a tensor with the UNet's channel count is taken as latents (diffusers' rule): no encode, no scaling
    theirs, _ = pair
    latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(5))
    assert _both(pair, image=latents) <= PIPELINE_FP32_MAX_ABS


def test_a_tensor_of_another_size_is_cut_as_diffusers_cuts_it(pair):
    """A pixel tensor whose size is not a multiple of the VAE's scale is resized (nearest) down to one, as diffusers'
    image processor does (it was refused before)."""
    image = torch.rand(1, 3, 42, 50, generator=torch.Generator().manual_seed(6))
    assert _both(pair, image=image) <= PIPELINE_FP32_MAX_ABS


def test_bad_inputs(pair):
    _, ours = pair
    for kwargs, error, message in [
        (dict(strength=1.5), ValueError, r"strength must be in \[0, 1\], got 1.5"),
        (dict(strength=0.1), ValueError, "strength 0.1 x num_inference_steps 6 leaves no denoising step"),
        (dict(image=None), ValueError, "image: give the initial image"),
        (dict(image="x.png"), TypeError, "image must be an RGB PIL image, a list of them, a .* tensor or numpy RGB images, got str"),
        (dict(image=IMAGE.convert("L")), ValueError, r"image: RGB images only \(got mode L\)"),
        (dict(image=[IMAGE, IMAGE.resize((40, 40))]), ValueError, "image: the images differ in size"),
        (dict(image=torch.rand(3, 40, 48)), ValueError, r"a tensor must be a float \(B, C, H, W\) batch"),
        (dict(image=torch.rand(1, 2, 40, 48)), ValueError, r"image has 2 channels: 3 \(pixels\) or 4 \(latents\)"),
        (dict(image=torch.rand(3, 3, 40, 48), prompt=["a", "b"]), ValueError,
         "image has 3 images, which does not divide the batch of 2"),
    ]:
        with pytest.raises(error, match=message):
            ours(**dict(dict(prompt="a", image=IMAGE, num_inference_steps=6), **kwargs))


def test_pndm_begin_index():
    sched = diffusion_fast.schedulers.PNDMScheduler(skip_prk_steps=True)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.set_begin_index(2)
    sched.set_timesteps(4)  # 5 PLMS timesteps (the first twice)
    with pytest.raises(ValueError, match="begin_index 5 is past the schedule of 5 timesteps"):
        sched.set_begin_index(5)
    sched.set_begin_index(3)
    x = torch.randn(1, 4, 5, 7)
    for t in sched.timesteps[3:]:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match=r"step called 3 times for a schedule of 5 timesteps \(4 inference steps\), "
                                         r"begun at index 3"):
        sched.step(x, sched.timesteps[-1], x)


@pytest.fixture(scope="module")
def xl_pair(tmp_path_factory):
    """(diffusers' StableDiffusionXLImg2ImgPipeline, ours) on the same saved tiny SDXL weights."""
    import diffusers

    folder = tmp_path_factory.mktemp("tiny-sdxl-img2img")
    _tiny_diffusers.sdxl_pipeline(seed=1).save_pretrained(folder)
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},  # SDXL's default strength, 0.3
    dict(strength=0.7, negative_prompt="blurry", negative_prompt_2="dark"),
    # two prompts of two images; every size id (the negative ones take the positive crop corner, as in diffusers)
    dict(prompt=["a", "b"], num_images_per_prompt=2, strength=0.6, original_size=(64, 64), target_size=(32, 40),
         crops_coords_top_left=(4, 8), negative_original_size=(16, 16), negative_target_size=(24, 24)),
    dict(guidance_scale=1.0, strength=1.0),
    dict(strength=0.9, guidance_scale=9.0, guidance_rescale=0.7),  # (diffusers' SD img2img takes no rescale)
]))
def test_sdxl_same_image_as_diffusers(xl_pair, backend_name, kwargs):
    assert _both(xl_pair, backend_name, **kwargs) <= PIPELINE_FP32_MAX_ABS


def test_sdxl_with_euler_and_a_step_callback(xl_pair):
    import diffusers

    theirs, ours = xl_pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(saved[0].config)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        callback = lambda pipe, i, t, tensors: {"add_time_ids": tensors["add_time_ids"] + 1} if i == 0 else {}
        assert _both(xl_pair, strength=0.9, callback_on_step_end=callback,
                     callback_on_step_end_tensor_inputs=["add_time_ids"]) <= PIPELINE_FP32_MAX_ABS
    finally:
        theirs.scheduler, ours.scheduler = saved


def test_sdxl_encode_upcasts_an_fp16_vae_and_applies_latents_mean(xl_pair, tmp_path):
    from diffusion_fast.models import AutoencoderKL

    _, ours = xl_pair
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    weights = {k: v.clone() for k, v in ours.vae.state_dict().items()}
    try:
        ours.vae.half().float()  # fp16-representable weights, so the upcast ones are exactly these
        expected = ours.vae.encode(pixels.half().float()).latent_dist.sample(torch.Generator().manual_seed(0))
        ours.vae.half()
        got = ours._encode_image(pixels.half(), torch.Generator().manual_seed(0))
        assert got.dtype == torch.float16 and ours.vae.dtype == torch.float16  # encoded in fp32, back to fp16
    finally:
        ours.vae.float().load_state_dict(weights)
    torch.testing.assert_close(got, ours.vae.config.scaling_factor * expected.half(), rtol=0, atol=0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 1.0, 2.0]
    vae = AutoencoderKL.from_config(dict(ours.vae.config, latents_mean=mean, latents_std=std))
    vae.load_state_dict(ours.vae.state_dict())
    saved, ours.vae = ours.vae, vae
    try:
        got = ours._encode_image(pixels, torch.Generator().manual_seed(0))
    finally:
        ours.vae = saved
    sample = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    mean, std = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(got, (sample - mean) * vae.config.scaling_factor / std, rtol=0, atol=0)
