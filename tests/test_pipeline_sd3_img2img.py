"""SD3 image-to-image: our StableDiffusion3Img2ImgPipeline against diffusers' on a tiny SD3.5 Medium-shaped model
written by save_pretrained and loaded by load_pipeline, and diffusers' under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image, strength and weights. Each comparison also checks that what it varies moves the image.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
OTHER = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8))
CALL = _tiny_diffusers.Comparison(prompt="a cat on a mat", image=IMAGE, num_inference_steps=4)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


@pytest.fixture(scope="module")
def img2img_pair(tmp_path_factory):
    """SD3.5 Medium's shape (the text-to-image tests compare plain SD3's too; image-to-image adds no block kind)."""
    from diffusers import StableDiffusion3Img2ImgPipeline as Theirs

    theirs = Theirs(**_tiny_diffusers.sd3_pipeline(variant="sd3.5").components)
    folder = tmp_path_factory.mktemp("tiny-sd3-img2img")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusion3Img2ImgPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.mark.parametrize("kwargs, other", [
    ({}, {"image": OTHER}),  # diffusers' defaults: strength 0.6, the image resized to the default size
    # strength 0.7 of 4 steps: 2.8, and int(4 - 2.8) = 1 step skipped (the SD pipelines' int(2.8) = 2 would skip 2)
    ({"strength": 0.7}, {"strength": 0.9}),
    ({"strength": 1.0, "num_inference_steps": 3}, {"prompt": "a dog"}),  # from pure noise: the image's sigma is 1
    # two prompts, two images each, another size (the image resized to it), negative prompts
    ({"prompt": ["a cat", "a hat"], "num_images_per_prompt": 2, "height": 48, "width": 32,
      "negative_prompt": ["dull", "dark"]}, {"image": OTHER}),
    ({"image": [IMAGE, OTHER], "prompt": ["a", "b"]}, {"image": [OTHER, IMAGE]}),  # an image per prompt
    ({"guidance_scale": 1.0}, {"image": OTHER}),  # no guidance
    ({"sigmas": [1.0, 0.7, 0.4, 0.2]}, {"strength": 0.3}),  # a custom schedule's tail
], ids=["defaults", "strength-tail", "strength-1", "batch-size-negative", "image-per-prompt", "no-guidance",
        "sigmas"])
def test_sd3_img2img_matches_diffusers(img2img_pair, kwargs, other):
    theirs, ours = img2img_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    assert _moved(_run(ours, **dict(kwargs, **other)), b)


def test_sd3_img2img_inputs_backends_and_generators(img2img_pair):
    """Tensor and numpy images and latents given as the image (taken as they are, as diffusers), a generator per
    image, and the reference backend."""
    theirs, ours = img2img_pair
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _assert_as_diffusers(theirs, ours, image=pixels)
    _assert_as_diffusers(theirs, ours, image=pixels.permute(0, 2, 3, 1).numpy())
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    assert _moved(_assert_as_diffusers(theirs, ours, image=latents), _run(ours))
    def generators():
        return [torch.Generator().manual_seed(s) for s in (1, 2)]

    a, b = (pipe(prompt=["a", "b"], image=[IMAGE, OTHER], generator=generators(), num_inference_steps=3,
                 output_type="np").images for pipe in (theirs, ours))
    assert np.abs(a - b).max() <= 1e-3
    # one image for two generators: ours encodes it for each (diffusers' indexes past its one image and fails)
    assert ours(prompt="a", image=IMAGE, num_images_per_prompt=2, generator=generators(), num_inference_steps=3,
                output_type="np").images.shape == (2, 32, 32, 3)
    _assert_as_diffusers(theirs, ours, backend_name="reference")


def test_sd3_img2img_from_pipe_load_and_errors(img2img_pair):
    _, ours = img2img_pair
    t2i = StableDiffusion3Pipeline.from_pipe(ours)
    assert type(t2i) is StableDiffusion3Pipeline and t2i.transformer is ours.transformer
    back = StableDiffusion3Img2ImgPipeline.from_pipe(t2i)
    assert np.array_equal(_run(back), _run(ours))
    with pytest.raises(TypeError, match="does not take"):
        StableDiffusion3Img2ImgPipeline.from_pipe(t2i, unet=None)
    for kwargs, match in ((dict(strength=1.5), "strength must be in"), (dict(image=None), "give the initial image"),
                          (dict(strength=0.0), "leaves no denoising step"),
                          (dict(image=torch.rand(1, 5, 32, 32)), "5 channels"),
                          (dict(image=[IMAGE, OTHER, IMAGE]), "does not divide the batch"),
                          (dict(latents=torch.randn(1, 16, 4, 4)), "latents must have shape")):
        with pytest.raises(ValueError, match=match):
            _run(ours, **kwargs)


def test_accelerate_sd3_img2img_keeps_its_images():
    from diffusers import StableDiffusion3Img2ImgPipeline as Theirs

    _tiny_diffusers.assert_accelerate_keeps_images(Theirs(**_tiny_diffusers.sd3_pipeline().components), _run,
                                                   strength=0.7)


def test_generate_and_check_sd3_image_to_image(img2img_pair, tmp_path, capsys):
    """``generate --image`` on an SD3 folder: image-to-image at --strength, the image's size cut to what the model
    takes, diffusers' PNG; ``check`` runs the folder's image-to-image both ways."""
    from diffusion_fast.cli import main

    theirs, _ = img2img_pair
    IMAGE.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--strength", "0.7",
                 "--steps", "4", "--seed", "2", "--output", str(out), "--no-progress", "--compare"]) == 0
    text = capsys.readouterr().out
    assert "fast path:      3 steps" in text and "max abs pixel difference" in text, text
    expected = theirs(diffusion_fast.cli.DEFAULT_PROMPT, image=IMAGE, strength=0.7, num_inference_steps=4,
                      height=40, width=48, generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "SD3 image-to-image pipeline (2 FlowMatchEuler steps" in text and "0 failed" in text, text
