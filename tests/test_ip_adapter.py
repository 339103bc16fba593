"""IP-Adapters in our pipelines against diffusers' on tiny SD1- and SDXL-shaped weights: the plain IP-Adapter and
IP-Adapter Plus, in the original files' layout (tests/_tiny_diffusers.write_ip_adapter), with a tiny CLIP image encoder.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same seed,
image prompt and weights, as for text-to-image. The tiny adapters' image keys and values are large, so each
comparison also checks that the image without the adapter (scale 0) is far off: a dropped image term cannot pass.
"""
import contextlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast.models import ip_adapter as ip_model
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# 48x40 RGB: not the encoder's 32x32, so both resize and centre-crop it with the same CLIP image processor
CAT = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
DOG = Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 36, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers' tiny SD1 pipeline, ours from the folder it is saved in, the adapters' folder with a plain and a
    Plus adapter and their image encoder)."""
    folder = tmp_path_factory.mktemp("tiny-ip-sd1")
    theirs, ours = _tiny_diffusers.saved_pair(_tiny_diffusers.pipeline("sd1", seed=5), folder / "pipe",
                                              diffusion_fast.StableDiffusionPipeline)
    for kind in ("plain", "plus"):
        _tiny_diffusers.write_ip_adapter(folder / "ip", theirs.unet, kind, seed=7)
    theirs._saved_to = str(folder / "pipe")  # (for the CLI's --model)
    return theirs, ours, str(folder / "ip")


def _loaded(pipes, folder, weights, scale=None):
    for pipe in pipes:
        pipe.load_ip_adapter(folder, "", weights)
        if scale is not None:
            pipe.set_ip_adapter_scale(scale)


def _images(pipe, prompt="a cat", **kwargs):
    kwargs = dict(dict(num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np"), **kwargs)
    return np.asarray(pipe(prompt, **kwargs).images)


def _as_diffusers_and_adapter_matters(theirs, ours, run=_images, **kwargs):
    a, b = run(theirs, **kwargs), run(ours, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS, np.abs(a - b).max()
    saved = [(attn.processor, list(attn.processor.scale)) for _, attn in ip_model.cross_attentions(ours.unet)]
    ours.set_ip_adapter_scale(0.0)
    try:
        assert np.abs(run(ours, **kwargs) - b).max() > 0.01  # the image prompt matters
    finally:
        for processor, scales in saved:  # (per layer: per-block scales differ between layers)
            processor.scale = scales
    return b


@pytest.mark.parametrize("weights, scale, images", [
    ("ip-adapter-plain.safetensors", None, CAT),
    ("ip-adapter-plus.safetensors", 0.6, CAT),
    # two adapters at once, each with its own scale; the plain one given two images (their tokens concatenated)
    (["ip-adapter-plain.safetensors", "ip-adapter-plus.safetensors"], [0.7, 0.4], [[CAT, DOG], DOG]),
], ids=["plain", "plus", "plain-and-plus"])
def test_text_to_image_as_diffusers(sd, weights, scale, images):
    theirs, ours, folder = sd
    _loaded((theirs, ours), folder, weights, scale)
    try:
        _as_diffusers_and_adapter_matters(theirs, ours, ip_adapter_image=images)
        # two prompts, two images each, no guidance: the embeddings repeated for the whole batch, no negative half
        _as_diffusers_and_adapter_matters(theirs, ours, prompt=["a cat", "a dog"], num_images_per_prompt=2,
                                          guidance_scale=1.0, ip_adapter_image=images)
    finally:
        for pipe in (theirs, ours):
            pipe.unload_ip_adapter()


@pytest.mark.parametrize("scale", [
    {"up": {"block_1": [0.0, 1.0, 0.5]}},  # InstantStyle's kind: one up block's transformers, the rest off
    {"down": 0.7, "mid": [0.3]},  # a whole side; mid as a one-entry list
    [{"down": {"block_0": [1.0]}}, 0.6],  # per adapter: a one-entry list for the whole block, and a number
], ids=["up-block", "down-and-mid", "per-adapter"])
def test_per_block_scales_as_diffusers(sd, scale):
    """diffusers' per-block scales (set_ip_adapter_scale with dicts): the blocks left out at 0, as there."""
    theirs, ours, folder = sd
    weights = (["ip-adapter-plain.safetensors", "ip-adapter-plus.safetensors"] if isinstance(scale, list)
               else "ip-adapter-plus.safetensors")
    _loaded((theirs, ours), folder, weights, scale)
    try:
        images = [CAT, DOG] if isinstance(scale, list) else CAT
        b = _as_diffusers_and_adapter_matters(theirs, ours, ip_adapter_image=images)
        ours.set_ip_adapter_scale(1.0)
        assert np.abs(_images(ours, ip_adapter_image=images) - b).max() > 0.01  # the blocks' scales mattered
    finally:
        for pipe in (theirs, ours):
            pipe.unload_ip_adapter()


@pytest.mark.parametrize("scale", [
    {"down": {"block_1": [0.0, 1.0]}, "up": {"block_2": 0.5}},  # blocks left out within a side, and whole sides
    {"down": 0.25, "up": {"block_1": [1.0], "block_2": [0.1, 0.2, 0.3]}, "mid": 0.5},
    {},  # every block off
])
def test_per_block_scales_expand_as_diffusers(scale):
    """The expansion alone, on a UNet with two attention blocks per side (the tiny pipelines have one)."""
    from diffusers import UNet2DConditionModel as TheirUNet
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    from diffusion_fast.ip_adapter import _block_scales
    from diffusion_fast.models import UNet2DConditionModel

    config = dict(block_out_channels=[16, 16, 16], layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
                  attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    theirs = _maybe_expand_lora_scales(TheirUNet(**config), [scale], default_scale=0.0)[0]
    with torch.device("meta"):
        ours = _block_scales(UNet2DConditionModel(config), scale, "scale")
    assert ours == {k: float(v) for k, v in theirs.items()}


def _halves(height, width):
    """Two masks at (height, width): white below the diagonal, and above it (a slanted edge: downsampling it, bicubic
    and bilinear differ)."""
    y, x = np.mgrid[:height, :width]
    below = np.where(x * height < y * width, 255, 0).astype(np.uint8)
    return [Image.fromarray(below), Image.fromarray(255 - below)]


@pytest.mark.parametrize("case", ["two-images", "per-image-scales", "one-of-two-adapters", "other-aspect"])
def test_masks_as_diffusers(sd, case):
    """IP-Adapter masks (diffusers' cross_attention_kwargs={"ip_adapter_masks": ...}): each image of an adapter
    prompts its own region. Masks made by our IPAdapterMaskProcessor, equal to diffusers' own."""
    from diffusers.image_processor import IPAdapterMaskProcessor as TheirMasks

    theirs, ours, folder = sd
    height, width = 32, 40  # (latents 8x10 and 4x5 at the tiny UNet's attention layers)
    # a tall mask on a 4:5 output: its grid at 80 queries is 18x4, padded to 80 (at 20 queries 9x2, padded)
    mask_size = (64, 16) if case == "other-aspect" else (height, width)
    masks = diffusion_fast.IPAdapterMaskProcessor.preprocess(_halves(*mask_size), *mask_size)
    assert torch.equal(masks, TheirMasks().preprocess(_halves(*mask_size), *mask_size))
    odd = _halves(35, 43)  # without a size: the mask's own, cut to a multiple of 8, as diffusers' does
    assert torch.equal(diffusion_fast.IPAdapterMaskProcessor.preprocess(odd), TheirMasks().preprocess(odd))
    masks = masks.reshape(1, 2, *mask_size)
    weights, scale, images, all_masks = "ip-adapter-plain.safetensors", None, [[CAT, DOG]], [masks]
    if case == "per-image-scales":
        scale = [[0.9, 0.3]]
    if case == "one-of-two-adapters":
        weights, scale = ["ip-adapter-plain.safetensors", "ip-adapter-plus.safetensors"], [1.0, 0.5]
        images, all_masks = [[CAT, DOG], DOG], [masks, None]
    _loaded((theirs, ours), folder, weights, scale)
    try:
        kwargs = dict(ip_adapter_image=images, height=height, width=width,
                      cross_attention_kwargs={"ip_adapter_masks": all_masks})
        with pytest.warns(UserWarning, match="aspect ratio") if case == "other-aspect" else contextlib.nullcontext():
            masked = _as_diffusers_and_adapter_matters(theirs, ours, **kwargs)
        unmasked = _images(ours, ip_adapter_image=images, height=height, width=width) if scale is None else None
        assert unmasked is None or np.abs(unmasked - masked).max() > 0.01  # the masks matter
    finally:
        for pipe in (theirs, ours):
            pipe.unload_ip_adapter()


def test_image_embeds_and_unload(sd):
    """Precomputed embeddings (diffusers' prepare_ip_adapter_image_embeds, negative first) give the image's result;
    after unload_ip_adapter the pipeline gives its plain image again, and the UNet has no adapter weights left."""
    theirs, ours, folder = sd
    plain = _images(ours)
    _loaded((theirs, ours), folder, "ip-adapter-plus.safetensors")
    try:
        embeds = theirs.prepare_ip_adapter_image_embeds(CAT, None, "cpu", 1, True)
        assert len(embeds) == 1 and embeds[0].shape[:2] == (2, 1)
        from_image = _images(ours, ip_adapter_image=CAT)
        assert np.abs(_images(ours, ip_adapter_image_embeds=embeds) - from_image).max() <= 1e-6
        assert np.abs(_images(theirs, ip_adapter_image_embeds=embeds) - from_image).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        for pipe in (theirs, ours):
            pipe.unload_ip_adapter()
    assert not any("ip" in k.split(".")[-2] or k.startswith("encoder_hid_proj") for k in ours.unet.state_dict())
    assert ours.image_encoder is None and np.array_equal(_images(ours), plain)


def test_to_moves_the_adapters_and_the_image_encoder(sd):
    """pipe.to(dtype) (or a device) takes the adapter's weights and the image encoder along, and the call runs."""
    theirs, _, folder = sd
    ours = diffusion_fast.load_pipeline(theirs._saved_to)  # (its own: the bfloat16 round trip rounds the weights)
    ours.set_progress_bar_config(disable=True)
    ours.load_ip_adapter(folder, "", "ip-adapter-plus.safetensors")
    ours.to(dtype=torch.bfloat16)
    adapter = [p for name, p in ours.unet.named_parameters() if "_ip." in name or "encoder_hid_proj" in name]
    assert adapter and all(p.dtype == torch.bfloat16 for p in [*adapter, *ours.image_encoder.parameters()])
    assert np.isfinite(_images(ours, ip_adapter_image=CAT)).all()


def test_a_controlnet_pipeline_built_from_ours_keeps_its_image_encoder(sd, tmp_path):
    """from_pipeline(pipe, net) shares the UNet, which holds the adapter, and so the image encoder goes along."""
    from diffusers import ControlNetModel as TheirNet

    theirs, ours, folder = sd
    TheirNet.from_unet(theirs.unet, conditioning_embedding_out_channels=(8, 16, 32)).save_pretrained(tmp_path / "net")
    net = diffusion_fast.ControlNetModel.from_pretrained(tmp_path / "net")
    ours.load_ip_adapter(folder, "", "ip-adapter-plain.safetensors")
    try:
        control = diffusion_fast.StableDiffusionControlNetPipeline.from_pipeline(ours, net)
        control.set_progress_bar_config(disable=True)
        assert control.image_encoder is ours.image_encoder and control.feature_extractor is ours.feature_extractor
        assert np.isfinite(_images(control, image=CAT, ip_adapter_image=DOG)).all()
    finally:
        ours.unload_ip_adapter()


def test_unet_state_dict_names_are_diffusers(sd):
    """The adapter's weights sit under diffusers' names (encoder_hid_proj..., attn2.processor.to_k_ip.0...) with
    diffusers' values: a UNet state dict saved by diffusers with an adapter loaded maps one to one."""
    theirs, ours, folder = sd
    _loaded((theirs, ours), folder, ["ip-adapter-plain.safetensors", "ip-adapter-plus.safetensors"])
    try:
        def ip_part(unet):
            return {k: v for k, v in unet.state_dict().items() if "_ip." in k or k.startswith("encoder_hid_proj")}
        a, b = ip_part(theirs.unet), ip_part(ours.unet)
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        for pipe in (theirs, ours):
            pipe.unload_ip_adapter()


@pytest.mark.parametrize("mode", ["step", "unet"])
def test_graphed_loop_gives_the_eager_image(sd, monkeypatch, mode):
    """On CUDA the image tokens (and masks) are inputs of the step's (or UNet call's) graph: a new image or mask
    replays the same graph, a new scale recaptures it (a scale is baked into the kernels). Capture is stood in for on
    the CPU."""
    from _fake_graphs import use_fake_graphs

    _, ours, folder = sd
    ours.load_ip_adapter(folder, "", "ip-adapter-plain.safetensors")
    try:
        eager_cat, eager_dog = _images(ours, ip_adapter_image=CAT), _images(ours, ip_adapter_image=DOG)
        masks = diffusion_fast.IPAdapterMaskProcessor.preprocess(_halves(32, 32), 32, 32).reshape(1, 2, 32, 32)
        masked = dict(ip_adapter_image=[[CAT, DOG]], cross_attention_kwargs={"ip_adapter_masks": [masks]})
        flipped = dict(masked, cross_attention_kwargs={"ip_adapter_masks": [masks.flip(1)]})
        eager_masked, eager_flipped = _images(ours, **masked), _images(ours, **flipped)
        ours.set_ip_adapter_scale(0.5)
        eager_half = _images(ours, ip_adapter_image=DOG)
        ours.set_ip_adapter_scale(1.0)
        monkeypatch.setattr(ours, "_graph_mode", lambda device, eta: mode)
        graphed = use_fake_graphs(ours._graphs_for_components()[mode])
        assert np.array_equal(_images(ours, ip_adapter_image=CAT), eager_cat)
        assert np.array_equal(_images(ours, ip_adapter_image=DOG), eager_dog)
        assert graphed.captures == 1
        ours.set_ip_adapter_scale(0.5)
        assert np.array_equal(_images(ours, ip_adapter_image=DOG), eager_half)
        assert graphed.captures == 2
        ours.set_ip_adapter_scale(1.0)  # masks are graph inputs too: other masks replay the same graph
        assert np.array_equal(_images(ours, **masked), eager_masked)
        assert np.array_equal(_images(ours, **flipped), eager_flipped)
        assert graphed.captures == 3 and not np.array_equal(eager_masked, eager_flipped)  # (one for both)
    finally:
        ours.unload_ip_adapter()
        ours._graphs = None


def test_sdxl_as_diffusers(tmp_path):
    theirs, ours = _tiny_diffusers.saved_pair(_tiny_diffusers.sdxl_pipeline(seed=6), tmp_path / "pipe",
                                              diffusion_fast.StableDiffusionXLPipeline)
    for kind in ("plain", "plus"):
        _tiny_diffusers.write_ip_adapter(tmp_path / "ip", theirs.unet, kind, seed=8)
    _loaded((theirs, ours), str(tmp_path / "ip"), ["ip-adapter-plain.safetensors", "ip-adapter-plus.safetensors"],
            [0.8, 0.5])
    _as_diffusers_and_adapter_matters(theirs, ours, ip_adapter_image=[CAT, DOG])


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_other_sd_pipelines_as_diffusers(tmp_path, kind):
    """Image-to-image, inpainting and ControlNet take the image prompt too (the nets see the text alone, as in
    diffusers)."""
    import diffusers

    if kind == "controlnet":
        base = _tiny_diffusers.controlnet_pipeline(seed=4)
        theirs, ours = _tiny_diffusers.saved_pair(base, tmp_path / "pipe",
                                                  diffusion_fast.StableDiffusionControlNetPipeline)
    else:
        classes = {"img2img": ("StableDiffusionImg2ImgPipeline",), "inpaint": ("StableDiffusionInpaintPipeline",)}
        name, = classes[kind]
        base = _tiny_diffusers.pipeline("sd1", seed=5)
        base.save_pretrained(tmp_path / "pipe")
        theirs = getattr(diffusers, name).from_pretrained(tmp_path / "pipe", safety_checker=None,
                                                          requires_safety_checker=False)
        theirs.set_progress_bar_config(disable=True)
        ours = getattr(diffusion_fast, name).from_pretrained(tmp_path / "pipe")
        ours.set_progress_bar_config(disable=True)
    _tiny_diffusers.write_ip_adapter(tmp_path / "ip", theirs.unet, "plus", seed=9)
    _loaded((theirs, ours), str(tmp_path / "ip"), "ip-adapter-plus.safetensors")
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 40, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(40)[None, :] < 20, 255, 0).repeat(32, 0).astype(np.uint8))
    extra = {"img2img": dict(image=picture, strength=0.75), "inpaint": dict(image=picture, mask_image=mask),
             "controlnet": dict(image=picture)}[kind]
    _as_diffusers_and_adapter_matters(theirs, ours, ip_adapter_image=CAT, **extra)


def test_bad_inputs_are_named(sd, tmp_path):
    theirs, ours, folder = sd
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        _images(ours, ip_adapter_image=CAT)
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        ours.set_ip_adapter_scale(0.5)
    ours.load_ip_adapter(folder, "", "ip-adapter-plain.safetensors")
    try:
        with pytest.raises(ValueError, match="give ip_adapter_image or ip_adapter_image_embeds"):
            _images(ours)
        with pytest.raises(ValueError, match="give one, not both"):
            _images(ours, ip_adapter_image=CAT, ip_adapter_image_embeds=[torch.zeros(2, 1, 24)])
        with pytest.raises(TypeError, match=r"ip_adapter_image\[0\] must be a PIL image, a numpy array or a tensor"):
            _images(ours, ip_adapter_image="cat.png")
        with pytest.raises(TypeError, match=r"ip_adapter_image\[0\] must be .* got NoneType"):
            _images(ours, ip_adapter_image=[[CAT, None]])
        with pytest.raises(ValueError, match="ip_adapter_image has 2 entries for 1 IP-Adapters"):
            _images(ours, ip_adapter_image=[CAT, DOG])
        with pytest.raises(ValueError, match=r"ip_adapter_image_embeds must be a list of 1 tensors"):
            _images(ours, ip_adapter_image_embeds=torch.zeros(2, 1, 24))
        with pytest.raises(ValueError, match=r"ip_adapter_image_embeds\[0\] has 1 rows: give 2"):
            _images(ours, ip_adapter_image_embeds=[torch.zeros(1, 1, 24)])
        with pytest.raises(ValueError, match=r"up blocks \['block_0'\] have no attention in this UNet"):
            ours.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0]}})
        with pytest.raises(ValueError, match=r"down.block_0 has 2 transformers, got 3 scales"):
            ours.set_ip_adapter_scale({"down": {"block_0": [0.0, 1.0, 1.0]}})
        with pytest.raises(ValueError, match=r"take the keys 'down', 'mid' and 'up', got \['middle'\]"):
            ours.set_ip_adapter_scale({"middle": 1.0})
        mask = torch.ones(1, 1, 32, 32)
        with pytest.raises(ValueError, match=r"ip_adapter_masks must be a list with one entry per IP-Adapter \(1\)"):
            _images(ours, ip_adapter_image=CAT, cross_attention_kwargs={"ip_adapter_masks": [mask, mask]})
        with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\] must be a \(1, images, H, W\) tensor"):
            _images(ours, ip_adapter_image=CAT, cross_attention_kwargs={"ip_adapter_masks": [mask[0]]})
        with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\] has 1 masks for the adapter's 2 images"):
            _images(ours, ip_adapter_image=[[CAT, DOG]], cross_attention_kwargs={"ip_adapter_masks": [mask]})
        ours.set_ip_adapter_scale([[0.5, 0.5]])
        with pytest.raises(ValueError, match="one scale per image .* give ip_adapter_masks"):
            _images(ours, ip_adapter_image=[[CAT, DOG]])
        with pytest.raises(ValueError, match=r"scale has 2 entries for 1 IP-Adapters \(per-image scales"):
            ours.set_ip_adapter_scale([0.5, 0.5])
        with pytest.raises(TypeError, match=r"scale\[0\] must be a number"):
            ours.set_ip_adapter_scale("high")
    finally:
        ours.unload_ip_adapter()
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        ours.load_ip_adapter(folder, "", "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="image_encoder_folder"):
        ours.load_ip_adapter(folder, "", "ip-adapter-plain.safetensors", image_encoder_folder="elsewhere")


def test_weights_that_do_not_fit_are_listed(sd):
    """FaceID and Full-face adapters are refused by name; an adapter for another UNet gets one error listing every
    mis-shaped and missing weight, and the UNet is left as it was."""
    _, ours, folder = sd
    from safetensors.torch import load_file

    state = load_file(f"{folder}/ip-adapter-plain.safetensors")
    split = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        split[part][rest] = value
    faceid = {"image_proj": {"proj.0.weight": torch.zeros(8, 4), "proj.2.weight": torch.zeros(8, 8),
                             "norm.weight": torch.zeros(8), "norm.bias": torch.zeros(8)},
              "ip_adapter": split["ip_adapter"]}
    with pytest.raises(ValueError, match="IP-Adapter FaceID is not supported"):
        ours.load_ip_adapter(faceid, "", "faceid", image_encoder_folder=None)
    wrong = {"image_proj": split["image_proj"], "ip_adapter": dict(split["ip_adapter"])}
    wrong["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(3, 3)
    del wrong["ip_adapter"]["3.to_v_ip.weight"]
    with pytest.raises(ValueError) as err:
        ours.load_ip_adapter(wrong, "", "wrong", image_encoder_folder=None)
    assert "ip_adapter.1.to_k_ip.weight is (3, 3)" in str(err.value)
    assert "ip_adapter.3.to_v_ip.weight missing" in str(err.value)
    assert ours.unet.encoder_hid_proj is None and ours.image_encoder is None and ours.feature_extractor is None
    assert all(attn.processor is None for _, attn in ip_model.cross_attentions(ours.unet))


def test_diffusers_pipeline_with_an_ip_adapter_under_accelerate(sd):
    """accelerate() on a diffusers pipeline with an IP-Adapter loaded: the same image; its IP-Adapter processors
    are left alone and listed (our processor has no image term)."""
    theirs, _, folder = sd
    theirs.load_ip_adapter(folder, "", "ip-adapter-plus.safetensors")
    try:
        before = _images(theirs, ip_adapter_image=CAT)
        diffusion_fast.accelerate(theirs, attention=True)
        try:
            assert np.abs(_images(theirs, ip_adapter_image=CAT) - before).max() <= PIPELINE_FP32_MAX_ABS
            skipped = theirs._diffusion_fast_report["skipped"]
            assert any("IPAdapterAttnProcessor2_0" in s for s in skipped)
            assert theirs._diffusion_fast_report["attention"] > 0  # the self-attentions still run ours
        finally:
            diffusion_fast.restore(theirs)
    finally:
        theirs.unload_ip_adapter()


# ---- the CLI: generate --ip-adapter FILE --ip-adapter-image FILE [--ip-adapter-scale S] ---------------------------
@pytest.mark.parametrize("adapters", [["plus"], ["plain", "plus"]])
def test_cli_generate_gives_diffusers_image(sd, tmp_path, capsys, adapters):
    """The image diffusers makes from the same seed, adapters, images and scale (within one 8-bit level); the image
    encoder found beside the first weights file, as h94/IP-Adapter lays them out."""
    from diffusion_fast.cli import main

    theirs, _, folder = sd
    CAT.save(tmp_path / "cat.png")
    DOG.save(tmp_path / "dog.png")
    files = [f"ip-adapter-{kind}.safetensors" for kind in adapters]
    images = [tmp_path / "cat.png", tmp_path / "dog.png"][:len(adapters)]
    argv = ["generate", "--model", theirs._saved_to, "--steps", "3", "--seed", "2", "--output",
            str(tmp_path / "out.png"), "--no-progress", "--compare", "--ip-adapter-scale", "0.7"]
    for file, image in zip(files, images):
        argv += ["--ip-adapter", f"{folder}/{file}", "--ip-adapter-image", str(image)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "loaded " + str(len(adapters)) + " IP-Adapter" in out and "max abs pixel difference" in out
    theirs.load_ip_adapter(folder, "", files if len(files) > 1 else files[0])
    try:
        theirs.set_ip_adapter_scale([0.7] * len(files))  # (diffusers refuses one number for two adapters)
        loaded = [Image.open(p).convert("RGB") for p in images]
        expected = theirs("a photograph of an astronaut riding a horse", num_inference_steps=3,
                          generator=torch.Generator().manual_seed(2),
                          ip_adapter_image=loaded if len(loaded) > 1 else loaded[0]).images[0]
    finally:
        theirs.unload_ip_adapter()
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--ip-adapter-image", "CAT"], "--ip-adapter-image, --ip-adapter-scale and --image-encoder are for IP-Adapters"),
    (["--ip-adapter", "PLAIN"], r"--ip-adapter-image: give one per --ip-adapter \(1\), in order; got 0"),
    (["--ip-adapter", "PLAIN", "--ip-adapter-image", "CAT", "--ip-adapter-scale", "1", "--ip-adapter-scale", "2"],
     r"--ip-adapter-scale: give one for all IP-Adapters or one per --ip-adapter \(1\); got 2"),
    (["--ip-adapter", "PLAIN", "--ip-adapter-image", "/no/such.png"], "--ip-adapter-image: no such file"),
    (["--ip-adapter", "PLAIN", "--ip-adapter-image", "CAT", "--image-encoder", "ELSEWHERE"],
     "--ip-adapter: no image encoder at"),
    (["--ip-adapter", "CAT"], "is not an IP-Adapter weights file"),
    (["--ip-adapter", "SDXL_ADAPTER", "--ip-adapter-image", "CAT"], "--ip-adapter: the IP-Adapter weights do not fit"),
])
def test_cli_bad_options_one_line(sd, tmp_path, capsys, argv, message):
    from diffusion_fast.cli import main

    theirs, _, folder = sd
    CAT.save(tmp_path / "cat.png")
    (tmp_path / "elsewhere").mkdir()
    if "SDXL_ADAPTER" in argv:  # an adapter written for the tiny SDXL UNet (another cross width, other blocks)
        (tmp_path / "xl").mkdir()
        _tiny_diffusers.write_ip_adapter(tmp_path / "xl", _tiny_diffusers.sdxl_pipeline().unet, "plain")
    names = {"CAT": tmp_path / "cat.png", "PLAIN": f"{folder}/ip-adapter-plain.safetensors",
             "ELSEWHERE": tmp_path / "elsewhere", "SDXL_ADAPTER": tmp_path / "xl" / "ip-adapter-plain.safetensors"}
    argv = ["generate", "--model", theirs._saved_to, *[str(names.get(a, a)) for a in argv], "--steps", "2",
            "--no-progress", "--output", str(tmp_path / "out.png")]
    try:
        code = main(argv)
    except SystemExit as exit:  # (argparse's own: a file that is not a weights file)
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])  # the whole step; the call alone
def test_cuda_graph_loop_with_adapters_matches_eager_on_gpu(sd, scheduler):
    """fp16 on CUDA, a plain and a Plus adapter, masks on the first: eager, capture and replay give the same
    latents (the replay bit for bit); another image replays the same graph."""
    theirs, _, folder = sd
    pipe = diffusion_fast.load_pipeline(theirs._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusion_fast.schedulers, scheduler).from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(folder, "", ["ip-adapter-plain.safetensors", "ip-adapter-plus.safetensors"])
    masks = diffusion_fast.IPAdapterMaskProcessor.preprocess(_halves(32, 32), 32, 32).reshape(1, 2, 32, 32)
    outs = []
    for graph, image in ((False, DOG), ("auto", DOG), ("auto", DOG), ("auto", CAT), (False, CAT)):
        pipe.cuda_graph = graph
        outs.append(pipe("a", ip_adapter_image=[[CAT, DOG], image], num_inference_steps=5, output_type="latent",
                         cross_attention_kwargs={"ip_adapter_masks": [masks, None]},
                         generator=torch.Generator().manual_seed(0)).images)
    mode = "step" if scheduler == "DDIMScheduler" else "unet"
    assert len(pipe._graphs[mode]) == 1
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[3], outs[4], rtol=2e-3, atol=2e-3)
