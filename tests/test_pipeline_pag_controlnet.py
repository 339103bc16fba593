"""Perturbed-attention guidance with ControlNets: our StableDiffusionControlNetPAG(Inpaint)Pipeline and
StableDiffusionXLControlNetPAG(Img2Img)Pipeline against diffusers' on the tiny models, written by save_pretrained
and loaded by load_pipeline (which must pick our class of that name), and diffusers' under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, images and weights. Each comparison also checks that PAG and the conditioning image move the image, so a
perturbed copy that never runs, or one whose nets see no conditioning image, cannot pass.
"""
import numpy as np
import pytest
import torch

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import pipeline_pag
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:You have disabled the safety checker")]

_rng = np.random.default_rng(0)
CONTROL = torch.from_numpy(_rng.random((1, 3, 32, 40), dtype=np.float32))  # in [0, 1]; 32x40: not square
OTHER = torch.from_numpy(_rng.random((1, 3, 32, 40), dtype=np.float32))
IMAGE = torch.from_numpy(_rng.random((1, 3, 32, 40), dtype=np.float32))
MASK = torch.zeros(1, 1, 32, 40)
MASK[:, :, 8:24, 10:30] = 1.0
STEPS = 3


def _pair(kind, folder, nets=1, unet_channels=4):
    """diffusers' PAG ControlNet pipeline of ``kind`` ("sd", "sd-inpaint", "xl", "xl-img2img") on the tiny
    components with ``nets`` random ControlNets (an SD inpainting one with a ``unet_channels``-channel UNet), saved,
    and ours loaded from the folder."""
    import diffusers

    xl = kind.startswith("xl")
    base = _tiny_diffusers.controlnet_pipeline(seed=4, nets=nets, variant="sdxl" if xl else "sd1")
    components = dict(base.components)
    if unet_channels == 9:
        torch.manual_seed(12)
        components["unet"] = diffusers.UNet2DConditionModel(**dict(components["unet"].config, in_channels=9))
    suffix = {"sd": "", "sd-inpaint": "Inpaint", "xl": "", "xl-img2img": "Img2Img"}[kind]
    name = f"StableDiffusion{'XL' if xl else ''}ControlNetPAG{suffix}Pipeline"
    extra = {} if xl else {"requires_safety_checker": False}
    theirs = getattr(diffusers, name)(**components, pag_applied_layers="mid", **extra)
    theirs._saved_to = str(folder)
    return _tiny_diffusers.saved_pair(theirs, folder, getattr(pipeline_pag, name))


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory):
    return _pair("sd", tmp_path_factory.mktemp("pag-controlnet"))


def _inputs(kind, **kwargs):
    control = {"image": CONTROL} if kind in ("sd", "xl") else {"control_image": CONTROL, "image": IMAGE}
    if kind == "sd-inpaint":
        control.update(mask_image=MASK, height=32, width=40)
    return dict(control, **kwargs)


CALL = _tiny_diffusers.Comparison(prompt="a red cube", num_inference_steps=STEPS)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # CFG 7.5 and PAG 3 on the mid block: the nets and the UNet on three copies of the batch
    {"guidance_scale": 1.0},  # PAG alone: two copies
    {"prompt": ["a red cube", "a blue ball"], "num_images_per_prompt": 2, "negative_prompt": ["dark", "blurry"],
     "controlnet_conditioning_scale": 0.6, "control_guidance_end": 0.5, "pag_adaptive_scale": 0.002},
], ids=["cfg", "no-cfg", "batch-scales-end-adaptive"])
def test_sd_pag_controlnet_matches_diffusers(sd_pair, kwargs):
    theirs, ours = sd_pair
    b = _assert_as_diffusers(theirs, ours, **_inputs("sd", **kwargs))
    assert _moved(_run(ours, **_inputs("sd", **dict(kwargs, pag_scale=0.0))), b)  # PAG matters
    assert _moved(_run(ours, **dict(_inputs("sd", **kwargs), image=OTHER)), b)  # so does the conditioning image


def test_sd_pag_controlnet_reference_backend_matches_diffusers(sd_pair):
    _assert_as_diffusers(*sd_pair, backend_name="reference", **_inputs("sd"))


def test_two_controlnets_with_pag_match_diffusers(tmp_path):
    """A MultiControlNetModel: each net's image takes the perturbed copy's rows."""
    theirs, ours = _pair("sd", tmp_path, nets=2)
    b = _assert_as_diffusers(theirs, ours, image=[CONTROL, OTHER], controlnet_conditioning_scale=[1.0, 0.5])
    assert _moved(_run(ours, image=[CONTROL, CONTROL], controlnet_conditioning_scale=[1.0, 0.5]), b)


@pytest.mark.parametrize("kind, unet_channels", [("sd-inpaint", 9), ("sd-inpaint", 4), ("xl", 4), ("xl-img2img", 4)],
                         ids=["sd-inpaint-9", "sd-inpaint-4", "xl", "xl-img2img"])
def test_other_pag_controlnet_pipelines_match_diffusers(kind, unet_channels, tmp_path):
    """SD inpainting (the perturbed copy of a 9-channel UNet's mask and masked image too; a plain UNet's blend keeps
    the batch's own mask), SDXL text-to-image (its pooled embeddings and time ids, for the nets too) and SDXL
    image-to-image, each with and without CFG."""
    theirs, ours = _pair(kind, tmp_path, unet_channels=unet_channels)
    extra = {"strength": 0.75} if kind == "xl-img2img" else {}
    for kwargs in ({}, {"guidance_scale": 1.0}):
        b = _assert_as_diffusers(theirs, ours, **_inputs(kind, **extra, **kwargs))
        assert _moved(_run(ours, **_inputs(kind, **extra, **kwargs, pag_scale=0.0)), b)


# ---- how it composes -----------------------------------------------------------------------------------------------
def test_only_the_unets_self_attentions_are_perturbed(sd_pair, monkeypatch):
    """During the call the applied UNet self-attentions perturb the batch's last rows; no net's attention does."""
    from diffusion_fast.models.attention import Attention

    _, ours = sd_pair
    seen = {}
    real = Attention.forward

    def spy(self, *args, **kwargs):
        if self.perturbed_rows:
            seen[self] = self.perturbed_rows
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "forward", spy)
    _run(ours, num_inference_steps=1, **_inputs("sd"))
    applied = set(pipeline_pag.pag_layers(ours.unet, ["mid"]).values())
    assert set(seen) == applied and set(seen.values()) == {1}
    assert not any(m in seen for m in ours.controlnet.modules())


def test_guess_mode_is_refused_with_pag_and_runs_without(sd_pair):
    _, ours = sd_pair
    with pytest.raises(ValueError, match="guess_mode: not with perturbed-attention guidance"):
        _run(ours, guess_mode=True, **_inputs("sd"))
    _run(ours, guess_mode=True, pag_scale=0.0, num_inference_steps=1, **_inputs("sd"))


def test_from_pipe_adds_pag_to_a_controlnet_pipeline_and_back(sd_pair):
    """Our ControlNet pipeline's components under PAG with from_pipe, as diffusers' from_pipe does; back to the
    plain pipeline, its image is the PAG pipeline's at scale 0."""
    _, ours = sd_pair
    plain = diffusion_fast.StableDiffusionControlNetPipeline.from_pipe(ours)
    again = diffusion_fast.StableDiffusionControlNetPAGPipeline.from_pipe(plain, pag_applied_layers=["mid"])
    assert again.controlnet is ours.controlnet and again.unet is ours.unet
    assert np.array_equal(_run(again, **_inputs("sd")), _run(ours, **_inputs("sd")))
    assert np.array_equal(_run(plain, **_inputs("sd")), _run(ours, **_inputs("sd", pag_scale=0.0)))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_pag_controlnet_loop_matches_eager_on_gpu(sd_pair):
    """fp16 on CUDA: eager, capture and replay of the UNet call with the net and the mid block perturbed."""
    pipe = diffusion_fast.load_pipeline(sd_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("a red cube", image=CONTROL, num_inference_steps=STEPS,
                                              output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "unet", 1)


def test_accelerate_keeps_diffusers_pag_controlnet_image(sd_pair, monkeypatch):
    """diffusers' PAG ControlNet pipeline under accelerate (its PAG processors, set at each call, run beside our
    GroupNorm+SiLU and DDIM step): the image within the fp32 tolerance, restore gives it back exactly."""
    from _scheduler_parity import count_op_calls

    theirs, _ = sd_pair
    before = _run(theirs, **_inputs("sd"))
    diffusion_fast.accelerate(theirs)
    try:
        steps = count_op_calls(monkeypatch, "ddim_step")
        norms = count_op_calls(monkeypatch, "_group_norm_silu")
        assert np.abs(_run(theirs, **_inputs("sd")) - before).max() <= PIPELINE_FP32_MAX_ABS
        assert len(steps) == STEPS and len(norms) > 0
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs, **_inputs("sd")), before)


# ---- the CLI -------------------------------------------------------------------------------------------------------
def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("how", ["flags", "pag-controlnet-folder"])
def test_generate_controlnet_with_pag_gives_diffusers_image(sd_pair, tmp_path, capsys, how):
    """``generate --controlnet NET --control-image IMG --pag-scale 3`` on a plain folder, and a PAG ControlNet folder
    with its own net and --control-image alone: diffusers' PAG ControlNet image, within one 8-bit level."""
    from PIL import Image

    from diffusion_fast.cli import main

    theirs, _ = sd_pair
    folder = tmp_path / "plain"
    theirs.controlnet.save_pretrained(tmp_path / "net")
    control = Image.fromarray((CONTROL[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    control.save(tmp_path / "edges.png")
    if how == "flags":  # a plain SD folder (diffusers' SD pipeline on the same components), the net and PAG given
        import diffusers

        parts = {k: v for k, v in theirs.components.items() if k != "controlnet"}
        diffusers.StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(folder)
        argv = ["--model", str(folder), "--controlnet", str(tmp_path / "net"), "--pag-scale", "3"]
    else:
        argv = ["--model", theirs._saved_to]
    out = tmp_path / "out.png"
    assert main(["generate", *argv, "--control-image", str(tmp_path / "edges.png"), "--steps", str(STEPS),
                 "--seed", "2", "--output", str(out), "--no-progress"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    expected = theirs("a photograph of an astronaut riding a horse", image=Image.open(tmp_path / "edges.png"),
                      num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2), pag_scale=3.0).images[0]
    assert np.abs(_png(out) - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_pag_with_a_controlnet_kind_diffusers_lacks_is_one_line(sd_pair, tmp_path, capsys):
    """SD ControlNet image-to-image has no PAG pipeline in diffusers: --pag-scale there is refused in one line."""
    from PIL import Image

    from diffusion_fast.cli import main

    theirs, _ = sd_pair
    theirs.controlnet.save_pretrained(tmp_path / "net")
    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "edges.png")
    assert main(["generate", "--model", theirs._saved_to, "--controlnet", str(tmp_path / "net"),
                 "--control-image", str(tmp_path / "edges.png"), "--image", str(tmp_path / "edges.png"),
                 "--pag-scale", "3", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not with this --controlnet run (StableDiffusionControlNetImg2ImgPipeline)" in err and \
        "Traceback" not in err, err


def test_check_runs_a_pag_controlnet_folder(sd_pair, capsys, monkeypatch):
    """``check`` on a PAG ControlNet folder compares whole runs with PAG and the net; a fast path that drops the
    perturbation fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main
    from diffusion_fast.pipeline_pag import PAGGuidance

    assert main(["check", "--model", sd_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "PAG ControlNet pipeline (2 DDIM steps" in text and "0 failed" in text, text
    real = PAGGuidance._unet_call

    def fast_without_perturbation(self, *args, **kwargs):
        if current_backend() == "reference":
            return real(self, *args, **kwargs)
        return super(PAGGuidance, self)._unet_call(*args, **kwargs)

    monkeypatch.setattr(PAGGuidance, "_unet_call", fast_without_perturbation)
    assert main(["check", "--model", sd_pair[0]._saved_to, "--steps", "2"]) == 1
