"""Our StableDiffusionXLPipeline against diffusers' on a tiny SDXL-shaped model written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed
and weights, on both the fast and the reference path (as for SD 1.x/2.x).
"""
import json

import numpy as np
import pytest
import torch
from _fake_graphs import use_fake_graphs
from conftest import DEVICE, ON_GPU

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusionXLPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

# diffusers' Euler and DPM-Solver call np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    _tiny_diffusers.sdxl_pipeline(seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(folder):
    """(diffusers' StableDiffusionXLPipeline, ours) on the same saved weights."""
    from diffusers import StableDiffusionXLPipeline as Theirs

    theirs = Theirs.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    ours = diffusion_fast.load_pipeline(folder)  # picks the SDXL class by the folder
    assert type(ours) is StableDiffusionXLPipeline
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


def _both(pair, backend_name="fast", **kwargs):
    theirs, ours = pair
    kwargs = dict(dict(num_inference_steps=3, output_type="np"), **kwargs)
    a = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    with diffusion_fast.backend(backend_name):
        b = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert a.shape == b.shape
    return np.abs(a - b).max()


@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    dict(prompt="a red cube"),  # no negative prompt: zero negative embeddings (force_zeros_for_empty_prompt)
    dict(prompt="a red cube", negative_prompt="blurry", negative_prompt_2="dark"),
    # two prompts, two images each, a second prompt per encoder; a non-square 48x64 image
    dict(prompt=["a cat", "a dog"], prompt_2=["red", "blue"], num_images_per_prompt=2, height=48, width=64),
    dict(prompt="a red cube", guidance_scale=1.0),  # no guidance: batch 1 through the UNet
    dict(prompt="a red cube", guidance_scale=9.0, guidance_rescale=0.7),  # not the fused CFG+DDIM step then
    # the size conditioning: every time id, and a negative one of its own
    dict(prompt="a red cube", original_size=(96, 64), crops_coords_top_left=(8, 16), target_size=(40, 24),
         negative_original_size=(16, 16), negative_target_size=(64, 64), negative_crops_coords_top_left=(4, 0)),
]))
def test_same_image_as_diffusers(pair, backend_name, kwargs):
    assert _both(pair, backend_name, **kwargs) <= PIPELINE_FP32_MAX_ABS


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")  # diffusers' DPM2, DEIS
@pytest.mark.parametrize("scheduler, cfg", [
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),  # as SDXL ships it
    ("EulerAncestralDiscreteScheduler", {}),  # noise every step, from the generator
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DDIMScheduler", {}),  # with eta: DDIM's noise
    ("DPMSolverMultistepScheduler", dict(timesteps=[999, 845, 730, 587, 443, 310, 193, 116, 53, 13])),  # SDXL's AYS
    ("KDPM2AncestralDiscreteScheduler", dict(use_karras_sigmas=True)),  # the UNet at the midpoints, SDXL's ids too
    ("DEISMultistepScheduler", {}),
    ("TCDScheduler", {}),  # with eta: TCD's noise
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++")),  # noise at every call
    ("EDMDPMSolverMultistepScheduler", {}),  # Playground v2.5's: c_in-scaled input, c_noise timesteps (floats < 0)
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", sigma_schedule="exponential")),
    # CosXL's: v-prediction, sigma_data 1, exponential sigmas up to 120
    ("EDMEulerScheduler", dict(prediction_type="v_prediction", sigma_data=1.0, sigma_max=120.0,
                               sigma_schedule="exponential")),
])
def test_other_schedulers_same_image_as_diffusers(pair, scheduler, cfg):
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        cfg = dict(cfg)  # (the parameter's own dict stays as it is)
        schedule = {"timesteps": cfg.pop("timesteps")} if "timesteps" in cfg else {"num_inference_steps": 4}
        theirs.scheduler = getattr(diffusers, scheduler).from_config(saved[0].config, **cfg)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        extra = {"eta": 0.6} if scheduler in ("DDIMScheduler", "TCDScheduler") else {}
        assert _both(pair, prompt="a red cube", **schedule, **extra) <= PIPELINE_FP32_MAX_ABS
    finally:
        theirs.scheduler, ours.scheduler = saved


def test_freeu_same_image_as_diffusers(pair):
    """enable_freeu on SDXL (its recommended factors): diffusers' image, and another than without."""
    kwargs = dict(prompt="a red cube", num_inference_steps=3, output_type="np")
    plain = pair[1](generator=torch.Generator().manual_seed(3), **kwargs).images
    try:
        for pipe in pair:
            pipe.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)
        assert _both(pair, prompt="a red cube") <= PIPELINE_FP32_MAX_ABS
        freeu = pair[1](generator=torch.Generator().manual_seed(3), **kwargs).images
    finally:
        for pipe in pair:
            pipe.disable_freeu()
    assert np.abs(freeu - plain).max() > 0.02


def test_step_callback_sees_and_replaces_the_added_conditioning(pair):
    # diffusers' SDXL names: the callback replaces add_time_ids at step 1 (both pipelines use the new ids after it)
    def callback(pipe, i, t, tensors):
        assert sorted(tensors) == ["add_text_embeds", "add_time_ids", "latents", "prompt_embeds"]
        return {"add_time_ids": tensors["add_time_ids"] * 2} if i == 1 else {}

    inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    assert _both(pair, prompt="a red cube", num_inference_steps=4, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=inputs) <= PIPELINE_FP32_MAX_ABS


def test_diffusers_sdxl_cfg_cutoff_callback_as_diffusers(pair):
    """diffusers' SDXLCFGCutoffCallback cuts the embeddings, pooled embeddings and time ids to the prompt's rows and
    turns guidance off at its step: the same image as diffusers'."""
    from diffusers.callbacks import SDXLCFGCutoffCallback

    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
    assert _both(pair, prompt="a red cube", negative_prompt="blur", num_inference_steps=5,
                 callback_on_step_end=cutoff) <= PIPELINE_FP32_MAX_ABS
    assert pair[1].guidance_scale == 0.0 and pair[1].num_timesteps == 5


def test_the_run_begins_at_index_zero_as_diffusers_sdxl(pair, monkeypatch):
    # diffusers' SDXL pipeline calls set_begin_index(0) (its SD pipeline does not): the first step then reads no
    # timestep to find its index, which also matters where the first timestep appears twice in a schedule
    _, ours = pair
    saved = ours.scheduler
    ours.scheduler = diffusion_fast.schedulers.EulerDiscreteScheduler.from_config(saved.config)
    begins = []
    real = ours.scheduler.set_begin_index
    monkeypatch.setattr(ours.scheduler, "set_begin_index", lambda i=0: begins.append(i) or real(i))
    monkeypatch.setattr(ours.scheduler, "index_for_timestep", lambda *a: pytest.fail("looked up the timestep"))
    try:
        ours("a", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        ours.scheduler = saved
    assert begins == [0]


def test_negative_prompt_encoded_when_the_folder_does_not_force_zeros(pair, folder, tmp_path):
    theirs, _ = pair
    index = json.loads((folder / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True  # what we read from the folder
    ours = StableDiffusionXLPipeline.from_pretrained(folder)
    ours.force_zeros_for_empty_prompt = False
    theirs.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        assert _both((theirs, ours), prompt="a red cube") <= PIPELINE_FP32_MAX_ABS  # "" through both encoders
    finally:
        theirs.register_to_config(force_zeros_for_empty_prompt=True)


def test_prompt_embeds_given(pair):
    theirs, ours = pair
    embeds, negative, pooled, negative_pooled = theirs.encode_prompt("a cat", device="cpu", negative_prompt="dog")
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=negative_pooled)
    assert _both(pair, **kwargs) <= PIPELINE_FP32_MAX_ABS
    mine = ours.encode_prompt(["a cat"], None, torch.device("cpu"), 1, True, "dog")
    for a, b in zip(mine, (embeds, negative, pooled, negative_pooled)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_step_graph_takes_the_added_conditioning(pair, monkeypatch):
    """With CUDA graphs (stood in for on the CPU), the pooled embeds and time ids are graph inputs like the text
    embeddings: a second call with other sizes replays the graph with the new ids, same image as eager."""
    _, ours = pair
    call = lambda **kw: ours("a", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                             output_type="latent", **kw).images
    eager = [call(), call(original_size=(16, 96))]
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "step")
    ours._graphs = None
    step = use_fake_graphs(ours._graphs_for_components()["step"])
    for expected, kw in zip(eager, ({}, {"original_size": (16, 96)})):
        torch.testing.assert_close(call(**kw), expected, rtol=0, atol=0)
    assert step.captures == 1
    ours._graphs = None


def test_fp16_vae_with_force_upcast_decodes_in_fp32_and_stays_fp16(pair):
    _, ours = pair
    latents = torch.randn(1, 4, 4, 4)
    expected = ours.vae.decode(latents / ours.vae.config.scaling_factor)
    ours.vae.half()
    try:
        weights16 = {k: v.clone() for k, v in ours.vae.state_dict().items()}
        out = ours._decode(latents.half())
        assert out.dtype == torch.float32 and ours.vae.dtype == torch.float16
        for k, v in ours.vae.state_dict().items():
            assert torch.equal(v, weights16[k])  # back to the same fp16 weights
        ours.vae.float()
        torch.testing.assert_close(out, ours.vae.decode(latents.half().float() / ours.vae.config.scaling_factor),
                                   rtol=0, atol=0)  # the fp16 weights, upcast: what diffusers decodes with
        assert (out - expected).abs().max() < 5e-2
    finally:
        ours.vae.float()


def test_latents_mean_and_std_applied_where_the_vae_has_them(pair, folder):
    from diffusion_fast.models import AutoencoderKL

    config = json.loads((folder / "vae" / "config.json").read_text())
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 1.0, 2.0]
    _, ours = pair
    vae = AutoencoderKL.from_config(dict(config, latents_mean=mean, latents_std=std))
    vae.load_state_dict(ours.vae.state_dict())
    latents = torch.randn(1, 4, 4, 4)
    saved, ours.vae = ours.vae, vae
    try:
        got = ours._decode(latents)
    finally:
        ours.vae = saved
    mean, std = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    shaped = latents * std / config["scaling_factor"] + mean
    torch.testing.assert_close(got, vae.decode(shaped), rtol=0, atol=0)


def test_bad_inputs_and_mismatched_components(pair, folder, tmp_path):
    _, ours = pair
    with pytest.raises(ValueError, match="prompt_embeds needs pooled_prompt_embeds too"):
        ours(prompt_embeds=torch.randn(1, 77, 40))
    with pytest.raises(ValueError, match="negative_prompt_embeds needs negative_pooled_prompt_embeds too"):
        ours(prompt_embeds=torch.randn(1, 77, 40), pooled_prompt_embeds=torch.randn(1, 24),
             negative_prompt_embeds=torch.randn(1, 77, 40))
    with pytest.raises(TypeError, match="prompt_2 must be a str or a list of str, got int"):
        ours("a", prompt_2=3)
    with pytest.raises(ValueError, match="prompt_2 has 1 entries but there are 2 prompts"):
        ours(["a", "b"], prompt_2=["c"])
    with pytest.raises(ValueError, match="prompt_2 has 2 entries but there are 1 prompts"):
        ours("a", prompt_2=["c", "d"])
    with pytest.raises(ValueError, match="negative_prompt_2 has 3 entries but there are 2 prompts"):
        ours(["a", "b"], negative_prompt_2=["c", "d", "e"])
    with pytest.raises(ValueError, match=r"original_size must be a \(height, width\) pair of non-negative ints"):
        ours("a", original_size=(64,))
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        ours("a", height=30)
    te, te2 = ours.text_encoder, ours.text_encoder_2
    with pytest.raises(ValueError, match=r"does not fit the text encoders \(hidden sizes 24 \+ 24 = 48\)"):
        StableDiffusionXLPipeline(ours.unet, ours.vae, te2, te2, ours.tokenizer, ours.tokenizer_2, ours.scheduler)
    with pytest.raises(TypeError, match="folder must be a path .* got NoneType"):
        diffusion_fast.load_pipeline(None)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        diffusion_fast.load_pipeline(tmp_path)
    with pytest.raises(TypeError, match="text_encoder_2 must be a model with config.projection_dim"):
        StableDiffusionXLPipeline(ours.unet, ours.vae, te, torch.nn.Linear(2, 2), ours.tokenizer, ours.tokenizer_2,
                                  ours.scheduler)
    sd1 = diffusion_fast.StableDiffusionPipeline.from_tiny("sd1")
    with pytest.raises(ValueError, match="addition_embed_type=None: an SDXL UNet takes the pooled"):
        StableDiffusionXLPipeline(sd1.unet, ours.vae, _Encoder(16, 0), _Encoder(16, 24), ours.tokenizer,
                                  ours.tokenizer_2, ours.scheduler)
    with pytest.raises(ValueError, match="expects an added embedding of 72 values .* make 73"):
        StableDiffusionXLPipeline(ours.unet, ours.vae, te, _Encoder(24, 25), ours.tokenizer, ours.tokenizer_2,
                                  ours.scheduler)
    index = json.loads((folder / "model_index.json").read_text())
    for name in index:
        (tmp_path / name).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, tokenizer_2=[None, None])))  # (only the first may be null)
    with pytest.raises(FileNotFoundError, match=r"lacks the pipeline components \['tokenizer_2'\]"):
        StableDiffusionXLPipeline.from_pretrained(tmp_path)


class _Encoder(torch.nn.Module):
    """A text encoder's config alone (all the component checks read), of the given widths."""

    def __init__(self, hidden_size, projection_dim):
        super().__init__()
        import types

        self.config = types.SimpleNamespace(hidden_size=hidden_size, projection_dim=projection_dim)


def test_cli_generate_and_check_take_an_sdxl_folder(folder, tmp_path, capsys):
    from diffusion_fast.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(folder), "--steps", "2", "--height", "32", "--width", "32",
                 "--output", str(out), "--no-progress"]) == 0
    assert out.exists() and "scheduler DDIMScheduler" in capsys.readouterr().out
    assert main(["check", "--model", str(folder), "--steps", "2"]) == 0
    assert "pipeline (2 DDIM steps, float32)" in capsys.readouterr().out
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "in.png")  # image-to-image, SDXL's default strength
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--steps", "10",
                 "--output", str(out), "--no-progress"]) == 0
    assert "fast path:      3 steps" in capsys.readouterr().out and Image.open(out).size == (40, 32)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and fp16 need a GPU")
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])  # the whole step / the UNet graphed
def test_fp16_on_gpu_graphed_as_eager_and_near_diffusers(folder, scheduler):
    import diffusers

    ours = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float16, device=DEVICE)
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = getattr(diffusion_fast.schedulers, scheduler).from_config(ours.scheduler.config)
    outs = []
    for graph in (False, "auto", "auto"):  # eager, capture, replay
        ours.cuda_graph = graph
        outs.append(ours("a red cube", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                         output_type="np").images)
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=2e-2)
    np.testing.assert_array_equal(outs[2], outs[1])
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16).to(DEVICE)
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    image = theirs("a red cube", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert np.abs(image - outs[0]).max() < 2e-2
