"""Depth-to-image: our StableDiffusionDepth2ImgPipeline against diffusers' on a tiny model written by save_pretrained
and loaded by load_pipeline (a 5-channel UNet, v-prediction DDIM, and a tiny transformers DPT depth estimator with its
image processor), and diffusers' pipeline under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image and weights. Each comparison also checks that the image and its depth move the image, so a depth map
that never reaches the UNet cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, assert_one_capture_for_new_inputs
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionDepth2ImgPipeline, StableDiffusionPipeline, tiny
from diffusion_fast.models import UNet2DConditionModel
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:CPU Autocast only supports")]  # (diffusers' fp32 autocast)

_rng = np.random.default_rng(0)
_RAMP = np.linspace(0, 255, 50)[None, :, None] * np.ones((42, 1, 3))
# odd-sized on purpose (cut to 48x40 by the image processor); a ramp with noise, so the depth varies across it
IMAGE = Image.fromarray((_RAMP * 0.7 + _rng.integers(0, 70, (42, 50, 3))).astype(np.uint8))
OTHER = Image.fromarray((_RAMP[:, ::-1] * 0.7 + _rng.integers(0, 70, (42, 50, 3))).astype(np.uint8))
STEPS = 4


@pytest.fixture(scope="module")
def depth_pair(tmp_path_factory):
    """diffusers' StableDiffusionDepth2ImgPipeline on the tiny components, and ours loaded from its folder."""
    theirs = _tiny_diffusers.depth2img_pipeline()
    folder = tmp_path_factory.mktemp("tiny-depth2img")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusionDepth2ImgPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


CALL = _tiny_diffusers.Comparison(prompt="a stone hall", image=IMAGE, num_inference_steps=STEPS)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


DEPTH = torch.rand(1, 21, 25, generator=torch.Generator().manual_seed(9)) * 7 + 2  # any size and range


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: strength 0.8, guidance 7.5, the estimator's depth
    {"guidance_scale": 1.0},  # no guidance
    {"strength": 1.0, "negative_prompt": "blurry", "guidance_scale": 4.0},
    {"depth_map": DEPTH},  # a depth map given: no estimator run
], ids=["defaults", "no-guidance", "strength-1-negative", "depth-map"])
def test_depth2img_matches_diffusers(depth_pair, kwargs):
    theirs, ours = depth_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    assert b.shape == (1, 40, 48, 3)  # the image's size cut to a multiple of 8
    assert _moved(_run(ours, **dict(kwargs, depth_map=DEPTH.flip(-1))), b)  # the depth reaches the UNet


def test_depth2img_reference_backend_matches_diffusers(depth_pair):
    _assert_as_diffusers(*depth_pair, backend_name="reference")


def test_the_estimators_depth_follows_the_image(depth_pair):
    """Another image, another depth: with the image's own latents and noise kept (a latent start fixed through the
    same strength), only the depth map changes between the two runs, and it moves the image."""
    _, ours = depth_pair
    with torch.no_grad():
        a = ours._depth_mask(IMAGE, None, (5, 6), 1, False, torch.float32)
        b = ours._depth_mask(OTHER, None, (5, 6), 1, False, torch.float32)
    assert (a - b).abs().max() > 0.1 and a.min() == -1 and a.max() == 1


def test_depth_mask_is_diffusers_prepare_depth_map(depth_pair):
    """The UNet's depth input, against diffusers' own prepare_depth_map: estimated and given, repeated whole to a
    batch of 4, doubled for guidance."""
    theirs, ours = depth_pair
    for depth_map in (None, DEPTH):
        for batch, cfg in ((1, True), (4, False)):
            expected = theirs.prepare_depth_map(IMAGE, depth_map, batch, cfg, torch.float32, torch.device("cpu"))
            with torch.no_grad():
                got = ours._depth_mask(IMAGE, depth_map, (10, 12), batch, cfg, torch.float32)  # (42x50 // 4)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_batches_as_diffusers(depth_pair):
    """Two prompts with their two images, two images per prompt (the images repeated whole, the depth maps too)."""
    theirs, ours = depth_pair
    b = _assert_as_diffusers(theirs, ours, prompt=["a stone hall", "a forest"], image=[IMAGE, OTHER],
                             num_images_per_prompt=2, negative_prompt=["dark", "blurry"])
    assert b.shape[0] == 4 and _moved(b[0], b[1]) and _moved(b[0], b[2])


def test_numpy_and_tensor_images(depth_pair):
    """A numpy (1, H, W, 3) batch and a [0, 1] tensor as diffusers takes them (the depth estimator's processor gets
    the images as they are). A non-square numpy image, and a single (H, W, 3) one, run too: diffusers swaps the
    width and height of the first for the depth map's size, and cannot unpack the second's, and fails on both."""
    theirs, ours = depth_pair
    array = np.asarray(IMAGE, dtype=np.float32)[:40, :40] / 255.0
    _assert_as_diffusers(theirs, ours, image=array[None])
    _assert_as_diffusers(theirs, ours, image=torch.from_numpy(array).permute(2, 0, 1)[None])
    wide = np.asarray(IMAGE, dtype=np.float32)[:40, :48] / 255.0
    assert _run(ours, image=wide).shape == (1, 40, 48, 3)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_other_schedulers_match_diffusers(depth_pair, scheduler):
    theirs, ours = depth_pair
    with _tiny_diffusers.swapped_schedulers(scheduler, [theirs], [ours]):
        _assert_as_diffusers(theirs, ours, **({"eta": 0.5} if scheduler == "DDIMScheduler" else {}))


def test_callback_reads_and_replaces_the_depth_mask_as_diffusers(depth_pair):
    """diffusers' callback tensors include "depth_mask": read at every step, and a replaced one used after it."""
    theirs, ours = depth_pair
    seen = {"theirs": [], "ours": []}

    def recorder(key):
        def callback(pipe, i, t, tensors):
            seen[key].append(tensors["depth_mask"].clone())
            return {"depth_mask": -tensors["depth_mask"]} if i == 0 else {}
        return callback

    names = ["latents", "depth_mask"]
    a = _run(theirs, callback_on_step_end=recorder("theirs"), callback_on_step_end_tensor_inputs=names)
    b = _run(ours, callback_on_step_end=recorder("ours"), callback_on_step_end_tensor_inputs=names)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS and _moved(b, _run(ours))
    assert len(seen["ours"]) == len(seen["theirs"]) == int(STEPS * 0.8)
    for x, y in zip(seen["theirs"], seen["ours"]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_whole_step_graph_gives_the_eager_image(depth_pair, monkeypatch):
    """On CUDA a DDIM step replays whole from one graph with the depth map among its inputs (capture stood in for
    on the CPU): another image, another depth, the same graph."""
    _, ours = depth_pair
    assert_one_capture_for_new_inputs(ours, "step", _run, [dict(image=IMAGE), dict(image=OTHER)], monkeypatch)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_depth2img_loop_matches_eager_on_gpu(depth_pair):
    """fp16 on CUDA (the DPT estimator under autocast, as diffusers runs it): eager, capture and replay of the whole
    DDIM step, the depth map a graph input."""
    pipe = diffusion_fast.load_pipeline(depth_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("a stone hall", image=IMAGE, num_inference_steps=STEPS,
                                              output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "step", 1)


def test_accelerate_keeps_diffusers_depth2img_image(depth_pair, monkeypatch):
    """diffusers' pipeline under accelerate (its 5-channel UNet changes none of the patched blocks; the DPT estimator
    is not a diffusers model and is left alone): the image within the fp32 tolerance, restore gives it back."""
    from _scheduler_parity import count_op_calls

    theirs, _ = depth_pair
    before = _run(theirs)
    diffusion_fast.accelerate(theirs)
    try:
        steps = count_op_calls(monkeypatch, "ddim_step")
        norms = count_op_calls(monkeypatch, "_group_norm_silu")
        assert np.abs(_run(theirs) - before).max() <= PIPELINE_FP32_MAX_ABS
        assert len(steps) == int(STEPS * 0.8) and len(norms) > 0
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs), before)


# ---- refused clearly -----------------------------------------------------------------------------------------------
def test_depth2img_refuses_bad_inputs_naming_them(depth_pair):
    _, ours = depth_pair
    with pytest.raises(ValueError, match="image: give the initial image"):
        ours("a hall")
    with pytest.raises(ValueError, match=r"depth_map must be a float \(B, H, W\) tensor"):
        _run(ours, depth_map=torch.rand(1, 1, 20, 20))
    with pytest.raises(ValueError, match="depth_map has 3 maps, which does not divide the batch of 2"):
        _run(ours, prompt=["a", "b"], image=[IMAGE, IMAGE], depth_map=torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match=r"image: a tensor must be a \(B, 3, H, W\) RGB batch"):
        _run(ours, image=torch.randn(1, 4, 5, 6))
    no_estimator = StableDiffusionDepth2ImgPipeline.from_pipe(ours, depth_estimator=None)
    with pytest.raises(ValueError, match="depth_map: this pipeline has no depth estimator"):
        _run(no_estimator)
    _run(no_estimator, depth_map=DEPTH, num_inference_steps=2)  # (given a map, it runs)


def test_unets_of_the_wrong_kind_are_refused_by_name(depth_pair):
    _, ours = depth_pair
    parts = (ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)
    plain = UNet2DConditionModel.from_config(tiny.unet_config("sd2"))
    with pytest.raises(ValueError, match="unet has 4 input channels: a depth-to-image UNet takes 5"):
        StableDiffusionDepth2ImgPipeline(plain, *parts)
    with pytest.raises(ValueError, match="unet has 5 input channels .* a depth-to-image UNet, for "
                                         "diffusion_fast.StableDiffusionDepth2ImgPipeline"):
        StableDiffusionPipeline(ours.unet, *parts)


def test_ip_adapter_is_refused_not_ignored(depth_pair, tmp_path):
    theirs, ours = depth_pair
    with _tiny_diffusers.ip_adapter_loaded([ours], tmp_path, theirs.unet):
        with pytest.raises(ValueError, match="IP-Adapter: diffusers' depth-to-image pipeline takes none"):
            _run(ours)


# ---- the CLI -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_map", [False, True], ids=["estimated", "depth-map-file"])
def test_generate_remakes_the_image_as_diffusers(depth_pair, tmp_path, capsys, with_map):
    """``generate`` on a depth-to-image folder with --image (and --strength, and a --depth-map image): diffusers'
    image from the same seed, within one 8-bit level."""
    from diffusion_fast.cli import main

    theirs = depth_pair[0]
    IMAGE.save(tmp_path / "in.png")
    depth = (DEPTH[0] / DEPTH.max() * 255).round().to(torch.uint8).numpy()
    Image.fromarray(depth).save(tmp_path / "depth.png")
    out = tmp_path / "out.png"
    extra = ["--depth-map", str(tmp_path / "depth.png")] if with_map else []
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--prompt", "a hall",
                 "--steps", str(STEPS), "--strength", "0.75", "--seed", "2", "--output", str(out), "--no-progress",
                 *extra]) == 0
    assert f"fast path:      {int(STEPS * 0.75)} steps" in capsys.readouterr().out
    depth_map = torch.from_numpy(np.asarray(Image.open(tmp_path / "depth.png").convert("F"), np.float32))[None]
    expected = theirs("a hall", image=Image.open(tmp_path / "in.png").convert("RGB"), num_inference_steps=STEPS,
                      strength=0.75, generator=torch.Generator().manual_seed(2),
                      depth_map=depth_map if with_map else None).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    ([], "is a depth-to-image model: give --image to remake"),
    (["--image", "IN", "--mask", "IN"], r"is a depth-to-image model .*: it takes no --mask"),
    (["--image", "IN", "--depth-map", "NOWHERE"], "--depth-map NOWHERE: not an image"),
], ids=["no-image", "mask", "bad-map"])
def test_generate_depth_bad_options_one_line(depth_pair, tmp_path, capsys, extra, message):
    import re

    from diffusion_fast.cli import main

    IMAGE.save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IN" else a for a in extra]
    assert main(["generate", "--model", depth_pair[0]._saved_to, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_depth_map_is_refused_for_other_models(capsys, tmp_path):
    from diffusion_fast.cli import main

    assert main(["generate", "--depth-map", str(tmp_path / "d.png"), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--depth-map is for a depth-to-image model" in err and "Traceback" not in err, err


def test_check_runs_a_depth2img_folder(depth_pair, capsys, monkeypatch):
    """``check`` remakes an image both ways (its depth from the folder's estimator) and compares the UNet's first
    prediction with a depth map beside the latents; a fast path that drops the depth fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main

    assert main(["check", "--model", depth_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "depth-to-image pipeline (2 DDIM steps" in text and "0 failed" in text, text
    real = StableDiffusionDepth2ImgPipeline._unet_call

    def fast_without_depth(self, model_input, t, embeds, depth_mask, timestep_cond=None):
        keep = current_backend() == "reference"
        return real(self, model_input, t, embeds, depth_mask if keep else torch.zeros_like(depth_mask))

    monkeypatch.setattr(StableDiffusionDepth2ImgPipeline, "_unet_call", fast_without_depth)
    assert main(["check", "--model", depth_pair[0]._saved_to, "--steps", "2"]) == 1
