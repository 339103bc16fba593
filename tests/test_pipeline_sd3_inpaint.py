"""SD3 inpainting: our StableDiffusion3InpaintPipeline against diffusers' on tiny SD3.5 Medium-shaped models written
by save_pretrained and loaded by load_pipeline (SD3's own 16-channel transformer, blended after each step, and a
33-channel inpainting one), and diffusers' under accelerate.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image, mask, strength and weights, diffusers' decode given the VAE shift it leaves out (diffusers issue #13611:
our decode adds it back, as every other SD3 pipeline does; ``test_decode_adds_the_vae_shift_back`` shows the
difference). Each comparison also checks that what it varies moves the image.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
OTHER = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8))
_mask = np.zeros((40, 52), np.uint8)
_mask[10:30, 12:40] = 255  # white: repainted
MASK = Image.fromarray(_mask)
CORNER = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), ((0, 24), (0, 36))))  # top left repainted
CALL = _tiny_diffusers.Comparison(prompt="a cat on a mat", image=IMAGE, mask_image=MASK, num_inference_steps=4)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


def _decode_with_shift(theirs):
    """diffusers' pipeline decoding as its SD3 text-to-image and image-to-image ones do (the fix of issue #13611):
    latents / scaling_factor + shift_factor, where its inpainting pipeline passes latents / scaling_factor."""
    decode, shift = theirs.vae.decode, theirs.vae.config.shift_factor
    theirs.vae.decode = lambda z, *args, **kwargs: decode(z + shift, *args, **kwargs)
    return theirs


def _pair(tmp_path_factory, in_channels):
    from diffusers import StableDiffusion3InpaintPipeline as Theirs

    theirs = Theirs(**_tiny_diffusers.sd3_pipeline(variant="sd3.5", in_channels=in_channels).components)
    folder = tmp_path_factory.mktemp(f"tiny-sd3-inpaint-{in_channels}")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusion3InpaintPipeline)
    theirs._saved_to = str(folder)
    return _decode_with_shift(theirs), ours


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory):
    """SD3's own transformer (16 input channels): the image put back outside the mask after every step."""
    return _pair(tmp_path_factory, 16)


@pytest.fixture(scope="module")
def inpainting_pair(tmp_path_factory):
    """An inpainting transformer (33 input channels: latents, mask, the masked image's latents)."""
    return _pair(tmp_path_factory, 33)


CASES = [
    ({}, {"mask_image": CORNER}),  # diffusers' defaults: strength 0.6, image and mask resized to the default size
    # strength 0.7 of 4 steps: int(4 - 2.8) = 1 step skipped (SD3's tail, not the SD pipelines' rounding)
    ({"strength": 0.7}, {"strength": 0.9}),
    ({"strength": 1.0, "num_inference_steps": 3}, {"image": OTHER}),  # from pure noise
    # two prompts, two images each, another size (image and mask resized to it), negative prompts
    ({"prompt": ["a cat", "a hat"], "num_images_per_prompt": 2, "height": 48, "width": 32,
      "negative_prompt": ["dull", "dark"]}, {"mask_image": CORNER}),
    # an image and a mask per prompt, a generator per image
    ({"prompt": ["a", "b"], "image": [IMAGE, OTHER], "mask_image": [MASK, CORNER],
      "generator": [torch.Generator().manual_seed(s) for s in (1, 2)]}, {"mask_image": [CORNER, MASK]}),
    ({"guidance_scale": 1.0}, {"image": OTHER}),  # no guidance
    ({"sigmas": [1.0, 0.7, 0.4, 0.2]}, {"strength": 0.3}),  # a custom schedule's tail
]
IDS = ["defaults", "strength-tail", "strength-1", "batch-size-negative", "image-mask-generator-per-prompt",
       "no-guidance", "sigmas"]


def _fresh(kwargs):
    """``kwargs`` with fresh generators (a list is used up by each call)."""
    gens = kwargs.get("generator")
    return dict(kwargs, generator=[torch.Generator().manual_seed(g.initial_seed()) for g in gens]) if isinstance(
        gens, list) else kwargs


def _compare(theirs, ours, kwargs):
    a, b = (_run(pipe, **_fresh(kwargs)) for pipe in (theirs, ours))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3, np.abs(a - b).max()
    return b


@pytest.mark.parametrize("kwargs, other", CASES, ids=IDS)
def test_sd3_inpaint_plain_transformer_matches_diffusers(plain_pair, kwargs, other):
    theirs, ours = plain_pair
    assert _moved(_run(ours, **_fresh(dict(kwargs, **other))), _compare(theirs, ours, kwargs))


@pytest.mark.parametrize("kwargs, other", [c for c, i in zip(CASES, IDS) if i != "sigmas"],
                         ids=[i for i in IDS if i != "sigmas"])
def test_sd3_inpaint_inpainting_transformer_matches_diffusers(inpainting_pair, kwargs, other):
    theirs, ours = inpainting_pair
    assert _moved(_run(ours, **_fresh(dict(kwargs, **other))), _compare(theirs, ours, kwargs))


def test_decode_adds_the_vae_shift_back(plain_pair):
    """Our latents are diffusers'; our image is them decoded with the VAE's shift added back. diffusers' own
    inpainting decode (without the shift) gives another image: the difference is that shift, not our sampling."""
    theirs, ours = plain_pair
    a = _run(theirs, output_type="latent")
    b = _run(ours, output_type="latent")
    assert np.abs(a - b).max() <= 1e-4
    fixed = theirs.vae.decode
    del theirs.vae.decode  # diffusers' own inpainting decode again
    try:
        unshifted = _run(theirs)
    finally:
        theirs.vae.decode = fixed
    assert _moved(unshifted, _run(ours))
    assert np.abs(_run(theirs) - _run(ours)).max() <= 1e-3


def test_sd3_inpaint_latents_masked_latents_crop_and_backends(plain_pair, inpainting_pair):
    """Given latents (taken as the noise, as diffusers), latents given as the image (a plain transformer needs no
    masked image), given masked image latents (the VAE's, shifted and scaled here as there), tensor images,
    padding_mask_crop (pasted into the image), and the reference backend."""
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    for theirs, ours in (plain_pair, inpainting_pair):
        _assert_as_diffusers(theirs, ours, latents=noise)
        _assert_as_diffusers(theirs, ours, image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
        _assert_as_diffusers(theirs, ours, backend_name="reference")
        a, b = (np.asarray(_run(pipe, padding_mask_crop=4, output_type="pil")[0], dtype=np.int16)
                for pipe in (theirs, ours))
        assert a.shape == (40, 52, 3) and np.abs(a - b).max() <= 1
        kept = np.asarray(IMAGE, dtype=np.int16)[_mask == 0]  # the crop pasted back where the mask is white only
        assert np.array_equal(b[_mask == 0], kept)
    theirs, ours = plain_pair
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    masked = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    # (diffusers masks the image before it looks at the transformer, so it fails without masked_image_latents,
    # which a plain transformer never reads: ours takes the latents alone)
    b = _assert_as_diffusers(theirs, ours, image=latents, masked_image_latents=masked)
    assert np.array_equal(_run(ours, image=latents), b)
    theirs, ours = inpainting_pair
    assert _moved(_assert_as_diffusers(theirs, ours, masked_image_latents=masked), _run(ours))


def test_sd3_inpaint_callbacks(plain_pair, inpainting_pair):
    """A callback reads diffusers' tensor names (the negative embeddings among them) and may replace the mask, as
    diffusers reads it back; diffusers' SD3CFGCutoffCallback turns guidance off mid-call (the pooled embeddings it
    replaces are among ours, and the mask follows the batch: diffusers' inpainting refuses the callback)."""
    from diffusers.callbacks import SD3CFGCutoffCallback

    def clear_mask(pipe, i, t, tensors):
        assert tensors["negative_prompt_embeds"].shape[0] == tensors["negative_pooled_prompt_embeds"].shape[0] == 1
        return {"mask": torch.zeros(2, 1, 8, 8)} if i == 0 else {}  # (the mask doubled under guidance)

    inputs = ["latents", "negative_prompt_embeds", "negative_pooled_prompt_embeds"]
    for theirs, ours in (plain_pair, inpainting_pair):
        b = _compare(theirs, ours, dict(callback_on_step_end=clear_mask, callback_on_step_end_tensor_inputs=inputs,
                                        strength=1.0))
        assert _moved(b, _run(ours, strength=1.0))
        cut = _run(ours, strength=1.0, callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.4))
        assert cut.shape == (1, 32, 32, 3) and _moved(cut, _run(ours, strength=1.0))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs has to be in"):
        _run(ours, callback_on_step_end=clear_mask, callback_on_step_end_tensor_inputs=["mask"])


def test_sd3_inpaint_from_pipe_load_and_errors(plain_pair, inpainting_pair):
    _, ours = plain_pair
    t2i = StableDiffusion3Pipeline.from_pipe(ours)
    assert type(t2i) is StableDiffusion3Pipeline and t2i.transformer is ours.transformer
    assert np.array_equal(_run(StableDiffusion3InpaintPipeline.from_pipe(t2i)), _run(ours))
    _, inpainting = inpainting_pair
    with pytest.raises(ValueError, match="33 .latents, mask, masked image latents. and a plain one 16"):
        StableDiffusion3InpaintPipeline.from_pipe(ours, transformer=diffusion_fast.SD3Transformer2DModel(
            dict(_tiny_diffusers.SD3_TINY, in_channels=20)))
    for pipe, kwargs, match in (
            (ours, dict(strength=1.5), "strength must be in"), (ours, dict(mask_image=None), "give both"),
            (ours, dict(strength=0.0), "leaves no denoising step"),
            (ours, dict(image=torch.rand(1, 5, 32, 32)), "5 channels"),
            (ours, dict(mask_image=[MASK, CORNER, MASK]), "mask_image has 3 images, which does not divide"),
            (ours, dict(image=torch.randn(1, 16, 4, 4)), "latents of size"),
            (ours, dict(latents=torch.randn(1, 16, 4, 4)), "latents must have shape"),
            (ours, dict(generator=[torch.Generator()] * 3), "generator is a list of 3"),
            (ours, dict(padding_mask_crop=4, image=torch.rand(1, 3, 32, 32)), "must be a PIL image"),
            (inpainting, dict(image=torch.randn(1, 16, 8, 8)), "needs masked_image_latents too")):
        with pytest.raises(ValueError, match=match):
            _run(pipe, **kwargs)
    with pytest.raises(TypeError, match="masked_image_latents must be a .B, C, H, W. tensor"):
        _run(inpainting, masked_image_latents=[0.0])


def test_accelerate_sd3_inpaint_keeps_its_images():
    from diffusers import StableDiffusion3InpaintPipeline as Theirs

    _tiny_diffusers.assert_accelerate_keeps_images(Theirs(**_tiny_diffusers.sd3_pipeline().components), _run,
                                                   strength=0.7)


def test_generate_and_check_sd3_inpainting(plain_pair, inpainting_pair, tmp_path, capsys):
    """``generate --image --mask`` on an SD3 folder (SD3's transformer, blended) and on an inpainting one: the
    image's size cut to what the model takes, diffusers' PNG; text-to-image refused for the inpainting model (and
    run for the other); ``check`` runs the folder's inpainting both ways."""
    from diffusion_fast.cli import main

    IMAGE.save(tmp_path / "in.png")
    MASK.save(tmp_path / "mask.png")
    for theirs, _ in (plain_pair, inpainting_pair):
        out = tmp_path / "out.png"
        assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--strength", "0.7", "--steps", "4", "--seed", "2", "--output",
                     str(out), "--no-progress", "--compare"]) == 0
        text = capsys.readouterr().out
        assert "fast path:      3 steps" in text and "max abs pixel difference" in text, text
        expected = theirs(diffusion_fast.cli.DEFAULT_PROMPT, image=IMAGE, mask_image=MASK, strength=0.7,
                          num_inference_steps=4, height=40, width=48,
                          generator=torch.Generator().manual_seed(2)).images[0]
        got = np.asarray(Image.open(out), dtype=np.int16)
        assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
        assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
        text = capsys.readouterr().out
        assert "SD3 inpainting pipeline (2 FlowMatchEuler steps" in text and "0 failed" in text, text
    assert main(["generate", "--model", inpainting_pair[0]._saved_to, "--steps", "2", "--output",
                 str(tmp_path / "t2i.png"), "--no-progress"]) == 2
    assert "is an inpainting model" in capsys.readouterr().err
    # (a folder diffusers saved SD3's inpainting pipeline in, on SD3's own transformer, still runs text-to-image)
    assert main(["generate", "--model", plain_pair[0]._saved_to, "--steps", "2", "--output",
                 str(tmp_path / "t2i.png"), "--no-progress"]) == 0
    assert Image.open(tmp_path / "t2i.png").size == (32, 32)


def test_graphed_inpainting_calls_give_the_eager_images(plain_pair, inpainting_pair, monkeypatch):
    """Capture stood in for on the CPU: the transformer call replays from one graph (the 33-channel transformer's mask
    inputs part of its input), the blend outside it; the eager images bit for bit."""
    from _fake_graphs import use_fake_graphs

    for _, ours in (plain_pair, inpainting_pair):
        eager = _run(ours)
        monkeypatch.setattr(ours, "_graphs_on", lambda device: True)
        try:
            graphed = use_fake_graphs(ours._model(ours.device))
            assert np.array_equal(_run(ours), eager) and graphed.captures == 1
        finally:
            monkeypatch.undo()
            ours._graph = None


def test_plain_transformer_encodes_only_the_image(plain_pair, inpainting_pair, monkeypatch):
    """The README's claim: with SD3's own transformer the masked image (which only a 33-channel transformer reads)
    is not encoded: one VAE encode of the image; the inpainting transformer's call encodes both."""
    for (_, ours), encodes in ((plain_pair, 1), (inpainting_pair, 2)):
        calls = []
        encode = ours.vae.encode
        monkeypatch.setattr(ours.vae, "encode", lambda x: calls.append(x.shape[0]) or encode(x))
        _run(ours)
        monkeypatch.undo()
        assert calls == [1] * encodes, calls
