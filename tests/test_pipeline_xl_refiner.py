"""SDXL's refiner and diffusers' "ensemble of expert denoisers": our base pipeline stops at ``denoising_end`` with
latents, our StableDiffusionXLImg2ImgPipeline on a refiner folder (no first text encoder, an aesthetic score in the
time ids) takes over at ``denoising_start``; against diffusers' pair on the same tiny weights written by
save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed
and weights (as for text-to-image).
"""
import numpy as np
import pytest
import torch
from _fake_graphs import use_fake_graphs
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from conftest import NEEDS_SCIPY
from diffusion_fast import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

# diffusers' Euler and DPM-Solver call np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sdxl-experts")
    base = _tiny_diffusers.sdxl_pipeline(seed=1)
    base.save_pretrained(root / "base")
    _tiny_diffusers.sdxl_refiner_pipeline(base, seed=2).save_pretrained(root / "refiner")
    return root / "base", root / "refiner"


@pytest.fixture(scope="module")
def pipes(folders):
    """{"theirs": (diffusers' base, refiner), "ours": (our base, refiner)}, each loaded from the folders."""
    import diffusers

    base, refiner = folders
    theirs = (diffusers.StableDiffusionXLPipeline.from_pretrained(base),
              diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner))
    ours = (diffusion_fast.load_pipeline(base), diffusion_fast.load_pipeline(refiner))
    assert type(ours[0]) is StableDiffusionXLPipeline
    assert type(ours[1]) is StableDiffusionXLImg2ImgPipeline  # picked by requires_aesthetics_score
    assert ours[1].text_encoder is None and ours[1].requires_aesthetics_score
    for pipe in theirs + ours:
        pipe.set_progress_bar_config(disable=True)
    return {"theirs": theirs, "ours": ours}


def _experts(base, refiner, fraction, steps=6, base_kwargs=None, output_type="np", **kwargs):
    """diffusers' ensemble: the base's first ``fraction`` as latents, the refiner's rest; (latents, image, the
    timesteps each ran)."""
    ran = ([], [])

    def record(i):
        return lambda pipe, step, t, tensors: ran[i].append(float(t)) or tensors

    generator = torch.Generator().manual_seed(3)
    latents = base(prompt="a red cube", num_inference_steps=steps, denoising_end=fraction, output_type="latent",
                   generator=generator, callback_on_step_end=record(0), **(base_kwargs or {})).images
    image = refiner(prompt="a red cube", image=latents, num_inference_steps=steps, denoising_start=fraction,
                    output_type=output_type, generator=generator, callback_on_step_end=record(1), **kwargs).images
    return latents, np.asarray(image), ran


def _both(pipes, fraction, backend_name="fast", **kwargs):
    latents, image, ran = _experts(*pipes["theirs"], fraction, **kwargs)
    with diffusion_fast.backend(backend_name):
        our_latents, our_image, our_ran = _experts(*pipes["ours"], fraction, **kwargs)
    assert our_ran == ran and ran[0] and ran[1]  # the same cut: each expert ran the same timesteps
    torch.testing.assert_close(our_latents, latents, rtol=0, atol=1e-4)
    return np.abs(image - our_image).max()


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_ensemble_of_experts_same_image_as_diffusers(pipes, backend_name):
    assert _both(pipes, 0.8, backend_name) <= PIPELINE_FP32_MAX_ABS


# DDIM's 10 leading timesteps are 900, 800, ..., 0: 0.8's cutoff 200 is one of them, which the base keeps (>=) and the
# refiner leaves; each scheduler starts the refiner's part its own way (DDIM by the timesteps, the sigma schedulers
# by set_begin_index, Heun's second-order cut rounded up to finish its last step, DPM-Solver++ and UniPC afresh)
@pytest.mark.parametrize("scheduler, cfg, steps, fraction", [
    ("DDIMScheduler", dict(steps_offset=0), 10, 0.8),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1), 7, 0.7),  # as SDXL ships it
    ("EulerAncestralDiscreteScheduler", {}, 6, 0.75),  # fresh noise every step, from the one generator
    ("HeunDiscreteScheduler", {}, 5, 0.8),
    ("HeunDiscreteScheduler", {}, 6, 0.5),  # an even count below the cutoff: one more call
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), 8, 0.6),
    ("UniPCMultistepScheduler", {}, 7, 0.7),
    pytest.param("LMSDiscreteScheduler", {}, 6, 0.7, marks=NEEDS_SCIPY),
])
def test_every_scheduler_splits_as_diffusers(pipes, scheduler, cfg, steps, fraction):
    with _tiny_diffusers.swapped_schedulers(scheduler, pipes["theirs"], pipes["ours"], **cfg):
        assert _both(pipes, fraction, steps=steps) <= PIPELINE_FP32_MAX_ABS


def test_refiner_conditioning_same_image_as_diffusers(pipes):
    """The refiner's own inputs: aesthetic scores, a negative crop corner (the refiner's time ids take it), a
    negative prompt through the second encoder alone, and prompt_2 (which diffusers ignores without a first
    encoder); base conditioning with batch 2. Compared as latents, to 1e-4: the tiny refiner's two steps move its
    latents by far more than that for a change of score, so a score lost or misplaced in the time ids fails."""
    kwargs = dict(aesthetic_score=3.0, negative_aesthetic_score=1.0, negative_crops_coords_top_left=(8, 4),
                  original_size=(64, 48), negative_prompt="blurry", prompt_2="ignored", output_type="latent")
    assert _both(pipes, 0.7, base_kwargs=dict(num_images_per_prompt=2), num_images_per_prompt=2, **kwargs) <= 1e-4
    ours = pipes["ours"]
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        moved = [_experts(*ours, 0.7, output_type="latent", **{name: score})[1] for score in (1.0, 9.0)]
        assert np.abs(moved[1] - moved[0]).max() > 1e-2, name


@pytest.mark.parametrize("kwargs", [
    dict(strength=0.5),  # a refiner alone refines an image: noised to the strength's start
    dict(strength=0.9, denoising_end=0.5, output_type="latent"),  # stopping early
    dict(denoising_start=0.6),  # pixels taken over without noise, as diffusers does
])
def test_refiner_on_an_image_same_as_diffusers(pipes, kwargs):
    kwargs = dict(dict(prompt="a red cube", image=IMAGE, num_inference_steps=6, output_type="np"), **kwargs)
    images = [pipe[1](generator=torch.Generator().manual_seed(5), **kwargs).images
              for pipe in (pipes["theirs"], pipes["ours"])]
    assert images[0].shape == images[1].shape
    assert np.abs(np.asarray(images[0]) - np.asarray(images[1])).max() <= PIPELINE_FP32_MAX_ABS


def test_the_step_graph_runs_each_part(pipes, monkeypatch):
    """With CUDA graphs (stood in for on the CPU) each expert replays its captured step over its part of the
    schedule: the same latents as eager."""
    eager = _experts(*pipes["ours"], 0.7)
    for pipe in pipes["ours"]:
        monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: "step")
        pipe._graphs = None
        use_fake_graphs(pipe._graphs_for_components()["step"])
    graphed = _experts(*pipes["ours"], 0.7)
    try:
        torch.testing.assert_close(graphed[0], eager[0], rtol=0, atol=0)
        np.testing.assert_array_equal(graphed[1], eager[1])
        assert [pipe._graphs["step"].captures for pipe in pipes["ours"]] == [1, 1]
    finally:
        for pipe in pipes["ours"]:
            pipe._graphs = None


def test_components_passed_to_from_pretrained_are_shared(folders, pipes, tmp_path):
    """As diffusers' example loads the refiner with the base's second text encoder and VAE: used, not loaded."""
    base = pipes["ours"][0]
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1], text_encoder_2=base.text_encoder_2,
                                                               vae=base.vae)
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    with pytest.raises(TypeError, match=r"does not take: \['safety_checker'\]"):
        StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1], safety_checker=None)
    # SD's from_pretrained takes its components the same way; one not in the folder is no longer missing
    diffusion_fast.tiny.write_tiny_pipeline(tmp_path, "sd1")
    (tmp_path / "vae" / "config.json").unlink()
    sd = diffusion_fast.StableDiffusionPipeline.from_pretrained(tmp_path, vae=base.vae)
    assert sd.vae is base.vae
    with pytest.raises(TypeError, match=r"does not take: \['text_encoder_2'\]"):
        diffusion_fast.StableDiffusionPipeline.from_pretrained(tmp_path, text_encoder_2=None)


def test_bad_inputs_name_the_argument(folders, pipes):
    base, refiner = pipes["ours"]
    latents = torch.randn(1, 4, 8, 8)
    for value in (0, 1.0, 1.5, -0.2, "0.5", True):
        with pytest.raises(ValueError, match="denoising_end must be a fraction"):
            base("a", num_inference_steps=2, denoising_end=value)
        with pytest.raises(ValueError, match="denoising_start must be a fraction"):
            refiner("a", image=latents, num_inference_steps=2, denoising_start=value)
    with pytest.raises(ValueError, match="denoising_start=0.8 must be below denoising_end=0.5"):
        refiner("a", image=latents, num_inference_steps=2, denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(ValueError, match="denoising_end=0.01 leaves no denoising step"):
        base("a", num_inference_steps=2, denoising_end=0.01)
    with pytest.raises(ValueError, match="denoising_start=0.9999 leaves no denoising step"):
        refiner("a", image=latents, num_inference_steps=2, denoising_start=0.9999)  # cutoff 0
    with pytest.raises(TypeError, match="aesthetic_score must be a finite number"):
        refiner("a", image=latents, num_inference_steps=2, aesthetic_score=float("nan"))
    # a refiner is image-to-image only, by folder and by components
    with pytest.raises(ValueError, match=r"is an SDXL refiner .*: it refines images; load it with .*Img2Img"):
        StableDiffusionXLPipeline.from_pretrained(folders[1])
    parts = (refiner.unet, refiner.vae, None, refiner.text_encoder_2, None, refiner.tokenizer_2, refiner.scheduler)
    with pytest.raises(ValueError, match="requires_aesthetics_score: an SDXL refiner's UNet"):
        StableDiffusionXLPipeline(*parts, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="five time ids with an aesthetic score fit it"):
        StableDiffusionXLImg2ImgPipeline(*parts)  # requires_aesthetics_score forgotten
    with pytest.raises(ValueError, match="six time ids fit it"):
        StableDiffusionXLImg2ImgPipeline(base.unet, base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer,
                                         base.tokenizer_2, base.scheduler, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="text_encoder and tokenizer: give both, or neither"):
        StableDiffusionXLImg2ImgPipeline(refiner.unet, refiner.vae, None, refiner.text_encoder_2, base.tokenizer,
                                         refiner.tokenizer_2, refiner.scheduler, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match=r"does not fit the text encoders \(hidden sizes 16 \+ 24 = 40\)"):
        StableDiffusionXLImg2ImgPipeline(refiner.unet, refiner.vae, base.text_encoder, refiner.text_encoder_2,
                                         base.tokenizer, refiner.tokenizer_2, refiner.scheduler,
                                         requires_aesthetics_score=True)


def test_accelerate_keeps_the_ensembles_images(pipes):
    """diffusers' own base + refiner pair under accelerate (the refiner with no first text encoder): every resnet
    and attention of both UNets patched, the scheduler's step fused, the same image, and restore undoes it."""
    theirs = pipes["theirs"]
    expected = _experts(*theirs, 0.7)
    try:
        for pipe in theirs:
            diffusion_fast.accelerate(pipe, attention=True)  # (on the CPU "auto" leaves attention to diffusers)
            report = pipe._diffusion_fast_report
            assert report["resnets"] > 0 and report["attention"] > 0 and report["scheduler"] == 1
        latents, image, ran = _experts(*theirs, 0.7)
    finally:
        for pipe in theirs:
            diffusion_fast.restore(pipe)
    assert ran == expected[2]
    torch.testing.assert_close(latents, expected[0], rtol=0, atol=1e-4)
    assert np.abs(image - expected[1]).max() <= PIPELINE_FP32_MAX_ABS
