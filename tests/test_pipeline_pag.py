"""Perturbed-attention guidance: our StableDiffusionPAGPipeline and StableDiffusionXLPAGPipeline against diffusers'
on tiny models written by save_pretrained and loaded by load_pipeline.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, scales, applied layers and weights. Each comparison also checks that PAG moves the image (against a PAG scale
of 0), so a perturbation that never reaches the UNet, or a combine without its PAG term, cannot pass.
"""
import numpy as np
import pytest
import torch

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, use_fake_graphs
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline, tiny
from diffusion_fast.models import UNet2DConditionModel
from diffusion_fast.models.attention import Attention

STEPS = 4


def _saved(theirs, folder, cls):
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, cls)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.fixture(scope="module")
def pag_pair(tmp_path_factory):
    return _saved(_tiny_diffusers.pag_pipeline(), tmp_path_factory.mktemp("tiny-pag"), StableDiffusionPAGPipeline)


@pytest.fixture(scope="module")
def pag_xl_pair(tmp_path_factory):
    return _saved(_tiny_diffusers.pag_pipeline(xl=True), tmp_path_factory.mktemp("tiny-pag-xl"),
                  StableDiffusionXLPAGPipeline)


CALL = _tiny_diffusers.Comparison(prompt="a red cube", num_inference_steps=STEPS)
_run = CALL.run


def _assert_as_diffusers(theirs, ours, backend_name="fast", **kwargs):
    b = CALL.as_diffusers(theirs, ours, backend_name, **kwargs)
    assert CALL.moved(_run(ours, backend_name, **dict(kwargs, pag_scale=0.0)), b)  # PAG matters
    return b


def _set_layers(pipes, layers):
    for pipe in pipes:
        pipe.set_pag_applied_layers(layers)


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: pag_scale 3, guidance 7.5 (uncond, text and perturbed rows)
    {"guidance_scale": 1.0, "pag_scale": 5.0},  # PAG alone: text and perturbed rows
    {"pag_scale": 6.0, "pag_adaptive_scale": 0.01},  # the scale falls with the timestep: 3.5, 1, then clamped at 0
    {"guidance_rescale": 0.7, "negative_prompt": "blurry", "num_images_per_prompt": 2},
], ids=["defaults", "no-cfg", "adaptive", "rescale-negative-batch"])
def test_pag_matches_diffusers(pag_pair, kwargs):
    _assert_as_diffusers(*pag_pair, **kwargs)


def test_adaptive_scale_is_diffusers(pag_pair):
    """The PAG scale per timestep: pag_scale - adaptive * (1000 - t), at least 0, as diffusers' _get_pag_scale (the
    tiny model's images barely move at the low timesteps where the clamp acts, so it is compared directly)."""
    theirs, ours = pag_pair
    theirs._pag_scale, theirs._pag_adaptive_scale = 6.0, 0.01
    ours._pag_run = ({}, 6.0, 0.01)
    try:
        for t in torch.tensor([999, 751, 501, 251, 1]):
            assert float(ours._pag_scale_at(t)) == float(theirs._get_pag_scale(t))
    finally:
        ours._pag_run = None
    assert float(theirs._get_pag_scale(torch.tensor(1))) == 0.0  # (the clamp acted)


def test_pag_reference_backend_matches_diffusers(pag_pair):
    _assert_as_diffusers(*pag_pair, backend_name="reference")


@pytest.mark.parametrize("layers", [
    ["down_blocks.0", "up_blocks.1.attentions.2"],  # several regexes, a block and one attention
    "blocks.1",  # matches up_blocks.1 (and no down block of this UNet's: its down_blocks.1 has no attention)
], ids=["list", "regex"])
def test_applied_layers_match_diffusers(pag_pair, layers):
    theirs, ours = pag_pair
    _set_layers(pag_pair, layers)
    try:
        _assert_as_diffusers(theirs, ours)
    finally:
        _set_layers(pag_pair, "mid")


def test_pag_with_another_scheduler_matches_diffusers(pag_pair):
    """Euler ancestral: the step draws from the generator after the PAG combine."""
    theirs, ours = pag_pair
    with _tiny_diffusers.swapped_schedulers("EulerAncestralDiscreteScheduler", [theirs], [ours]):
        _assert_as_diffusers(theirs, ours)


@pytest.mark.parametrize("kwargs", [{}, {"guidance_scale": 1.0}], ids=["cfg", "no-cfg"])
def test_sdxl_pag_matches_diffusers(pag_xl_pair, kwargs):
    """SDXL: the pooled text embeddings and time ids get the perturbed copy too."""
    _assert_as_diffusers(*pag_xl_pair, **kwargs)


def test_pag_with_an_ip_adapter_matches_diffusers(pag_pair, tmp_path):
    """An IP-Adapter's image tokens get the perturbed copy (the prompt's rows once more), as diffusers builds them."""
    theirs, ours = pag_pair
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with _tiny_diffusers.ip_adapter_loaded(pag_pair, tmp_path, theirs.unet):
        b = _assert_as_diffusers(theirs, ours, ip_adapter_image=image)
        ours.set_ip_adapter_scale(0.0)
        assert np.abs(_run(ours, ip_adapter_image=image) - b).max() > 0.005  # the image prompt matters


def test_pag_scale_zero_is_the_sd_pipeline(pag_pair):
    """With pag_scale 0 (or no layers) nothing is perturbed: the SD pipeline's image, bit for bit."""
    theirs, ours = pag_pair
    plain = diffusion_fast.StableDiffusionPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer,
                                                   ours.scheduler)
    plain.set_progress_bar_config(disable=True)
    assert np.array_equal(_run(ours, pag_scale=0.0), _run(plain))
    _set_layers([ours], [])
    try:
        assert np.array_equal(_run(ours), _run(plain))
    finally:
        _set_layers([ours], "mid")


# ---- image-to-image and inpainting ---------------------------------------------------------------------------------
_rng = np.random.default_rng(0)
IMAGE = torch.from_numpy(_rng.random((1, 3, 40, 48), dtype=np.float32))  # in [0, 1]; 40x48: not square
MASK = torch.zeros(1, 1, 40, 48)
MASK[:, :, 8:30, 10:40] = 1.0


def _image_pair(kind, pag_pair, pag_xl_pair, folder):
    """diffusers' PAG image-to-image or inpainting pipeline of ``kind`` on the tiny components (an inpainting
    ``kind`` ending in 9 gets a 9-channel UNet), saved, and ours loaded from the folder."""
    import diffusers
    from diffusion_fast import pipeline_pag

    xl = kind.startswith("xl")
    components = dict((pag_xl_pair if xl else pag_pair)[0].components)
    if kind.endswith("9"):
        torch.manual_seed(11)
        components["unet"] = diffusers.UNet2DConditionModel(**dict(tiny.unet_config("sd1"), in_channels=9))
    name = f"StableDiffusion{'XL' if xl else ''}PAG{'Inpaint' if 'inpaint' in kind else 'Img2Img'}Pipeline"
    extra = {} if xl else {"requires_safety_checker": False}
    theirs = getattr(diffusers, name)(**components, pag_applied_layers="mid", **extra)
    return _saved(theirs, folder, getattr(pipeline_pag, name))


@pytest.mark.parametrize("kind", ["img2img", "inpaint-9", "inpaint-4", "xl-img2img", "xl-inpaint-4"])
def test_pag_image_to_image_and_inpainting_match_diffusers(kind, pag_pair, pag_xl_pair, tmp_path):
    """The perturbed copy of an inpainting UNet's mask and masked image too (9 channels); a plain UNet's blend keeps
    the mask of the batch itself."""
    theirs, ours = _image_pair(kind, pag_pair, pag_xl_pair, tmp_path)
    kwargs = dict(image=IMAGE, strength=0.75)
    if "inpaint" in kind:
        kwargs.update(mask_image=MASK, height=40, width=48)
    _assert_as_diffusers(theirs, ours, **kwargs)
    _assert_as_diffusers(theirs, ours, guidance_scale=1.0, **kwargs)  # PAG alone


# ---- the perturbation itself --------------------------------------------------------------------------------------
def test_perturbed_rows_attend_to_themselves_alone():
    """Attention.perturbed_rows: the batch's last rows output their values (projected), as diffusers' identity
    processors do; the other rows are untouched; the setting is put back after each call of the pipeline."""
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(3, 7, 16)
    full = attn(x)
    attn.perturbed_rows = 1
    out = attn(x)
    torch.testing.assert_close(out[:2], full[:2])
    torch.testing.assert_close(out[2:], attn.to_out[0](attn.to_v(x[2:])))


def test_only_the_applied_layers_are_perturbed_during_the_call(pag_pair, monkeypatch):
    _, ours = pag_pair
    seen = []
    real = Attention.forward

    def spy(self, hidden_states, encoder_hidden_states=None):
        if self.perturbed_rows:
            seen.append(self)
        return real(self, hidden_states, encoder_hidden_states)

    monkeypatch.setattr(Attention, "forward", spy)
    _run(ours, num_inference_steps=1)
    mid = ours.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")
    assert seen == [mid] and mid.perturbed_rows == 0


def test_graphed_unet_call_gives_the_eager_image_and_follows_the_layers(pag_pair, monkeypatch):
    """On CUDA the UNet call replays from a graph with the perturbation captured in it; capture stood in for on the
    CPU. Another layer set, or another batch, gets a fresh graph rather than replaying the old perturbation."""
    _, ours = pag_pair
    eager = {}
    for layers in ("mid", "down_blocks.0"):
        _set_layers([ours], layers)
        eager[layers] = _run(ours)
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "unet")
    graphs = []
    try:
        for layers in ("mid", "down_blocks.0", "down_blocks.0"):
            _set_layers([ours], layers)
            assert np.array_equal(_run_fake_graphed(ours), eager[layers])
            graphs.append(ours._graphs["unet"])
        # (the stand-in replays the Python call, so a stale graph would not show in the image: the graphs must differ)
        assert graphs[0] is not graphs[1] and graphs[1] is graphs[2]
    finally:
        ours._graphs = None
        _set_layers([ours], "mid")


def _run_fake_graphed(pipe):
    """A run with the UNet-call graph's capture stood in for (use_fake_graphs on the graphs the run builds)."""
    real = type(pipe)._graphs_for_components

    def with_fake(self):
        graphs = real(self)
        if not hasattr(graphs["unet"], "captures"):
            use_fake_graphs(graphs["unet"])
        return graphs

    pipe._graphs_for_components = with_fake.__get__(pipe)
    try:
        out = _run(pipe)
        assert pipe._graphs["unet"].captures == 1
        return out
    finally:
        del pipe._graphs_for_components


def test_whole_step_graph_is_not_used_with_pag(pag_pair, monkeypatch):
    from diffusion_fast.pipeline import StableDiffusionPipeline as Base

    _, ours = pag_pair
    monkeypatch.setattr(Base, "_graph_mode", lambda self, device, eta: "step")
    ours._pag_run = ({}, 3.0, 0.0)
    try:
        assert ours._graph_mode(torch.device("cuda"), 0.0) == "unet"
    finally:
        ours._pag_run = None
    assert ours._graph_mode(torch.device("cuda"), 0.0) == "step"  # (PAG off: the SD pipeline's)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_pag_loop_matches_eager_on_gpu(pag_pair):
    """fp16 on CUDA: eager, capture and replay of the UNet call with the mid block perturbed."""
    pipe = diffusion_fast.load_pipeline(pag_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("a red cube", num_inference_steps=STEPS, output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "unet", 1)


# ---- refused clearly -----------------------------------------------------------------------------------------------
def test_pag_refuses_bad_inputs_naming_them(pag_pair):
    _, ours = pag_pair
    with pytest.raises(TypeError, match="pag_scale must be a finite float"):
        _run(ours, pag_scale="3")
    with pytest.raises(ValueError, match="pag_adaptive_scale must be >= 0"):
        _run(ours, pag_adaptive_scale=-0.1)
    with pytest.raises(ValueError, match="pag_applied_layers: 'nowhere' matches no self-attention of the UNet"):
        ours.set_pag_applied_layers(["mid", "nowhere"])
    with pytest.raises(ValueError, match=r"pag_applied_layers: 'up_blocks\[' is not a regular expression"):
        ours.set_pag_applied_layers("up_blocks[")
    with pytest.raises(TypeError, match="pag_applied_layers must be a str or a list of str"):
        ours.set_pag_applied_layers(3)
    assert ours.pag_applied_layers == ["mid"]  # (a refused setting changes nothing)
    lcm = UNet2DConditionModel.from_config(dict(ours.unet.config, time_cond_proj_dim=32))
    with pytest.raises(ValueError, match="time_cond_proj_dim .* PAG"):
        StableDiffusionPAGPipeline(lcm, ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)


# ---- the CLI -------------------------------------------------------------------------------------------------------
def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("how", ["plain-folder-with-flags", "pag-folder", "pag-folder-image-to-image"])
def test_generate_with_pag_gives_diffusers_image(pag_pair, pag_xl_pair, tmp_path, capsys, how):
    """--pag-scale / --pag-layers on a plain SD folder, or a folder diffusers saved its PAG pipeline in (its scale 3
    and "mid" by default), text-to-image or with --image: diffusers' PAG image from the same seed and weights, within
    one 8-bit level."""
    from PIL import Image

    from diffusion_fast.cli import main

    theirs, flags, layers, kwargs = pag_pair[0], [], "mid", {}
    folder = theirs._saved_to
    if how == "plain-folder-with-flags":  # the same weights as a plain SD pipeline's folder
        folder = str(tmp_path / "plain")
        _tiny_diffusers.saved_pipeline(folder, "sd1", seed=3)
        flags, layers = ["--pag-scale", "2.5", "--pag-layers", "down_blocks.0", "--pag-layers", "mid"], \
            ["down_blocks.0", "mid"]
    elif how == "pag-folder-image-to-image":
        Image.fromarray((IMAGE[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "in.png")
        flags = ["--image", str(tmp_path / "in.png"), "--strength", "0.75"]
        theirs = _image_pair("img2img", pag_pair, pag_xl_pair, tmp_path / "i2i")[0]
        kwargs = dict(image=Image.open(tmp_path / "in.png").convert("RGB"), strength=0.75)
    out = tmp_path / "out.png"
    assert main(["generate", "--model", folder, "--steps", str(STEPS), "--seed", "2", "--output", str(out),
                 "--no-progress", *flags]) == 0
    theirs.set_pag_applied_layers(layers)
    try:
        expected = theirs("a photograph of an astronaut riding a horse", num_inference_steps=STEPS,
                          pag_scale=2.5 if how.startswith("plain") else 3.0,
                          generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    finally:
        theirs.set_pag_applied_layers("mid")
    assert np.abs(_png(out) - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--pag-scale", "3", "--pag-layers", "nowhere"], "--pag-layers: pag_applied_layers: 'nowhere' matches no"),
    (["--pag-layers", "mid"], "--pag-layers and --pag-adaptive-scale go with --pag-scale"),
    (["--pag-scale", "-1"], "--pag-scale must be a finite number >= 0"),
], ids=["unknown-layer", "layers-alone", "negative"])
def test_generate_pag_bad_options_one_line(tmp_path, capsys, argv, message):
    import re

    from PIL import Image

    from diffusion_fast.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    argv = [str(tmp_path / "in.png") if a == "IN" else a for a in argv]
    assert main(["generate", "--steps", "1", "--no-progress", "--output", str(tmp_path / "o.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_pag_folder_with_a_controlnet_says_it_runs_without_pag(pag_pair, tmp_path, capsys):
    """A ControlNet image-to-image run (which diffusers has no PAG pipeline for) of a PAG folder goes without PAG,
    and says so."""
    from PIL import Image

    from diffusion_fast.cli import main

    torch.manual_seed(0)
    _tiny_diffusers.random_controlnet(pag_pair[0].unet).save_pretrained(tmp_path / "net")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "edges.png")
    assert main(["generate", "--model", pag_pair[0]._saved_to, "--controlnet", str(tmp_path / "net"),
                 "--control-image", str(tmp_path / "edges.png"), "--image", str(tmp_path / "edges.png"),
                 "--steps", "2", "--no-progress", "--output", str(tmp_path / "o.png")]) == 0
    assert "is a PAG pipeline: perturbed-attention guidance does not run with this kind of run" in \
        capsys.readouterr().out


def test_check_runs_a_pag_folder(pag_pair, capsys, monkeypatch):
    """``check`` on a PAG folder compares whole PAG runs; a fast path that drops the perturbation fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main
    from diffusion_fast.pipeline_pag import PAGGuidance

    assert main(["check", "--model", pag_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "PAG text-to-image pipeline (2 DDIM steps" in text and "0 failed" in text, text
    real = PAGGuidance._unet_call

    def fast_without_perturbation(self, *args, **kwargs):
        if current_backend() == "reference":
            return real(self, *args, **kwargs)
        return super(PAGGuidance, self)._unet_call(*args, **kwargs)

    monkeypatch.setattr(PAGGuidance, "_unet_call", fast_without_perturbation)
    assert main(["check", "--model", pag_pair[0]._saved_to, "--steps", "2"]) == 1


@pytest.mark.parametrize("kind", ["img2img", "inpaint-9"])
def test_check_runs_pag_image_folders(kind, pag_pair, pag_xl_pair, tmp_path, capsys):
    """A PAG image-to-image or inpainting folder: ``check`` gives it an image (and a mask) made from the seed."""
    from diffusion_fast.cli import main

    _image_pair(kind, pag_pair, pag_xl_pair, tmp_path)
    assert main(["check", "--model", str(tmp_path), "--steps", "2"]) == 0
    name = "PAG image-to-image" if kind == "img2img" else "PAG inpainting"
    text = capsys.readouterr().out
    assert f"{name} pipeline (2 DDIM steps" in text and "0 failed" in text, text


def test_an_unmirrored_pipeline_folder_loads_with_a_warning_not_silently(pag_pair, tmp_path):
    """A pipeline class diffusers saved that is not mirrored here (Attend-and-Excite, on SD's components) loads as
    our pipeline for its components, and says so."""
    import diffusers

    components = {k: v for k, v in pag_pair[0].components.items() if k != "image_encoder"}
    diffusers.StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False).save_pretrained(
        tmp_path)
    with pytest.warns(UserWarning, match="diffusers saved a StableDiffusionAttendAndExcitePipeline there, which is "
                                         "not mirrored here; loaded as StableDiffusionPipeline"):
        ours = diffusion_fast.load_pipeline(str(tmp_path))
    assert type(ours) is diffusion_fast.StableDiffusionPipeline
