"""InstructPix2Pix: our StableDiffusionInstructPix2PixPipeline against diffusers' on a tiny model written by
save_pretrained and loaded by load_pipeline (an 8-channel UNet, Euler ancestral as timbrooks/instruct-pix2pix ships),
and diffusers' pipeline under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image and weights. Each comparison also checks that both guidance scales and the image move the image, so a
three-way combine with a term dropped or swapped, or an image that never reaches the UNet, cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, assert_one_capture_for_new_inputs
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline, tiny
from diffusion_fast.models import UNet2DConditionModel
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS
from diffusion_fast.pipeline_img2img import preprocess_image

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# odd-sized on purpose: cut to 48x40 by the image processor, so the output is 48x40 (the image's size, not the UNet's)
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50, 3), dtype=np.uint8))
OTHER = Image.fromarray(np.random.default_rng(1).integers(0, 255, (42, 50, 3), dtype=np.uint8))
STEPS = 4


@pytest.fixture(scope="module")
def pix2pix_pair(tmp_path_factory):
    """diffusers' StableDiffusionInstructPix2PixPipeline on the tiny components, and ours loaded from its folder."""
    theirs = _tiny_diffusers.pix2pix_pipeline()
    folder = tmp_path_factory.mktemp("tiny-pix2pix")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusionInstructPix2PixPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


CALL = _tiny_diffusers.Comparison(prompt="make it snowy", image=IMAGE, num_inference_steps=STEPS)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: guidance 7.5, image guidance 1.5 (three-way guidance)
    {"guidance_scale": 3.0, "image_guidance_scale": 2.5, "negative_prompt": "blurry"},
    {"guidance_scale": 1.0},  # no guidance: the instruction with the image alone
    {"image_guidance_scale": 0.5},  # an image scale below 1 also turns guidance off, as in diffusers
], ids=["defaults", "scales-negative", "no-guidance", "image-scale-below-1"])
def test_pix2pix_matches_diffusers(pix2pix_pair, kwargs):
    theirs, ours = pix2pix_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    assert b.shape == (1, 40, 48, 3)  # the image's size cut to a multiple of 8
    assert _moved(_run(ours, **dict(kwargs, image=OTHER)), b)  # the image reaches the UNet
    if kwargs.get("guidance_scale", 7.5) > 1 and kwargs.get("image_guidance_scale", 1.5) >= 1:
        for scale in ("guidance_scale", "image_guidance_scale"):  # both terms of the combine matter
            assert _moved(_run(ours, **dict(kwargs, **{scale: kwargs.get(scale, 2.0) + 2.0})), b)


def test_pix2pix_reference_backend_matches_diffusers(pix2pix_pair):
    _assert_as_diffusers(*pix2pix_pair, backend_name="reference")


def test_batches_pair_prompts_and_images_as_diffusers(pix2pix_pair):
    """Two prompts, two images per prompt: one image serves all four; two images cycle through the batch
    (prompt a with images A, B; prompt b with A, B), as diffusers repeats them whole."""
    theirs, ours = pix2pix_pair
    prompts = ["make it snowy", "turn it into a painting"]
    b = _assert_as_diffusers(theirs, ours, prompt=prompts, num_images_per_prompt=2)
    assert b.shape[0] == 4 and _moved(b[0], b[1]) and _moved(b[0], b[2])  # fresh noise per image, per prompt
    two = _assert_as_diffusers(theirs, ours, prompt=prompts, image=[IMAGE, OTHER], num_images_per_prompt=2,
                               negative_prompt=["blurry", "dark"])
    assert _moved(two[1], b[1])  # the second row took the second image


def test_given_latents_embeddings_and_latent_image_as_diffusers(pix2pix_pair):
    """Starting latents, prompt embeddings in place of prompts, and the image given as 4-channel latents (taken as
    they are: not encoded, not scaled)."""
    theirs, ours = pix2pix_pair
    latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(5))
    _assert_as_diffusers(theirs, ours, latents=latents)
    embeds = ours._encode_text(["make it snowy"], ours.device)
    negative = ours._encode_text(["blurry"], ours.device)
    _assert_as_diffusers(theirs, ours, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    image_latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(6))
    out = _assert_as_diffusers(theirs, ours, image=image_latents)
    assert out.shape == (1, 40, 48, 3)


def test_image_latents_are_the_posterior_mode_unscaled(pix2pix_pair):
    """The image's latents the UNet sees: the VAE posterior's mode (the generator draws nothing for it), not
    multiplied by the scaling factor, as InstructPix2Pix was trained; with guidance, a zero image in the third row."""
    _, ours = pix2pix_pair
    seen = []
    ours_call = ours.unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(sample[:, 4:].clone())
        return ours_call(sample, *args, **kwargs)

    ours.unet.forward = spy
    try:
        _run(ours, num_inference_steps=1)
    finally:
        del ours.unet.forward
    mode = ours.vae.encode(preprocess_image(IMAGE, ours.vae_scale_factor, 4)).latent_dist.mode()
    torch.testing.assert_close(seen[0][:2], torch.cat([mode, mode]), rtol=1e-5, atol=1e-5)
    assert seen[0].shape[0] == 3 and torch.count_nonzero(seen[0][2]) == 0


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_other_schedulers_match_diffusers(pix2pix_pair, scheduler):
    """Our DDIM step (eta 0.5: its noise drawn from the generator) and Euler's, after the three-way combine."""
    theirs, ours = pix2pix_pair
    with _tiny_diffusers.swapped_schedulers(scheduler, [theirs], [ours]):
        _assert_as_diffusers(theirs, ours, **({"eta": 0.5} if scheduler == "DDIMScheduler" else {}))


def test_callback_reads_and_replaces_image_latents_as_diffusers(pix2pix_pair):
    """diffusers' callback tensors: the latents, the three-way prompt embeddings and the image's latents, the same
    as diffusers'; a replaced image latents is used by the next steps, in ours as in diffusers."""
    theirs, ours = pix2pix_pair
    names = ["latents", "prompt_embeds", "image_latents"]
    seen = {"theirs": [], "ours": []}

    def recorder(key):
        def callback(pipe, i, t, tensors):
            seen[key].append({k: tensors[k].clone() for k in names})
            return {"image_latents": tensors["image_latents"] * 4.0} if i == 0 else {}
        return callback

    a = _run(theirs, callback_on_step_end=recorder("theirs"), callback_on_step_end_tensor_inputs=names)
    b = _run(ours, callback_on_step_end=recorder("ours"), callback_on_step_end_tensor_inputs=names)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    assert len(seen["ours"]) == len(seen["theirs"]) == STEPS
    for x, y in zip(seen["theirs"], seen["ours"]):
        assert y["prompt_embeds"].shape[0] == 3 and y["image_latents"].shape[0] == 3
        for k in names:
            torch.testing.assert_close(y[k], x[k], rtol=1e-3, atol=1e-3)
    assert _moved(b, _run(ours))  # the scaled image latents were used


def test_graphed_unet_call_gives_the_eager_image(pix2pix_pair, monkeypatch):
    """On CUDA the UNet call replays from a graph with the image's latents among its inputs (a DDIM step is not
    graphed whole: the three-way combine is not the fused CFG step); capture stood in for on the CPU. Another image
    is a new input, not a new graph."""
    _, ours = pix2pix_pair
    assert_one_capture_for_new_inputs(ours, "unet", _run, [dict(image=IMAGE), dict(image=OTHER)], monkeypatch)


def test_whole_step_graph_is_not_used(pix2pix_pair, monkeypatch):
    """Where the SD pipeline graphs a DDIM step whole, this one graphs the UNet call alone."""
    from diffusion_fast.pipeline import StableDiffusionPipeline as Base

    _, ours = pix2pix_pair
    monkeypatch.setattr(Base, "_graph_mode", lambda self, device, eta: "step")
    assert ours._graph_mode(torch.device("cuda"), 0.0) == "unet"


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_pix2pix_loop_matches_eager_on_gpu(pix2pix_pair):
    """fp16 on CUDA: eager, capture and replay of the UNet call, the image's latents a graph input."""
    pipe = diffusion_fast.load_pipeline(pix2pix_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("make it snowy", image=IMAGE, num_inference_steps=STEPS,
                                              output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "unet", 1)


def test_accelerate_keeps_diffusers_pix2pix_image(pix2pix_pair, monkeypatch):
    """diffusers' pipeline under accelerate: our GroupNorm+SiLU in its resnets (the UNet's 8-channel input changes
    none of them) and our Euler ancestral step run, the image stays within the fp32 tolerance, restore gives it back
    exactly."""
    from _scheduler_parity import count_op_calls

    theirs, _ = pix2pix_pair
    before = _run(theirs)
    diffusion_fast.accelerate(theirs)
    try:
        steps = count_op_calls(monkeypatch, "euler_ancestral_step")
        norms = count_op_calls(monkeypatch, "_group_norm_silu")  # (the patches call the unchecked entry)
        assert np.abs(_run(theirs) - before).max() <= PIPELINE_FP32_MAX_ABS
        assert len(steps) == STEPS and len(norms) > 0
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs), before)


# ---- refused clearly -----------------------------------------------------------------------------------------------
def test_pix2pix_refuses_bad_inputs_naming_them(pix2pix_pair):
    _, ours = pix2pix_pair
    with pytest.raises(ValueError, match="image: give the image to edit"):
        ours("make it snowy")
    with pytest.raises(TypeError, match="image_guidance_scale must be a finite float"):
        _run(ours, image_guidance_scale="high")
    with pytest.raises(ValueError, match="image_guidance_scale must be >= 0"):
        _run(ours, image_guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 10, 12\)"):
        _run(ours, latents=torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="image has 3 images, which does not divide the batch of 2"):
        _run(ours, prompt=["a", "b"], image=[IMAGE, IMAGE, IMAGE])
    with pytest.raises(ValueError, match="image has 2 channels"):
        _run(ours, image=torch.rand(1, 2, 40, 48))
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs.*\['negative_prompt_embeds'\]"):
        _run(ours, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])


def test_unets_of_the_wrong_kind_are_refused_by_name(pix2pix_pair):
    _, ours = pix2pix_pair
    plain = UNet2DConditionModel.from_config(tiny.unet_config("sd1"))
    with pytest.raises(ValueError, match="unet has 4 input channels: an InstructPix2Pix UNet takes 8"):
        StableDiffusionInstructPix2PixPipeline(plain, ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)
    with pytest.raises(ValueError, match="unet has 8 input channels .* an InstructPix2Pix UNet, for "
                                         "diffusion_fast.StableDiffusionInstructPix2PixPipeline"):
        StableDiffusionPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)
    lcm = UNet2DConditionModel.from_config(dict(tiny.unet_config("sd1"), in_channels=8, time_cond_proj_dim=32))
    with pytest.raises(ValueError, match="time_cond_proj_dim .* two scales"):
        StableDiffusionInstructPix2PixPipeline(lcm, ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)


def test_ip_adapter_is_refused_not_ignored(pix2pix_pair, tmp_path):
    theirs, ours = pix2pix_pair
    with _tiny_diffusers.ip_adapter_loaded([ours], tmp_path, theirs.unet):
        with pytest.raises(ValueError, match="IP-Adapter: this pipeline does not run one"):
            _run(ours)
    _run(ours, num_inference_steps=1)  # (unloaded, it runs)


# ---- the CLI -------------------------------------------------------------------------------------------------------
def test_generate_edits_the_image_as_diffusers(pix2pix_pair, tmp_path, capsys):
    """``generate`` on an InstructPix2Pix folder with --image: diffusers' image from the same seed (its default
    guidance, the image guidance given), within one 8-bit level; the output is the image's size."""
    from diffusion_fast.cli import main

    theirs = pix2pix_pair[0]
    IMAGE.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--prompt",
                 "make it snowy", "--steps", str(STEPS), "--image-guidance-scale", "2", "--seed", "2", "--output",
                 str(out), "--no-progress", "--compare"]) == 0
    text = capsys.readouterr().out
    assert f"fast path:      {STEPS} steps" in text and "max abs pixel difference" in text, text
    expected = theirs("make it snowy", image=Image.open(tmp_path / "in.png").convert("RGB"), num_inference_steps=STEPS,
                      image_guidance_scale=2.0, generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    ([], "is an InstructPix2Pix model: give --image to edit"),
    (["--image", "IN", "--strength", "0.5"], "is an InstructPix2Pix model .*: it takes no --strength"),
    (["--image", "IN", "--mask", "IN", "--clip-skip", "0"], "it takes no --mask, --clip-skip"),
    (["--image", "IN", "--pag-scale", "3"],
     "perturbed-attention guidance runs .* not with .*StableDiffusionInstructPix2PixPipeline"),
], ids=["no-image", "strength", "mask-and-clip-skip", "pag"])
def test_generate_pix2pix_bad_options_one_line(pix2pix_pair, tmp_path, capsys, extra, message):
    import re

    from diffusion_fast.cli import main

    IMAGE.save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IN" else a for a in extra]
    assert main(["generate", "--model", pix2pix_pair[0]._saved_to, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_image_guidance_scale_is_refused_for_other_models(capsys):
    from diffusion_fast.cli import main

    assert main(["generate", "--image-guidance-scale", "1.5", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--image-guidance-scale is for an InstructPix2Pix model" in err and "Traceback" not in err, err


def test_check_runs_a_pix2pix_folder(pix2pix_pair, capsys, monkeypatch):
    """``check`` edits an image both ways and compares the UNet's first prediction with the image's latents beside
    the latents; a fast path that drops the image fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main

    assert main(["check", "--model", pix2pix_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "InstructPix2Pix pipeline (2 EulerAncestral steps" in text and "0 failed" in text, text
    real = StableDiffusionInstructPix2PixPipeline._unet_call

    def fast_without_image(self, model_input, t, embeds, image_latents, timestep_cond=None):
        keep = current_backend() == "reference"
        return real(self, model_input, t, embeds, image_latents if keep else torch.zeros_like(image_latents))

    monkeypatch.setattr(StableDiffusionInstructPix2PixPipeline, "_unet_call", fast_without_image)
    assert main(["check", "--model", pix2pix_pair[0]._saved_to, "--steps", "2"]) == 1


# ---- SDXL ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl_pix2pix_pair(tmp_path_factory):
    """diffusers' StableDiffusionXLInstructPix2PixPipeline on the tiny SDXL components, and ours from its folder."""
    from diffusion_fast import StableDiffusionXLInstructPix2PixPipeline

    theirs = _tiny_diffusers.sdxl_pix2pix_pipeline()
    folder = tmp_path_factory.mktemp("tiny-xl-pix2pix")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusionXLInstructPix2PixPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: guidance 5, image guidance 1.5, the UNet's default size (the image resized to it)
    # a negative prompt (no zeroed negative), another pair of scales, guidance rescale on the three-way prediction
    {"guidance_scale": 3.0, "image_guidance_scale": 2.5, "negative_prompt": "blurry", "guidance_rescale": 0.7},
    {"guidance_scale": 1.0},  # no guidance: the instruction with the image alone
    # the image resized to 40x48, two prompts (a second one for the second encoder) with two images each
    {"height": 40, "width": 48, "prompt": ["make it snowy", "make it a painting"],
     "prompt_2": ["in winter", "in oil"], "num_images_per_prompt": 2},
    {"original_size": (64, 64), "crops_coords_top_left": (4, 8), "target_size": (48, 48)},  # the time ids
], ids=["defaults", "scales-negative-rescale", "no-guidance", "size-batch", "time-ids"])
def test_sdxl_pix2pix_matches_diffusers(xl_pix2pix_pair, kwargs):
    theirs, ours = xl_pix2pix_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    side = (kwargs.get("height", 32), kwargs.get("width", 32))  # (SDXL_TINY's 8 latents x the VAE's 4)
    assert b.shape[1:3] == side
    assert _moved(_run(ours, **dict(kwargs, image=OTHER)), b)  # the image reaches the UNet
    if kwargs.get("guidance_scale", 5.0) > 1:
        for scale in ("guidance_scale", "image_guidance_scale"):
            assert _moved(_run(ours, **dict(kwargs, **{scale: kwargs.get(scale, 2.0) + 2.0})), b)


def test_sdxl_pix2pix_reference_backend_and_ddim_match_diffusers(xl_pix2pix_pair):
    theirs, ours = xl_pix2pix_pair
    _assert_as_diffusers(theirs, ours, backend_name="reference")
    with _tiny_diffusers.swapped_schedulers("DDIMScheduler", [theirs], [ours]):
        _assert_as_diffusers(theirs, ours, eta=0.5)


def test_cosxl_edit_scales_the_image_latents_as_diffusers(xl_pix2pix_pair):
    """is_cosxl_edit (CosXL Edit): the image's latents times the VAE's scaling factor; given to from_pretrained, as
    to diffusers' (its folder does not record it)."""
    from diffusion_fast import StableDiffusionXLInstructPix2PixPipeline

    theirs, plain = xl_pix2pix_pair
    ours = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(theirs._saved_to, is_cosxl_edit=True)
    ours.set_progress_bar_config(disable=True)
    theirs.is_cosxl_edit = True
    try:
        b = _assert_as_diffusers(theirs, ours)
    finally:
        theirs.is_cosxl_edit = False
    assert _moved(_run(plain), b)


def test_one_second_prompt_serves_every_prompt(xl_pix2pix_pair):
    """A str prompt_2 with a list of prompts is every prompt's second prompt (diffusers' SDXL pipelines fail there:
    their two encoders' batches differ)."""
    _, ours = xl_pix2pix_pair
    prompts = ["make it snowy", "make it a painting"]
    assert np.array_equal(_run(ours, prompt=prompts, prompt_2="in winter"),
                          _run(ours, prompt=prompts, prompt_2=["in winter", "in winter"]))


def test_sdxl_pix2pix_refuses_bad_inputs_naming_them(xl_pix2pix_pair):
    _, ours = xl_pix2pix_pair
    with pytest.raises(ValueError, match="image: give the image to edit"):
        ours("make it snowy")
    with pytest.raises(ValueError, match="image_guidance_scale must be >= 0"):
        _run(ours, image_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="prompt_embeds needs pooled_prompt_embeds too"):
        _run(ours, prompt=None, prompt_embeds=torch.randn(1, 77, 40))
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\)"):
        _run(ours, latents=torch.randn(1, 4, 10, 12))
    with pytest.raises(ValueError, match="unet has 8 input channels .* an InstructPix2Pix UNet, for "
                                         "diffusion_fast.StableDiffusionXLInstructPix2PixPipeline"):
        diffusion_fast.StableDiffusionXLPipeline(ours.unet, ours.vae, ours.text_encoder, ours.text_encoder_2,
                                                 ours.tokenizer, ours.tokenizer_2, ours.scheduler)


def test_generate_and_check_take_an_sdxl_pix2pix_folder(xl_pix2pix_pair, tmp_path, capsys):
    """``generate`` edits at the image's size (cut to the VAE's multiple; diffusers' call given that size) within one
    8-bit level of diffusers; ``check`` edits an image both ways, the UNet probe with SDXL's conditioning and the
    image's latents."""
    from diffusion_fast.cli import main

    theirs = xl_pix2pix_pair[0]
    IMAGE.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--prompt",
                 "make it snowy", "--steps", str(STEPS), "--seed", "2", "--output", str(out), "--no-progress"]) == 0
    expected = theirs("make it snowy", image=Image.open(tmp_path / "in.png").convert("RGB"), height=40, width=48,
                      num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    capsys.readouterr()
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "InstructPix2Pix pipeline (2 EulerAncestral steps" in text and "0 failed" in text, text


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_sdxl_pix2pix_loop_matches_eager_on_gpu(xl_pix2pix_pair):
    """fp16 on CUDA (the VAE's encode upcast to fp32 where its config asks): eager, capture and replay of the UNet
    call, SDXL's conditioning and the image's latents graph inputs."""
    pipe = diffusion_fast.load_pipeline(xl_pix2pix_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("make it snowy", image=IMAGE, num_inference_steps=STEPS,
                                              output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "unet", 1)


def test_accelerate_keeps_diffusers_sdxl_pix2pix_image(xl_pix2pix_pair, monkeypatch):
    from _scheduler_parity import count_op_calls

    theirs, _ = xl_pix2pix_pair
    before = _run(theirs)
    diffusion_fast.accelerate(theirs)
    try:
        steps = count_op_calls(monkeypatch, "euler_ancestral_step")
        assert np.abs(_run(theirs) - before).max() <= PIPELINE_FP32_MAX_ABS and len(steps) == STEPS
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs), before)
