"""The x4 upscaler: our StableDiffusionUpscalePipeline against diffusers' on a tiny model written by save_pretrained
and loaded by load_pipeline (a 7-channel UNet with a noise-level class embedding and only-cross attention, a VAE
that scales by 4, DDIM with v-prediction and a DDPM low-resolution scheduler, as stabilityai's upscaler ships), and
diffusers' pipeline under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image and weights. Each comparison also checks that the image, the prompt and the noise level move the image,
so an image that never reaches the UNet, or a noise level that is not its class label, cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, assert_one_capture_for_new_inputs
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionPipeline, StableDiffusionUpscalePipeline, tiny
from diffusion_fast.models import AutoencoderKL, UNet2DConditionModel
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# odd-sized on purpose: cut to 12x16 (a multiple of the VAE's scale 4) by the image processor, so the output is 48x64
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (13, 18, 3), dtype=np.uint8))
OTHER = Image.fromarray(np.random.default_rng(1).integers(0, 255, (13, 18, 3), dtype=np.uint8))
STEPS = 3


@pytest.fixture(scope="module")
def upscale_pair(tmp_path_factory):
    """diffusers' StableDiffusionUpscalePipeline on the tiny components, and ours loaded from its folder."""
    theirs = _tiny_diffusers.upscale_pipeline()
    folder = tmp_path_factory.mktemp("tiny-upscale")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusionUpscalePipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


CALL = _tiny_diffusers.Comparison(prompt="a cat on a sofa", image=IMAGE, num_inference_steps=STEPS)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: guidance 9, noise level 20
    {"guidance_scale": 4.0, "noise_level": 300, "negative_prompt": "blurry"},
    {"guidance_scale": 1.0},  # no guidance: the prompt's half alone
    {"noise_level": 0},  # the image as it is (the low-resolution scheduler adds nothing at level 0)
], ids=["defaults", "scale-level-negative", "no-guidance", "level-0"])
def test_upscale_matches_diffusers(upscale_pair, kwargs):
    theirs, ours = upscale_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    assert b.shape == (1, 48, 64, 3)  # 4x the image cut to 12x16
    assert _moved(_run(ours, **dict(kwargs, image=OTHER)), b)  # the image reaches the UNet
    assert _moved(_run(ours, **dict(kwargs, noise_level=kwargs.get("noise_level", 20) + 50)), b)  # the level too
    assert _moved(_run(ours, **dict(kwargs, prompt="a dog in the snow")), b)


def test_upscale_reference_backend_matches_diffusers(upscale_pair):
    _assert_as_diffusers(*upscale_pair, backend_name="reference")


def test_batches_pair_prompts_and_images_as_diffusers(upscale_pair):
    """Two prompts with their two images, two images per prompt: the images repeated whole per UNet row group, as
    diffusers repeats them (so with several images per prompt they cycle through the rows); fresh noise per image."""
    theirs, ours = upscale_pair
    prompts = ["a cat", "a dog"]
    b = _assert_as_diffusers(theirs, ours, prompt=prompts, image=[IMAGE, OTHER], negative_prompt=["blurry", "dark"])
    assert b.shape[0] == 2 and _moved(b[0], b[1])
    four = _assert_as_diffusers(theirs, ours, prompt=prompts, image=[IMAGE, OTHER], num_images_per_prompt=2)
    assert four.shape[0] == 4 and _moved(four[0], four[1])


def test_one_image_serves_every_prompt(upscale_pair):
    """One PIL image with two prompts (diffusers' pipeline fails there, its image rows short of the latents'): the
    image serves both, as the same image given twice would."""
    _, ours = upscale_pair
    one = _run(ours, prompt=["a cat", "a dog"], image=IMAGE)
    twice = _run(ours, prompt=["a cat", "a dog"], image=[IMAGE, IMAGE])
    assert one.shape == (2, 48, 64, 3) and np.array_equal(one, twice)


def test_given_latents_embeddings_and_tensor_images_as_diffusers(upscale_pair):
    """Starting latents, prompt embeddings in place of prompts, and the image as a tensor in [0, 1] and in [-1, 1]
    (taken as such, as diffusers' image processor takes it) and as a numpy batch."""
    theirs, ours = upscale_pair
    latents = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(5))
    _assert_as_diffusers(theirs, ours, latents=latents)
    embeds = ours._encode_text(["a cat on a sofa"], ours.device)
    negative = ours._encode_text(["blurry"], ours.device)
    _assert_as_diffusers(theirs, ours, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    pixels = torch.from_numpy(np.asarray(IMAGE, dtype=np.float32) / 255.0).permute(2, 0, 1)[None, :, :12, :16]
    zero_one = _assert_as_diffusers(theirs, ours, image=pixels)
    assert np.abs(_run(ours, image=pixels * 2 - 1) - zero_one).max() <= 1e-5
    _assert_as_diffusers(theirs, ours, image=pixels.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_other_schedulers_match_diffusers(upscale_pair, scheduler):
    """DDIM with eta 0.5 (its noise drawn from the generator after the image's and the latents') and Euler
    ancestral: the noised image and the latents drawn in diffusers' order."""
    theirs, ours = upscale_pair
    with _tiny_diffusers.swapped_schedulers(scheduler, [theirs], [ours]):
        _assert_as_diffusers(theirs, ours, **({"eta": 0.5} if scheduler == "DDIMScheduler" else {}))


def test_clip_skip_and_a_lora_at_a_call_scale_as_diffusers(upscale_pair, tmp_path):
    """clip_skip, and a kohya LoRA (on the only-cross attentions too) at cross_attention_kwargs' scale, as diffusers'
    upscale pipeline takes them; each moves the image."""
    from test_lora import _kohya_file

    theirs, ours = upscale_pair
    plain = _run(ours)
    if not hasattr(theirs.text_encoder, "text_model"):  # (diffusers 0.42 with transformers 5: see test_clip_skip)
        object.__setattr__(theirs.text_encoder, "text_model", theirs.text_encoder)
    assert _moved(_assert_as_diffusers(theirs, ours, clip_skip=1), plain)
    lora = _kohya_file(str(tmp_path / "upscaler-lora.safetensors"), theirs, rank=2)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(lora)
    try:
        assert _moved(_assert_as_diffusers(theirs, ours, cross_attention_kwargs={"scale": 0.5}), plain)
    finally:
        for pipe in (theirs, ours):
            pipe.unload_lora_weights()
    assert np.array_equal(_run(ours), plain)


def test_unet_sees_the_noised_image_and_the_level(upscale_pair):
    """What the UNet gets beside the latents: the image noised by the low-resolution scheduler to the level, the
    same in both CFG rows, with the level as each row's class label."""
    from diffusion_fast.pipeline_img2img import preprocess_image
    from diffusion_fast.schedulers.common import randn_tensor

    _, ours = upscale_pair
    seen = []
    ours_call = ours.unet.forward

    def spy(sample, *args, class_labels=None, **kwargs):
        seen.append((sample[:, 4:].clone(), class_labels.clone()))
        return ours_call(sample, *args, class_labels=class_labels, **kwargs)

    ours.unet.forward = spy
    try:
        _run(ours, num_inference_steps=1, noise_level=123)
    finally:
        del ours.unet.forward
    image, labels = seen[0]
    pixels = preprocess_image(IMAGE, 4, None, resample="bicubic")
    noise = randn_tensor(pixels.shape, generator=torch.Generator().manual_seed(3))
    expected = ours.low_res_scheduler.add_noise(pixels, noise, torch.tensor([123]))
    torch.testing.assert_close(image, torch.cat([expected, expected]), rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [123, 123]


def test_callback_reads_and_replaces_latents(upscale_pair):
    """diffusers' upscale pipeline has only the old callback; ours takes callback_on_step_end as our other
    pipelines do: the latents each step (4x smaller than the output), a replacement used."""
    _, ours = upscale_pair
    shapes = []

    def callback(pipe, i, t, tensors):
        shapes.append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] * 0.0} if i == STEPS - 1 else {}

    out = _run(ours, callback_on_step_end=callback)
    assert shapes == [(1, 4, 12, 16)] * STEPS
    assert _moved(out, _run(ours))


def test_whole_step_graph_gives_the_eager_image(upscale_pair, monkeypatch):
    """On CUDA a DDIM step replays whole from one graph (the two-way CFG combine is the fused step's), with the image
    and the noise level among its inputs; capture stood in for on the CPU. Another image or level is a new input, not
    a new graph."""
    _, ours = upscale_pair
    cases = [dict(image=IMAGE), dict(image=OTHER), dict(image=IMAGE, noise_level=200)]
    assert_one_capture_for_new_inputs(ours, "step", _run, cases, monkeypatch)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_upscale_loop_matches_eager_on_gpu(upscale_pair):
    """fp16 on CUDA: eager, capture and replay of the whole DDIM step, the image and level graph inputs."""
    pipe = diffusion_fast.load_pipeline(upscale_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("a cat", image=IMAGE, num_inference_steps=STEPS, output_type="latent",
                                              generator=torch.Generator(DEVICE).manual_seed(3)).images, "step", 1)


def test_fp16_vae_decodes_upcast_and_is_put_back(upscale_pair):
    """An fp16 VAE with force_upcast decodes in fp32, as diffusers' upscale pipeline does, and stays fp16."""
    _, ours = upscale_pair
    vae = AutoencoderKL.from_config(dict(ours.vae.config)).to(torch.float16)
    vae.load_state_dict(ours.vae.state_dict())
    pipe = StableDiffusionUpscalePipeline.from_pipe(ours, vae=vae)
    fp32 = AutoencoderKL.from_config(dict(ours.vae.config))  # (the same fp16-rounded weights, in fp32)
    fp32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe._decode(latents)
        expected = fp32.decode(latents / 0.08333)
    assert out.dtype == torch.float32 and vae.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_accelerate_keeps_diffusers_upscale_image(upscale_pair, monkeypatch):
    """diffusers' pipeline under accelerate: our GroupNorm+SiLU in its resnets, our attention in its only-cross and
    ordinary blocks (asked for: on the CPU "auto" leaves diffusers' SDPA), and our fused DDIM step run; the image
    stays within the fp32 tolerance and restore gives it back exactly."""
    from _scheduler_parity import count_op_calls

    theirs, _ = upscale_pair
    before = _run(theirs)
    diffusion_fast.accelerate(theirs, attention=True)
    try:
        steps = count_op_calls(monkeypatch, "ddim_step")
        norms = count_op_calls(monkeypatch, "_group_norm_silu")  # (the patches call the unchecked entry)
        attentions = count_op_calls(monkeypatch, "_attention")
        assert np.abs(_run(theirs) - before).max() <= PIPELINE_FP32_MAX_ABS
        assert len(steps) == STEPS and len(norms) > 0 and len(attentions) > 0
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs), before)


# ---- refused clearly -----------------------------------------------------------------------------------------------
def test_upscale_refuses_bad_inputs_naming_them(upscale_pair):
    _, ours = upscale_pair
    with pytest.raises(ValueError, match="image: give the low-resolution image"):
        ours("a cat")
    for level in (351, -1):
        with pytest.raises(ValueError, match=r"noise_level must be in \[0, 350\]"):
            _run(ours, noise_level=level)
    for level in (20.0, True, "20"):
        with pytest.raises(TypeError, match="noise_level must be an int"):
            _run(ours, noise_level=level)
    with pytest.raises(ValueError, match="image has 3 images for 2 prompts"):
        _run(ours, prompt=["a", "b"], image=[IMAGE, IMAGE, IMAGE])
    with pytest.raises(ValueError, match="image has 4 channels: an RGB image"):
        _run(ours, image=torch.rand(1, 4, 12, 16))
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 12, 16\)"):
        _run(ours, latents=torch.randn(1, 4, 8, 8))


def test_unets_and_schedulers_of_the_wrong_kind_are_refused_by_name(upscale_pair):
    _, ours = upscale_pair
    parts = (ours.vae, ours.text_encoder, ours.tokenizer, ours.scheduler)
    plain = UNet2DConditionModel.from_config(tiny.unet_config("sd2"))
    with pytest.raises(ValueError, match="unet has 4 input channels: an x4 upscaler UNet takes 7"):
        StableDiffusionUpscalePipeline(plain, *parts, ours.low_res_scheduler)
    unlabelled = UNet2DConditionModel.from_config(dict(tiny.unet_config("sd2"), in_channels=7))
    with pytest.raises(ValueError, match="unet has no class embedding"):
        StableDiffusionUpscalePipeline(unlabelled, *parts, ours.low_res_scheduler)
    with pytest.raises(TypeError, match="low_res_scheduler must be a scheduler with add_noise"):
        StableDiffusionUpscalePipeline(ours.unet, *parts, None)
    with pytest.raises(ValueError, match="unet has 7 input channels .* an x4 upscaler UNet, for diffusion_fast.StableDiffusionUpscalePipeline"):
        StableDiffusionPipeline(ours.unet, *parts)


def test_a_vae_of_another_scaling_factor_is_announced(upscale_pair):
    """diffusers' upscale pipeline imposes the upscaler's latent scale 0.08333 on any VAE (with a deprecation
    message): so does ours, with a warning, and its image stays diffusers'."""
    theirs, ours = upscale_pair
    vae = AutoencoderKL.from_config(dict(ours.vae.config, scaling_factor=0.18215))
    vae.load_state_dict(ours.vae.state_dict())
    with pytest.warns(UserWarning, match="scaling_factor is 0.18215; the x4 upscaler's latents use 0.08333"):
        pipe = StableDiffusionUpscalePipeline.from_pipe(ours, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    _assert_as_diffusers(theirs, pipe)


def test_ip_adapter_is_refused_not_ignored(upscale_pair, tmp_path):
    theirs, ours = upscale_pair
    with _tiny_diffusers.ip_adapter_loaded([ours], tmp_path, theirs.unet):
        with pytest.raises(ValueError, match="IP-Adapter: diffusers' upscale pipeline takes none"):
            _run(ours)
    _run(ours, num_inference_steps=1)  # (unloaded, it runs)


# ---- the CLI -------------------------------------------------------------------------------------------------------
def test_generate_upscales_the_image_as_diffusers(upscale_pair, tmp_path, capsys):
    """``generate`` on an upscaler folder with --image: diffusers' image from the same seed (its default guidance,
    the noise level given), within one 8-bit level; the output is 4x the image."""
    from diffusion_fast.cli import main

    theirs = upscale_pair[0]
    IMAGE.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--prompt", "a cat",
                 "--steps", str(STEPS), "--noise-level", "40", "--seed", "2", "--output", str(out), "--no-progress",
                 "--compare"]) == 0
    text = capsys.readouterr().out
    assert f"fast path:      {STEPS} steps" in text and "max abs pixel difference" in text, text
    expected = theirs("a cat", image=Image.open(tmp_path / "in.png").convert("RGB"), num_inference_steps=STEPS,
                      noise_level=40, generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (48, 64, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    ([], "is an x4 upscaler: give --image to upscale"),
    (["--image", "IN", "--strength", "0.5", "--mask", "IN"], r"is an x4 upscaler .*: it takes no --mask, --strength"),
    (["--image", "IN", "--noise-level", "351"], r"--noise-level must be in \[0, 350\]"),
    (["--image", "IN", "--pag-scale", "3"], "perturbed-attention guidance runs .* not with .*StableDiffusionUpscalePipeline"),
], ids=["no-image", "strength-mask", "level", "pag"])
def test_generate_upscale_bad_options_one_line(upscale_pair, tmp_path, capsys, extra, message):
    import re

    from diffusion_fast.cli import main

    IMAGE.save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IN" else a for a in extra]
    assert main(["generate", "--model", upscale_pair[0]._saved_to, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_noise_level_is_refused_for_other_models(capsys):
    from diffusion_fast.cli import main

    assert main(["generate", "--noise-level", "20", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--noise-level is for an x4 upscaler" in err and "Traceback" not in err, err


def test_check_runs_an_upscaler_folder(upscale_pair, capsys, monkeypatch):
    """``check`` upscales an image both ways and compares the UNet's first prediction with the image and noise level
    beside the latents; a fast path that drops the noise level's label fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main

    assert main(["check", "--model", upscale_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "x4 upscaler pipeline (2 DDIM steps" in text and "0 failed" in text, text
    real = StableDiffusionUpscalePipeline._unet_call

    def fast_without_level(self, model_input, t, embeds, image, noise_level, timestep_cond=None):
        keep = current_backend() == "reference"
        return real(self, model_input, t, embeds, image, noise_level if keep else torch.zeros_like(noise_level))

    monkeypatch.setattr(StableDiffusionUpscalePipeline, "_unet_call", fast_without_level)
    assert main(["check", "--model", upscale_pair[0]._saved_to, "--steps", "2"]) == 1
