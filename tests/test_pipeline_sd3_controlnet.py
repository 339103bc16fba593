"""SD3 ControlNets: our StableDiffusion3ControlNetPipeline and SD3ControlNetModel against diffusers' on the tiny
SD3.5 Medium-shaped model with tiny nets of both kinds (InstantX's, joint with the text; SD3.5 Large's, image-only on
the transformer's patch embedding), saved by save_pretrained and loaded by load_pipeline; several nets at once;
diffusers' pipeline under accelerate; the CLI and check.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference of diffusers' for the same seed, control image and
weights (the control image's posterior is sampled from the global generator, as diffusers does: each run seeds it).
Each comparison also checks that what it varies moves the image.
"""
import re

import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, use_fake_graphs
import diffusion_fast
from diffusion_fast import StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline
from diffusion_fast.models import SD3ControlNetModel

CONTROL = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
OTHER = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8))
CALL = _tiny_diffusers.Comparison(prompt="a cat on a mat", control_image=CONTROL, num_inference_steps=3)
_moved = CALL.moved


def _run(pipe, **kwargs):
    torch.manual_seed(11)  # (the control image's posterior sample: the global generator, in both pipelines)
    return CALL.run(pipe, **kwargs)


def _compare(theirs, ours, backend_name="fast", **kwargs):
    torch.manual_seed(11)
    b = CALL.run(ours, backend_name, **kwargs)
    a = _run(theirs, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3, np.abs(a - b).max()
    return b


def _pair(tmp_path_factory, kind):
    from diffusers import StableDiffusion3ControlNetPipeline as Theirs

    theirs = Theirs(**_tiny_diffusers.sd3_pipeline(variant="sd3.5").components,
                    controlnet=_tiny_diffusers.sd3_controlnet(kind))
    folder = tmp_path_factory.mktemp(f"tiny-sd3-controlnet-{kind}")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusion3ControlNetPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.fixture(scope="module")
def instantx_pair(tmp_path_factory):
    return _pair(tmp_path_factory, "instantx")


@pytest.fixture(scope="module")
def large_pair(tmp_path_factory):
    return _pair(tmp_path_factory, "large")


CASES = [
    ({}, {"control_image": OTHER}),  # diffusers' defaults: scale 1 over the whole schedule, the default size
    # a scale and an end: the net's residuals for the first 60% of the steps (2 of 3), at half strength
    ({"controlnet_conditioning_scale": 0.5, "control_guidance_end": 0.6}, {"controlnet_conditioning_scale": 1.0}),
    ({"control_guidance_start": 0.4}, {"control_guidance_start": 0.0}),  # off for the first step
    ({"guidance_scale": 1.0}, {"control_image": OTHER}),  # no guidance: one half, as diffusers encodes it
    # two prompts, two images each, another size (the image resized to it), negative prompts
    ({"prompt": ["a cat", "a hat"], "num_images_per_prompt": 2, "height": 48, "width": 32,
      "negative_prompt": ["dull", "dark"]}, {"control_image": OTHER}),
    ({"prompt": ["a", "b"], "control_image": [CONTROL, OTHER]}, {"control_image": [OTHER, CONTROL]}),  # per prompt
    # a tensor in [-1, 1], taken as it is: it sets the output size (one net)
    ({"control_image": torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1},
     {"controlnet_conditioning_scale": 0.3}),
]
IDS = ["defaults", "scale-end", "start", "no-guidance", "batch-size-negative", "image-per-prompt", "tensor-size"]


@pytest.mark.parametrize("kwargs, other", CASES, ids=IDS)
def test_sd3_controlnet_instantx_matches_diffusers(instantx_pair, kwargs, other):
    theirs, ours = instantx_pair
    assert _moved(_run(ours, **dict(kwargs, **other)), _compare(theirs, ours, **kwargs))


@pytest.mark.parametrize("kwargs, other", CASES[:2] + CASES[3:5], ids=IDS[:2] + IDS[3:5])
def test_sd3_controlnet_large_matches_diffusers(large_pair, kwargs, other):
    """SD3.5 Large's kind: image-only blocks, the transformer's patch embedding (shared, not copied), the pooled
    text, the VAE's shift on the control latents."""
    theirs, ours = large_pair
    assert all(net.pos_embed is ours.transformer.pos_embed for net in ours._nets)
    assert _moved(_run(ours, **dict(kwargs, **other)), _compare(theirs, ours, **kwargs))


def test_sd3_controlnet_net_matters_backends_and_callbacks(instantx_pair, large_pair):
    """The nets' residuals change the image (scale 0 is the plain pipeline's image exactly); the reference backend;
    a callback that reads the negative embeddings, as diffusers; diffusers' SD3CFGCutoffCallback (which fails in
    diffusers' ControlNet pipeline: its nets keep the doubled batch)."""
    from diffusers.callbacks import SD3CFGCutoffCallback

    def reads_negatives(pipe, i, t, tensors):
        assert tensors["negative_prompt_embeds"].shape[0] == tensors["negative_pooled_prompt_embeds"].shape[0] == 1
        return {"latents": tensors["latents"] * 1.01} if i == 1 else {}

    inputs = ["latents", "negative_prompt_embeds", "negative_pooled_prompt_embeds"]
    for theirs, ours in (instantx_pair, large_pair):
        off = _run(ours, controlnet_conditioning_scale=0.0)
        plain = _tiny_diffusers.Comparison(prompt="a cat on a mat", num_inference_steps=3).run(
            StableDiffusion3Pipeline.from_pipe(ours))
        assert np.array_equal(off, plain) and _moved(off, _run(ours))
        _compare(theirs, ours, backend_name="reference")
        _compare(theirs, ours, callback_on_step_end=reads_negatives, callback_on_step_end_tensor_inputs=inputs)
        cut = _run(ours, callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.0))  # (after step 0)
        assert cut.shape == (1, 32, 32, 3) and _moved(cut, _run(ours))


def test_several_sd3_controlnets_match_diffusers(instantx_pair, tmp_path):
    """Two nets (diffusers' SD3MultiControlNetModel): an image and a scale each, their residuals summed."""
    from diffusers import StableDiffusion3ControlNetPipeline as Theirs

    theirs_one, ours_one = instantx_pair
    second = _tiny_diffusers.sd3_controlnet(seed=21, layers=3)  # (3 residuals spread over 3 blocks)
    second.save_pretrained(tmp_path / "second")
    theirs = Theirs(**{**theirs_one.components, "controlnet": [theirs_one.controlnet, second]})
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusion3ControlNetPipeline.from_pipe(
        ours_one, controlnet=[ours_one.controlnet, SD3ControlNetModel.from_pretrained(tmp_path / "second")])
    kwargs = dict(control_image=[CONTROL, OTHER], controlnet_conditioning_scale=[0.7, 1.2],
                  control_guidance_end=[1.0, 0.5])
    b = _compare(theirs, ours, **kwargs)
    assert _moved(b, _run(ours, **dict(kwargs, controlnet_conditioning_scale=[0.7, 0.0])))


def test_sd3_controlnet_from_pipe_load_and_errors(instantx_pair, large_pair, tmp_path):
    _, ours = instantx_pair
    plain = StableDiffusion3Pipeline.from_pipe(ours)
    assert type(plain) is StableDiffusion3Pipeline and plain.transformer is ours.transformer
    with pytest.raises(TypeError, match="controlnet must be a diffusion_fast SD3ControlNetModel"):
        StableDiffusion3ControlNetPipeline.from_pipe(plain)
    wide = SD3ControlNetModel(dict(_tiny_diffusers.SD35_TINY, num_attention_heads=2))
    with pytest.raises(ValueError, match="does not fit this transformer"):
        StableDiffusion3ControlNetPipeline.from_pipe(plain, controlnet=wide)
    with pytest.raises(ValueError, match="nets of one kind"):
        StableDiffusion3ControlNetPipeline.from_pipe(plain, controlnet=[ours.controlnet, large_pair[1].controlnet])
    for kwargs, match in ((dict(control_image=None), "give a conditioning image per ControlNet"),
                          (dict(controlnet_conditioning_scale=[1.0, 2.0]), "a number or a list of 1 numbers"),
                          (dict(control_guidance_start=0.5, control_guidance_end=0.5), "0 <= start < end <= 1"),
                          (dict(control_image=[CONTROL, OTHER, CONTROL]), "has 3 images for 1 prompts"),
                          (dict(control_image=torch.rand(1, 4, 32, 32)), "with 3 channels"),
                          (dict(latents=torch.randn(1, 16, 4, 4)), "latents must have shape")):
        with pytest.raises(ValueError, match=match):
            _run(ours, **kwargs)
    _, large = large_pair
    with pytest.raises(ValueError, match="controlnet_pooled_projections must have the loop's pooled shape"):
        _run(large, controlnet_pooled_projections=torch.zeros(1, 40))
    with pytest.raises(TypeError, match="controlnet_pooled_projections must be a tensor, got list"):
        _run(large, controlnet_pooled_projections=[0.0] * 40)
    # the net alone: its inputs checked by shape, each named
    x, cond, text, pooled, t = (torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 5, 48),
                                torch.randn(1, 40), torch.tensor([1.0]))
    for args, error, match in (((x, cond, 1.0, text, None, t), ValueError, "pooled_projections must be a .1, 40."),
                               ((x, cond, 1.0, text[..., :40], pooled, t), ValueError,
                                "encoder_hidden_states must be a .1, L, 48."),
                               ((x, cond[:, :8], 1.0, text, pooled, t), ValueError, "controlnet_cond must be a"),
                               ((x, cond, "1", text, pooled, t), TypeError, "conditioning_scale must be a number"),
                               ((x, cond, 1.0, None, pooled, t), ValueError, "give the prompt embeddings")):
        with pytest.raises(error, match=match):
            ours.controlnet(*args)
    with pytest.raises(ValueError, match="SD3MultiControlNetModel: 1 nets, 2 conditioning images and 1 scales"):
        diffusion_fast.models.SD3MultiControlNetModel([ours.controlnet])(x, [cond, cond], [1.0], pooled, text, t)
    with pytest.raises(ValueError, match="transformer's patch embedding"):  # a bare SD3.5 Large net, no pipeline
        SD3ControlNetModel(dict(large.controlnet.config, use_pos_embed=False))(
            torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), 1.0, None, torch.randn(1, 40), torch.tensor([1.0]))


def test_accelerate_sd3_controlnet_keeps_its_images():
    from diffusers import StableDiffusion3ControlNetPipeline as Theirs

    for kind in ("instantx", "large"):
        pipe = Theirs(**_tiny_diffusers.sd3_pipeline().components, controlnet=_tiny_diffusers.sd3_controlnet(kind))
        _tiny_diffusers.assert_accelerate_keeps_images(pipe, _run)
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline

    pipe = StableDiffusion3ControlNetInpaintingPipeline(**_tiny_diffusers.sd3_pipeline().components,
                                                        controlnet=_tiny_diffusers.sd3_controlnet("inpaint"))
    _tiny_diffusers.assert_accelerate_keeps_images(pipe, _run, control_mask=MASK)


def test_generate_and_check_sd3_controlnet(instantx_pair, large_pair, tmp_path, capsys):
    """``generate --controlnet NET --control-image FILE`` on an SD3 folder (the image's size cut to what the model
    takes; diffusers' PNG) and ``--control-image`` alone on a folder diffusers saved an SD3 ControlNet pipeline in;
    an SD ControlNet refused by name; ``check`` runs an SD3 ControlNet folder both ways."""
    from diffusion_fast.cli import main

    theirs, _ = instantx_pair
    theirs.controlnet.save_pretrained(tmp_path / "net")
    CONTROL.save(tmp_path / "control.png")
    plain = _tiny_diffusers.sd3_pipeline(variant="sd3.5")
    plain.save_pretrained(tmp_path / "sd3")
    for model, extra in ((tmp_path / "sd3", ["--controlnet", str(tmp_path / "net")]), (theirs._saved_to, [])):
        out = tmp_path / "out.png"
        assert main(["generate", "--model", str(model), *extra, "--control-image", str(tmp_path / "control.png"),
                     "--controlnet-scale", "0.8", "--steps", "3", "--seed", "2", "--output", str(out),
                     "--no-progress", "--compare"]) == 0
        diff = re.search(r"max abs pixel difference (\S+)", capsys.readouterr().out)  # (fast vs reference)
        assert diff and float(diff.group(1)) <= 1e-3, diff
        torch.manual_seed(2)  # (the CLI seeds the global generator with --seed: the control image's draw)
        expected = theirs(diffusion_fast.cli.DEFAULT_PROMPT, control_image=CONTROL, controlnet_conditioning_scale=0.8,
                          num_inference_steps=3, height=40, width=48,
                          generator=torch.Generator().manual_seed(2)).images[0]
        got = np.asarray(Image.open(out), dtype=np.int16)
        assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    capsys.readouterr()
    assert main(["generate", "--model", theirs._saved_to, "--steps", "1", "--output", str(tmp_path / "x.png"),
                 "--no-progress"]) == 2
    assert "is an SD3 ControlNet pipeline: give --control-image" in capsys.readouterr().err
    sd_net = tmp_path / "sd-net"
    sd_net.mkdir()
    (sd_net / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    assert main(["generate", "--model", str(tmp_path / "sd3"), "--controlnet", str(sd_net), "--control-image",
                 str(tmp_path / "control.png"), "--steps", "1", "--output", str(tmp_path / "x.png"),
                 "--no-progress"]) == 2
    assert "not an SD3 ControlNet" in capsys.readouterr().err
    for pair in (instantx_pair, large_pair):
        assert main(["check", "--model", pair[0]._saved_to, "--steps", "2"]) == 0
        text = capsys.readouterr().out
        assert "SD3 ControlNet pipeline (2 FlowMatchEuler steps" in text and "0 failed" in text, text


# ---- inpainting by an inpainting ControlNet (diffusers' StableDiffusion3ControlNetInpaintingPipeline) ------------
_mask = np.zeros((40, 52), np.uint8)
_mask[10:30, 12:40] = 255  # white: repainted
MASK = Image.fromarray(_mask)


@pytest.fixture(scope="module")
def inpainting_pair(tmp_path_factory):
    """A net with the mask as its extra conditioning channel (alimama's kind), on SD3's own transformer."""
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline as Theirs

    theirs = Theirs(**_tiny_diffusers.sd3_pipeline(variant="sd3.5").components,
                    controlnet=_tiny_diffusers.sd3_controlnet("inpaint"))
    folder = tmp_path_factory.mktemp("tiny-sd3-controlnet-inpainting")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, diffusion_fast.StableDiffusion3ControlNetInpaintingPipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.mark.parametrize("kwargs, other", [
    ({}, {"control_mask": OTHER.convert("L")}),  # diffusers' defaults: the net at scale 1 over every step
    ({"controlnet_conditioning_scale": 0.5, "control_guidance_end": 0.6}, {"controlnet_conditioning_scale": 1.0}),
    ({"guidance_scale": 1.0}, {"control_image": OTHER}),  # one half: the masked image's draw not doubled
    ({"prompt": ["a cat", "a hat"], "num_images_per_prompt": 2, "height": 48, "width": 32,
      "negative_prompt": ["dull", "dark"]}, {"control_image": OTHER}),
    # a tensor image and mask, taken as they are (the mask's grey values go to the net as 1 - mask)
    ({"control_image": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1,
      "control_mask": torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))},
     {"controlnet_conditioning_scale": 0.3}),
], ids=["defaults", "scale-end", "no-guidance", "batch-size-negative", "tensors"])
def test_sd3_controlnet_inpainting_matches_diffusers(inpainting_pair, kwargs, other):
    theirs, ours = inpainting_pair
    kwargs = {"control_mask": MASK, **kwargs}
    assert _moved(_run(ours, **dict(kwargs, **other)), _compare(theirs, ours, **kwargs))


def test_sd3_controlnet_inpainting_errors_cli_and_check(inpainting_pair, instantx_pair, tmp_path, capsys):
    """The mask is the inpainting pipeline's alone and its nets take it as an extra channel (either pipeline refuses
    the other's nets); ``generate --image --mask`` on a folder diffusers saved the pipeline in (diffusers' PNG) and
    ``check`` on it."""
    from diffusion_fast.cli import main

    theirs, ours = inpainting_pair
    _, plain_nets = instantx_pair
    with pytest.raises(ValueError, match="give the mask"):
        _run(ours)
    with pytest.raises(ValueError, match="control_mask: for an inpainting ControlNet"):
        _run(plain_nets, control_mask=MASK)
    with pytest.raises(ValueError, match="an inpainting ControlNet takes 1"):
        diffusion_fast.StableDiffusion3ControlNetInpaintingPipeline.from_pipe(ours, controlnet=plain_nets.controlnet)
    with pytest.raises(ValueError, match="StableDiffusion3ControlNetInpaintingPipeline runs it"):
        StableDiffusion3ControlNetPipeline.from_pipe(ours)
    with pytest.raises(ValueError, match="control_mask must be .B, 1, H, W. masks"):
        _run(ours, control_mask=torch.rand(1, 3, 32, 32))
    # tensors of another size than the call's set it (diffusers' mask goes to the call's size and fails)
    assert _run(ours, control_image=torch.rand(1, 3, 32, 40) * 2 - 1,
                control_mask=torch.rand(1, 1, 32, 40)).shape == (1, 32, 40, 3)
    CONTROL.save(tmp_path / "in.png")
    MASK.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "3", "--seed", "2", "--output", str(out),
                 "--no-progress"]) == 0
    torch.manual_seed(2)
    expected = theirs(diffusion_fast.cli.DEFAULT_PROMPT, control_image=CONTROL, control_mask=MASK,
                      num_inference_steps=3, height=40, width=48, generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (40, 48, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert main(["generate", "--model", theirs._saved_to, "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--strength", "0.5", "--output", str(out), "--no-progress"]) == 2
    assert "ControlNet inpainting pipeline: give --image and --mask" in capsys.readouterr().err
    assert main(["check", "--model", theirs._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "SD3 ControlNet inpainting pipeline (2 FlowMatchEuler steps" in text and "0 failed" in text, text
    # an inpainting net given with --controlnet to a plain SD3 folder: refused, naming the pipeline that runs it
    theirs.controlnet.save_pretrained(tmp_path / "inpainting-net")
    _tiny_diffusers.sd3_pipeline(variant="sd3.5").save_pretrained(tmp_path / "sd3")
    assert main(["generate", "--model", str(tmp_path / "sd3"), "--controlnet", str(tmp_path / "inpainting-net"),
                 "--control-image", str(tmp_path / "in.png"), "--steps", "1", "--output", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "StableDiffusion3ControlNetInpaintingPipeline runs it" in err and "Traceback" not in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sd3_controlnet_loop_matches_eager_on_gpu(instantx_pair):
    """fp16 on CUDA: eager, then the nets and the transformer captured as one graph per scale (the net on for the
    first step, off after: two graphs) and replayed; the capture within fp16's 2e-3 of eager, the replay bit for
    bit."""
    pipe = diffusion_fast.load_pipeline(instantx_pair[0]._saved_to, dtype=torch.float16, device="cuda")
    pipe.set_progress_bar_config(disable=True)

    def call(p):
        torch.manual_seed(0)  # (the control image's posterior sample: the global generator)
        return p("a cat", control_image=CONTROL, control_guidance_end=0.5, num_inference_steps=3, output_type="latent",
                 generator=torch.Generator().manual_seed(1)).images

    assert_graphed_as_eager(pipe, call, None, 2)


def test_graphed_controlnet_calls_give_the_eager_images(instantx_pair, large_pair, monkeypatch):
    """Capture stood in for on the CPU: our nets + transformer call replays from one graph per scale (the net on for
    the first step, off after: two captures; the SD3.5 Large kind's None text a signature value), and accelerate's
    graphs of diffusers' transformer and net (the residual list a graph output; a direct call with return_dict=True
    gets diffusers' SD3ControlNetOutput): the eager images bit for bit."""

    from diffusion_fast import diffusers_patch

    for _, ours in (instantx_pair, large_pair):
        eager = _run(ours, control_guidance_end=0.5)
        monkeypatch.setattr(ours, "_graphs_on", lambda device: True)
        try:
            graphed = use_fake_graphs(ours._model(ours.device))
            assert np.array_equal(_run(ours, control_guidance_end=0.5), eager) and graphed.captures == 2
            assert np.array_equal(_run(ours, control_guidance_end=0.5), eager) and graphed.captures == 2
        finally:
            monkeypatch.undo()
            ours._graph = None
    from diffusers import StableDiffusion3ControlNetPipeline as Theirs

    pipe = Theirs(**_tiny_diffusers.sd3_pipeline().components, controlnet=_tiny_diffusers.sd3_controlnet())
    pipe.set_progress_bar_config(disable=True)
    _run(pipe)
    before = _run(pipe)
    graphed = [use_fake_graphs(model.forward.graphed)
               for model, _ in diffusers_patch._graph_models(pipe, {"skipped": []})]
    assert len(graphed) == 2 and np.array_equal(_run(pipe), before)
    assert [g.captures for g in graphed] == [1, 1]
    with torch.no_grad():
        out = pipe.controlnet(hidden_states=torch.randn(2, 16, 8, 8), controlnet_cond=torch.randn(2, 16, 8, 8),
                              encoder_hidden_states=torch.randn(2, 5, 48), pooled_projections=torch.randn(2, 40),
                              timestep=torch.tensor([1.0, 1.0]))
    assert type(out).__name__ == "SD3ControlNetOutput" and len(out.controlnet_block_samples) == 2
    del pipe.transformer.forward, pipe.controlnet.forward


def test_first_call_is_the_same_as_the_next(instantx_pair):
    """A freshly loaded pipeline's first call encodes the control image with the VAE in the layout every later call
    uses (channels_last on the CPU, set before the encode, not at the first decode): the same image, bit for bit."""
    ours = diffusion_fast.load_pipeline(instantx_pair[0]._saved_to)
    ours.set_progress_bar_config(disable=True)
    assert np.array_equal(_run(ours), _run(ours))


def test_the_control_image_is_encoded_once_for_both_guidance_halves(instantx_pair, monkeypatch):
    """The README's claim: one VAE encode of the batch's control images (diffusers encodes the doubled batch), a
    posterior draw for both halves (the diffusers comparisons above hold the draws equal)."""
    _, ours = instantx_pair
    calls = []
    encode = ours.vae.encode
    monkeypatch.setattr(ours.vae, "encode", lambda x: calls.append(x.shape[0]) or encode(x))
    _run(ours, prompt=["a", "b"])
    assert calls == [2], calls  # two prompts' images, not four
