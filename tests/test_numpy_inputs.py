"""Numpy images as diffusers' pipelines take them: float arrays in [0, 1], (H, W, C) or (B, H, W, C) or a list, masks
(H, W) too, going the way of tensors (resized nearest, cut to the VAE's scale). Compared with diffusers' images on the
tiny SD1 models; stated tolerance as for text-to-image, 1e-3 max abs on fp32 pixels in [0, 1]."""
import numpy as np
import pytest
import torch

import _tiny_diffusers
import diffusion_fast
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

_rng = np.random.default_rng(4)
IMAGE = _rng.random((42, 50, 3), dtype=np.float32)  # an odd size: both cut it to 40x48 (the tiny VAE's scale 4)
EDGES = _rng.random((1, 40, 48, 3), dtype=np.float32)  # (diffusers' ControlNet checks read a 3-D array's batch as H)
MASK = np.zeros((40, 48), np.float32)  # 2-D: one grayscale mask
MASK[8:30, 10:40] = 1.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-numpy")
    _tiny_diffusers.pipeline("sd1", seed=6).save_pretrained(path / "sd")
    _tiny_diffusers.controlnet_pipeline(seed=6).save_pretrained(path / "controlnet")
    return path


def _pair(folder, name, sub="sd"):
    import diffusers

    theirs = getattr(diffusers, name).from_pretrained(folder / sub, **(
        dict(safety_checker=None, requires_safety_checker=False) if sub == "sd" else {}))
    ours = getattr(diffusion_fast, name).from_pretrained(folder / sub)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.mark.parametrize("name, kwargs", [
    ("StableDiffusionImg2ImgPipeline", dict(image=IMAGE, strength=0.7)),
    ("StableDiffusionImg2ImgPipeline", dict(image=[IMAGE, IMAGE[::-1].copy()], strength=0.7,  # a list: a batch
                                            prompt=["a cube", "a ball"])),
    ("StableDiffusionInpaintPipeline", dict(image=IMAGE, mask_image=MASK, height=40, width=48)),
    ("StableDiffusionInpaintPipeline", dict(image=IMAGE[None], mask_image=MASK[None, :, :, None], height=32,
                                            width=40)),  # (B, H, W, C) arrays, resized
    # a lone 3-D mask: (H, W, 1) by diffusers' grayscale rule (and (B, H, W) otherwise)
    ("StableDiffusionInpaintPipeline", dict(image=IMAGE, mask_image=MASK[..., None], height=40, width=48)),
    ("StableDiffusionControlNetPipeline", dict(image=EDGES)),
    ("StableDiffusionControlNetInpaintPipeline", dict(image=IMAGE, mask_image=MASK, control_image=EDGES)),
], ids=["img2img", "img2img-list", "inpaint", "inpaint-4d", "inpaint-hw1", "controlnet", "controlnet-inpaint"])
def test_numpy_images_as_diffusers(folder, name, kwargs):
    theirs, ours = _pair(folder, name, "controlnet" if "ControlNet" in name else "sd")
    kwargs = dict(dict(prompt="a cube", num_inference_steps=4, output_type="np"), **kwargs)
    a = theirs(generator=torch.Generator().manual_seed(2), **kwargs).images
    b = ours(generator=torch.Generator().manual_seed(2), **kwargs).images
    assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, (a.shape, b.shape)


def test_bad_numpy_images_are_named(folder):
    _, ours = _pair(folder, "StableDiffusionInpaintPipeline")
    kwargs = dict(prompt="a cube", num_inference_steps=2, output_type="np")
    with pytest.raises(TypeError, match=r"image: numpy images are floats in \[0, 1\].*got dtype uint8"):
        ours(image=(IMAGE * 255).astype(np.uint8), mask_image=MASK, **kwargs)
    with pytest.raises(ValueError, match="image: numpy images are RGB"):
        ours(image=IMAGE[..., :1].copy(), mask_image=MASK, **kwargs)
    with pytest.raises(ValueError, match=r"mask_image: numpy images are \(H, W, C\)"):
        ours(image=IMAGE, mask_image=MASK[None, None, None], **kwargs)
