"""Our StableDiffusionControlNetImg2ImgPipeline and StableDiffusionControlNetInpaintPipeline against diffusers' on
the tiny SD1 ControlNet pipeline's weights (one net, and two), written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed,
images and weights; with padding_mask_crop (PIL output, pasted back) within one 8-bit level. Each comparison also
checks that the image without the nets is far off, so a dropped residual cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusionControlNetInpaintPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


_per_net = _tiny_diffusers.per_net


# 50x42 RGB: cut to 48x40 by both, and conditioning images of its size (diffusers prepares each at its own size, so
# with others it fails; ours resizes them to the initial image's): grayscale edges and an RGB pose
INIT = Image.fromarray(np.random.default_rng(3).integers(0, 255, (42, 50, 3), dtype=np.uint8))
INIT_EDGES = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50), dtype=np.uint8))
INIT_POSE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (42, 50, 3), dtype=np.uint8))


def _img2img_pair(tmp_path_factory, variant, nets):
    """(diffusers' StableDiffusion(XL)ControlNetImg2ImgPipeline on the tiny SD1 (SDXL) ControlNet pipeline's
    components, ours loaded from the folder diffusers saved it in, the number of nets)."""
    import diffusers

    name = "StableDiffusionControlNetImg2ImgPipeline" if variant == "sd1" else \
        "StableDiffusionXLControlNetImg2ImgPipeline"
    theirs = getattr(diffusers, name)(**_tiny_diffusers.controlnet_pipeline(seed=4, nets=nets, variant=variant)
                                      .components)
    return (*_tiny_diffusers.saved_pair(theirs, tmp_path_factory.mktemp(f"tiny-controlnet-img2img-{variant}-{nets}"),
                         getattr(diffusion_fast, name)), nets)


@pytest.fixture(scope="module", params=[("sd1", 1), ("sd1", 2), ("sdxl", 1), ("sdxl", 2)],
                ids=["sd1-one-net", "sd1-two-nets", "sdxl-one-net", "sdxl-two-nets"])
def img2img_pair(request, tmp_path_factory):
    return _img2img_pair(tmp_path_factory, *request.param)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-net", "two-nets"])
def xl_img2img_pair(request, tmp_path_factory):
    return _img2img_pair(tmp_path_factory, "sdxl", request.param)


def _img2img(pipe, nets, backend_name="fast", **kwargs):
    kwargs = dict(dict(prompt="a red cube", image=INIT, control_image=_per_net(nets, INIT_EDGES, INIT_POSE), strength=0.7,
                       num_inference_steps=6, output_type="np"), **kwargs)
    with diffusion_fast.backend(backend_name):
        return pipe(generator=torch.Generator().manual_seed(3), **kwargs).images


@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},
    dict(guess_mode=True),
    # the nets' end is a fraction of the 4 steps that run (of 6 it would keep the net one step longer)
    dict(control_guidance_end=0.6),
    dict(height=32, width=40),  # the initial image resized to it, and the conditioning images too
    dict(strength=1.0, num_images_per_prompt=2, negative_prompt="blurry"),
]))
def test_img2img_same_image_as_diffusers(img2img_pair, backend_name, kwargs):
    theirs, ours, nets = img2img_pair
    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(
        lambda pipe, **kw: _img2img(pipe, nets, backend_name if pipe is ours else "fast", **kw), theirs, ours, nets,
        PIPELINE_FP32_MAX_ABS, **kwargs)


def test_sdxl_img2img_size_ids_and_second_prompts_as_diffusers(xl_img2img_pair):
    """SDXL's image-to-image conditioning beside the nets: prompt_2, a negative prompt, negative size ids and a crop
    corner (which the negative ids take from the positive one, as diffusers has it)."""
    theirs, ours, nets = xl_img2img_pair
    kwargs = dict(prompt_2="a blue ball", negative_prompt="blurry", negative_original_size=(32, 32),
                  negative_target_size=(40, 40), crops_coords_top_left=(4, 4))
    b = _img2img(ours, nets, **kwargs)
    assert np.abs(_img2img(theirs, nets, **kwargs) - b).max() <= PIPELINE_FP32_MAX_ABS
    assert np.abs(_img2img(ours, nets, **dict(kwargs, crops_coords_top_left=(0, 0))) - b).max() > 0.005


def test_sdxl_img2img_on_a_refiner_as_diffusers(tmp_path):
    """A refiner's folder (the second text encoder alone, requires_aesthetics_score) with a net built from its UNet:
    load_pipeline loads it as the ControlNet image-to-image pipeline it was saved as; the aesthetic scores condition
    the UNet and the net, and the negative ids keep the positive crop corner. (original_size is given: diffusers'
    default, the control image's torch.Size, fails there on the added float score.)"""
    import diffusers

    components = _tiny_diffusers.sdxl_refiner_pipeline(_tiny_diffusers.sdxl_pipeline(seed=4), seed=5).components
    torch.manual_seed(6)
    theirs = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(
        **components, controlnet=_tiny_diffusers.random_controlnet(components["unet"]), requires_aesthetics_score=True)
    theirs, ours = _tiny_diffusers.saved_pair(theirs, tmp_path,
                                              diffusion_fast.StableDiffusionXLControlNetImg2ImgPipeline)
    assert ours.requires_aesthetics_score and ours.text_encoder is None
    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(
        lambda pipe, **kw: _img2img(pipe, 1, **kw), theirs, ours, 1, PIPELINE_FP32_MAX_ABS, negative_prompt="blurry",
        original_size=(40, 48), crops_coords_top_left=(4, 8), aesthetic_score=7.0, negative_aesthetic_score=1.5)


def test_img2img_callback_names_the_images_control_image(img2img_pair):
    theirs, ours, nets = img2img_pair

    def callback(pipe, i, t, tensors):
        images = tensors["control_image"] if nets > 1 else [tensors["control_image"]]
        flipped = [im.flip(-1) for im in images]
        return {"control_image": flipped if nets > 1 else flipped[0]} if i == 0 else {}

    kwargs = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["control_image"])
    b = _img2img(ours, nets, **kwargs)
    assert np.abs(_img2img(theirs, nets, **kwargs) - b).max() <= PIPELINE_FP32_MAX_ABS
    assert np.abs(b - _img2img(ours, nets)).max() > 0.005
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs has to be in"):
        _img2img(ours, nets, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["image"])


def test_img2img_bad_input_is_named(img2img_pair):
    _, ours, nets = img2img_pair
    for kwargs, error, match in [
        (dict(control_image=None), ValueError, "control_image: (give a conditioning image|2 ControlNets take a list)"),
        (dict(image=None), ValueError, "image: give the initial image"),
        (dict(strength=1.5), ValueError, "strength must be in"),
        (dict(control_image=_per_net(nets, torch.rand(1, 1, 40, 48), torch.rand(1, 3, 40, 48))), ValueError,
         "control_image( 0)? has 1 channels; ControlNet 0 takes 3"),  # (named as the call names it)
        (dict(width=30), ValueError, "width must be a positive multiple of 8"),
    ]:
        with pytest.raises(error, match=match):
            _img2img(ours, nets, **kwargs)


# ---- inpainting ---------------------------------------------------------------------------------------------------
# white (repainted) in a 20x28 box of the 50x42 image
MASK = np.zeros((42, 50), np.uint8)
MASK[10:30, 12:40] = 255
MASK = Image.fromarray(MASK)


@pytest.fixture(scope="module", params=[(9, 1), (9, 2), (4, 1)], ids=["inpainting-unet", "two-nets", "plain-unet"])
def inpaint_pair(request, tmp_path_factory):
    """(diffusers' StableDiffusionControlNetInpaintPipeline on the tiny ControlNet pipeline's components, with a
    9-channel inpainting UNet or the plain one, ours loaded from the folder diffusers saved, the number of nets)."""
    import diffusers

    from diffusion_fast import tiny

    unet_channels, nets = request.param
    components = dict(_tiny_diffusers.controlnet_pipeline(seed=4, nets=nets).components)
    if unet_channels == 9:  # the nets still take the 4 latent channels
        torch.manual_seed(1)
        components["unet"] = diffusers.UNet2DConditionModel(**dict(tiny.unet_config("sd1"), in_channels=9))
    theirs = diffusers.StableDiffusionControlNetInpaintPipeline(**components)
    return (*_tiny_diffusers.saved_pair(theirs, tmp_path_factory.mktemp(f"tiny-controlnet-inpaint-{unet_channels}-{nets}"),
                         StableDiffusionControlNetInpaintPipeline), nets)


def _inpaint(pipe, nets, backend_name="fast", **kwargs):
    kwargs = dict(dict(prompt="a red cube", image=INIT, mask_image=MASK, control_image=_per_net(nets, INIT_EDGES,
                                                                                                 INIT_POSE),
                       num_inference_steps=6, output_type="np"), **kwargs)
    with diffusion_fast.backend(backend_name):
        images = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]) if kwargs["output_type"] == "pil" \
        else images


@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},  # the image's own size (not the UNet's default, unlike plain inpainting), strength 1, scale 0.5
    dict(guess_mode=True),
    # the nets' end is a fraction of the 3 steps that run (of 6 it would keep them three steps longer)
    dict(control_guidance_end=0.5, strength=0.6),
    dict(height=32, width=40, negative_prompt="blurry"),  # image, mask and conditioning images resized to it
]))
def test_inpaint_same_image_as_diffusers(inpaint_pair, backend_name, kwargs):
    theirs, ours, nets = inpaint_pair
    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(
        lambda pipe, **kw: _inpaint(pipe, nets, backend_name if pipe is ours else "fast", **kw), theirs, ours, nets,
        PIPELINE_FP32_MAX_ABS, **kwargs)


def test_inpaint_padding_mask_crop(inpaint_pair):
    """The box around the mask cut from the image, the mask and each conditioning image alike (diffusers' crop and
    "fill" resize), inpainted and pasted back: the image's size, its pixels outside the mask. (diffusers refuses a
    list of conditioning images here; ours takes one per net.)"""
    theirs, ours, nets = inpaint_pair
    b = _inpaint(ours, nets, padding_mask_crop=2, output_type="pil")
    if nets == 1:
        assert np.abs(_inpaint(theirs, nets, padding_mask_crop=2, output_type="pil") - b).max() <= 1.5 / 255
    outside = np.asarray(MASK) == 0
    assert b.shape == (1, 42, 50, 3) and np.array_equal(b[0][outside], np.asarray(INIT, np.float32)[outside] / 255)
    off = _inpaint(ours, nets, padding_mask_crop=2, output_type="pil",
                   controlnet_conditioning_scale=_per_net(nets, 0.0, 0.0))
    assert np.abs(off - b).max() > 0.02  # the nets' (cropped) images matter


def test_inpaint_callback_reads_mask_and_control_image(inpaint_pair):
    theirs, ours, nets = inpaint_pair
    seen = {}

    def callback(pipe, i, t, tensors):
        images = tensors["control_image"] if nets > 1 else [tensors["control_image"]]
        seen.setdefault(id(pipe), []).append((tuple(tensors["mask"].shape), [tuple(im.shape) for im in images]))
        return {"control_image": [im.flip(-1) for im in images] if nets > 1 else images[0].flip(-1)} if i == 0 else {}

    kwargs = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["mask", "control_image"])
    b = _inpaint(ours, nets, **kwargs)
    assert np.abs(_inpaint(theirs, nets, **kwargs) - b).max() <= PIPELINE_FP32_MAX_ABS
    assert seen[id(theirs)] == seen[id(ours)]


def test_inpaint_bad_input_is_named(inpaint_pair):
    _, ours, nets = inpaint_pair
    for kwargs, match in [
        (dict(mask_image=None), "image and mask_image: give both"),
        (dict(control_image=None), "control_image: (give a conditioning image|2 ControlNets take a list)"),
        (dict(padding_mask_crop=-1), "padding_mask_crop must be a number of pixels"),
        (dict(padding_mask_crop=2), "output_type must be 'pil' with padding_mask_crop"),
    ]:
        with pytest.raises(ValueError, match=match):
            _inpaint(ours, nets, **kwargs)
