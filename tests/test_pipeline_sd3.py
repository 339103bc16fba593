"""Stable Diffusion 3 and 3.5: our StableDiffusion3Pipeline against diffusers' on tiny models written by
save_pretrained and loaded by load_pipeline (two CLIP encoders with projections, a T5 encoder, the MMDiT transformer
with SD3's shape and with SD3.5 Medium's: RMSNorm on queries and keys, a second attention in the first blocks; a
16-channel VAE with SD3's scaling and shift), and the transformer alone on every backend.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, prompt and weights. Each comparison also checks that what it varies moves the image.
"""
import numpy as np
import pytest
import torch

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, assert_one_capture_for_new_inputs, use_fake_graphs
import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import StableDiffusion3Pipeline
from diffusion_fast.models import SD3Transformer2DModel
from diffusion_fast.numerics import strict_fp32

CALL = _tiny_diffusers.Comparison(prompt="a cat on a mat", num_inference_steps=4)
_run, _assert_as_diffusers, _moved = CALL.run, CALL.as_diffusers, CALL.moved


@pytest.fixture(scope="module")
def sd3_pair(tmp_path_factory):
    """SD3.5 Medium's shape: every block kind SD3's has, plus RMSNorm q/k norms and the second attention (plain
    SD3's shape is compared once, below)."""
    theirs = _tiny_diffusers.sd3_pipeline(variant="sd3.5")
    folder = tmp_path_factory.mktemp("tiny-sd3")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, StableDiffusion3Pipeline)
    theirs._saved_to = str(folder)
    return theirs, ours


@pytest.mark.parametrize("kwargs, other", [
    ({}, {"prompt": "a dog"}),  # diffusers' defaults: guidance 7, shift 3, the transformer's default size
    ({"guidance_scale": 1.0}, {"prompt": "a dog"}),  # no guidance: one transformer half
    # two prompts, two images each, a non-square size (the position table cropped off-centre), a negative prompt
    ({"prompt": ["a cat", "a hat"], "num_images_per_prompt": 2, "height": 48, "width": 32,
      "negative_prompt": ["dull", "dark"]}, {"negative_prompt": ["bright", "sharp"]}),
    # the second CLIP's and T5's own prompts, and their negatives
    ({"prompt_2": "ink", "prompt_3": "a red box", "negative_prompt_3": "blue"}, {"prompt_3": "a green box"}),
    # SD3.5's skip-layer guidance over most of the schedule (an extra transformer call without block 1)
    ({"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 0.9},
     {"skip_layer_guidance_scale": 6.0}),
    ({"clip_skip": 1}, {"clip_skip": None}),  # the prompt's CLIP hidden states one layer earlier
    ({"max_sequence_length": 20}, {"max_sequence_length": 40}),  # fewer T5 tokens: a shorter joint sequence
    ({"sigmas": [1.0, 0.6, 0.3]}, {"sigmas": [1.0, 0.8, 0.3]}),  # a custom schedule, shifted
], ids=["defaults", "no-guidance", "batch-size-negative", "prompt-2-3", "skip-layer-guidance", "clip-skip",
        "max-sequence-length", "sigmas"])
def test_sd3_matches_diffusers(sd3_pair, kwargs, other):
    theirs, ours = sd3_pair
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    assert _moved(_run(ours, **dict(kwargs, **other)), b)


def test_plain_sd3_shape_matches_diffusers(tmp_path):
    """SD3's own shape (no q/k norms, no second attention): the defaults and skip-layer guidance as diffusers'."""
    theirs, ours = _tiny_diffusers.saved_pair(_tiny_diffusers.sd3_pipeline(variant="sd3"), tmp_path,
                                              StableDiffusion3Pipeline)
    b = _assert_as_diffusers(theirs, ours)
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.9)
    assert _moved(_assert_as_diffusers(theirs, ours, **slg), b)


def test_sd3_embeds_latents_reference_backend_and_callback(sd3_pair):
    theirs, ours = sd3_pair
    embeds = ours.encode_prompt("a cat on a mat", do_classifier_free_guidance=True)
    torch.testing.assert_close(embeds, theirs.encode_prompt("a cat on a mat", None, None), rtol=1e-5, atol=1e-5)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    given = dict(zip(names, embeds), prompt=None)
    _assert_as_diffusers(theirs, ours, **given)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    _assert_as_diffusers(theirs, ours, latents=latents)
    _assert_as_diffusers(theirs, ours, backend_name="reference")
    seen = []

    def halve(pipe, i, t, tensors):  # diffusers' callback: read the named tensors, replace the latents
        seen.append((i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5}

    kwargs = dict(callback_on_step_end=halve, callback_on_step_end_tensor_inputs=["latents", "pooled_prompt_embeds"])
    b = _assert_as_diffusers(theirs, ours, **kwargs)
    assert seen[:4] == [(i, ["latents", "pooled_prompt_embeds"]) for i in range(4)]
    assert _moved(_run(ours), b)


def test_sd3_with_a_tiny_vae_matches_diffusers(tmp_path):
    """A TAESD3-shaped AutoencoderTiny (16 channels, SD3's scaling and shift) in place of the VAE, saved in the folder:
    text-to-image and image-to-image (its encoder: latents without a posterior) as diffusers."""
    import diffusers
    from PIL import Image

    from diffusion_fast import StableDiffusion3Img2ImgPipeline

    torch.manual_seed(0)
    tiny_vae = diffusers.AutoencoderTiny(
        latent_channels=16, encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), scaling_factor=1.5305, shift_factor=0.0609)
    base = _tiny_diffusers.sd3_pipeline(variant="sd3.5").components
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    for theirs_cls, ours_cls, extra in ((diffusers.StableDiffusion3Pipeline, StableDiffusion3Pipeline, {}),
                                        (diffusers.StableDiffusion3Img2ImgPipeline, StableDiffusion3Img2ImgPipeline,
                                         {"image": image})):
        theirs, ours = _tiny_diffusers.saved_pair(theirs_cls(**{**base, "vae": tiny_vae.eval()}),
                                                  tmp_path / theirs_cls.__name__, ours_cls)
        assert type(ours.vae).__name__ == "AutoencoderTiny"
        _assert_as_diffusers(theirs, ours, **extra)


def test_sd3_without_t5_matches_diffusers(tmp_path):
    """A folder saved without T5 (diffusers' text_encoder_3=None): zeros in its place, as diffusers."""
    theirs, ours = _tiny_diffusers.saved_pair(_tiny_diffusers.sd3_pipeline(t5=False), tmp_path,
                                              StableDiffusion3Pipeline)
    assert ours.text_encoder_3 is None and ours.tokenizer_3 is None
    _assert_as_diffusers(theirs, ours)


def test_transformer_matches_diffusers_on_every_backend():
    """The transformer alone, SD3.5's shape with head dim 16 (the Triton kernel's smallest): diffusers' output on
    the C++/torch path, the reference path and (interpreted) Triton kernels, 50 image tokens from a 10x20 latent plus
    7 text tokens (57: no power of two), batch 3; skipped blocks, and an SD3 ControlNet's residuals (two spread over
    three blocks, added after a skipped one too)."""
    import diffusers

    config = dict(_tiny_diffusers.SD35_TINY, attention_head_dim=16, caption_projection_dim=64)
    torch.manual_seed(0)
    theirs = diffusers.SD3Transformer2DModel(**config).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = SD3Transformer2DModel(dict(theirs.config))
    ours.load_state_dict(theirs.state_dict())
    x, context = torch.randn(3, 16, 10, 20), torch.randn(3, 7, 48)
    pooled, t = torch.randn(3, 40), torch.tensor([999.0, 500.5, 3.0])
    with torch.no_grad():
        expected = theirs(x, context, pooled, t).sample
        for name in ("fast", "reference", "triton"):
            on = DEVICE if name == "triton" else torch.device("cpu")  # (compiled Triton takes CUDA tensors)
            with diffusion_fast.backend(name), strict_fp32():
                got = ours.to(on)(*(a.to(on) for a in (x, context, pooled, t))).cpu()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
        ours.to("cpu")
        skipped = ours(x, context, pooled, t, skip_layers=[0, 2])
        residuals = [torch.randn(3, 50, 64) for _ in range(2)]
        guided = ours(x, context, pooled, t, skip_layers=[0], block_controlnet_hidden_states=residuals)
        theirs_guided = theirs(x, context, pooled, t, skip_layers=[0], block_controlnet_hidden_states=residuals)
    torch.testing.assert_close(skipped, theirs(x, context, pooled, t, skip_layers=[0, 2]).sample.detach(),
                               rtol=1e-4, atol=1e-4)
    assert (skipped - expected).abs().max() > 1e-2
    torch.testing.assert_close(guided, theirs_guided.sample, rtol=1e-4, atol=1e-4)
    assert (guided - ours(x, context, pooled, t, skip_layers=[0]).detach()).abs().max() > 1e-2


def test_transformer_errors():
    model = SD3Transformer2DModel(dict(_tiny_diffusers.SD3_TINY))
    x, context, pooled = torch.randn(1, 16, 8, 8), torch.randn(1, 5, 48), torch.randn(1, 40)
    for bad, match in ((dict(hidden_states=torch.randn(1, 4, 8, 8)), "hidden_states must be a"),
                       (dict(hidden_states=torch.randn(1, 16, 7, 8)), "multiples of 2"),
                       (dict(hidden_states=torch.randn(1, 16, 26, 8)), "exceed the position table"),
                       (dict(encoder_hidden_states=torch.randn(1, 5, 40)), "encoder_hidden_states must be a"),
                       (dict(pooled_projections=torch.randn(2, 40)), "pooled_projections must be a"),
                       (dict(block_controlnet_hidden_states=[]), "block_controlnet_hidden_states must be a non-empty"),
                       # (16 tokens of width 32 in this model)
                       (dict(block_controlnet_hidden_states=[torch.randn(1, 7, 32)]), r"list of \(1, 16, 32\) tens")):
        args = {**dict(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=1.0), **bad}
        with pytest.raises(ValueError, match=match):
            model(**args)
    for field, value, match in (("qk_norm", "layer_norm", "qk_norm"), ("caption_projection_dim", 48, "must equal"),
                                ("num_layers", 0, "positive int")):
        with pytest.raises(ValueError, match=match):
            SD3Transformer2DModel(dict(_tiny_diffusers.SD3_TINY, **{field: value}))


def test_sd3_call_errors(sd3_pair):
    _, ours = sd3_pair
    for kwargs, error, match in (
            (dict(prompt=None), ValueError, "give a prompt"),
            (dict(height=36), ValueError, "height must be a"),  # not a multiple of 8
            (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
            (dict(guidance_scale=-1), ValueError, "guidance_scale"),
            (dict(prompt_2=["a", "b"]), ValueError, "prompt_2 has 2 entries"),
            (dict(negative_prompt=3), TypeError, "negative_prompt must be a str"),
            (dict(max_sequence_length=600), ValueError, "max_sequence_length"),
            (dict(skip_guidance_layers=[7]), ValueError, "skip_guidance_layers"),
            (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
            (dict(latents=torch.randn(1, 4, 8, 8)), ValueError, "latents must have shape"),
            (dict(prompt=None, prompt_embeds=torch.randn(1, 333, 48)), ValueError, "needs pooled_prompt_embeds"),
            (dict(output_type="jpeg"), ValueError, "output_type")):
        with pytest.raises(error, match=match):
            _run(ours, **kwargs)
    from diffusion_fast.pipeline_common import check_size

    with pytest.raises(ValueError, match="height must be a multiple of the VAE scale factor times the patch size 16"):
        check_size(16, "the VAE scale factor times the patch size", height=40)  # (SD3's factor: the tiny's is 8)
    with pytest.raises(TypeError, match="prompt must be a str"):
        ours.encode_prompt(None)
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        ours.encode_prompt(None, prompt_embeds=torch.randn(1, 333, 48))
    with pytest.raises(TypeError, match="pipe must be one of diffusion_fast's SD3 pipelines"):
        StableDiffusion3Pipeline.from_pipe(diffusion_fast.StableDiffusionPipeline.from_tiny())
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        StableDiffusion3Pipeline(ours.transformer, diffusion_fast.schedulers.DDIMScheduler(), ours.vae,
                                 ours.text_encoder, ours.tokenizer, ours.text_encoder_2, ours.tokenizer_2)
    if not ON_GPU:
        ours.cuda_graph = True
        try:
            with pytest.raises(ValueError, match="needs the pipeline on a CUDA device"):
                _run(ours)
        finally:
            ours.cuda_graph = "auto"


def test_graphed_transformer_call_gives_the_eager_image(sd3_pair, monkeypatch):
    """On CUDA the transformer call replays from one graph per shape (capture stood in for on the CPU): other
    prompts, the same graph, the eager images bit for bit."""
    assert_one_capture_for_new_inputs(sd3_pair[1], None, _run, [dict(), dict(prompt="a dog", negative_prompt="a hat")],
                                      monkeypatch)


def test_load_pipeline_refuses_other_transformer_pipelines(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", '
                                               '"FluxTransformer2DModel"]}')
    with pytest.raises(ValueError, match="FluxPipeline .* not supported"):
        diffusion_fast.load_pipeline(tmp_path)


@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: shift 3, CFG
    # skip-layer guidance at steps 1-3 (0 < i < 0.9 * 4), a non-square size
    {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 0.9, "height": 48,
     "width": 32},
])
def test_accelerate_sd3_same_images_exact_restore_and_our_ops(monkeypatch, kwargs):
    """diffusers' own StableDiffusion3Pipeline under accelerate: the joint attention on our op (attention=True: on
    the CPU "auto" leaves it to diffusers' SDPA), the VAE's GroupNorm+SiLU fused, flow-matching Euler as one fused
    step; the same images, and restore puts diffusers' back bit for bit."""
    from _scheduler_parity import count_op_calls
    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.sd3_pipeline(variant="sd3.5")
    before = _run(pipe, **kwargs)
    attention, steps = count_op_calls(monkeypatch, "_attention"), count_op_calls(monkeypatch, "linear_step")
    diffusion_fast.accelerate(pipe, attention=True)
    report = pipe._diffusion_fast_report
    joint = sum(isinstance(m.processor, diffusers_patch.DiffusionFastJointAttnProcessor)
                for m in pipe.transformer.modules() if hasattr(m, "processor"))
    assert joint == 3 + 2 and report["scheduler"] == 1 and report["resnets"] > 0  # 3 blocks, 2 second attentions
    assert np.abs(_run(pipe, **kwargs) - before).max() <= 1e-3
    # per step the joint attentions; a skip-layer call runs all but block 1's two; the VAE decoder's mid attention
    slg_calls = 3 if kwargs else 0
    assert len(steps) == 4 and len(attention) == 4 * joint + slg_calls * (joint - 2) + 1
    diffusion_fast.restore(pipe)
    assert np.array_equal(_run(pipe, **kwargs), before)


def test_accelerate_sd3_graphs_the_transformer_call(monkeypatch):
    """On CUDA accelerate replays SD3's transformer from CUDA graphs (capture stood in for on the CPU): the pipeline's
    keyword call, timestep and pooled projections as graph inputs, one capture for every step, the eager image."""
    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.sd3_pipeline()
    before = _run(pipe)
    diffusers_patch._graph_models(pipe, {"skipped": []})
    graphed = use_fake_graphs(pipe.transformer.forward.graphed)
    assert np.array_equal(_run(pipe), before) and graphed.captures == 1
    del pipe.transformer.forward


def test_accelerate_fuses_diffusers_flow_match_scheduler_exactly():
    """accelerate's step for diffusers' FlowMatchEulerDiscreteScheduler against its own, step by step: SD3's shift,
    stochastic sampling (noise from equal generators) and a dynamic shift."""
    import diffusers

    from diffusion_fast.diffusers_schedulers import fuse_step

    for cfg, schedule in ((dict(shift=3.0), dict(num_inference_steps=6)),
                          (dict(shift=3.0, stochastic_sampling=True), dict(num_inference_steps=4)),
                          (dict(use_dynamic_shifting=True), dict(num_inference_steps=5, mu=0.8))):
        plain, fused = (diffusers.FlowMatchEulerDiscreteScheduler(**cfg) for _ in range(2))
        assert fuse_step(fused) is None
        for sched in (plain, fused):
            sched.set_timesteps(**schedule)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 5, 7, generator=gen)
        for t in plain.timesteps:
            v = torch.randn(2, 16, 5, 7, generator=gen)
            a = plain.step(v, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
            b = fused.step(v, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
            fused._step_index -= 1  # a second look at the same step, with an fp16 model's velocity
            half = fused.step(v.half(), t, x, generator=torch.Generator().manual_seed(1)).prev_sample
            assert half.dtype == torch.float16  # prev in the model output's dtype, as diffusers
            torch.testing.assert_close(half.float(), a, rtol=2e-3, atol=2e-3)
            fused._step_index -= 1  # and an fp16 sample too (an fp16 pipeline's latents), not copied to fp32 first
            plain._step_index -= 1
            kw = dict(generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(fused.step(v.half(), t, x.half(), **kw).prev_sample,
                                       plain.step(v.half(), t, x.half(), generator=torch.Generator().manual_seed(1))
                                       .prev_sample, rtol=0, atol=2e-3)
            x = a


def test_generate_sd3_folder_writes_diffusers_image(sd3_pair, tmp_path, capsys):
    """``generate --model`` on an SD3 folder: both paths, the speed and their difference printed, and the PNG is
    diffusers' image for the same seed (within one 8-bit level)."""
    from PIL import Image

    from diffusion_fast.cli import main

    theirs, _ = sd3_pair
    out = tmp_path / "sd3.png"
    assert main(["generate", "--model", theirs._saved_to, "--prompt", "a cat", "--negative-prompt", "blur",
                 "--steps", "3", "--guidance", "5", "--height", "48", "--width", "32", "--seed", "2", "--output",
                 str(out), "--no-progress", "--compare"]) == 0
    text = capsys.readouterr().out
    assert "fast path:      3 steps" in text and "max abs pixel difference" in text, text
    expected = theirs("a cat", negative_prompt="blur", num_inference_steps=3, guidance_scale=5.0, height=48,
                      width=32, generator=torch.Generator().manual_seed(2)).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (48, 32, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--image", "IN", "--karras"], "Stable Diffusion 3 model .* takes no --karras"),
    (["--scheduler", "ddim", "--eta", "0.5"], "takes no --eta, --scheduler"),
    (["--embedding", "IN"], "takes no --embedding"),
], ids=["karras", "scheduler-eta", "embedding"])
def test_generate_sd3_bad_options_one_line(sd3_pair, tmp_path, capsys, extra, message):
    import re

    from PIL import Image

    from diffusion_fast.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IN" else a for a in extra]
    assert main(["generate", "--model", sd3_pair[0]._saved_to, "--steps", "1", *extra, "--no-progress",
                 "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_check_runs_an_sd3_folder(sd3_pair, capsys, monkeypatch):
    """``check`` runs an SD3 folder both ways and compares the transformer's first prediction; a fast path whose
    joint attention drops the text tokens fails."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main
    from diffusion_fast.models.sd3_transformer import JointAttention

    assert main(["check", "--model", sd3_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "SD3 text-to-image pipeline (2 FlowMatchEuler steps" in text and "0 failed" in text, text
    assert "transformer velocity prediction rel err" in text
    real = JointAttention.forward

    def fast_without_text(self, x, context=None, ip=None):
        if context is None or current_backend() == "reference":
            return real(self, x, context, ip)
        return real(self, x), context  # (image tokens attend to themselves; the text stream passes through)

    monkeypatch.setattr(JointAttention, "forward", fast_without_text)
    assert main(["check", "--model", sd3_pair[0]._saved_to, "--steps", "2"]) == 1


def test_vae_layout_follows_channels_last(sd3_pair):
    """channels_last="auto" decodes in channels_last on the CPU (as the SD pipelines measured it to pay), False in
    NCHW; the same image either way."""
    _, ours = sd3_pair
    conv = ours.vae.decoder.conv_in.weight
    try:
        auto = _run(ours)
        assert ours.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        ours.channels_last = False
        plain = _run(ours)
        assert ours.vae.decoder.conv_in.weight.is_contiguous() and np.abs(auto - plain).max() <= 1e-5
        with pytest.raises(ValueError, match="channels_last"):
            ours.channels_last = "yes"
    finally:
        ours.channels_last = "auto"
    assert conv.shape == ours.vae.decoder.conv_in.weight.shape


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_sd3_loop_matches_eager_on_gpu(sd3_pair):
    """fp16 on CUDA (our Triton attention in every block): eager, then the transformer call captured and replayed;
    the capture within fp16's 2e-3 of eager, the replay bit for bit, one graph held."""
    from conftest import DEVICE

    pipe = diffusion_fast.load_pipeline(sd3_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("a cat", num_inference_steps=3, output_type="latent",
                                              generator=torch.Generator().manual_seed(1)).images, None, 1)


def test_diffusers_cfg_cutoff_callback_and_embeds_per_image(sd3_pair):
    """diffusers' SD3CFGCutoffCallback (guidance off after the first step: the pipeline's _guidance_scale set to 0,
    the embeddings cut to the prompt's) works as in diffusers; given embeddings are repeated per image like a prompt's."""
    from diffusers.callbacks import SD3CFGCutoffCallback

    theirs, ours = sd3_pair
    cutoff = SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    b = _assert_as_diffusers(theirs, ours, callback_on_step_end=cutoff)
    assert ours.num_timesteps == 4 and ours.guidance_scale == 0.0  # (what the callback read and set)
    assert _moved(_run(ours), b)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    given = dict(zip(names, ours.encode_prompt("a cat on a mat")), prompt=None)
    assert np.array_equal(_run(ours, num_images_per_prompt=2, **given), _run(ours, num_images_per_prompt=2))


def _sd3_lora(folder, theirs, rank=4, alpha=8, seed=0):
    """A LoRA as diffusers' SD3 training script saves it: a PEFT adapter on the transformer (attention in and out of
    both streams, SD3.5's second attention, the feed-forwards), and factors for both CLIP encoders' attention, through
    save_lora_weights with the adapter's config as metadata."""
    import copy

    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_lora import _factors, _targets

    transformer = copy.deepcopy(theirs.transformer)
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2"]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
    generator, text = torch.Generator().manual_seed(seed), [{}, {}]
    for layers, encoder in zip(text, (theirs.text_encoder, theirs.text_encoder_2)):
        for name, weight in _targets(encoder, ("q_proj", "v_proj")):
            layers[f"{name}.lora_A.weight"], layers[f"{name}.lora_B.weight"] = _factors(weight, rank, generator)
    text_metadata = dict(r=rank, lora_alpha=alpha // 2, target_modules=["q_proj", "v_proj"])
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer), text_encoder_lora_layers=text[0],
        text_encoder_2_lora_layers=text[1], transformer_lora_adapter_metadata=transformer.peft_config[
            "default"].to_dict(), text_encoder_lora_adapter_metadata=text_metadata,
        text_encoder_2_lora_adapter_metadata=text_metadata)
    return str(folder)


def test_sd3_lora_as_diffusers_at_a_call_scale_and_unloaded_exactly(tmp_path):
    """A diffusers-format SD3 LoRA (transformer and both CLIP encoders), merged: diffusers' image after its
    load_lora_weights, at joint_attention_kwargs' scale too; unload gives back the weights bit for bit."""
    theirs, ours = _tiny_diffusers.saved_pair(_tiny_diffusers.sd3_pipeline(variant="sd3.5"), tmp_path / "model",
                                              StableDiffusion3Pipeline)
    before = _run(ours)
    weights = {k: v.clone() for k, v in ours.transformer.state_dict().items()}
    lora = _sd3_lora(tmp_path / "lora", theirs)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(lora)
    with_lora = _assert_as_diffusers(theirs, ours)
    assert _moved(with_lora, before)
    assert _moved(_assert_as_diffusers(theirs, ours, joint_attention_kwargs={"scale": 0.5}), with_lora)
    with pytest.raises(ValueError, match=r"joint_attention_kwargs: only 'scale'"):
        _run(ours, joint_attention_kwargs={"ip_adapter_image_embeds": None})
    img2img = diffusion_fast.StableDiffusion3Img2ImgPipeline.from_pipe(ours)  # the same weights, the same LoRAs
    assert img2img.get_active_adapters() == ours.get_active_adapters() == ["default_0"]
    img2img.unload_lora_weights()
    assert all(torch.equal(v, weights[k]) for k, v in ours.transformer.state_dict().items())
    assert np.array_equal(_run(ours), before)


def test_generate_sd3_with_a_lora(sd3_pair, tmp_path, capsys):
    """``generate --lora`` on an SD3 folder merges it at its scale: diffusers' image with the LoRA at that scale."""
    from PIL import Image

    from diffusion_fast.cli import main

    theirs, _ = sd3_pair
    lora = _sd3_lora(tmp_path / "lora", theirs)
    out = tmp_path / "lora.png"
    assert main(["generate", "--model", theirs._saved_to, "--lora", f"{lora}:0.7", "--steps", "3", "--seed", "2",
                 "--output", str(out), "--no-progress"]) == 0
    assert "merged 1 LoRA" in capsys.readouterr().out
    theirs.load_lora_weights(lora, adapter_name="cli")
    theirs.set_adapters(["cli"], [0.7])
    try:
        expected = theirs(num_inference_steps=3, prompt=diffusion_fast.cli.DEFAULT_PROMPT,
                          generator=torch.Generator().manual_seed(2)).images[0]
    finally:
        theirs.unload_lora_weights()
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
