"""clip_skip in every pipeline of ours, against diffusers' on the same tiny weights written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference of diffusers' (as for every pipeline). diffusers
skips layers for the prompt alone (the negative prompt is encoded in full), SD through the final layer norm and SDXL
without it; ours does the same, so that the images match.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
MASK = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((16, 16), dtype=np.uint8)))
CHANGED = 0.02  # skipping a layer must move the image by more than this (the tolerance is 1e-3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-skip")
    _tiny_diffusers.pipeline("sd1", seed=1).save_pretrained(root / "sd")
    _tiny_diffusers.sdxl_pipeline(seed=1).save_pretrained(root / "sdxl")
    return root


# (folder, diffusers' class and ours by name, the call's image inputs)
CASES = {
    "sd": ("sd", "StableDiffusionPipeline", {}),
    "sd-img2img": ("sd", "StableDiffusionImg2ImgPipeline", dict(image=IMAGE, strength=0.7)),
    "sd-inpaint": ("sd", "StableDiffusionInpaintPipeline", dict(image=IMAGE, mask_image=MASK, height=32, width=32)),
    "sdxl": ("sdxl", "StableDiffusionXLPipeline", {}),
    "sdxl-img2img": ("sdxl", "StableDiffusionXLImg2ImgPipeline", dict(image=IMAGE, strength=0.7)),
    "sdxl-inpaint": ("sdxl", "StableDiffusionXLInpaintPipeline", dict(image=IMAGE, mask_image=MASK, height=32,
                                                                     width=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_clip_skip_same_image_as_diffusers(folders, case):
    import diffusers

    folder, name, inputs = CASES[case]
    theirs = getattr(diffusers, name).from_pretrained(folders / folder)
    if not hasattr(theirs.text_encoder, "text_model"):
        # diffusers 0.42's SD clip_skip reads text_encoder.text_model.final_layer_norm, which transformers 5's
        # CLIPTextModel no longer has (its layers sit on the model itself): alias it, outside the module tree
        object.__setattr__(theirs.text_encoder, "text_model", theirs.text_encoder)
    ours = getattr(diffusion_fast, name).from_pretrained(folders / folder)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    images = {}
    for skip in (None, 1):
        kwargs = dict(prompt="a red cube", negative_prompt="blurry", num_inference_steps=3, output_type="np",
                      clip_skip=skip, **inputs)
        a = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
        images[skip] = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
        assert np.abs(a - images[skip]).max() <= PIPELINE_FP32_MAX_ABS, skip
    assert np.abs(images[1] - images[None]).max() > CHANGED  # the skip is not a no-op here


def test_bad_clip_skip_names_the_argument(folders):
    ours = diffusion_fast.load_pipeline(folders / "sd")
    for value in (2, -1, 1.0, True, "1"):  # the tiny text encoder has 2 layers
        with pytest.raises(ValueError, match=r"clip_skip must be None or an int in \[0, 2\)"):
            ours("a", num_inference_steps=1, clip_skip=value)
    # the image pipelines refuse it before setting the schedule: a refused call leaves the scheduler as it was
    from diffusion_fast.pipeline_img2img import StableDiffusionImg2ImgPipeline
    from diffusion_fast.pipeline_inpaint import StableDiffusionInpaintPipeline

    image, mask = Image.new("RGB", (32, 32)), Image.new("L", (32, 32), 255)
    for cls, extra in [(StableDiffusionImg2ImgPipeline, {}), (StableDiffusionInpaintPipeline, {"mask_image": mask})]:
        scheduler = diffusion_fast.schedulers.DDIMScheduler.from_config(ours.scheduler.config)
        pipe = cls(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer, scheduler)
        with pytest.raises(ValueError, match="clip_skip must be None or an int"):
            pipe("a", image=image, num_inference_steps=3, clip_skip=2, **extra)
        assert pipe.scheduler.num_inference_steps is None
