"""Our StableDiffusionXLControlNetInpaintPipeline against diffusers' on the tiny SDXL ControlNet pipeline's weights
(one net, and two; SDXL's 9-channel inpainting UNet and a plain one), written by save_pretrained.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed,
images and weights; with padding_mask_crop (PIL output, pasted back) within one 8-bit level. Each comparison also
checks that the image without the nets is far off, so a dropped residual cannot pass.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusionXLControlNetInpaintPipeline
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# 50x42: cut to 48x40 by both (the image's own size is the output's here, not the UNet's default); conditioning
# images of the same size (diffusers prepares each at its own size); white (repainted) in a 20x28 box
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 255, (42, 50, 3), dtype=np.uint8))
EDGES = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50), dtype=np.uint8))
POSE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (42, 50, 3), dtype=np.uint8))
_mask = np.zeros((42, 50), np.uint8)
_mask[10:30, 12:40] = 255
MASK = Image.fromarray(_mask)


@pytest.fixture(scope="module", params=[(9, 1), (4, 1), (4, 2)], ids=["inpainting-unet", "plain-unet", "two-nets"])
def pair(request, tmp_path_factory):
    """(diffusers' pipeline on the tiny SDXL ControlNet pipeline's components with a UNet of the given input
    channels, ours loaded by load_pipeline from the folder diffusers saved, the number of nets)."""
    import diffusers

    channels, nets = request.param
    components = dict(_tiny_diffusers.controlnet_pipeline(seed=4, nets=nets, variant="sdxl").components)
    if channels == 9:  # the nets still take the 4 latent channels
        torch.manual_seed(1)
        components["unet"] = diffusers.UNet2DConditionModel(**dict(_tiny_diffusers.SDXL_TINY, in_channels=9))
    theirs = diffusers.StableDiffusionXLControlNetInpaintPipeline(**components)
    folder = tmp_path_factory.mktemp(f"tiny-xl-controlnet-inpaint-{channels}-{nets}")
    theirs._saved_to = str(folder)  # (for a pipeline of its own in another dtype)
    return (*_tiny_diffusers.saved_pair(theirs, folder, StableDiffusionXLControlNetInpaintPipeline), nets)


def _inpaint(pipe, nets, backend_name="fast", **kwargs):
    kwargs = dict(dict(prompt="a red cube", image=IMAGE, mask_image=MASK, control_image=_tiny_diffusers.per_net(
        nets, EDGES, POSE), num_inference_steps=6, output_type="np"), **kwargs)
    with diffusion_fast.backend(backend_name):
        images = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]) if kwargs["output_type"] == "pil" \
        else images


@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},  # diffusers' defaults: strength 0.9999, guidance 5, the nets at scale 1
    dict(guess_mode=True),
    # the nets' end is a fraction of the 3 steps of the strength's tail (of 6 it would keep them longer)
    dict(control_guidance_end=0.5, strength=0.6),
    # and of the tail before denoising_end cuts it: 6 steps, of which 4 run; the nets stop after step 4 of 6
    dict(denoising_end=0.6, control_guidance_end=0.7, output_type="latent"),
    dict(denoising_start=0.4, control_guidance_start=0.3),  # a refiner's part: the image's latents not noised
    # resized to 32x40; the negative size ids take the positive crop corner, as diffusers builds them here
    dict(height=32, width=40, negative_prompt="blurry", crops_coords_top_left=(4, 8), original_size=(80, 96)),
]))
def test_same_image_as_diffusers(pair, backend_name, kwargs):
    theirs, ours, nets = pair
    tolerance = 1e-4 if kwargs.get("output_type") == "latent" else PIPELINE_FP32_MAX_ABS

    def run(pipe, **kw):
        out = _inpaint(pipe, nets, backend_name if pipe is ours else "fast", **kw)
        return out.numpy() if torch.is_tensor(out) else out

    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(run, theirs, ours, nets, tolerance, **kwargs)


def test_padding_mask_crop(pair):
    """The box around the mask cut from the image, mask and conditioning images alike, inpainted and pasted back:
    the image's size, its pixels outside the mask. (diffusers refuses a list of conditioning images here.)"""
    theirs, ours, nets = pair
    b = _inpaint(ours, nets, padding_mask_crop=2, output_type="pil")
    if nets == 1:
        assert np.abs(_inpaint(theirs, nets, padding_mask_crop=2, output_type="pil") - b).max() <= 1.5 / 255
    outside = np.asarray(MASK) == 0
    assert b.shape == (1, 42, 50, 3) and np.array_equal(b[0][outside], np.asarray(IMAGE, np.float32)[outside] / 255)


def test_callback_reads_mask_and_control_image(pair):
    theirs, ours, nets = pair
    seen = {}

    def callback(pipe, i, t, tensors):
        images = tensors["control_image"] if nets > 1 else [tensors["control_image"]]
        seen.setdefault(id(pipe), []).append((tuple(tensors["mask"].shape), tuple(tensors["add_time_ids"].shape),
                                              [tuple(im.shape) for im in images]))
        return {"control_image": [im.flip(-1) for im in images] if nets > 1 else images[0].flip(-1)} if i == 0 else {}

    kwargs = dict(callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["mask", "add_time_ids", "control_image"])
    b = _inpaint(ours, nets, **kwargs)
    assert np.abs(_inpaint(theirs, nets, **kwargs) - b).max() <= PIPELINE_FP32_MAX_ABS
    assert seen[id(theirs)] == seen[id(ours)]


def test_graphed_loop_gives_the_eager_image(pair, monkeypatch):
    """On CUDA the whole DDIM step (the nets and the mask inputs inside) replays from a graph; capture stood in for
    on the CPU."""
    from _fake_graphs import use_fake_graphs

    _, ours, nets = pair
    eager = _inpaint(ours, nets, control_guidance_end=0.5)
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "step")
    try:
        graphed = use_fake_graphs(ours._graphs_for_components()["step"])
        assert np.array_equal(_inpaint(ours, nets, control_guidance_end=0.5), eager)
        assert graphed.captures == 2  # the nets' two sets of scales: on, then off
    finally:
        ours._graphs = None


def test_refiner_shaped_unet_same_image_as_diffusers(tmp_path):
    """requires_aesthetics_score (a refiner's UNet and net: five time ids, the aesthetic score in place of the target
    size): diffusers' negative ids here take the positive size and crop corner with the negative score."""
    import diffusers

    components = dict(_tiny_diffusers.controlnet_pipeline(seed=4, variant="sdxl").components)
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(**dict(_tiny_diffusers.SDXL_TINY, in_channels=9,
                                                 projection_class_embeddings_input_dim=24 + 5 * 8))
    controlnet = _tiny_diffusers.random_controlnet(diffusers.UNet2DConditionModel(**dict(
        _tiny_diffusers.SDXL_TINY, projection_class_embeddings_input_dim=24 + 5 * 8)))
    components.update(unet=unet, controlnet=controlnet)
    theirs = diffusers.StableDiffusionXLControlNetInpaintPipeline(**components, requires_aesthetics_score=True)
    theirs, ours = _tiny_diffusers.saved_pair(theirs, tmp_path, StableDiffusionXLControlNetInpaintPipeline)
    assert ours.requires_aesthetics_score

    def run(pipe, **kw):
        return _inpaint(pipe, 1, **kw)

    _tiny_diffusers.assert_as_diffusers_with_nets_that_matter(
        run, theirs, ours, 1, PIPELINE_FP32_MAX_ABS, negative_prompt="blurry", crops_coords_top_left=(4, 8),
        aesthetic_score=7.0, negative_aesthetic_score=1.5)


def test_bad_input_is_named(pair):
    _, ours, nets = pair
    for kwargs, match in [
        (dict(mask_image=None), "image and mask_image: give both"),
        (dict(control_image=None), "control_image: (give a conditioning image|2 ControlNets take a list)"),
        (dict(denoising_start=0.6, denoising_end=0.5), "denoising_start"),
        (dict(aesthetic_score="high"), "aesthetic_score must be a finite number"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            _inpaint(ours, nets, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_loop_matches_eager_on_gpu(pair):
    """fp16 on CUDA, a net ending early: eager, capture and replay give the same latents (the replay bit for bit)."""
    theirs, _, nets = pair
    pipe = diffusion_fast.load_pipeline(theirs._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: _inpaint(p, nets, control_guidance_end=0.5, output_type="latent"),
                            "step", 2)
