"""Few-step distilled models' recipes as their model cards give them for diffusers, ours against diffusers' on the tiny
SD and SDXL models: SD-/SDXL-Turbo (Euler ancestral, "trailing" spacing, 1 step, guidance 0; image-to-image with
2 steps at strength 0.5) and SDXL-Lightning (Euler, "trailing", 4 steps, guidance 0). The distilled weights are
what makes such a run a good image; the recipes are what must match.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers'.
"""
import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
RECIPES = {
    "turbo": ("EulerAncestralDiscreteScheduler", dict(num_inference_steps=1, guidance_scale=0.0)),
    "lightning": ("EulerDiscreteScheduler", dict(num_inference_steps=4, guidance_scale=0.0)),
}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pair(request, tmp_path_factory):
    theirs = (_tiny_diffusers.pipeline("sd1", seed=2) if request.param == "sd1" else
              _tiny_diffusers.sdxl_pipeline(seed=2))
    cls = diffusion_fast.StableDiffusionPipeline if request.param == "sd1" else diffusion_fast.StableDiffusionXLPipeline
    return _tiny_diffusers.saved_pair(theirs, tmp_path_factory.mktemp(f"few-step-{request.param}"), cls)


def _run(pipe, **kwargs):
    kwargs = dict(dict(output_type="np"), **kwargs)
    out = pipe(prompt="a red cube", generator=torch.Generator().manual_seed(3), **kwargs).images
    return out.numpy() if torch.is_tensor(out) else out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_text_to_image_recipe_matches_diffusers(pair, recipe):
    theirs, ours = pair
    name, kwargs = RECIPES[recipe]
    with _tiny_diffusers.swapped_schedulers(name, [theirs], [ours], timestep_spacing="trailing"):
        a, b = _run(theirs, **kwargs), _run(ours, **kwargs)
        latents = [_run(pipe, output_type="latent", **kwargs) for pipe in (theirs, ours)]
    assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, np.abs(a - b).max()
    # (the tiny VAE hides small latent errors, such as an init sigma of sqrt(1 + s^2) for s: the latents too)
    np.testing.assert_allclose(latents[1], latents[0], rtol=0, atol=1e-4)


def test_turbo_image_to_image_matches_diffusers(pair):
    """Turbo's image-to-image: 2 steps at strength 0.5 (one step runs), no guidance; ours on the loaded pipeline's
    components (as the CLI builds it)."""
    from diffusion_fast.generate import _img2img

    theirs, ours = pair
    cls = (diffusers.StableDiffusionXLImg2ImgPipeline if hasattr(ours, "text_encoder_2") else
           diffusers.StableDiffusionImg2ImgPipeline)
    img2img = [cls(**theirs.components), _img2img(ours)]
    for pipe in img2img:
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=IMAGE, num_inference_steps=2, strength=0.5, guidance_scale=0.0)
    with _tiny_diffusers.swapped_schedulers("EulerAncestralDiscreteScheduler", img2img[:1], img2img[1:],
                                            timestep_spacing="trailing"):
        a, b = _run(img2img[0], **kwargs), _run(img2img[1], **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, np.abs(a - b).max()
