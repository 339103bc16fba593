"""Our StableDiffusionPipeline against diffusers' on tiny SD1- and SD2-shaped models written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed
and weights, on both the fast and the reference path.
"""
import os

import numpy as np
import pytest
import torch
from _fake_graphs import use_fake_graphs
from conftest import DEVICE, NEEDS_SCIPY, ON_GPU

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusionPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

STEPS = 3


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    """(diffusers pipeline, our pipeline) sharing the same saved weights."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    theirs, folder = _tiny_diffusers.saved_pipeline(folder, request.param, seed=1)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


def _both(pair, backend_name="fast", **kwargs):
    theirs, ours = pair
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    a = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    with diffusion_fast.backend(backend_name):
        b = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    return a, b


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_same_image_as_diffusers(pair, backend_name):
    a, b = _both(pair, backend_name, prompt="a red cube", negative_prompt="blurry")
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")  # diffusers' KDPM2 schedules
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # its single-step DPM-Solver's
@pytest.mark.parametrize("scheduler, cfg, steps", [
    ("EulerDiscreteScheduler", {}, STEPS),
    ("EulerAncestralDiscreteScheduler", {}, STEPS),
    ("DDPMScheduler", {}, STEPS),
    ("PNDMScheduler", dict(skip_prk_steps=True), STEPS),  # as SD1.5 ships it
    ("PNDMScheduler", dict(skip_prk_steps=False), 4),  # diffusers' default: 12 Runge-Kutta calls, then PLMS
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), 5),  # "DPM++ 2M Karras"
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3), 5),
    ("UniPCMultistepScheduler", {}, 5),  # corrector and predictor
    ("LCMScheduler", {}, 4),  # LCM-LoRA's: fresh noise at every step but the last
    ("HeunDiscreteScheduler", {}, 3),  # two model calls a step but the last: 5 calls
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True), 3),  # "DPM2 Karras": the UNet at fractional timesteps
    ("KDPM2AncestralDiscreteScheduler", {}, 3),  # "DPM2 a": noise from the generator at each step's second call
    ("DEISMultistepScheduler", dict(solver_order=3), 5),  # up to two earlier noise predictions
    # "DPM++ SDE Karras" as diffusers maps it: single-step groups of two calls, noise at every call
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), 5),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, solver_type="heun"), 7),  # a 3-call group, then 1, 2, 1
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3), 5),  # EDM's preconditioning around DPM-Solver++ 3M
    ("EDMEulerScheduler", {}, 4),
    pytest.param("LMSDiscreteScheduler", {}, 5, marks=NEEDS_SCIPY),  # up to 4 earlier derivatives
])
def test_other_schedulers_same_image_as_diffusers(pair, scheduler, cfg, steps):
    # Euler ancestral, DDPM and the SDE DPM-Solver draw noise at every step, from the generator, as diffusers does
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = getattr(diffusers, scheduler).from_config(saved[0].config, **cfg)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))  # by _class_name
        assert type(ours.scheduler).__name__ == scheduler
        a, b = _both(pair, prompt="a red cube", num_inference_steps=steps)
        assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        theirs.scheduler, ours.scheduler = saved


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_tcd_takes_the_pipelines_eta_as_diffusers(pair, eta):
    """TCD-LoRA's sampler: its step takes the pipeline's eta (TCD's gamma; diffusers' prepare_extra_step_kwargs
    passes it to any step that has one), and with eta > 0 draws fresh noise from the generator at each step."""
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = diffusers.TCDScheduler.from_config(saved[0].config)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        assert type(ours.scheduler).__name__ == "TCDScheduler"
        a, b = _both(pair, prompt="a red cube", num_inference_steps=4, eta=eta)
        assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
        if eta:
            assert np.abs(b - _both(pair, prompt="a red cube", num_inference_steps=4)[1]).max() > 0.02
    finally:
        theirs.scheduler, ours.scheduler = saved


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_guidance_rescale_same_image_as_diffusers(pair, scheduler, backend_name):
    """guidance_rescale (SD 2.x v-prediction and zero-SNR models use 0.7): the guided prediction rescaled to the text
    prediction's spread per sample; with DDIM the step is then no longer the fused CFG+DDIM one."""
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = getattr(diffusers, scheduler).from_config(saved[0].config)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        plain = _both(pair, backend_name, prompt="a red cube", guidance_scale=9.0)[1]
        a, b = _both(pair, backend_name, prompt="a red cube", guidance_scale=9.0, guidance_rescale=0.7)
        assert np.abs(b - plain).max() > 0.02  # the rescale matters
        assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        theirs.scheduler, ours.scheduler = saved


@pytest.mark.parametrize("value", ["0.7", float("nan"), True])
def test_guidance_rescale_bad_value(pair, value):
    with pytest.raises(TypeError, match="guidance_rescale must be a finite float"):
        pair[1]("a red cube", num_inference_steps=1, guidance_rescale=value)


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_freeu_same_image_as_diffusers(pair, backend_name):
    """pipe.enable_freeu (SD1.5's recommended factors): the first two up stages' backbone amplified and skip low
    frequencies scaled, as diffusers does; disable_freeu gives the plain image back exactly."""
    def with_freeu(s1):
        try:
            for pipe in pair:
                pipe.enable_freeu(s1=s1, s2=0.2, b1=1.5, b2=1.6)
            return _both(pair, backend_name, prompt="a red cube")
        finally:
            for pipe in pair:
                pipe.disable_freeu()

    ours = pair[1]
    plain = _both(pair, backend_name, prompt="a red cube")[1]
    a, b = with_freeu(0.9)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS and np.abs(b - plain).max() > 0.02
    assert np.array_equal(_both(pair, backend_name, prompt="a red cube")[1], plain)
    a, b = with_freeu(0.0)  # a factor of 0 switches FreeU off altogether, as in diffusers (it tests their truth)
    assert np.array_equal(b, plain) and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="enable_freeu: s1 must be a finite number"):
            ours.enable_freeu(s1=bad, s2=0.2, b1=1.5, b2=1.6)


def test_fused_qkv_projections_same_image_as_diffusers(pair):
    """pipe.fuse_qkv_projections(): one q/k/v GEMM per self-attention in the UNet and VAE, as diffusers' does; the
    same image as diffusers' fused pipeline, and back to the plain one unfused."""
    theirs, ours = pair
    plain = _both(pair, prompt="a red cube")[1]
    for pipe in pair:
        pipe.fuse_qkv_projections()
    try:
        assert any(getattr(m, "fused_qkv_weight", None) is not None for m in ours.unet.modules())  # (built)
        a, b = _both(pair, prompt="a red cube")
    finally:
        for pipe in pair:
            pipe.unfuse_qkv_projections()
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS and np.abs(b - plain).max() <= PIPELINE_FP32_MAX_ABS
    assert np.array_equal(_both(pair, prompt="a red cube")[1], plain)


def test_vae_tiling_and_slicing_same_image_as_diffusers(pair):
    """pipe.enable_vae_tiling / enable_vae_slicing at 72x96 px (18x24 latents, past the tiny VAE's 16-latent tile),
    two images: diffusers' images with its VAE's switches; tiling moves the image a little (the seams), slicing not."""
    theirs, ours = pair
    kwargs = dict(prompt="a red cube", height=72, width=96, num_images_per_prompt=2)
    plain = _both(pair, **kwargs)[1]
    ours.enable_vae_tiling()
    ours.enable_vae_slicing()
    theirs.vae.enable_tiling()
    theirs.vae.enable_slicing()
    try:
        a, b = _both(pair, **kwargs)
    finally:
        ours.disable_vae_tiling()
        ours.disable_vae_slicing()
        theirs.vae.disable_tiling()
        theirs.vae.disable_slicing()
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS and np.abs(b - plain).max() > PIPELINE_FP32_MAX_ABS


def test_diffusers_attention_switches_change_nothing_and_say_so(pair):
    """enable_attention_slicing / enable_xformers_memory_efficient_attention (and their disable_ pairs), common in
    scripts written for diffusers: our attention is flash attention already, so the image stays bit for bit the
    same, and a warning says why; a slice size diffusers would refuse is refused. CPU offloading, not built here, is
    a NotImplementedError naming the switch and what to do instead (not an AttributeError)."""
    _, ours = pair
    plain = _both(pair, prompt="a red cube")[1]
    for switch, args in (("enable_attention_slicing", ()), ("enable_attention_slicing", ("max",)),
                         ("enable_attention_slicing", (2,)), ("enable_xformers_memory_efficient_attention", ()),
                         ("disable_attention_slicing", ()), ("disable_xformers_memory_efficient_attention", ())):
        with pytest.warns(UserWarning, match=f"{switch} changes nothing here: our attention is flash attention"):
            getattr(ours, switch)(*args)
    assert np.array_equal(_both(pair, prompt="a red cube")[1], plain)
    with pytest.raises(ValueError, match="slice_size must be 'auto', 'max', None or a positive int"):
        ours.enable_attention_slicing(0)
    for switch in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        with pytest.raises(NotImplementedError, match=f"{switch}: our pipelines keep every model on one device.*"
                                                      "diffusion_fast.accelerate"):
            getattr(ours, switch)()


# Custom schedules, as diffusers' retrieve_timesteps passes them: "Align Your Steps"-style timesteps with DPM-Solver++
# (diffusers' own example), Euler and Heun, Euler with custom sigmas, LCM's and DDPM's timesteps
AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]


@pytest.mark.parametrize("scheduler, schedule", [
    ("DPMSolverMultistepScheduler", dict(timesteps=AYS_TIMESTEPS)),
    ("EulerDiscreteScheduler", dict(timesteps=AYS_TIMESTEPS)),
    ("EulerDiscreteScheduler", dict(sigmas=[14.6, 6.3, 3.7, 2.2, 1.3, 0.8, 0.4, 0.2, 0.03, 0.0])),
    ("HeunDiscreteScheduler", dict(timesteps=AYS_TIMESTEPS[::3])),
    ("LCMScheduler", dict(timesteps=[999, 759, 499, 259])),
    ("DDPMScheduler", dict(timesteps=AYS_TIMESTEPS[::2])),
])
def test_custom_timesteps_and_sigmas_same_image_as_diffusers(pair, scheduler, schedule):
    import diffusers

    theirs, ours = pair
    saved = theirs.scheduler, ours.scheduler
    try:
        theirs.scheduler = getattr(diffusers, scheduler).from_config(saved[0].config)
        ours.scheduler = diffusion_fast.schedulers.load_scheduler(dict(theirs.scheduler.config))
        a, b = _both(pair, prompt="a red cube", **schedule)
        assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
        assert len(ours.scheduler.timesteps) == len(theirs.scheduler.timesteps)
    finally:
        theirs.scheduler, ours.scheduler = saved


def test_custom_schedule_errors(pair):
    _, ours = pair  # its scheduler is DDIM, which takes no custom schedule (as in diffusers)
    with pytest.raises(ValueError, match="timesteps: DDIMScheduler takes no custom timesteps"):
        ours("a", timesteps=AYS_TIMESTEPS)
    with pytest.raises(ValueError, match="timesteps and sigmas: give one, not both"):
        ours("a", timesteps=AYS_TIMESTEPS, sigmas=[1.0, 0.0])


def _step_callback(log):
    """A callback as diffusers' docs write them: reads the tensors, replaces the latents at step 1, and sets
    pipe._interrupt at step 2 (the remaining steps are skipped)."""

    def callback(pipe, i, t, tensors):
        log.append((i, int(t), sorted(tensors), float(tensors["latents"].abs().mean())))
        if i == 2:
            pipe._interrupt = True
        return {"latents": tensors["latents"] * 0.9} if i == 1 else {}

    return callback


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_step_callback_and_interrupt_as_diffusers(pair, backend_name):
    theirs, ours = pair
    logs = [], []
    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    images = []
    for pipe, log in zip(pair, logs):
        with diffusion_fast.backend(backend_name):
            images.append(pipe("a", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                               output_type="np", callback_on_step_end=_step_callback(log),
                               callback_on_step_end_tensor_inputs=inputs).images)
    assert [entry[:3] for entry in logs[1]] == [entry[:3] for entry in logs[0]] and len(logs[0]) == 3
    np.testing.assert_allclose([e[3] for e in logs[1]], [e[3] for e in logs[0]], rtol=1e-5)
    assert np.abs(images[1] - images[0]).max() <= PIPELINE_FP32_MAX_ABS


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_diffusers_cfg_cutoff_callback_as_diffusers(pair, scheduler, monkeypatch):
    """diffusers' SDCFGCutoffCallback (at its cutoff step: the pipeline's _guidance_scale set to 0 and the embeddings
    cut to the prompt's rows) turns guidance off for the remaining steps as in diffusers, with DDIM's fused CFG step
    and Euler's; with the whole step graphed (stood in for on the CPU) the loop takes a second graph for the batch of
    one and gives the eager image."""
    from diffusers.callbacks import SDCFGCutoffCallback

    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    with _tiny_diffusers.swapped_schedulers(scheduler, [pair[0]], [pair[1]]):
        a, b = _both(pair, prompt="a red cube", num_inference_steps=5, callback_on_step_end=cutoff)
        assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
        assert pair[1].num_timesteps == 5 and pair[1].guidance_scale == 0.0  # (what the callback read and set)
        assert not pair[1].do_classifier_free_guidance
        _, guided = _both(pair, prompt="a red cube", num_inference_steps=5)
        assert np.abs(guided - b).max() > 0.005 and pair[1].guidance_scale == 7.5
    if scheduler == "DDIMScheduler":
        _, ours = pair
        monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "step")
        ours._graphs = None
        try:
            graphed = use_fake_graphs(ours._graphs_for_components()["step"])
            assert np.array_equal(_both(pair, prompt="a red cube", num_inference_steps=5,
                                        callback_on_step_end=cutoff)[1], b)
            assert graphed.captures == 2  # CFG (batch 2), then the prompt alone (batch 1)
        finally:
            ours._graphs = None


def test_step_callback_with_the_step_graphed(monkeypatch):
    """With the whole step graphed (stood in for on the CPU), the callback gets a copy of the graph's output, and the
    latents it returns are the next replay's input: the eager loop's image."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe("a", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
                        callback_on_step_end=_step_callback([])).images
    eager = call()
    monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: "step")
    pipe._graphs = None
    use_fake_graphs(pipe._graphs_for_components()["step"])
    torch.testing.assert_close(call(), eager, rtol=0, atol=0)


def test_step_callback_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"has to be in \['latents', 'prompt_embeds', 'negative_prompt_embeds'\], "
                                         r"but found \['noise_pred'\]"):
        ours("a", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    with pytest.raises(TypeError, match="callback_on_step_end must be callable"):
        ours("a", callback_on_step_end=3)
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict .* got NoneType"):
        ours("a", num_inference_steps=1, callback_on_step_end=lambda *a: None)


def test_batch_of_prompts_several_images_non_square_and_eta(pair):
    # Two prompts x two images each, a 48x64 image (latent 12x16: non-square), and eta > 0 so the DDIM noise is
    # drawn from the generator at every step exactly as diffusers draws it.
    a, b = _both(pair, prompt=["a cat", "a dog"], num_images_per_prompt=2, height=48, width=64, eta=0.7)
    assert a.shape == b.shape == (4, 48, 64, 3)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS


def test_prompt_embeds_and_no_guidance(pair):
    theirs, ours = pair
    embeds = torch.randn(1, 77, theirs.text_encoder.config.hidden_size)
    # guidance_scale <= 1 disables classifier-free guidance (the UNet runs on batch 1), as in diffusers.
    a, b = _both(pair, prompt_embeds=embeds, guidance_scale=1.0)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS


def test_given_latents_and_output_types(pair):
    theirs, ours = pair
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a, b = _both(pair, prompt="x", latents=latents, output_type="latent")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    pil = ours("x", num_inference_steps=1).images
    assert len(pil) == 1 and pil[0].size == (32, 32) and pil[0].mode == "RGB"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="x", height=30), "height must be a positive multiple of 8"),
        (dict(prompt="x", width=36), "width must be a positive multiple of 8"),
        (dict(prompt=[]), "prompt is an empty list"),
        (dict(prompt=None), "give a prompt"),
        (dict(prompt="x", guidance_scale=-2.0), "guidance_scale must be >= 0"),
        (dict(prompt="x", num_inference_steps=0), "num_inference_steps must be a positive int"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt has 1 entries but there are 2 prompts"),
        (dict(prompt="x", prompt_embeds=torch.zeros(1, 77, 32)), "prompt and prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32)),
         "must have the same shape"),
        (dict(prompt="x", output_type="jpeg"), "output_type must be one of"),
        (dict(prompt="x", latents=torch.randn(1, 4, 4, 4)), "latents must have shape"),
    ],
)
def test_bad_input_is_a_clear_error(pair, kwargs, message):
    _, ours = pair
    with pytest.raises((ValueError, TypeError), match=message):
        ours(**{"num_inference_steps": 1, **kwargs})


def test_writing_a_tiny_folder_leaves_the_callers_random_state_alone(tmp_path):
    """tiny.write_tiny_pipeline seeds its own weights (the same files for the same seed) without reseeding the
    caller's global generator: before, a user's torch.rand after it repeated the draws of torch.manual_seed(0)."""
    from diffusion_fast import tiny

    def files(folder):
        return {name: open(os.path.join(folder, name, "diffusion_pytorch_model.safetensors"), "rb").read()
                for name in ("unet", "vae")}

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = files(tiny.write_tiny_pipeline(str(tmp_path / "a"), "sd1", seed=0))
    assert torch.equal(torch.rand(4), expected)
    assert files(tiny.write_tiny_pipeline(str(tmp_path / "b"), "sd1", seed=0)) == first


def test_missing_folder_and_components(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusionPipeline.from_pretrained(tmp_path)


def test_sdxl_folder_and_mismatched_models_are_refused_up_front(tmp_path):
    """An SDXL folder (two text encoders) is refused before any weight loads, pointing at our SDXL pipeline; before, it
    loaded and failed at the first UNet call with a shape error. A UNet whose cross-attention width is not the text
    encoder's is refused when the pipeline is built."""
    import json

    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (tmp_path / name).mkdir()
    index = {name: ["diffusers", "X"] for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                    "tokenizer_2", "scheduler")}
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline")))
    with pytest.raises(ValueError, match=r"StableDiffusionXLPipeline folder with two text encoders \(SDXL\): load it "
                                         r"with diffusion_fast.StableDiffusionXLPipeline"):
        StableDiffusionPipeline.from_pretrained(tmp_path)

    sd1, sd2 = StableDiffusionPipeline.from_tiny("sd1"), StableDiffusionPipeline.from_tiny("sd2")
    width = sd1.text_encoder.config.hidden_size
    assert sd2.unet.config.cross_attention_dim != width  # the two tiny variants differ there
    with pytest.raises(ValueError, match=f"unet \\(cross_attention_dim={sd2.unet.config.cross_attention_dim}\\) "
                                         f"does not fit text_encoder \\(hidden_size={width}\\)"):
        StableDiffusionPipeline(sd2.unet, sd1.vae, sd1.text_encoder, sd1.tokenizer, sd1.scheduler)
    with pytest.raises(TypeError, match="text_encoder must be a model with config.hidden_size .* got Linear"):
        StableDiffusionPipeline(sd1.unet, sd1.vae, torch.nn.Linear(2, 2), sd1.tokenizer, sd1.scheduler)


def test_builtin_tiny_model_runs_both_paths():
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    pipe.set_progress_bar_config(disable=True)
    outs = []
    for name in ("fast", "reference"):
        with diffusion_fast.backend(name):
            outs.append(pipe("a", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images)
    assert np.isfinite(outs[0]).all() and np.abs(outs[0] - outs[1]).max() <= PIPELINE_FP32_MAX_ABS


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_half_precision_runs_both_paths(backend_name):
    # fp16 weights through both paths: every op must return the model's dtype (the reference upcasts internally)
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    with diffusion_fast.backend(backend_name):
        latents = pipe("a", num_inference_steps=2, output_type="latent").images
    assert latents.dtype == torch.float16 and bool(torch.isfinite(latents).all())


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_loop_matches_eager_on_gpu(tmp_path):
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    outs = []
    for graph in (False, "auto", "auto"):  # eager, first graphed call (capture), second graphed call (replay)
        pipe.cuda_graph = graph
        outs.append(pipe("a", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent").images)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_survives_eager_runs_and_a_swapped_scheduler():
    """Regression: set_timesteps used to free and reallocate the scheduler's device tables, which a captured graph
    reads by address; an eager run in between reused that memory and the next graphed image was NaN (H100, fp16)."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)

    def run(graph, backend_name="fast"):
        pipe.cuda_graph = graph
        with diffusion_fast.backend(backend_name):
            return pipe("a", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images

    graphed = run("auto")  # capture
    eager = run(False)
    churn = [torch.randn(1 << 14, device=DEVICE) for _ in range(64)]  # small blocks: what a freed table would get
    run(False, "reference")
    del churn
    torch.testing.assert_close(run("auto"), graphed, rtol=0, atol=0)  # replay after eager work: unchanged
    torch.testing.assert_close(graphed, eager, rtol=2e-3, atol=2e-3)
    pipe.scheduler = diffusion_fast.schedulers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    torch.testing.assert_close(run("auto"), run(False), rtol=2e-3, atol=2e-3)  # new scheduler, new graphs


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_is_recaptured_after_the_unet_weights_are_replaced():
    """load_state_dict(assign=True) gives the UNet new tensors and frees the ones the graph read: the next graphed
    image must use the new weights (recaptured), not whatever reused the freed memory."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)

    def run(graph):
        pipe.cuda_graph = graph
        return pipe("a", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent").images

    first = run("auto")  # capture
    pipe.unet.load_state_dict({k: v * 0.9 if v.is_floating_point() else v.clone()
                               for k, v in pipe.unet.state_dict().items()}, assign=True)
    churn = [torch.randn(1 << 14, device=DEVICE) for _ in range(64)]  # reuse the freed weights' memory
    graphed = run("auto")
    del churn
    eager = run(False)
    assert (graphed - first).abs().max() > 1e-3
    torch.testing.assert_close(graphed, eager, rtol=2e-3, atol=2e-3)


def test_graphed_step_is_rebuilt_for_a_swapped_unet_or_scheduler(monkeypatch):
    # On the CPU the graphed callable runs eagerly, so the bookkeeping can be checked here: a graph belongs to the
    # UNet and scheduler it was captured with (it reads their tensors by address).
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: "step")
    call = lambda: pipe("a", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    first = call().images
    graphs = pipe._graphs
    call()
    assert pipe._graphs is graphs  # same components: graphs kept
    pipe.scheduler = diffusion_fast.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(call().images, first, rtol=0, atol=0)
    assert pipe._graphs is not graphs and pipe._graphed_for[1] is pipe.scheduler
    graphs = pipe._graphs
    pipe.unet = type(pipe.unet).from_config(pipe.unet.config).eval()
    call()
    assert pipe._graphs is not graphs and pipe._graphed_for[0] is pipe.unet


def test_graphs_are_recaptured_after_the_unet_weights_are_replaced(monkeypatch):
    """The graphs watch the UNet's weights (ModuleState): replaced tensors mean a new capture. On the CPU, with capture
    stood in for (a replay runs the call into the static output)."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: "step")
    call = lambda: pipe("a", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    first = call().images  # the first call also sets the weights' layout, which drops the graphs
    step = use_fake_graphs(pipe._graphs_for_components()["step"])
    call(), call()
    assert step.captures == 1
    pipe.unet.load_state_dict({k: v.clone() for k, v in pipe.unet.state_dict().items()}, assign=True)
    torch.testing.assert_close(call().images, first, rtol=0, atol=0)
    assert step.captures == 2 and pipe._graphs["step"] is step


def test_graphs_are_recaptured_when_freeu_is_switched(monkeypatch):
    """FreeU's factors live on the UNet's up blocks, which the graphs watch (ModuleState): enable_freeu after a
    capture means a new one, whose replay gives the eager FreeU image; disable_freeu another, the first image again."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe("a", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    eager_freeu = call().images
    pipe.disable_freeu()
    monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: "step")
    first = call().images
    step = use_fake_graphs(pipe._graphs_for_components()["step"])
    call()
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    torch.testing.assert_close(call().images, eager_freeu, rtol=0, atol=0)
    pipe.disable_freeu()
    torch.testing.assert_close(call().images, first, rtol=0, atol=0)
    assert step.captures == 3


def test_graph_mode_whole_step_unet_only_or_none():
    """DDIM at eta 0 graphs the whole step; any other step graphs the UNet call (nearly all of a step's time) and
    runs the scheduler eagerly; the CPU, the reference backend and cuda_graph=False never graph."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # the choice reads the device type only
    assert pipe._graph_mode(cuda, 0.0) == "step"
    assert pipe._graph_mode(cuda, 0.5) == "unet"  # fresh noise each step
    assert pipe._graph_mode(cpu, 0.0) is None
    pipe._set_guidance_rescale(0.7)  # the rescaled step is not the fused one, and its value is no graph input
    assert pipe._graph_mode(cuda, 0.0) == "unet"
    pipe._set_guidance_rescale(0.0)
    with diffusion_fast.backend("reference"):
        assert pipe._graph_mode(cuda, 0.0) is None
    pipe.scheduler = diffusion_fast.schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe._graph_mode(cuda, 0.0) == "unet"
    pipe.cuda_graph = False
    assert pipe._graph_mode(cuda, 0.0) is None
    pipe.cuda_graph = True
    with pytest.raises(ValueError, match="cuda_graph=True needs the pipeline on a CUDA device"):
        pipe._graph_mode(cpu, 0.0)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDPMScheduler"])
def test_unet_only_graph_runs_every_step_and_keeps_the_image(monkeypatch, scheduler):
    """Non-DDIM schedulers: every UNet call goes through the UNet's graph (run eagerly on the CPU), whose output is
    copied before the scheduler uses it; the image is the eager loop's, bit for bit."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusion_fast.schedulers, scheduler).from_config(pipe.scheduler.config)
    call = lambda: pipe("a", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    eager = call().images
    calls = []
    real = pipe._unet_call
    monkeypatch.setattr(pipe, "_unet_call", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: "unet")
    pipe._graphs = None  # built afresh, around the spied call
    torch.testing.assert_close(call().images, eager, rtol=0, atol=0)
    assert len(calls) == 3


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_unet_only_graph_matches_eager_on_gpu():
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusion_fast.schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    outs = []
    for graph in (False, "auto", "auto"):  # eager, capture, replay
        pipe.cuda_graph = graph
        outs.append(pipe("a", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                         output_type="latent").images)
    assert pipe._graphs is not None and len(pipe._graphs["unet"]) == 1
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("layout", [True, False])
def test_channels_last_choice_keeps_the_image_and_converts_the_weights(layout):
    """channels_last=True/False/"auto": the same image (fp32 rounding apart), and the conv weights really are in the
    chosen memory format after a call ("auto" is channels_last on the CPU and on CUDA)."""
    pipe = StableDiffusionPipeline.from_tiny("sd1", seed=0, device=DEVICE, channels_last="auto")
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    auto = run()
    auto_is_cl = pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert auto_is_cl == (DEVICE.type in ("cpu", "cuda"))
    pipe.channels_last = layout
    out = run()
    fmt = torch.channels_last if layout else torch.contiguous_format
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=fmt)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=fmt)
    # fp32 on the CPU: only summation order differs. On CUDA, cuDNN may run fp32 convs in TF32 (PyTorch's default),
    # and NCHW and channels_last pick different algorithms.
    assert np.abs(out - auto).max() <= (1e-5 if DEVICE.type == "cpu" else 2e-3)
    with pytest.raises(ValueError, match="channels_last must be 'auto', True or False"):
        StableDiffusionPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                channels_last="yes")
    for name, bad in (("channels_last", 1), ("cuda_graph", "on")):  # set later: refused at the assignment
        with pytest.raises(ValueError, match=f"{name} must be 'auto', True or False"):
            setattr(pipe, name, bad)


def test_strict_fp32_turns_tf32_off_inside_and_restores_it():
    """The fp32 reference image (check, gpu_e2e) is computed with TF32 off; the caller's settings come back."""
    from diffusion_fast.numerics import strict_fp32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with pytest.raises(KeyError):
            with strict_fp32():
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                raise KeyError("restored even when the block raises")
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
