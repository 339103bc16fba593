"""Image variations: our StableDiffusionImageVariationPipeline against diffusers' on a tiny model written by
save_pretrained and loaded by load_pipeline (the tiny SD1 UNet and VAE, a tiny CLIP image encoder projecting to the
UNet's cross-attention width, and its image processor), and diffusers' pipeline under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image and weights. Each comparison also checks that the image moves the output, so an embedding that never
reaches the UNet cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, assert_one_capture_for_new_inputs
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionImageVariationPipeline, tiny
from diffusion_fast.models import UNet2DConditionModel
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50, 3), dtype=np.uint8))
OTHER = Image.fromarray(np.random.default_rng(1).integers(0, 255, (42, 50, 3), dtype=np.uint8))
STEPS = 3
CALL = _tiny_diffusers.Comparison(image=IMAGE, num_inference_steps=STEPS)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


@pytest.fixture(scope="module")
def variation_pair(tmp_path_factory):
    theirs = _tiny_diffusers.variation_pipeline()
    folder = tmp_path_factory.mktemp("tiny-variation")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusionImageVariationPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: guidance 7.5 (zeros as the unconditional embedding), the UNet's default size
    {"guidance_scale": 1.0},  # no guidance
    {"image": [IMAGE, OTHER], "num_images_per_prompt": 2, "height": 40, "width": 48},  # two images, two of each
    {"latents": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))},
], ids=["defaults", "no-guidance", "batch-size", "latents"])
def test_variation_matches_diffusers(variation_pair, kwargs):
    theirs, ours = variation_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    other = [OTHER, IMAGE] if isinstance(kwargs.get("image"), list) else OTHER
    assert _moved(_run(ours, **dict(kwargs, image=other)), b)  # the image reaches the UNet


def test_variation_reference_backend_and_euler_match_diffusers(variation_pair):
    theirs, ours = variation_pair
    _assert_as_diffusers(theirs, ours, backend_name="reference")
    with _tiny_diffusers.swapped_schedulers("EulerAncestralDiscreteScheduler", [theirs], [ours]):
        _assert_as_diffusers(theirs, ours)


def test_pixel_values_are_taken_as_they_are(variation_pair):
    """A tensor is the image encoder's pixel values, as diffusers takes it (no feature extractor run)."""
    theirs, ours = variation_pair
    pixels = ours.feature_extractor(images=IMAGE, return_tensors="pt").pixel_values
    assert np.array_equal(_run(ours, image=pixels), _run(ours))
    _assert_as_diffusers(theirs, ours, image=pixels * 0.5)


def test_whole_step_graph_gives_the_eager_image(variation_pair, monkeypatch):
    """On CUDA a DDIM step replays whole from one graph, the image embeddings an input (capture stood in for on the
    CPU): another image, the same graph."""
    _, ours = variation_pair
    assert_one_capture_for_new_inputs(ours, "step", _run, [dict(image=IMAGE), dict(image=OTHER)], monkeypatch)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_variation_loop_matches_eager_on_gpu(variation_pair):
    """fp16 on CUDA: eager, capture and replay of the whole DDIM step, the image embeddings a graph input."""
    pipe = diffusion_fast.load_pipeline(variation_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p(IMAGE, num_inference_steps=STEPS, output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "step", 1)


def test_accelerate_keeps_diffusers_variation_image(variation_pair, monkeypatch):
    from _scheduler_parity import count_op_calls

    theirs, _ = variation_pair
    before = _run(theirs)
    diffusion_fast.accelerate(theirs)
    try:
        steps = count_op_calls(monkeypatch, "ddim_step")
        norms = count_op_calls(monkeypatch, "_group_norm_silu")
        assert np.abs(_run(theirs) - before).max() <= PIPELINE_FP32_MAX_ABS
        assert len(steps) == STEPS and len(norms) > 0
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs), before)


def test_variation_refuses_bad_inputs_and_components_naming_them(variation_pair):
    _, ours = variation_pair
    with pytest.raises(ValueError, match="image: give the image to vary"):
        ours()
    with pytest.raises(ValueError, match=r"image: a tensor must be the encoder's \(B, 3, H, W\) pixel values"):
        _run(ours, image=torch.rand(1, 4, 32, 32))
    with pytest.raises(TypeError, match="guidance_scale must be a finite float"):
        _run(ours, guidance_scale="high")
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\)"):
        _run(ours, latents=torch.randn(1, 4, 5, 5))
    wide = UNet2DConditionModel.from_config(dict(tiny.unet_config("sd1"), cross_attention_dim=48))
    with pytest.raises(ValueError, match=r"unet \(cross_attention_dim=48\) does not fit image_encoder "
                                         r"\(projection_dim=32\)"):
        StableDiffusionImageVariationPipeline(wide, ours.vae, ours.image_encoder, ours.scheduler)
    with pytest.raises(TypeError, match="image_encoder must be a model with config.projection_dim"):
        StableDiffusionImageVariationPipeline(ours.unet, ours.vae, object(), ours.scheduler)


# ---- the CLI -------------------------------------------------------------------------------------------------------
def test_generate_and_check_take_a_variation_folder(variation_pair, tmp_path, capsys):
    """``generate --model DIR --image in.png`` writes diffusers' variation (no prompt) within one 8-bit level;
    ``check`` varies an image made from the seed both ways."""
    from diffusion_fast.cli import main

    theirs = variation_pair[0]
    IMAGE.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--steps",
                 str(STEPS), "--seed", "2", "--output", str(out), "--no-progress"]) == 0
    expected = theirs(Image.open(tmp_path / "in.png").convert("RGB"), num_inference_steps=STEPS,
                      generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (32, 32, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    capsys.readouterr()
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "image variation pipeline (2 DDIM steps" in text and "0 failed" in text, text


@pytest.mark.parametrize("extra, message", [
    ([], "is an image-variation model: give --image to vary"),
    (["--image", "IN", "--prompt", "a cat"], r"is an image-variation model .*: it takes no --prompt"),
    (["--image", "IN", "--negative-prompt", "dark", "--strength", "0.5"], "it takes no --strength, --negative-prompt"),
], ids=["no-image", "prompt", "negative-and-strength"])
def test_generate_variation_bad_options_one_line(variation_pair, tmp_path, capsys, extra, message):
    import re

    from diffusion_fast.cli import main

    IMAGE.save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IN" else a for a in extra]
    assert main(["generate", "--model", variation_pair[0]._saved_to, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
