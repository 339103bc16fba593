"""Our StableDiffusionInpaintPipeline against diffusers' on tiny SD models: an inpainting UNet (9 input channels) and a
plain 4-channel one, written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference of diffusers' for the same seed, image, mask and
weights, on both the fast and the reference path.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusionInpaintPipeline, tiny
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# an odd-sized image (resized to the output size with Lanczos, as diffusers does) and an RGB mask with soft edges
# (made grayscale after the resize and binarized at 0.5)
_rng = np.random.default_rng(0)
IMAGE = Image.fromarray(_rng.integers(0, 255, (42, 50, 3), dtype=np.uint8))
_mask = np.zeros((42, 50, 3), dtype=np.uint8)
_mask[10:30, 12:40] = 255
_mask[8:10, 12:40] = 120  # a soft edge: about 0.47 after the resize, below 0.5 or not
MASK = Image.fromarray(_mask)


def _save(folder, unet_in_channels, seed=1):
    """A diffusers StableDiffusionInpaintPipeline on the tiny SD1 components, its UNet taking ``unet_in_channels``."""
    from diffusers import StableDiffusionInpaintPipeline as Theirs
    from diffusers import UNet2DConditionModel

    base = _tiny_diffusers.pipeline("sd1", seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**dict(tiny.unet_config("sd1"), in_channels=unet_in_channels))
    components = dict(base.components, unet=unet)
    Theirs(**components).save_pretrained(folder)
    theirs = Theirs.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours = diffusion_fast.load_pipeline(folder)  # picks the inpainting class by the folder's class name
    assert type(ours) is StableDiffusionInpaintPipeline
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.fixture(scope="module", params=[9, 4], ids=["inpainting-unet", "plain-unet"])
def pair(request, tmp_path_factory):
    return _save(tmp_path_factory.mktemp(f"inpaint-{request.param}"), request.param)


def _both(pair, backend_name="fast", generators=None, **kwargs):
    theirs, ours = pair
    kwargs = dict(dict(prompt="a red cube", image=IMAGE, mask_image=MASK, num_inference_steps=4, output_type="np"),
                  **kwargs)
    seeds = generators or [3]

    def generator():
        made = [torch.Generator().manual_seed(s) for s in seeds]
        return made if generators else made[0]

    a = theirs(generator=generator(), **kwargs).images
    with diffusion_fast.backend(backend_name):
        b = ours(generator=generator(), **kwargs).images
    assert np.shape(a) == np.shape(b)  # (PIL output: lists of images)
    return a, b


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
@pytest.mark.parametrize("kwargs, generators", [
    ({}, None),  # strength 1: from pure noise
    (dict(strength=0.6, negative_prompt="blurry"), None),  # from the noised image, the schedule's tail
    # two prompts of two images, a generator per image; a non-square 40x48 output
    (dict(prompt=["a", "b"], num_images_per_prompt=2, height=40, width=48, strength=0.7), [1, 2, 3, 4]),
    (dict(guidance_scale=1.0), None),  # no guidance: no doubled mask
    # tensors: an image in [0, 1] and a mask, both resized (nearest) to the output size
    (dict(image=torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5)),
          mask_image=(torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(6)) > 0.5).float()), None),
])
def test_same_image_as_diffusers(pair, backend_name, kwargs, generators):
    a, b = _both(pair, backend_name, generators, **kwargs)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS


def test_the_mask_decides_what_changes(pair):
    """Not a test of one output: moving the mask moves the image (a mask left out, or inverted, fails this)."""
    shifted = Image.fromarray(np.roll(_mask, 12, axis=1))
    a = _both(pair, mask_image=MASK)[1]
    b = _both(pair, mask_image=shifted)[1]
    assert np.abs(a - b).max() > 0.02


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")  # diffusers' DPM2, DEIS
@pytest.mark.parametrize("scheduler, cfg", [
    ("EulerDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
    ("KDPM2DiscreteScheduler", {}),  # the mask blend at each of two calls a step
    ("DEISMultistepScheduler", {}),
    ("TCDScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),  # the mask blend between a group's calls
    ("EDMDPMSolverMultistepScheduler", {}),  # the mask blend re-noised as x + sigma * noise
])
def test_other_schedulers_same_image_as_diffusers(pair, scheduler, cfg):
    with _tiny_diffusers.swapped_schedulers(scheduler, pair[:1], pair[1:], **cfg):
        a, b = _both(pair, strength=0.75)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS


def test_step_callback_sees_the_mask_as_diffusers(pair):
    theirs, ours = pair
    seen = {"theirs": [], "ours": []}

    def recorder(name):
        def callback(pipe, step, t, tensors):
            seen[name].append({k: v.clone() for k, v in tensors.items()})
            return {"latents": tensors["latents"] * 0.98}  # a replacement feeds the next step
        return callback

    names = ["latents", "mask", "masked_image_latents"]
    a = theirs(prompt="a", image=IMAGE, mask_image=MASK, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(3), callback_on_step_end=recorder("theirs"),
               callback_on_step_end_tensor_inputs=names).images
    b = ours(prompt="a", image=IMAGE, mask_image=MASK, num_inference_steps=3, output_type="np",
             generator=torch.Generator().manual_seed(3), callback_on_step_end=recorder("ours"),
             callback_on_step_end_tensor_inputs=names).images
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    for mine, its in zip(seen["ours"], seen["theirs"], strict=True):
        for name in names:
            torch.testing.assert_close(mine[name], its[name], atol=1e-4, rtol=1e-4)


def test_bad_inputs(pair):
    _, ours = pair
    for kwargs, error, message in [
        (dict(mask_image=None), ValueError, "image and mask_image: give both"),
        (dict(strength=1.5), ValueError, r"strength must be in \[0, 1\], got 1.5"),
        (dict(mask_image="m.png"), TypeError, "mask_image must be a PIL image"),
        (dict(mask_image=torch.rand(1, 3, 32, 32)), ValueError, "a tensor mask has one channel"),
        (dict(image=torch.rand(3, 32, 32)), ValueError, r"image: a tensor must be a float \(B, C, H, W\) batch"),
        (dict(height=36), ValueError, "height must be a positive multiple of 8"),
        (dict(latents=torch.randn(1, 9, 8, 8)), ValueError, r"latents must have shape \(1, 4, 8, 8\)"),
        # two masks for three images: diffusers refuses it too, rather than failing on a shape in the UNet
        (dict(prompt=["a", "b", "c"], mask_image=[MASK, MASK]), ValueError,
         "mask_image has 2 images, which does not divide the batch of 3"),
        (dict(image=torch.rand(2, 3, 32, 32), num_images_per_prompt=3), ValueError,
         "image has 2 images, which does not divide the batch of 3"),
    ]:
        with pytest.raises(error, match=message):
            ours(**dict(dict(prompt="a", image=IMAGE, mask_image=MASK, num_inference_steps=2), **kwargs))


def test_an_inpainting_unet_is_refused_by_the_text_to_image_pipeline(pair):
    _, ours = pair
    if ours.unet.config.in_channels == 4:
        pytest.skip("a plain UNet runs in both")
    with pytest.raises(ValueError, match="unet has 9 input channels.*StableDiffusionInpaintPipeline"):
        diffusion_fast.StableDiffusionPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)


@pytest.mark.parametrize("mode, scheduler", [("step", "DDIMScheduler"), ("unet", "EulerDiscreteScheduler")])
def test_graphed_loop_gives_the_eager_image(pair, monkeypatch, mode, scheduler):
    """On CUDA the step (DDIM) or the UNet call is replayed from a graph, the mask and the masked image's latents
    among its inputs; a 4-channel UNet's blend runs on the graph's output. Capture is stood in for on the CPU."""
    from _fake_graphs import use_fake_graphs

    _, ours = pair
    saved = ours.scheduler
    try:
        ours.scheduler = getattr(diffusion_fast.schedulers, scheduler).from_config(saved.config)
        call = lambda: ours(prompt="a", image=IMAGE, mask_image=MASK, num_inference_steps=3, strength=0.8,  # noqa
                            output_type="np", generator=torch.Generator().manual_seed(3)).images
        eager = call()
        monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: mode)
        ours._graphs = None
        graphed = use_fake_graphs(ours._graphs_for_components()[mode])
        torch.testing.assert_close(call(), eager, rtol=0, atol=0)
        assert graphed.captures == 1
    finally:
        ours.scheduler, ours._graphs = saved, None


# padding_mask_crop ("inpaint only masked"): the box around the mask, padded and widened to the output's 64x64, is
# inpainted at the output size and pasted back; outside the mask the image is the original's. PIL output (8-bit):
# within one level of diffusers' (its tolerance, 1e-3 of the range, rounds to at most one level either way).
@pytest.mark.parametrize("pad, mask_box", [
    (4, (10, 30, 12, 40)),  # the test mask, wider than tall: the box grows in height
    (0, (2, 40, 44, 48)),  # a tall strip at the right edge: the box grows in width and is moved back inside
])
def test_padding_mask_crop_as_diffusers(pair, pad, mask_box):
    y0, y1, x0, x1 = mask_box
    mask = np.zeros((42, 50), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    a, b = _both(pair, mask_image=Image.fromarray(mask), padding_mask_crop=pad, output_type="pil")
    a, b = np.asarray(a[0], dtype=np.int16), np.asarray(b[0], dtype=np.int16)
    assert a.shape == b.shape == (42, 50, 3) and np.abs(a - b).max() <= 1
    assert np.array_equal(b[mask == 0], np.asarray(IMAGE)[mask == 0])  # the original outside the mask


def test_padding_mask_crop_bad_inputs(pair):
    _, ours = pair
    for kwargs, message in [(dict(padding_mask_crop=-1), "padding_mask_crop must be a number of pixels"),
                            (dict(padding_mask_crop=2.5), "padding_mask_crop must be a number of pixels"),
                            (dict(padding_mask_crop=4, output_type="np"), "output_type must be 'pil'"),
                            (dict(padding_mask_crop=4, image=[IMAGE]), "image must be a PIL image"),
                            (dict(padding_mask_crop=4, mask_image=torch.ones(1, 1, 8, 8)),
                             "mask_image must be a PIL image")]:
        with pytest.raises(ValueError, match=message):
            ours(**dict(dict(prompt="a", image=IMAGE, mask_image=MASK, num_inference_steps=2), **kwargs))
