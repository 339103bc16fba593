"""ControlNet-Union: our ControlNetUnionModel against diffusers' (one mode, several, guess mode), and our
StableDiffusionXLControlNetUnionPipeline against diffusers' on the tiny SDXL model with a tiny union net (its
zero-initialised parts random), written by save_pretrained and loaded by load_pipeline.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, images and weights (latents within 1e-4); each comparison also checks that the image with the net at scale
0 is far off.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# 50x42: cut to 48x40 by both; a grayscale "canny" map and an RGB "depth" map
CANNY = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50), dtype=np.uint8))
DEPTH = Image.fromarray(np.random.default_rng(1).integers(0, 255, (42, 50, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    theirs = _tiny_diffusers.controlnet_union_pipeline()
    folder = tmp_path_factory.mktemp("tiny-controlnet-union")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusionXLControlNetUnionPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


def _run(pipe, backend_name="fast", **kwargs):
    kwargs = dict(dict(prompt="a red cube", control_image=CANNY, control_mode=3, num_inference_steps=5,
                       output_type="np"), **kwargs)
    with diffusion_fast.backend(backend_name):
        out = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    return out.numpy() if torch.is_tensor(out) else out


def _assert_as_diffusers(theirs, ours, tolerance=PIPELINE_FP32_MAX_ABS, backend_name="fast", **kwargs):
    b = _run(ours, backend_name, **kwargs)
    a = _run(theirs, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= tolerance, np.abs(a - b).max()
    modes = kwargs.get("control_mode", 3)
    off = [0.0] * len(modes) if isinstance(modes, list) else 0.0
    assert np.abs(_run(ours, backend_name, **dict(kwargs, controlnet_conditioning_scale=off)) - b).max() > 0.005
    return b


# ---- the model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modes, scales, guess_mode", [
    ([3], [0.7], False),  # one mode: its scale multiplies the residuals
    ([1, 4], [0.6, 0.9], False),  # several: each scales its image's features and token, the residuals unscaled
    ([1, 4], [0.6, 0.9], True),
    ([2], [0.5], True),
])
def test_model_loads_a_diffusers_folder_and_gives_its_residuals(tmp_path, modes, scales, guess_mode):
    """At an odd latent size (6x7), batch 3 (the token transformer attends across the batch, as diffusers' does)."""
    theirs = _tiny_diffusers.union_controlnet(seed=0).eval()
    theirs.save_pretrained(tmp_path)
    ours = ControlNetUnionModel.from_pretrained(tmp_path)
    sample, context = torch.randn(3, 4, 6, 7), torch.randn(3, 7, 40)
    added = {"text_embeds": torch.randn(3, 24), "time_ids": torch.randn(3, 6)}
    images = [torch.rand(3, 3, 24, 28) for _ in modes]
    control_type = torch.zeros(6).scatter_(0, torch.tensor(modes), 1).repeat(3, 1)
    with torch.no_grad():
        down, mid = theirs(sample, 10, context, controlnet_cond=images, control_type=control_type,
                           control_type_idx=modes, conditioning_scale=scales, guess_mode=guess_mode,
                           added_cond_kwargs=added, return_dict=False)
        got_down, got_mid = ours(sample, 10, context, images, control_type, modes, scales, guess_mode, added)
    for a, b in zip([*down, mid], [*got_down, got_mid]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="control_type_idx must be control modes in"):
        ours(sample, 10, context, images, control_type, [6] * len(modes), scales, guess_mode, added)
    with pytest.raises(ValueError, match=r"control_type must be a \(3, 6\) one-hot tensor, got list"):
        ours(sample, 10, context, images, modes, modes, scales, guess_mode, added)
    with pytest.raises(ValueError, match="give one of each per mode"):
        ours(sample, 10, context, images, control_type, modes, scales[:1] * 3, guess_mode, added)


# ---- the pipeline -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},
    dict(controlnet_conditioning_scale=0.7, negative_prompt="blurry", num_images_per_prompt=2),
    # two modes: one image each, a scale each; the depth mode ends after 2 of the 5 steps
    dict(control_image=[CANNY, DEPTH], control_mode=[3, 1], controlnet_conditioning_scale=[0.8, 0.5],
         control_guidance_end=[1.0, 0.4]),
    dict(control_guidance_start=0.2, control_guidance_end=0.6, height=32, width=40),
    # the keep counted over the whole schedule, as in the SDXL ControlNet pipeline
    dict(denoising_end=0.6, control_guidance_end=0.7, output_type="latent"),
    dict(guess_mode=True, guidance_scale=1.0),  # (diffusers' guess mode fails with guidance: ours tested below)
    # two prompts, each mode with one image per prompt: a list of lists is per mode (a ControlNet's is per prompt)
    dict(prompt=["a red cube", "a blue ball"], control_mode=[3, 1],
         control_image=[[CANNY, CANNY.transpose(Image.FLIP_LEFT_RIGHT)], [DEPTH, DEPTH.transpose(Image.ROTATE_180)]]),
]))
def test_same_image_as_diffusers(pair, backend_name, kwargs):
    theirs, ours = pair
    tolerance = 1e-4 if kwargs.get("output_type") == "latent" else PIPELINE_FP32_MAX_ABS
    _assert_as_diffusers(theirs, ours, tolerance, backend_name, **kwargs)


def test_several_modes_out_of_their_steps_still_add_the_latents_residuals(pair):
    """Both modes at scale 0 (outside their steps, or given so): diffusers still runs the net, whose residuals then
    come from the latents alone; ours runs it too (one mode at 0 is skipped: it adds exact zeros)."""
    theirs, ours = pair
    kwargs = dict(control_image=[CANNY, DEPTH], control_mode=[3, 1], controlnet_conditioning_scale=[0.0, 0.0])
    b = _run(ours, **kwargs)
    assert np.abs(_run(theirs, **kwargs) - b).max() <= PIPELINE_FP32_MAX_ABS
    assert np.abs(_run(ours, controlnet_conditioning_scale=0.0) - b).max() > 0.005


def test_guess_mode_with_guidance(pair):
    """Guess mode with guidance: the net sees the conditional half (its one-hot modes too, where diffusers
    repeats them to the whole batch and fails); the image is between the net's and none."""
    _, ours = pair
    guessed = _run(ours, guess_mode=True)
    assert np.isfinite(guessed).all()
    assert np.abs(guessed - _run(ours)).max() > 0.005
    assert np.abs(guessed - _run(ours, controlnet_conditioning_scale=0.0)).max() > 0.005


def test_accelerate_keeps_diffusers_union_pipelines_image():
    """accelerate() on diffusers' own union pipeline: the UNet's and the union net's blocks run our ops (the union's
    front is left as it is), the image is the same; restore() undoes it exactly."""
    theirs = _tiny_diffusers.controlnet_union_pipeline()
    kwargs = dict(control_image=[CANNY, DEPTH], control_mode=[3, 1])
    before = _run(theirs, **kwargs)
    diffusion_fast.accelerate(theirs)
    try:
        assert np.abs(_run(theirs, **kwargs) - before).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs, **kwargs), before)


def test_graphed_loop_gives_the_eager_image(pair, monkeypatch):
    """On CUDA the whole DDIM step with the net inside replays from a graph; capture stood in for on the CPU. The
    modes are part of a graph's key: another mode, another graph."""
    from _fake_graphs import use_fake_graphs

    _, ours = pair
    eager = [_run(ours, control_guidance_end=0.5), _run(ours, control_mode=1)]
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "step")
    try:
        graphed = use_fake_graphs(ours._graphs_for_components()["step"])
        assert np.array_equal(_run(ours, control_guidance_end=0.5), eager[0])
        assert graphed.captures == 2  # the net on, then off
        assert np.array_equal(_run(ours, control_mode=1), eager[1])
        assert graphed.captures == 3
    finally:
        ours._graphs = None


def test_bad_input_is_named(pair):
    theirs, ours = pair
    for kwargs, error, match in [
        (dict(control_mode=None), ValueError, "control_mode must be a control mode"),
        (dict(control_mode=6), ValueError, r"control_mode must be a control mode \(an int in \[0, 6\)\)"),
        (dict(control_mode=[3, 3], control_image=[CANNY, CANNY]), ValueError, "or a list of distinct ones"),
        (dict(control_mode=[3, 1]), ValueError, "control_image: 2 control modes take a list of 2 conditioning"),
        (dict(control_image=[CANNY, DEPTH], control_mode=[3, 1], controlnet_conditioning_scale=[1.0]), ValueError,
         r"controlnet_conditioning_scale must be a number or a list of 2 numbers \(one per control mode\)"),
        (dict(control_image=None), ValueError, "control_image: give a conditioning image per control mode"),
    ]:
        with pytest.raises(error, match=match):
            _run(ours, **kwargs)
    with pytest.raises(TypeError, match="controlnet must be a diffusion_fast ControlNetUnionModel"):
        ours.controlnet = diffusion_fast.ControlNetModel.from_config(dict(ours.controlnet.config))
    assert isinstance(ours.controlnet, ControlNetUnionModel)


# ---- image-to-image and inpainting -------------------------------------------------------------------------------
INIT = Image.fromarray(np.random.default_rng(2).integers(0, 255, (42, 50, 3), dtype=np.uint8))
_mask = np.zeros((42, 50), np.uint8)
_mask[10:30, 12:40] = 255
MASK = Image.fromarray(_mask)


@pytest.fixture(scope="module", params=["img2img", "inpaint"])
def image_pair(request, tmp_path_factory, pair):
    """(diffusers' union image-to-image or inpainting pipeline on the tiny SDXL components, ours loaded by
    load_pipeline from the folder it saved, the kind)."""
    import diffusers

    theirs, _ = pair
    name = {"img2img": "StableDiffusionXLControlNetUnionImg2ImgPipeline",
            "inpaint": "StableDiffusionXLControlNetUnionInpaintPipeline"}[request.param]
    folder = tmp_path_factory.mktemp(f"tiny-controlnet-union-{request.param}")
    theirs, ours = _tiny_diffusers.saved_pair(getattr(diffusers, name)(**theirs.components), folder,
                                              getattr(diffusion_fast, name))
    theirs._saved_to = str(folder)
    return theirs, ours, request.param


def test_inpainting_with_an_inpainting_unet(pair):
    """SDXL's 9-channel inpainting UNet (diffusers' union inpainting pipeline refuses it; its plain SDXL ControlNet
    one takes it, and so does ours): the net's modes matter."""
    from diffusion_fast.models import UNet2DConditionModel

    _, base = pair
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(dict(_tiny_diffusers.SDXL_TINY, in_channels=9))
    ours = diffusion_fast.StableDiffusionXLControlNetUnionInpaintPipeline(
        unet, base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2, base.scheduler,
        base.controlnet)
    ours.set_progress_bar_config(disable=True)
    b = _run(ours, image=INIT, mask_image=MASK, control_image=[CANNY, DEPTH], control_mode=[3, 1])
    off = _run(ours, image=INIT, mask_image=MASK, control_image=[CANNY, DEPTH], control_mode=[3, 1],
               controlnet_conditioning_scale=[0.0, 0.0])
    assert np.isfinite(b).all() and np.abs(b - off).max() > 0.005


@pytest.mark.parametrize("kwargs", [
    {},
    # two modes, the depth mode ending after a fraction of the steps that run
    dict(control_image=[CANNY, DEPTH], control_mode=[3, 1], controlnet_conditioning_scale=[0.8, 0.5],
         control_guidance_end=[1.0, 0.5]),
    dict(strength=0.6, negative_prompt="blurry", crops_coords_top_left=(4, 8)),
])
def test_image_pipelines_same_image_as_diffusers(image_pair, kwargs):
    theirs, ours, kind = image_pair
    inputs = dict(image=INIT, **({} if kind == "img2img" else {"mask_image": MASK}))
    _assert_as_diffusers(theirs, ours, **inputs, **kwargs)


# ---- the GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_loop_matches_eager_on_gpu(pair):
    """fp16 on CUDA, two modes, one ending early: eager, capture and replay give the same latents (the replay bit
    for bit)."""
    theirs, _ = pair
    pipe = diffusion_fast.load_pipeline(theirs._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p(
        "a red cube", control_image=[CANNY, DEPTH], control_mode=[3, 1], num_inference_steps=5,
        control_guidance_end=[1.0, 0.4], output_type="latent", generator=torch.Generator(DEVICE).manual_seed(3)).images,
        "step", 2)


# ---- the CLI ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_folders(tmp_path_factory, pair):
    """A root with sdxl/ (the pipeline's components without the net), union/ (the net alone) and canny.png /
    depth.png / init.png (42x50)."""
    import diffusers

    root = tmp_path_factory.mktemp("cli-controlnet-union")
    theirs, _ = pair
    diffusers.StableDiffusionXLPipeline(**{k: v for k, v in theirs.components.items() if k != "controlnet"}) \
        .save_pretrained(root / "sdxl")
    theirs.controlnet.save_pretrained(root / "union")
    CANNY.save(root / "canny.png")
    DEPTH.save(root / "depth.png")
    DEPTH.save(root / "init.png")
    return root


@pytest.mark.parametrize("which", ["one-mode", "two-modes", "own", "img2img"])
def test_generate_with_a_union_net_gives_diffusers_image(pair, cli_folders, tmp_path, capsys, which):
    """--controlnet UNION_DIR --control-image FILE --control-mode N (repeat the image and mode pair), or a --model
    folder diffusers saved a union pipeline in, or with --image image-to-image: the image diffusers' union pipeline
    makes from the same seed, within one 8-bit level."""
    import diffusers

    from diffusion_fast.cli import main

    theirs, _ = pair
    root = cli_folders
    out = tmp_path / "out.png"
    argv = ["generate", "--steps", "3", "--seed", "2", "--output", str(out), "--no-progress", "--compare",
            "--control-image", str(root / "canny.png"), "--control-mode", "3", "--controlnet-scale", "0.8"]
    kwargs = dict(control_image=Image.open(root / "canny.png"), control_mode=3, controlnet_conditioning_scale=0.8)
    if which == "two-modes":
        argv += ["--control-image", str(root / "depth.png"), "--control-mode", "1", "--controlnet-scale", "0.5"]
        kwargs = dict(control_image=[Image.open(root / "canny.png"), Image.open(root / "depth.png")],
                      control_mode=[3, 1], controlnet_conditioning_scale=[0.8, 0.5])
    argv += ["--model", theirs._saved_to] if which == "own" else ["--model", str(root / "sdxl"), "--controlnet",
                                                                   str(root / "union")]
    if which == "img2img":  # (the union image-to-image pipeline's own scale is 0.8 too)
        argv += ["--image", str(root / "init.png"), "--strength", "0.7"]
        kwargs.update(image=Image.open(root / "init.png"), strength=0.7)
        theirs = diffusers.StableDiffusionXLControlNetUnionImg2ImgPipeline(**theirs.components)
    assert main(argv) == 0
    assert "max abs pixel difference" in capsys.readouterr().out
    expected = theirs("a photograph of an astronaut riding a horse", num_inference_steps=3,
                      generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--controlnet", "UNION", "--control-image", "CANNY"], "--control-mode: give one per --control-image for a "
                                                            "ControlNet-Union net"),
    (["--controlnet", "UNION", "--control-image", "CANNY", "--control-mode", "3", "--control-mode", "1"],
     r"--control-mode: give one per --control-image \(1\), in order; got 2"),
    (["--controlnet", "UNION", "--controlnet", "UNION", "--control-image", "CANNY", "--control-mode", "3"],
     "--controlnet: a ControlNet-Union net guides alone"),
    (["--controlnet", "UNION", "--control-image", "CANNY", "--control-mode", "9"],
     r"control_mode must be a control mode \(an int in \[0, 6\)\)"),
    (["--controlnet", "UNION", "--control-image", "CANNY", "--control-mode", "3", "--controlnet-scale", "1",
      "--controlnet-scale", "2"], r"--controlnet-scale: give one for all control modes or one per control mode \(1\)"),
    (["--control-mode", "3"], "--controlnet, --controlnet-scale and --control-mode need --control-image"),
])
def test_generate_union_bad_options_one_line(cli_folders, capsys, argv, message):
    import re

    from diffusion_fast.cli import main

    names = {"UNION": cli_folders / "union", "CANNY": cli_folders / "canny.png", "INIT": cli_folders / "init.png"}
    argv = ["generate", "--model", str(cli_folders / "sdxl"), *[str(names.get(a, a)) for a in argv], "--steps", "2",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_check_runs_a_union_folder(pair, capsys, monkeypatch):
    """A folder diffusers saved a union pipeline in is checked on an image in the net's first mode (the UNet's first
    prediction with the net's residuals too); a fast path whose net is off fails it."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main

    theirs, _ = pair
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "ControlNet-Union pipeline (2 " in text and "0 failed" in text
    real = ControlNetUnionModel.forward

    def off_on_the_fast_path(self, sample, *args):
        down, mid = real(self, sample, *args)
        return (down, mid) if current_backend() == "reference" else ([d * 1.1 for d in down], mid * 1.1)

    monkeypatch.setattr(ControlNetUnionModel, "forward", off_on_the_fast_path)
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 1


def test_check_runs_union_image_folders(image_pair, capsys):
    """Folders diffusers saved union image-to-image and inpainting pipelines in: checked on the image made from the
    seed, as the start and the condition in the net's first mode."""
    from diffusion_fast.cli import main

    theirs, _, kind = image_pair
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    expected = "image-to-image" if kind == "img2img" else "inpainting"
    assert f"ControlNet-Union {expected} pipeline (2 " in text and "0 failed" in text
