"""Our StableDiffusion(XL)ControlNetPipeline and ControlNetModel against diffusers' on tiny SD1- and SDXL-shaped
weights written by save_pretrained: one ControlNet, and two (a MultiControlNetModel).

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed,
conditioning images and weights (as for text-to-image). The tiny ControlNets' zero convolutions are random (see
_tiny_diffusers.controlnet_pipeline), so their residuals move the image: each comparison also checks that the image
without them is far off, so a dropped residual cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from diffusion_fast.models import ControlNetModel, MultiControlNetModel, UNet2DConditionModel
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# 42x34 grayscale ("L", as edge maps often are): not a multiple of the tiny VAE's scale 4, so both cut it to 40x32,
# resize it in its own mode and convert it to RGB afterwards
EDGES = Image.fromarray(np.random.default_rng(0).integers(0, 255, (34, 42), dtype=np.uint8))
POSE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (34, 42, 3), dtype=np.uint8))


def _pair(tmp_path_factory, variant, nets):
    """(diffusers' ControlNet pipeline, ours loaded from the folder diffusers saved it in, the number of nets)."""
    theirs, ours = _tiny_diffusers.saved_pair(
        _tiny_diffusers.controlnet_pipeline(seed=4, nets=nets, variant=variant),
        tmp_path_factory.mktemp(f"tiny-controlnet-{variant}-{nets}"),
        StableDiffusionControlNetPipeline if variant == "sd1" else StableDiffusionXLControlNetPipeline)
    assert isinstance(ours.controlnet, ControlNetModel if nets == 1 else MultiControlNetModel)
    return theirs, ours, nets


@pytest.fixture(scope="module", params=[("sd1", 1), ("sd1", 2), ("sdxl", 1), ("sdxl", 2)],
                ids=["sd1-one-net", "sd1-two-nets", "sdxl-one-net", "sdxl-two-nets"])
def pair(request, tmp_path_factory):
    return _pair(tmp_path_factory, *request.param)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-net", "two-nets"])
def xl_pair(request, tmp_path_factory):
    return _pair(tmp_path_factory, "sdxl", request.param)


def _images(pipe, nets, backend_name="fast", generators=None, **kwargs):
    kwargs = dict(dict(prompt="a red cube", image=EDGES if nets == 1 else [EDGES, POSE], num_inference_steps=5,
                       output_type="np"), **kwargs)
    generator = [torch.Generator().manual_seed(i) for i in range(generators)] if generators else \
        torch.Generator().manual_seed(3)
    with diffusion_fast.backend(backend_name):
        return pipe(generator=generator, **kwargs).images


_per_net = _tiny_diffusers.per_net


@pytest.mark.parametrize("case, backend_name", _tiny_diffusers.fast_and_one_reference([
    "default",
    "guess_mode",  # the nets see the conditional half alone, with rising scales; the other half gets no residual
    "guess_mode_no_guidance",  # ... and without guidance, the whole batch
    "guidance_end",  # the nets stop at half the steps (skipped there: the image must not change)
    "scales_and_start",  # a scale per net, starting at 30% of the steps
    "two_prompts",  # one conditioning image per prompt, two images per prompt, a generator per image
    "tensor_at_another_size",  # a [0, 1] tensor resized (nearest) to an explicit height and width
]))
def test_same_image_as_diffusers(pair, backend_name, case):
    theirs, ours, nets = pair
    rgb = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    kwargs, generators = {
        "default": ({}, None),
        "guess_mode": (dict(guess_mode=True), None),
        "guess_mode_no_guidance": (dict(guess_mode=True, guidance_scale=1.0), None),
        "guidance_end": (dict(control_guidance_end=0.5), None),
        "scales_and_start": (dict(controlnet_conditioning_scale=_per_net(nets, 0.5, 1.5),
                                  control_guidance_start=0.3), None),
        "two_prompts": (dict(prompt=["a", "b"], num_images_per_prompt=2,
                             image=_per_net(nets, [EDGES, POSE], [POSE, EDGES])), 4),
        "tensor_at_another_size": (dict(image=_per_net(nets, rgb, rgb.flip(-1)), height=16, width=24), None),
    }[case]
    if case == "two_prompts" and nets == 2:  # SD: diffusers' nested form, per prompt one image per net; SDXL's
        sdxl = isinstance(ours, StableDiffusionXLControlNetPipeline)  # pipeline takes one image per net for all
        kwargs["image"] = [EDGES, POSE] if sdxl else [[EDGES, POSE], [POSE, EDGES]]
    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(
        lambda pipe, **kw: _images(pipe, nets, backend_name if pipe is ours else "fast", generators, **kw),
        theirs, ours, nets, PIPELINE_FP32_MAX_ABS, **kwargs)


@pytest.mark.parametrize("case", [
    "denoising_end",  # a base's first part: the nets' fractions are of the whole schedule (0.8 of 5 steps keeps the
                      # net in all 3 steps that run; of the 3 alone it would drop the last)
    "second_prompts_and_negative_sizes",  # prompt_2, a negative prompt and negative size ids
    "guess_mode",  # the nets get the conditional half of the pooled embeddings and time ids too
])
def test_sdxl_arguments_same_image_as_diffusers(xl_pair, case):
    theirs, ours, nets = xl_pair
    kwargs = {"denoising_end": dict(denoising_end=0.6, control_guidance_end=0.8),
              "second_prompts_and_negative_sizes": dict(prompt_2="a blue ball", negative_prompt="blurry",
                                                        negative_original_size=(32, 32),
                                                        negative_target_size=(40, 40)),
              "guess_mode": dict(guess_mode=True, negative_prompt="blurry")}[case]
    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(lambda pipe, **kw: _images(pipe, nets, **kw), theirs,
                                                              ours, nets, PIPELINE_FP32_MAX_ABS, **kwargs)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                       "UniPCMultistepScheduler"])  # UniPC: diffusers' ControlNet docs' choice
def test_other_schedulers_same_image_as_diffusers(pair, scheduler):
    theirs, ours, nets = pair
    with _tiny_diffusers.swapped_schedulers(scheduler, [theirs], [ours]):
        assert np.abs(_images(theirs, nets) - _images(ours, nets)).max() <= PIPELINE_FP32_MAX_ABS


def test_a_net_outside_its_steps_is_not_run(pair):
    """control_guidance_end=0.4 of 5 steps: each net runs at steps 0 and 1 only (diffusers runs it at all five, at
    scale 0 after: exact zeros, the same image)."""
    theirs, ours, nets = pair
    calls = []
    handles = [net.register_forward_hook(lambda *args: calls.append(1)) for net in ours._nets]
    try:
        image = _images(ours, nets, control_guidance_end=0.4)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 * nets
    assert np.abs(_images(theirs, nets, control_guidance_end=0.4) - image).max() <= PIPELINE_FP32_MAX_ABS


def test_step_callback_sees_and_replaces_the_conditioning_images(pair):
    """diffusers' callback tensors: "image" is the prepared conditioning image (doubled for guidance), a list of them
    with several nets; one returned replaces it for the later steps."""
    theirs, ours, nets = pair
    seen = {}

    def callback(pipe, i, t, tensors):
        images = tensors["image"] if nets > 1 else [tensors["image"]]
        seen.setdefault(id(pipe), []).append([tuple(im.shape) for im in images])
        if i == 1:
            flipped = [im.flip(-1) for im in images]
            return {"image": flipped if nets > 1 else flipped[0], "latents": tensors["latents"] * 0.95}
        return {}

    kwargs = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "image"])
    a, b = _images(theirs, nets, **kwargs), _images(ours, nets, **kwargs)
    assert np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    assert seen[id(theirs)] == seen[id(ours)] == [[(2, 3, 32, 40)] * nets] * 5
    if isinstance(ours, StableDiffusionXLControlNetPipeline):  # SDXL's added conditioning beside the images
        seen.clear()

        def read_time_ids(pipe, i, t, tensors):
            seen.setdefault(id(pipe), []).append(tensors["add_time_ids"].tolist())
            return {"add_time_ids": tensors["add_time_ids"] * 1.5} if i == 0 else {}

        kwargs = dict(callback_on_step_end=read_time_ids, callback_on_step_end_tensor_inputs=["add_time_ids"])
        assert np.abs(_images(theirs, nets, **kwargs) - _images(ours, nets, **kwargs)).max() <= PIPELINE_FP32_MAX_ABS
        assert seen[id(theirs)] == seen[id(ours)]
    assert np.abs(b - _images(ours, nets)).max() > 0.005  # the replacement changed the image


@pytest.mark.parametrize("mode", ["step", "unet"])
def test_graphed_loop_gives_the_eager_image(pair, monkeypatch, mode):
    """On CUDA the whole DDIM step (the nets inside) or the nets' and UNet's call is replayed from a graph; each
    distinct set of per-step scales is its own graph (here two: before and after control_guidance_end). Capture is
    stood in for on the CPU. Weights replaced in a net recapture them; a ControlNet swapped in gets fresh graphs."""
    from _fake_graphs import use_fake_graphs

    _, ours, nets = pair
    eager = _images(ours, nets, control_guidance_end=0.6)
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: mode)
    try:
        graphed = use_fake_graphs(ours._graphs_for_components()[mode])
        assert np.array_equal(_images(ours, nets, control_guidance_end=0.6), eager)
        assert graphed.captures == 2 and len(graphed) == 2
        net = ours._nets[-1]  # weights replaced (same values, new tensors): both graphs are captured afresh
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
        assert np.array_equal(_images(ours, nets, control_guidance_end=0.6), eager)
        assert graphed.captures == 4 and len(graphed) == 2
        graphs, saved = ours._graphs, ours.controlnet
        assert ours._graphs_for_components() is graphs  # the same nets: the same graphs
        ours.controlnet = MultiControlNetModel(list(ours._nets))
        assert ours._graphs_for_components() is not graphs
    finally:
        ours.controlnet, ours._graphs = saved, None


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_controlnet_given_to_a_plain_folder(tmp_path, variant):
    """The usual way: an SD (SDXL) folder and a ControlNet loaded from its own folder (a list of them for several)."""
    theirs = _tiny_diffusers.controlnet_pipeline(seed=4, nets=2, variant=variant)
    base = _tiny_diffusers.pipeline("sd1", seed=4) if variant == "sd1" else _tiny_diffusers.sdxl_pipeline(seed=4)
    base.save_pretrained(tmp_path / "sd")
    for i, net in enumerate(theirs.controlnet.nets):
        net.save_pretrained(tmp_path / f"net{i}")
    nets = [ControlNetModel.from_pretrained(tmp_path / f"net{i}") for i in range(2)]
    cls = StableDiffusionControlNetPipeline if variant == "sd1" else StableDiffusionXLControlNetPipeline
    ours = cls.from_pretrained(tmp_path / "sd", controlnet=nets)
    ours.set_progress_bar_config(disable=True)
    assert np.abs(_images(theirs, 2) - _images(ours, 2)).max() <= PIPELINE_FP32_MAX_ABS
    with pytest.raises(ValueError, match="holds no ControlNet: pass controlnet="):
        cls.from_pretrained(tmp_path / "sd")


def test_bad_input_is_named(pair):
    _, ours, nets = pair
    image = _per_net(nets, EDGES, POSE)
    for kwargs, error, match in [
        (dict(image=None), ValueError, "image"),
        (dict(image="edges.png"), TypeError if nets == 1 else ValueError, "image"),
        (dict(controlnet_conditioning_scale=[1.0] * (nets + 1)), ValueError, "controlnet_conditioning_scale"),
        (dict(control_guidance_start=0.6, control_guidance_end=0.5), ValueError, "control_guidance_start"),
        (dict(control_guidance_end=1.5), ValueError, "control_guidance_end"),
        (dict(guess_mode="yes"), TypeError, "guess_mode"),
        (dict(height=30), ValueError, "height must be a positive multiple of 8"),
        # a grayscale tensor (PIL images are converted to RGB, as diffusers does; a tensor is taken as it is)
        (dict(image=_per_net(nets, torch.rand(1, 1, 32, 40), torch.rand(1, 3, 32, 40))), ValueError,
         "image( 0)? has 1 channels; ControlNet 0 takes 3"),
        (dict(prompt=["a", "b", "c"], image=_per_net(nets, [EDGES, POSE], [POSE, EDGES])), ValueError,
         "images for 3 prompts"),
    ]:
        with pytest.raises(error, match=match):
            ours(**dict(dict(prompt="a", image=image, num_inference_steps=2, output_type="latent"), **kwargs))


def test_components_that_do_not_fit_are_refused(pair):
    import diffusers

    theirs, ours, nets = pair
    with pytest.raises(TypeError, match="controlnet must be a diffusion_fast ControlNetModel"):
        type(ours).from_pipeline(ours, diffusers.ControlNetModel.from_unet(theirs.unet))
    wider = ControlNetModel.from_config(dict(ours._nets[0].config, cross_attention_dim=48))
    with pytest.raises(ValueError, match="controlnet 0 .* does not fit this UNet"):
        type(ours).from_pipeline(ours, wider)
    other = dict(diffusion_fast.tiny.unet_config("sd1")) if isinstance(ours, StableDiffusionXLControlNetPipeline) \
        else _tiny_diffusers.SDXL_TINY  # an SD net for an SDXL model, and the other way round
    other_net = ControlNetModel.from_config({k: v for k, v in other.items() if k not in (
        "sample_size", "out_channels", "up_block_types")})
    with pytest.raises(ValueError, match="controlnet 1 .* does not fit this UNet"):
        type(ours).from_pipeline(ours, [ours._nets[0], other_net])


# ---- the models ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, changes", [
    ("sd1", {}),
    ("sd1", dict(controlnet_conditioning_channel_order="bgr")),  # the image's channels flipped first
    ("sd1", dict(global_pool_conditions=True)),  # residuals pooled to 1x1 (shuffle-style nets)
    ("sdxl", {}),  # SDXL's text-time conditioning (the model alone; our ControlNet pipeline is SD 1.x/2.x)
])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_model_matches_diffusers(tmp_path, variant, changes, guess_mode):
    import diffusers

    torch.manual_seed(0)
    unet_config = dict(diffusion_fast.tiny.unet_config("sd1")) if variant == "sd1" else _tiny_diffusers.SDXL_TINY
    theirs = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel(**unet_config),
                                                 conditioning_embedding_out_channels=(8, 16, 32))
    theirs = diffusers.ControlNetModel.from_config(dict(theirs.config, **changes))
    with torch.no_grad():
        for p in theirs.parameters():  # every weight random, the zero convolutions too
            p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = ControlNetModel.from_pretrained(tmp_path)
    cross = theirs.config.cross_attention_dim
    sample, hidden = torch.randn(3, 4, 5, 7), torch.randn(3, 77, cross)  # batch 3, odd latent size
    image = torch.rand(3, 3, 20, 28)
    added = None if variant == "sd1" else {"text_embeds": torch.randn(3, 24), "time_ids": torch.rand(3, 6) * 512}
    with torch.no_grad():
        down_a, mid_a = theirs(sample, torch.tensor(321), hidden, image, 0.7, guess_mode=guess_mode,
                               added_cond_kwargs=added, return_dict=False)
        down_b, mid_b = ours(sample, torch.tensor(321), hidden, image, 0.7, guess_mode, added)
    assert len(down_a) == len(down_b)
    for a, b in zip([*down_a, mid_a], [*down_b, mid_b]):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_controlnet_model_bad_input_and_weights(tmp_path):
    import diffusers
    from safetensors.torch import load_file, save_file

    unet = diffusers.UNet2DConditionModel(**diffusion_fast.tiny.unet_config("sd1"))
    theirs = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    theirs.save_pretrained(tmp_path)
    net = ControlNetModel.from_pretrained(tmp_path)
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match=r"controlnet_cond must be a \(1, 3, 32, 32\) tensor .* 4x the latents"):
        net(sample, 10, hidden, torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="controlnet_cond must be"):
        net(sample, 10, hidden, None)
    with pytest.raises(ValueError, match="config field controlnet_conditioning_channel_order='rgba'"):
        ControlNetModel.from_config(dict(net.config, controlnet_conditioning_channel_order="rgba"))
    with pytest.raises(TypeError, match="conditioning_scale must be a number, got str"):
        net(sample, 10, hidden, torch.rand(1, 3, 32, 32), "0.5")
    with pytest.raises(TypeError, match="guess_mode must be a bool, got str"):
        net(sample, 10, hidden, torch.rand(1, 3, 32, 32), 1.0, "yes")
    with pytest.raises(TypeError, match="MultiControlNetModel takes a non-empty list"):
        MultiControlNetModel([theirs])
    with pytest.raises(TypeError, match="MultiControlNetModel: controlnet_cond must be a list"):
        MultiControlNetModel([net, net])(sample, 10, hidden, torch.rand(1, 3, 32, 32), [1.0, 1.0])
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("controlnet_mid_block.bias")
    state["controlnet_down_blocks.0.weight"] = state["controlnet_down_blocks.0.weight"][:1]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing \(1\): controlnet_mid_block.bias; mis-shaped \(1\): "
                                         r"controlnet_down_blocks.0.weight"):
        ControlNetModel.from_pretrained(tmp_path)


def test_unet_refuses_residuals_of_another_shape():
    unet = UNet2DConditionModel.from_config(diffusion_fast.tiny.unet_config("sd1"))
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="down_block_additional_residuals has 2 tensors but this UNet has 6 skip"):
        unet(sample, 10, hidden, None, [torch.zeros(1)] * 2, torch.zeros(1))


def test_a_controlnet_assigned_is_checked(pair):
    """pipe.controlnet = ... (as diffusers users swap nets): a list becomes a MultiControlNetModel, a net that does
    not fit is refused by name and the old one stays, something else is a TypeError."""
    _, ours, nets = pair
    saved = ours.controlnet
    try:
        ours.controlnet = list(ours._nets)
        assert isinstance(ours.controlnet, MultiControlNetModel) and len(ours._nets) == nets
        wider = ControlNetModel.from_config(dict(ours._nets[0].config, cross_attention_dim=48))
        with pytest.raises(ValueError, match="controlnet 0 .* does not fit this UNet"):
            ours.controlnet = wider
        assert isinstance(ours.controlnet, MultiControlNetModel)
        with pytest.raises(TypeError, match="controlnet must be a diffusion_fast ControlNetModel"):
            ours.controlnet = "lllyasviel/sd-controlnet-canny"
    finally:
        ours.controlnet = saved


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])  # the whole step; the call alone
def test_cuda_graph_controlnet_loop_matches_eager_on_gpu(tmp_path, scheduler):
    """fp16 on CUDA, two nets, guess mode, a net ending early: eager, capture and replay give the same latents (the
    replay bit for bit), and the two per-step scale sets are two graphs."""
    _tiny_diffusers.controlnet_pipeline(seed=4, nets=2).save_pretrained(tmp_path)
    pipe = diffusion_fast.load_pipeline(tmp_path, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusion_fast.schedulers, scheduler).from_config(pipe.scheduler.config)
    assert_graphed_as_eager(pipe, lambda p: p(
        "a", image=[EDGES, POSE], num_inference_steps=5, guess_mode=True, control_guidance_end=[1.0, 0.6],
        generator=torch.Generator().manual_seed(0), output_type="latent").images,
        "step" if scheduler == "DDIMScheduler" else "unet", 2)
