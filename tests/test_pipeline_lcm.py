"""LCM-distilled models (a UNet with ``time_cond_proj_dim``): our UNet's guidance-scale condition, our
LatentConsistencyModel(Img2Img)Pipeline, and our other pipelines on such a UNet, against diffusers' on tiny models
written by save_pretrained and loaded by load_pipeline.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed and weights; the UNet alone within 1e-4. Each pipeline comparison also checks that another guidance scale moves
the image, so a dropped or mis-built guidance embedding cannot pass.
"""
import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import (LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline,
                            StableDiffusionControlNetPipeline, StableDiffusionInpaintPipeline,
                            StableDiffusionPipeline, StableDiffusionXLPipeline, tiny)
from diffusion_fast.models import UNet2DConditionModel
from diffusion_fast.models.layers import guidance_scale_embedding
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

COND_DIM = _tiny_diffusers.LCM_COND_DIM
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50, 3), dtype=np.uint8))  # cut to 48x40
MASK = Image.fromarray(((np.indices((40, 48)).sum(0) % 13) < 6).astype(np.uint8) * 255)


def _lcm_scheduler():
    return diffusers.LCMScheduler(**tiny.scheduler_config("sd1"))


def _saved(theirs, folder, cls):
    theirs.scheduler = _lcm_scheduler()
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, cls)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.fixture(scope="module")
def lcm_pair(tmp_path_factory):
    """diffusers' LatentConsistencyModelPipeline on the tiny SD components, and ours loaded from its folder."""
    return _saved(_tiny_diffusers.lcm_pipeline(seed=1), tmp_path_factory.mktemp("tiny-lcm"),
                  LatentConsistencyModelPipeline)


@pytest.fixture(scope="module")
def lcm_img2img_pair(tmp_path_factory, lcm_pair):
    theirs = diffusers.LatentConsistencyModelImg2ImgPipeline(**lcm_pair[0].components, requires_safety_checker=False)
    return _saved(theirs, tmp_path_factory.mktemp("tiny-lcm-img2img"), LatentConsistencyModelImg2ImgPipeline)


def _run(pipe, backend_name="fast", **kwargs):
    with diffusion_fast.backend(backend_name):
        out = pipe(**dict(dict(prompt="a red cube", generator=torch.Generator().manual_seed(3), output_type="np"),
                          **kwargs)).images
    return out.numpy() if torch.is_tensor(out) else out


def _assert_as_diffusers(theirs, ours, backend_name="fast", **kwargs):
    b = _run(ours, backend_name, **kwargs)
    a = _run(theirs, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, np.abs(a - b).max()
    other = dict(kwargs, guidance_scale=kwargs.get("guidance_scale", 8.5) + 3.0)
    assert np.abs(_run(ours, backend_name, **other) - b).max() > 0.005  # the embedding reaches the UNet
    return b


# ---- the model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [256, 32, 33], ids=["lcm-dreamshaper", "tiny", "odd-width-zero-padded"])
def test_guidance_scale_embedding_is_diffusers(dim):
    w = torch.tensor([7.5, 0.0, -1.0, 3.25]) - 1  # 8.5 (LCM's default), 1, 0 and a fraction, less one
    expected = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(guidance_scale_embedding(w, dim), expected, rtol=0, atol=0)


def test_guidance_scale_embedding_names_bad_arguments():
    with pytest.raises(TypeError, match="w must be a .B,. tensor"):
        guidance_scale_embedding(7.5, 32)
    with pytest.raises(ValueError, match="dim must be an int >= 4"):
        guidance_scale_embedding(torch.tensor([7.5]), 2)


def test_unet_takes_the_guidance_condition_as_diffusers_does(tmp_path):
    """Batch 3 at an odd latent size (9x7): with the condition, without it (diffusers then adds nothing), and each
    sample's own condition."""
    theirs = _tiny_diffusers.lcm_unet(tiny.unet_config("sd1"), 0)
    theirs.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    torch.manual_seed(1)
    sample, text = torch.randn(3, 4, 9, 7), torch.randn(3, 77, tiny.unet_config("sd1")["cross_attention_dim"])
    cond = guidance_scale_embedding(torch.tensor([7.5, 1.0, 3.0]), COND_DIM)
    with torch.no_grad():
        for timestep_cond in (cond, None):
            expected = theirs(sample, 500, text, timestep_cond=timestep_cond).sample
            torch.testing.assert_close(ours(sample, 500, text, timestep_cond=timestep_cond), expected,
                                       rtol=1e-4, atol=1e-4)
        assert (ours(sample, 500, text, timestep_cond=cond) - ours(sample, 500, text)).abs().max() > 1e-3


def test_unet_refuses_a_condition_it_cannot_take(tmp_path):
    plain = UNet2DConditionModel.from_config(tiny.unet_config("sd1"))
    lcm = UNet2DConditionModel.from_config(dict(tiny.unet_config("sd1"), time_cond_proj_dim=COND_DIM))
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, tiny.unet_config("sd1")["cross_attention_dim"])
    with pytest.raises(ValueError, match="timestep_cond: this UNet2DConditionModel takes none"):
        plain(sample, 1, text, timestep_cond=torch.zeros(2, COND_DIM))
    with pytest.raises(ValueError, match=r"timestep_cond must be a \(2, 32\) tensor.*got \(1, 32\)"):
        lcm(sample, 1, text, timestep_cond=torch.zeros(1, COND_DIM))
    with pytest.raises(ValueError, match="time_cond_proj_dim.*int >= 4, got 2"):
        UNet2DConditionModel.from_config(dict(tiny.unet_config("sd1"), time_cond_proj_dim=2))


# ---- diffusers' LCM pipelines ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: 4 steps, guidance 8.5
    {"num_inference_steps": 3, "original_inference_steps": 20, "guidance_scale": 2.0},
    {"timesteps": [999, 759, 499, 259], "num_images_per_prompt": 2},
    {"prompt": ["a red cube", "a blue ball"], "guidance_scale": 1.0},  # w = 0: still an embedding, not "off"
], ids=["defaults", "original-steps", "custom-timesteps-two-per-prompt", "two-prompts-scale-1"])
def test_lcm_pipeline_matches_diffusers(lcm_pair, kwargs):
    _assert_as_diffusers(*lcm_pair, **kwargs)


def test_lcm_pipeline_reference_backend_matches_diffusers(lcm_pair):
    _assert_as_diffusers(*lcm_pair, backend_name="reference")


@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: strength 0.8, 4 steps
    {"strength": 0.5, "num_inference_steps": 2, "original_inference_steps": 30},
    {"num_images_per_prompt": 2, "guidance_scale": 3.0},
], ids=["defaults", "strength-and-original-steps", "two-per-prompt"])
def test_lcm_img2img_matches_diffusers(lcm_img2img_pair, kwargs):
    _assert_as_diffusers(*lcm_img2img_pair, image=IMAGE, **kwargs)


def test_lcm_img2img_starts_from_given_latents_as_diffusers_does(lcm_img2img_pair):
    latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(5))
    _assert_as_diffusers(*lcm_img2img_pair, image=IMAGE, latents=latents)
    with pytest.raises(ValueError, match=r"latents must be a \(1, 4, H, W\) tensor"):
        _run(lcm_img2img_pair[1], image=IMAGE, latents=torch.randn(2, 4, 10, 12))


def test_graphed_unet_call_gives_the_eager_image(lcm_pair, monkeypatch):
    """On CUDA the LCM step is eager and the UNet call replays from a graph, the guidance embedding one of its
    inputs; capture stood in for on the CPU. A new scale is a new input, not a new graph."""
    from _fake_graphs import use_fake_graphs

    _, ours = lcm_pair
    eager = [_run(ours, guidance_scale=g) for g in (8.5, 4.0)]
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "unet")
    try:
        graphed = use_fake_graphs(ours._graphs_for_components()["unet"])
        assert all(np.array_equal(_run(ours, guidance_scale=g), e) for g, e in zip((8.5, 4.0), eager))
        assert graphed.captures == 1
    finally:
        ours._graphs = None


def test_accelerate_keeps_diffusers_lcm_img2img_image(lcm_img2img_pair, monkeypatch):
    """diffusers' LCM image-to-image pipeline under accelerate (its text-to-image one: test_scheduler_lcm.py): every
    step is the fused LCM step, the image stays within the fp32 tolerance, restore gives it back exactly."""
    from _scheduler_parity import count_op_calls

    theirs, _ = lcm_img2img_pair
    before = _run(theirs, image=IMAGE)
    diffusion_fast.accelerate(theirs)
    try:
        calls = count_op_calls(monkeypatch, "linear_step")
        assert np.abs(_run(theirs, image=IMAGE) - before).max() <= PIPELINE_FP32_MAX_ABS and len(calls) == 4
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs, image=IMAGE), before)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_lcm_loop_matches_eager_on_gpu(lcm_pair):
    """fp16 on CUDA: eager, capture and replay of the UNet call with the guidance condition as a graph input give
    the same latents (the replay bit for bit), and a second scale replays the same graph."""
    pipe = diffusion_fast.load_pipeline(lcm_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    for scale in (8.5, 3.0):  # (the second scale replays the graph the first captured)
        assert_graphed_as_eager(pipe, lambda p: p("a red cube", guidance_scale=scale, output_type="latent",
                                                  generator=torch.Generator(DEVICE).manual_seed(3)).images, "unet", 1)


def test_lcm_pipelines_refuse_what_they_cannot_run(lcm_pair, lcm_img2img_pair):
    _, ours = lcm_pair
    with pytest.raises(TypeError, match="negative_prompt"):
        ours("a red cube", negative_prompt="blurry")  # (diffusers swallows it in **kwargs and ignores it)
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs.*\['noise_pred'\]"):
        ours("a red cube", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"])
    with pytest.raises(ValueError, match="unet has no time_cond_proj_dim: not an LCM-distilled UNet"):
        LatentConsistencyModelPipeline(UNet2DConditionModel.from_config(tiny.unet_config("sd1")), ours.vae,
                                       ours.text_encoder, ours.tokenizer, ours.scheduler)
    saved = ours.scheduler
    try:
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(diffusers.DDIMScheduler().config))
        with pytest.raises(ValueError, match="original_inference_steps: DDIMScheduler.set_timesteps takes none"):
            ours("a red cube", original_inference_steps=20)
        with pytest.raises(ValueError, match="strength: DDIMScheduler.set_timesteps takes none"):
            lcm_img2img_pair[1].__class__(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer,
                                          ours.scheduler)("a red cube", image=IMAGE)
    finally:
        ours.scheduler = saved


def test_lcm_pipeline_with_an_ip_adapter_matches_diffusers(lcm_pair, tmp_path):
    """An IP-Adapter on an LCM (a common pairing): one image-embedding row (no CFG batch), its tokens and the
    guidance condition both reach the UNet."""
    theirs, ours = lcm_pair
    image = IMAGE.resize((32, 32))
    with _tiny_diffusers.ip_adapter_loaded((theirs, ours), tmp_path, theirs.unet):
        b = _assert_as_diffusers(theirs, ours, ip_adapter_image=image)
        ours.set_ip_adapter_scale(0.0)
        assert np.abs(_run(ours, ip_adapter_image=image) - b).max() > 0.005  # the image prompt matters


def test_callback_reads_denoised_and_w_embedding_as_diffusers(lcm_pair):
    """diffusers' LCM callback tensors: each step's x0 ("denoised") and the guidance embedding, the same as diffusers'
    (the last x0 is the image's latents); returning them is refused, where diffusers would use them."""
    theirs, ours = lcm_pair
    names = ["latents", "denoised", "w_embedding"]
    seen = {"theirs": [], "ours": []}

    def recorder(key):
        def callback(pipe, i, t, tensors):
            seen[key].append({k: tensors[k].clone() for k in names})
            return {}
        return callback

    for key, pipe in (("theirs", theirs), ("ours", ours)):
        _run(pipe, output_type="latent", callback_on_step_end=recorder(key), callback_on_step_end_tensor_inputs=names)
    assert len(seen["ours"]) == len(seen["theirs"]) == 4
    for a, b in zip(seen["theirs"], seen["ours"]):
        for k in names:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["ours"][-1]["denoised"], seen["ours"][-1]["latents"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"returned \['denoised'\]: readable here, not replaceable"):
        _run(ours, callback_on_step_end=lambda pipe, i, t, tensors: {"denoised": tensors["denoised"]},
             callback_on_step_end_tensor_inputs=["denoised"])


def test_callback_replaces_the_latents(lcm_pair):
    _, ours = lcm_pair
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(int(t))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = _run(ours, callback_on_step_end=callback)
    assert seen == [int(t) for t in ours.scheduler.timesteps] and len(seen) == 4
    assert np.abs(out - _run(ours)).max() > 0.005


# ---- our other pipelines on an LCM-distilled UNet (diffusers' SD pipelines take one the same way) -----------------
def test_sd_pipeline_on_an_lcm_unet_matches_diffusers(tmp_path):
    """diffusers' StableDiffusionPipeline with an LCM UNet: no CFG batch (a negative prompt is not used), the
    embedding of guidance_scale - 1."""
    theirs = _tiny_diffusers.pipeline("sd1", seed=1)
    theirs.unet = _tiny_diffusers.lcm_unet(tiny.unet_config("sd1"), 2)
    theirs, ours = _saved(theirs, tmp_path, StableDiffusionPipeline)
    b = _assert_as_diffusers(theirs, ours, num_inference_steps=4, guidance_scale=6.0)
    assert np.array_equal(_run(ours, num_inference_steps=4, guidance_scale=6.0, negative_prompt="blurry"), b)


def test_sdxl_pipeline_on_an_lcm_unet_matches_diffusers(tmp_path):
    theirs = _tiny_diffusers.sdxl_pipeline(seed=1)
    theirs.unet = _tiny_diffusers.lcm_unet(_tiny_diffusers.SDXL_TINY, 2)
    _assert_as_diffusers(*_saved(theirs, tmp_path, StableDiffusionXLPipeline), num_inference_steps=4,
                         guidance_scale=6.0)


def test_controlnet_pipeline_on_an_lcm_unet_matches_diffusers(tmp_path):
    """The net gets no guidance condition (diffusers' ControlNetModel has none), the UNet does."""
    theirs = _tiny_diffusers.controlnet_pipeline(seed=1)
    theirs.unet = _tiny_diffusers.lcm_unet(tiny.unet_config("sd1"), 2)
    image = IMAGE.resize((48, 40))
    _assert_as_diffusers(*_saved(theirs, tmp_path, StableDiffusionControlNetPipeline), image=image,
                         num_inference_steps=4, guidance_scale=6.0)


def test_inpaint_pipeline_on_an_lcm_unet_matches_diffusers(tmp_path):
    """A 9-channel inpainting UNet distilled by LCM: the mask inputs and the condition both reach it."""
    base = _tiny_diffusers.pipeline("sd1", seed=1)
    unet = _tiny_diffusers.lcm_unet(dict(tiny.unet_config("sd1"), in_channels=9), 2)
    theirs = diffusers.StableDiffusionInpaintPipeline(**dict(base.components, unet=unet),
                                                      requires_safety_checker=False)
    _assert_as_diffusers(*_saved(theirs, tmp_path, StableDiffusionInpaintPipeline), image=IMAGE, mask_image=MASK,
                         num_inference_steps=4, guidance_scale=6.0)


# ---- the CLI ------------------------------------------------------------------------------------------------------
PROMPT = "a photograph of an astronaut riding a horse"  # (the CLI's default prompt)


@pytest.mark.parametrize("image, folder", [(False, "text-to-image"), (True, "image-to-image"),
                                          (False, "image-to-image")],
                         ids=["text-to-image", "image-to-image", "text-to-image-on-an-image-to-image-folder"])
def test_generate_with_an_lcm_folder_gives_diffusers_image(lcm_pair, lcm_img2img_pair, tmp_path, capsys, image,
                                                           folder):
    """An LCM folder: diffusers' defaults (4 steps, guidance 8.5), and with --image the LCM image-to-image pipeline
    (the LCM scheduler's strength, so all 4 steps run): diffusers' image from the same seed, within one 8-bit level.
    A folder diffusers saved its LCM image-to-image pipeline in serves text-to-image too (the same components)."""
    from diffusion_fast.cli import main

    theirs = lcm_img2img_pair[0] if image else lcm_pair[0]
    saved = (lcm_img2img_pair if folder == "image-to-image" else lcm_pair)[0]._saved_to
    out = tmp_path / "out.png"
    argv = ["generate", "--model", saved, "--seed", "2", "--output", str(out), "--no-progress", "--compare"]
    kwargs = {}
    if image:
        IMAGE.save(tmp_path / "in.png")
        argv += ["--image", str(tmp_path / "in.png"), "--strength", "0.6"]
        kwargs = dict(image=Image.open(tmp_path / "in.png").convert("RGB"), strength=0.6)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fast path:      4 steps" in text and "max abs pixel difference" in text, text
    expected = theirs(PROMPT, generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == np.asarray(expected).shape and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--negative-prompt", "blurry"], "is a latent consistency model .*: it takes no --negative-prompt"),
    (["--eta", "0.3"], "is a latent consistency model .*: it takes no --eta"),
])
def test_generate_lcm_bad_options_one_line(lcm_pair, capsys, argv, message):
    import re

    from diffusion_fast.cli import main

    assert main(["generate", "--model", lcm_pair[0]._saved_to, *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_check_runs_an_lcm_folder(lcm_pair, capsys, monkeypatch):
    """The UNet's first prediction is compared with the guidance condition too; a fast path that drops it fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main
    from diffusion_fast.pipeline import StableDiffusionPipeline as Ours

    assert main(["check", "--model", lcm_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "text-to-image pipeline (LCM-distilled UNet, 2 LCM steps" in text and "0 failed" in text, text
    real = Ours._unet_call

    def fast_without_condition(self, model_input, t, embeds, *cond, timestep_cond=None):
        keep = current_backend() == "reference"
        return real(self, model_input, t, embeds, *cond, timestep_cond=timestep_cond if keep else None)

    monkeypatch.setattr(Ours, "_unet_call", fast_without_condition)
    assert main(["check", "--model", lcm_pair[0]._saved_to, "--steps", "2"]) == 1
