"""T2I-Adapters: our T2IAdapter / MultiAdapter models, the UNet's intrablock residuals, and our
StableDiffusion(XL)AdapterPipeline against diffusers' on tiny models with three UNet levels (so that each adapter
kind fits as it fits SD 1.5 and SDXL), written by save_pretrained and loaded by load_pipeline.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, images and weights (latents within 1e-4). Each comparison also checks that the image at adapter scale 0 is far
off, so a dropped or misplaced feature map cannot pass.
"""
import re

import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import (MultiAdapter, StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline,
                            T2IAdapter)
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# 50x42: cut to 48x40 (multiples of 8, the XL adapter's factor) by both; an RGB "depth map" and a grayscale sketch
DEPTH = Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 50, 3), dtype=np.uint8))
SKETCH = Image.fromarray(np.random.default_rng(1).integers(0, 255, (42, 50), dtype=np.uint8))


def _pair(tmp_path_factory, variant, kinds):
    """(diffusers' adapter pipeline (_tiny_diffusers.adapter_pipeline), ours loaded from the folder it saved, the
    images it takes)."""
    theirs = _tiny_diffusers.adapter_pipeline(variant, kinds)
    folder = tmp_path_factory.mktemp(f"tiny-adapter-{variant}-{'-'.join(kinds)}")
    cls = StableDiffusionAdapterPipeline if variant == "sd1" else StableDiffusionXLAdapterPipeline
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, cls)
    theirs._saved_to = str(folder)
    images = [SKETCH if kind == "sketch" else DEPTH for kind in kinds]
    return theirs, ours, images[0] if len(images) == 1 else images


@pytest.fixture(scope="module", params=[("full",), ("light",), ("sketch", "full")],
                ids=["full", "light", "multi-sketch-and-full"])
def sd_pair(request, tmp_path_factory):
    return _pair(tmp_path_factory, "sd1", request.param)


@pytest.fixture(scope="module")
def xl_pair(tmp_path_factory):
    return _pair(tmp_path_factory, "sdxl", ("xl",))


def _multi(pipe):
    return len(getattr(pipe.adapter, "adapters", ())) > 1


def _run(pipe, image, backend_name="fast", **kwargs):
    if _multi(pipe) and "adapter_conditioning_scale" not in kwargs:
        kwargs["adapter_conditioning_scale"] = [0.8, 0.6]  # (diffusers' default 1.0 fails for a MultiAdapter)
    kwargs = dict(dict(prompt="a red cube", image=image, num_inference_steps=5, output_type="np"), **kwargs)
    with diffusion_fast.backend(backend_name):
        out = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    return out.numpy() if torch.is_tensor(out) else out


def _assert_as_diffusers(theirs, ours, image, tolerance=PIPELINE_FP32_MAX_ABS, backend_name="fast", **kwargs):
    b = _run(ours, image, backend_name, **kwargs)
    a = _run(theirs, image, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= tolerance, np.abs(a - b).max()
    zero = [0.0, 0.0] if _multi(ours) else 0.0
    assert np.abs(_run(ours, image, backend_name, **dict(kwargs, adapter_conditioning_scale=zero)) - b).max() > 0.005
    return b


# ---- the models ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(_tiny_diffusers.ADAPTERS))
def test_adapter_loads_a_diffusers_folder_and_gives_its_features(kind, tmp_path):
    theirs = _tiny_diffusers.diffusers_adapter(kind, 0)
    theirs.save_pretrained(tmp_path)
    ours = T2IAdapter.from_pretrained(tmp_path)
    config = _tiny_diffusers.ADAPTERS[kind]
    image = torch.rand(2, config.get("in_channels", 3), 48, 56)  # (56: odd maps below, pooled ceil-wise)
    expected, got = theirs(image), ours(image)
    assert len(got) == len(expected) and ours.total_downscale_factor == theirs.total_downscale_factor
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert [(f.shape[1], 48 // f.shape[2]) for f in got] == ours.feature_shapes()
    factor = config["downscale_factor"]
    with pytest.raises(ValueError, match=f"multiples of its downscale_factor {factor}"):
        ours(image[:, :, :factor + factor // 2])


def test_multi_adapter_sums_weighted_features_as_diffusers():
    import diffusers

    adapters = [_tiny_diffusers.diffusers_adapter("full", 0), _tiny_diffusers.diffusers_adapter("sketch", 1)]
    theirs = diffusers.MultiAdapter(adapters)
    ours = MultiAdapter([T2IAdapter.from_config(dict(a.config)) for a in adapters])
    for mine, theirs_one in zip(ours.adapters, adapters):
        mine.load_state_dict(theirs_one.state_dict())
    images = [torch.rand(1, 3, 32, 40), torch.rand(1, 1, 32, 40)]
    for weights in (None, [0.7, -0.2]):
        for a, b in zip(theirs(images, weights), ours(images, weights)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="adapter 1's feature maps"):
        MultiAdapter([T2IAdapter.from_config(_tiny_diffusers.ADAPTERS[kind]) for kind in ("full", "xl")])


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_unet_adds_feature_maps_where_diffusers_does(variant):
    """Our UNet with down_intrablock_additional_residuals against diffusers' at an odd latent size (12x15 halves to
    6x8, then 3x4); SD's three maps (none at the mid block), SDXL's four (the last at the mid block). diffusers'
    in-place add changes a plain block's last skip too; ours does the same."""
    import diffusers

    from diffusion_fast.models import UNet2DConditionModel

    torch.manual_seed(0)
    config = _tiny_diffusers.ADAPTER_SD_UNET if variant == "sd1" else _tiny_diffusers.ADAPTER_XL_UNET
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel.from_config(dict(theirs.config)).eval()
    ours.load_state_dict(theirs.state_dict())
    sample, context = torch.randn(2, 4, 12, 15), torch.randn(2, 7, theirs.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 24), "time_ids": torch.randn(2, 6)} if variant == "sdxl" else None
    shapes = ours.intrablock_shapes()[:3 if variant == "sd1" else 4]
    maps = [torch.randn(2, width, -(-12 // scale), -(-15 // scale)) for width, scale in shapes]
    with torch.no_grad():
        expected = theirs(sample, 10, context, added_cond_kwargs=added,
                          down_intrablock_additional_residuals=[m.clone() for m in maps]).sample
        got = ours(sample, 10, context, added, down_intrablock_additional_residuals=maps)
        without = ours(sample, 10, context, added)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert (got - without).abs().max() > 0.1
        with pytest.raises(ValueError, match="a feature map of shape"):
            ours(sample, 10, context, added, down_intrablock_additional_residuals=[maps[1], *maps[1:]])
        with pytest.raises(TypeError, match="down_intrablock_additional_residuals must be a list of tensors"):
            ours(sample, 10, context, added, down_intrablock_additional_residuals=maps[0])
        with pytest.raises(ValueError, match="1 feature maps left over"):  # (not the mid block's shape)
            ours(sample, 10, context, added, down_intrablock_additional_residuals=[*maps, torch.randn(2, 64, 1, 1)])


# ---- the pipelines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, backend_name", _tiny_diffusers.fast_and_one_reference([
    {},
    dict(adapter_conditioning_scale=0.6, negative_prompt="blurry", num_images_per_prompt=2),
    dict(height=32, width=40),  # the images resized to it
    # one image for both prompts (diffusers broadcasts its maps, which it can only without guidance)
    dict(prompt=["a red cube", "a blue ball"], guidance_scale=1.0),
]))
def test_sd_same_image_as_diffusers(sd_pair, backend_name, kwargs):
    theirs, ours, image = sd_pair
    if _multi(ours) and "adapter_conditioning_scale" in kwargs:
        kwargs = dict(kwargs, adapter_conditioning_scale=[0.6, 0.3])
    _assert_as_diffusers(theirs, ours, image, backend_name=backend_name, **kwargs)


def test_sd_one_image_per_prompt_as_diffusers(sd_pair):
    """Two prompts, each with its own conditioning image (and guidance): image i conditions prompt i."""
    theirs, ours, image = sd_pair
    two = [[im, im.transpose(Image.FLIP_LEFT_RIGHT)] for im in image] if _multi(ours) else \
        [image, image.transpose(Image.FLIP_LEFT_RIGHT)]
    b = _assert_as_diffusers(theirs, ours, two, prompt=["a red cube", "a blue ball"])
    swapped = [im[::-1] for im in two] if _multi(ours) else two[::-1]
    assert np.abs(_run(ours, swapped, prompt=["a red cube", "a blue ball"]) - b).max() > 0.005


@pytest.mark.parametrize("kwargs", [
    {},
    dict(adapter_conditioning_factor=0.5, adapter_conditioning_scale=0.7),  # the maps in the first 2 of 5 steps
    # diffusers counts the factor over the steps denoising_end leaves: int(3 * 0.7) = 2 of them
    dict(denoising_end=0.5, adapter_conditioning_factor=0.7, output_type="latent"),
    dict(guidance_rescale=0.7, negative_prompt="blurry", prompt_2="a blue ball"),
    # the negative ids are the positive ones unless both negative sizes are given (then with the negative crop)
    dict(crops_coords_top_left=(4, 8), original_size=(80, 96)),
    dict(negative_original_size=(32, 32), negative_target_size=(40, 40), negative_crops_coords_top_left=(2, 2)),
])
def test_sdxl_same_image_as_diffusers(xl_pair, kwargs):
    theirs, ours, image = xl_pair
    tolerance = 1e-4 if kwargs.get("output_type") == "latent" else PIPELINE_FP32_MAX_ABS
    _assert_as_diffusers(theirs, ours, image, tolerance, **kwargs)


def test_sdxl_factor_counts_steps_as_diffusers_with_heun(xl_pair):
    """Heun's loop runs 2N - 1 timesteps; diffusers' factor multiplies N (the steps asked for): the maps in
    int(4 * 0.3) = 1 of the loop's 7 UNet calls (over the loop's count they would be in 2)."""
    theirs, ours, image = xl_pair
    with _tiny_diffusers.swapped_schedulers("HeunDiscreteScheduler", [theirs], [ours]):
        _assert_as_diffusers(theirs, ours, image, num_inference_steps=4, adapter_conditioning_factor=0.3)


def test_with_an_ip_adapter_as_diffusers(xl_pair, tmp_path):
    """An IP-Adapter's image prompt beside the T2I-Adapter's maps (diffusers' SDXL adapter pipeline takes both)."""
    theirs, ours, image = xl_pair
    prompt_image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    with _tiny_diffusers.ip_adapter_loaded((theirs, ours), tmp_path, theirs.unet):
        b = _assert_as_diffusers(theirs, ours, image, ip_adapter_image=prompt_image)
        ours.set_ip_adapter_scale(0.0)
        assert np.abs(_run(ours, image, ip_adapter_image=prompt_image) - b).max() > 0.005


def test_accelerate_keeps_diffusers_sd_adapter_pipelines_images(sd_pair):
    _accelerate_keeps_the_image(*sd_pair)


def test_accelerate_keeps_diffusers_sdxl_adapter_pipelines_images(xl_pair):
    _accelerate_keeps_the_image(*xl_pair)


def _accelerate_keeps_the_image(theirs, _, image):
    """accelerate() on diffusers' own adapter pipeline: its UNet's blocks run our ops, the maps go where diffusers
    puts them, the image is the same; restore() undoes it."""
    before = _run(theirs, image)
    diffusion_fast.accelerate(theirs)
    try:
        assert np.abs(_run(theirs, image) - before).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        diffusion_fast.restore(theirs)
    assert np.array_equal(_run(theirs, image), before)


def test_graphed_loop_gives_the_eager_image(xl_pair, monkeypatch):
    """On CUDA the whole DDIM step (the maps as graph inputs) replays from a graph; capture stood in for on the
    CPU. The factor makes two graphs: with the maps, then without."""
    from _fake_graphs import use_fake_graphs

    _, ours, image = xl_pair
    eager = _run(ours, image, adapter_conditioning_factor=0.6)
    monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: "step")
    try:
        graphed = use_fake_graphs(ours._graphs_for_components()["step"])
        assert np.array_equal(_run(ours, image, adapter_conditioning_factor=0.6), eager)
        assert graphed.captures == 2
    finally:
        ours._graphs = None


def test_callback_reads_and_replaces_the_feature_maps(sd_pair):
    _, ours, image = sd_pair
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append([tuple(s.shape) for s in tensors["adapter_state"]])
        return {"adapter_state": [torch.zeros_like(s) for s in tensors["adapter_state"]]} if i == 0 else {}

    replaced = _run(ours, image, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["adapter_state"])
    assert seen[0] == [(2, 32, 10, 12), (2, 64, 5, 6), (2, 64, 3, 3)] and len(seen) == 5
    # zeros from step 2 on: between the adapter's image and the image at scale 0 for the first step alone
    assert np.abs(replaced - _run(ours, image)).max() > 0.005


def test_each_prompts_images_get_its_maps(sd_pair):
    """Two prompts with an image each and two images per prompt: the maps follow the latents' order (prompt 0's
    two images, then prompt 1's), for the unconditional half and the text half alike. (diffusers tiles them, so
    there prompt 1's first image would get prompt 0's map.)"""
    _, ours, image = sd_pair
    flip = Image.FLIP_LEFT_RIGHT
    two = [[im, im.transpose(flip)] for im in image] if _multi(ours) else [image, image.transpose(flip)]
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tensors["adapter_state"][0])
        return {}

    _run(ours, two, prompt=["a red cube", "a blue ball"], num_images_per_prompt=2, num_inference_steps=1,
         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["adapter_state"])
    rows = seen[0]
    assert rows.shape[0] == 8 and torch.equal(rows[:4], rows[4:])
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[2], rows[3]) and not torch.equal(rows[1], rows[2])


def test_pipelines_from_parts_and_adapter_swaps(sd_pair, xl_pair):
    _, ours, _ = sd_pair
    _, xl, _ = xl_pair
    with pytest.raises(ValueError, match=r"adapter \(feature maps .* does not fit this UNet"):
        StableDiffusionXLAdapterPipeline.from_pipeline(xl, ours.adapter)
    with pytest.raises(ValueError, match="does not fit this UNet"):
        xl.adapter = ours.adapter if isinstance(ours.adapter, T2IAdapter) else ours.adapter.adapters[1]
    assert isinstance(xl.adapter, T2IAdapter) and xl.adapter.config.adapter_type == "full_adapter_xl"  # kept
    with pytest.raises(TypeError, match="adapter must be a diffusion_fast T2IAdapter"):
        StableDiffusionAdapterPipeline.from_pipeline(ours, object())
    with pytest.raises(ValueError, match="pipe is an SDXL pipeline .* which StableDiffusionAdapterPipeline cannot"):
        StableDiffusionAdapterPipeline.from_pipeline(xl, xl.adapter)
    plain = diffusion_fast.StableDiffusionPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer,
                                                   ours.scheduler)
    again = StableDiffusionAdapterPipeline.from_pipeline(plain, ours.adapter)
    assert again.unet is ours.unet and again.adapter is ours.adapter


def test_bad_input_is_named(sd_pair):
    _, ours, image = sd_pair
    multi = _multi(ours)
    for kwargs, error, match in [
        (dict(image=None), ValueError, "image: (give a conditioning image|2 adapters take a list)"),
        (dict(width=30), ValueError, "width must be a positive multiple of 8"),
        (dict(adapter_conditioning_scale=[1.0, 2.0, 3.0]), ValueError, "adapter_conditioning_scale must be a number"),
        (dict(adapter_conditioning_factor=1.5), ValueError, "adapter_conditioning_factor must be a number in"),
        (dict(image=[SKETCH, SKETCH] if multi else SKETCH), ValueError,
         "image( 1)? has 1 channels; adapter [01] takes 3"),
        (dict(image=[[SKETCH] * 3, [DEPTH] * 3] if multi else [DEPTH] * 3, prompt=["a", "b"]), ValueError,
         "image( 0)? has 3 images for 2 prompts: give one, or one per prompt"),
        (dict(image=["depth.png"] * 2 if multi else "depth.png"), TypeError, "image must be a PIL image"),
    ]:
        with pytest.raises(error, match=match):
            _run(ours, kwargs.pop("image", image), **kwargs)


def test_numpy_image_as_its_pil_image(xl_pair):
    _, ours, _ = xl_pair
    array = np.asarray(DEPTH.resize((48, 40), Image.LANCZOS), dtype=np.float32) / 255
    np.testing.assert_allclose(_run(ours, array), _run(ours, DEPTH.resize((48, 40), Image.LANCZOS)), atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_loop_matches_eager_on_gpu(xl_pair):
    """fp16 on CUDA with the maps for half the steps: eager, capture and replay give the same latents (the replay
    bit for bit)."""
    theirs, _, image = xl_pair
    pipe = diffusion_fast.load_pipeline(theirs._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p(
        prompt="a red cube", image=image, num_inference_steps=5, output_type="latent",
        adapter_conditioning_factor=0.6, generator=torch.Generator(DEVICE).manual_seed(3)).images, "step", 2)


# ---- the CLI ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_folders(tmp_path_factory, xl_pair):
    """A root with: sd/ and sdxl/ (the adapter pipelines' plain components), full/ and xl/ (their adapters alone), and
    depth.png / sketch.png (42x50); and diffusers' pipelines for the PNGs (the SD one with the full adapter)."""
    import diffusers

    root = tmp_path_factory.mktemp("cli-t2i-adapter")
    theirs, _, _ = _pair(tmp_path_factory, "sd1", ("full",))
    xl, _, _ = xl_pair
    diffusers.StableDiffusionPipeline(**{k: v for k, v in theirs.components.items() if k != "adapter"}) \
        .save_pretrained(root / "sd")
    diffusers.StableDiffusionXLPipeline(**{k: v for k, v in xl.components.items() if k != "adapter"}) \
        .save_pretrained(root / "sdxl")
    theirs.adapter.save_pretrained(root / "full")
    xl.adapter.save_pretrained(root / "xl")
    DEPTH.save(root / "depth.png")
    SKETCH.save(root / "sketch.png")
    return root, theirs, xl


@pytest.mark.parametrize("which", ["sd", "sdxl", "own"])
def test_generate_with_a_t2i_adapter_gives_diffusers_image(cli_folders, xl_pair, tmp_path, capsys, which):
    """--t2i-adapter DIR --adapter-image FILE (or a --model folder diffusers saved an adapter pipeline in, with its
    own adapter): the image diffusers' adapter pipeline makes from the same seed, within one 8-bit level, at the
    image's size cut to the adapter's factor."""
    from diffusion_fast.cli import main

    root, theirs, xl = cli_folders
    out = tmp_path / "out.png"
    argv = ["generate", "--steps", "3", "--seed", "2", "--output", str(out), "--no-progress", "--compare",
            "--adapter-image", str(root / "depth.png"), "--adapter-scale", "0.8"]
    kwargs = {} if which == "sd" else {"adapter_conditioning_factor": 0.7}  # (SD's diffusers pipeline has none)
    if kwargs:
        argv += ["--adapter-factor", "0.7"]
    if which == "own":
        argv += ["--model", xl._saved_to]
    else:
        argv += ["--model", str(root / which), "--t2i-adapter", str(root / ("full" if which == "sd" else "xl"))]
    pipe = theirs if which == "sd" else xl
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "max abs pixel difference" in text and ("loaded 1 T2I-Adapter" in text) == (which != "own")
    expected = pipe("a photograph of an astronaut riding a horse", image=Image.open(root / "depth.png"),
                    num_inference_steps=3, adapter_conditioning_scale=0.8,
                    generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--t2i-adapter", "FULL"], "--t2i-adapter, --adapter-scale and --adapter-factor need --adapter-image"),
    (["--adapter-image", "DEPTH"], "--adapter-image is for T2I-Adapters: give --t2i-adapter too"),
    (["--t2i-adapter", "FULL", "--t2i-adapter", "FULL", "--adapter-image", "DEPTH"],
     r"--adapter-image: give one per --t2i-adapter \(2\), in order; got 1"),
    (["--t2i-adapter", "FULL", "--adapter-image", "/no/such.png"], "--adapter-image: no such file: /no/such.png"),
    (["--t2i-adapter", "FULL", "--adapter-image", "DEPTH", "--adapter-factor", "1.5"],
     r"--adapter-factor must be a fraction in \[0, 1\], got 1.5"),
    (["--t2i-adapter", "FULL", "--adapter-image", "DEPTH", "--adapter-scale", "1", "--adapter-scale", "2"],
     r"--adapter-scale: give one for all T2I-Adapters or one per adapter \(1\); got 2"),
    (["--t2i-adapter", "FULL", "--adapter-image", "DEPTH", "--image", "DEPTH"], "--adapter-image: leave out --image"),
    (["--model", "SDXL", "--t2i-adapter", "FULL", "--adapter-image", "DEPTH"],
     r"--t2i-adapter: adapter \(feature maps .* does not fit this UNet"),  # an SD adapter for an SDXL model
    (["--model", "OWN"], "is a T2I-Adapter pipeline with 1 adapter: give --adapter-image for each"),
    (["--t2i-adapter", "/no/such/dir", "--adapter-image", "DEPTH"], "is not a T2I-Adapter folder"),  # (argparse's)
])
def test_generate_t2i_adapter_bad_options_one_line(cli_folders, xl_pair, capsys, argv, message):
    from diffusion_fast.cli import main

    root = cli_folders[0]
    names = {"FULL": root / "full", "DEPTH": root / "depth.png", "SDXL": root / "sdxl", "OWN": xl_pair[0]._saved_to}
    if "--model" not in argv:
        argv = ["--model", str(root / "sd"), *argv]
    argv = ["generate", *[str(names.get(a, a)) for a in argv], "--steps", "2", "--no-progress"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own check of a flag's value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_check_runs_an_adapter_folder(xl_pair, capsys, monkeypatch):
    """A folder diffusers saved an adapter pipeline in is checked on a conditioning image made from the seed (the
    UNet's first prediction with the adapter's maps too); a fast path that drops the maps fails it."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main
    from diffusion_fast.pipeline_t2i_adapter import AdapterGuidance

    assert main(["check", "--model", xl_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "T2I-Adapter pipeline (2 " in text and "0 failed" in text
    real = AdapterGuidance._unet_call

    def fast_without_maps(self, model_input, t, embeds, *cond, **kwargs):
        return real(self, model_input, t, embeds, *(cond[:2] if current_backend() != "reference" else cond), **kwargs)

    monkeypatch.setattr(AdapterGuidance, "_unet_call", fast_without_maps)
    assert main(["check", "--model", xl_pair[0]._saved_to, "--steps", "2"]) == 1
    assert "T2I-Adapter pipeline (2 " in capsys.readouterr().out
