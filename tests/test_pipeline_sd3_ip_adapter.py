"""SD3 IP-Adapters: our SD3 pipelines with an InstantX-format adapter (SD3.5-Large-IP-Adapter's layout, tiny)
against diffusers' StableDiffusion3Pipeline with the same adapter, on a tiny SD3.5 Large-shaped model (q/k RMSNorm,
no second attention) saved by diffusers and loaded by load_pipeline, a tiny SigLIP as the image encoder.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, image prompt, scale and weights. Each comparison also checks that the image prompt moves the image.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, assert_one_capture_for_new_inputs, fake_graphed
import diffusion_fast
from conftest import ON_GPU
from diffusion_fast import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

CALL = _tiny_diffusers.Comparison(prompt="a cat on a mat", num_inference_steps=4)
_run, _moved = CALL.run, CALL.moved
_rng = np.random.default_rng(0)
STYLE = Image.fromarray(_rng.integers(0, 255, (40, 36, 3), dtype=np.uint8))  # the image prompt (not square)
OTHER = Image.fromarray(_rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
@pytest.fixture(scope="module")
def ip_pair(tmp_path_factory):
    """(diffusers' pipeline with the adapter loaded, ours loaded from the folder diffusers saved (its SigLIP too)
    with the adapter loaded, the adapter's folder)."""
    theirs = _tiny_diffusers.sd3_ip_pipeline()
    folder = tmp_path_factory.mktemp("tiny-sd35-large")
    theirs.save_pretrained(folder)
    ours = diffusion_fast.load_pipeline(str(folder))
    ours.set_progress_bar_config(disable=True)
    adapter = _tiny_diffusers.sd3_ip_adapter_file(tmp_path_factory.mktemp("tiny-sd3-ip-adapter"))
    for pipe in (theirs, ours):
        pipe.load_ip_adapter(adapter, weight_name="ip-adapter.bin")
    theirs._saved_to = str(folder)
    return theirs, ours, adapter


def _as_diffusers(theirs, ours, **kwargs):
    b = CALL.as_diffusers(theirs, ours, **kwargs)
    no_image = {k: v for k, v in kwargs.items() if k != "ip_adapter_image"}
    assert _moved(_run(ours, **no_image), b)  # (the image prompt matters)
    return b


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"ip_adapter_image": STYLE},  # the adapter's default scale 0.5, guidance 7 (zeros as the negative image)
    {"ip_adapter_image": OTHER, "guidance_scale": 1.0},  # no guidance: the image's features alone
    # two prompts, two images each, negatives, another size
    {"ip_adapter_image": STYLE, "prompt": ["a cat", "a hat"], "num_images_per_prompt": 2,
     "negative_prompt": ["dull", "dark"], "height": 48, "width": 32},
], ids=["defaults", "no-guidance", "batch"])
def test_sd3_ip_adapter_matches_diffusers(ip_pair, kwargs):
    _as_diffusers(*ip_pair[:2], **kwargs)


def test_sd3_ip_adapter_scale_embeds_and_backends(ip_pair):
    """A scale of 1, given embeddings (ours' own prepared ones, as diffusers takes them), the reference backend;
    scale 0 is the plain pipeline bit for bit (diffusers then does not run the adapter either)."""
    theirs, ours, _ = ip_pair
    plain = _run(ours)
    try:
        for pipe in (theirs, ours):
            pipe.set_ip_adapter_scale(1.0)
        _as_diffusers(theirs, ours, ip_adapter_image=STYLE)
        embeds = ours.prepare_ip_adapter_image_embeds(STYLE, None, ours.device, 1, True)
        assert embeds.shape == (2, 16, 16) and not embeds[0].any()  # (zeros, then SigLIP's 16 tokens)
        a = _run(ours, ip_adapter_image_embeds=embeds)
        assert np.array_equal(a, _run(ours, ip_adapter_image=STYLE))
        CALL.as_diffusers(theirs, ours, ip_adapter_image_embeds=embeds)
        CALL.as_diffusers(theirs, ours, "reference", ip_adapter_image=STYLE)
        ours.set_ip_adapter_scale(0.0)
        assert np.array_equal(_run(ours, ip_adapter_image=STYLE), plain)
    finally:
        for pipe in (theirs, ours):
            pipe.set_ip_adapter_scale(0.5)


def test_sd3_ip_adapter_image_to_image_and_inpainting_match_diffusers(ip_pair):
    import diffusers

    theirs, ours, _ = ip_pair
    image = Image.fromarray(_rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    # (inpainting's latents: diffusers' SD3 inpainting decode drops the VAE shift, diffusers#13611; see its tests)
    for cls, extra in ((StableDiffusion3Img2ImgPipeline, {}),
                       (StableDiffusion3InpaintPipeline, {"mask_image": mask, "output_type": "latent"})):
        theirs_kind = getattr(diffusers, cls.__name__).from_pipe(theirs)
        theirs_kind.set_progress_bar_config(disable=True)
        ours_kind = cls.from_pipe(ours)
        assert ours_kind.image_encoder is ours.image_encoder and ours_kind.is_ip_adapter_active
        _as_diffusers(theirs_kind, ours_kind, image=image, strength=0.8, ip_adapter_image=STYLE, **extra)


# ---- loading and unloading -----------------------------------------------------------------------------------------
def test_load_from_the_adapter_folder_and_unload(ip_pair, tmp_path):
    """A pipeline without an image encoder takes SigLIP from the adapter's image_encoder/ (its processor sized from
    the encoder's config when the folder has none); a .safetensors adapter loads like the .bin; unload restores the
    plain pipeline's images bit for bit and drops the encoder, as diffusers'."""
    from safetensors.torch import save_file

    theirs, ours, adapter = ip_pair
    folder = tmp_path / "adapter"
    encoder, _ = _tiny_diffusers.siglip()
    encoder.save_pretrained(folder / "image_encoder")
    state = torch.load(f"{adapter}/ip-adapter.bin", weights_only=True)
    save_file({f"{part}.{k}": v for part, d in state.items() for k, v in d.items()}, folder / "ip.safetensors")
    bare = StableDiffusion3Pipeline.from_pipe(ours, image_encoder=None, feature_extractor=None)
    plain = _run(bare)
    bare.transformer = type(ours.transformer).from_config(dict(ours.transformer.config))  # (not the shared one)
    bare.transformer.load_state_dict(ours.transformer.state_dict(), strict=False)
    bare.load_ip_adapter(str(folder), weight_name="ip.safetensors")
    assert bare.feature_extractor.size == {"height": 32, "width": 32}
    assert np.abs(_run(bare, ip_adapter_image=STYLE) - _run(ours, ip_adapter_image=STYLE)).max() < 1e-6
    bare.unload_ip_adapter()
    assert bare.image_encoder is None and bare.transformer.image_proj is None
    assert np.array_equal(_run(bare), plain)


def test_ip_adapter_errors_name_what_is_wrong(ip_pair, tmp_path):
    _, ours, adapter = ip_pair
    state = torch.load(f"{adapter}/ip-adapter.bin", weights_only=True)
    bad = {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}
    del bad["image_proj"]["norm_out.bias"]
    bad["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(5, 5)
    bad["ip_adapter"]["7.to_v_ip.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"(?s)image_proj: missing \(1\): norm_out.bias.*ip_adapter.1 .*mis-shaped.*"
                                         r"to_k_ip.weight.*no such joint block \(1\): ip_adapter.7.to_v_ip"):
        ours.load_ip_adapter(bad, image_encoder_folder=None)
    assert ours.transformer.transformer_blocks[1].attn.ip_adapter.to_k_ip.weight.shape == (32, 32)  # (unchanged)
    with pytest.raises(ValueError, match="not an SD3 IP-Adapter state dict"):
        ours.load_ip_adapter({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {"1.to_k_ip.weight":
                                                                                             torch.zeros(4, 4)}})
    with pytest.raises(ValueError, match="ip_adapter_image and ip_adapter_image_embeds: give one"):
        _run(ours, ip_adapter_image=STYLE, ip_adapter_image_embeds=torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="ip_adapter_image: give one image .* got 2"):
        _run(ours, ip_adapter_image=[STYLE, OTHER], prompt=["a", "b"])
    with pytest.raises(TypeError, match="ip_adapter_image must be a PIL image, a numpy array or a tensor .* got str"):
        _run(ours, ip_adapter_image="style.png")
    with pytest.raises(ValueError, match=r"processed pixels, \(1, C, H, W\); got \(3, 32, 32\)"):
        _run(ours, ip_adapter_image=torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds must be a \(rows, N, E\) tensor .* got list"):
        ours.prepare_ip_adapter_image_embeds(None, [torch.zeros(2, 16, 16)])
    with pytest.raises(TypeError, match="subfolder must be a str or None, got int"):
        ours.load_ip_adapter(adapter, weight_name="ip-adapter.bin", subfolder=3)
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds must be a \(2, N, 16\) tensor"):
        _run(ours, ip_adapter_image_embeds=torch.zeros(2, 16, 8))
    with pytest.raises(TypeError, match="scale must be a finite number"):
        ours.set_ip_adapter_scale([0.5])
    bare = StableDiffusion3Pipeline.from_pipe(ours)
    bare.transformer = type(ours.transformer).from_config(dict(ours.transformer.config))
    with pytest.raises(ValueError, match="ip_adapter_image: no IP-Adapter is loaded"):
        _run(bare, ip_adapter_image=STYLE)
    with pytest.raises(ValueError, match="set_ip_adapter_scale: no IP-Adapter is loaded"):
        bare.set_ip_adapter_scale(0.5)
    with pytest.raises(FileNotFoundError, match="image_encoder_folder"):
        StableDiffusion3Pipeline.from_pipe(bare, image_encoder=None).load_ip_adapter(adapter, weight_name="ip-adapter.bin")
    medium = _tiny_diffusers.sd3_pipeline(variant="sd3.5")  # (dual attention: not the adapter's kind)
    from diffusion_fast.models import SD3Transformer2DModel

    with pytest.raises(ValueError, match="without SD3.5 Medium's second attention"):
        StableDiffusion3Pipeline.from_pipe(ours, transformer=SD3Transformer2DModel.from_config(
            dict(medium.transformer.config))).load_ip_adapter(state, image_encoder_folder=None)


def test_controlnet_and_pag_pipelines_refuse_an_ip_adapter(ip_pair):
    from diffusion_fast import StableDiffusion3ControlNetPipeline, StableDiffusion3PAGPipeline
    from diffusion_fast.models import SD3ControlNetModel

    _, ours, adapter = ip_pair
    net = SD3ControlNetModel.from_config(dict(_tiny_diffusers.SD3_TINY, num_layers=1, qk_norm="rms_norm"))
    with pytest.raises(TypeError, match="takes no IP-Adapter"):
        StableDiffusion3ControlNetPipeline.from_pipe(ours, controlnet=net).load_ip_adapter(adapter)
    pag = StableDiffusion3PAGPipeline.from_pipe(ours)
    with pytest.raises(ValueError, match="not with perturbed-attention guidance"):
        _run(pag, ip_adapter_image=STYLE)
    assert np.array_equal(_run(pag, ip_adapter_image=STYLE, pag_scale=0.0), _run(ours, ip_adapter_image=STYLE))


# ---- the loop ------------------------------------------------------------------------------------------------------
def test_graphed_call_with_an_image_prompt(ip_pair, monkeypatch):
    """On CUDA the transformer call, the adapter's projection inside it, replays from a graph with the image
    features as an input (capture stood in for on the CPU): the eager images bit for bit, another image through the
    same graph; a new scale (baked into the kernels) or an unloaded adapter gets a fresh capture."""
    _, ours, adapter = ip_pair
    assert_one_capture_for_new_inputs(ours, None, _run, [dict(ip_adapter_image=STYLE), dict(ip_adapter_image=OTHER)],
                                      monkeypatch)
    ours.set_ip_adapter_scale(0.9)
    rescaled = _run(ours, ip_adapter_image=STYLE)
    ours.set_ip_adapter_scale(0.5)
    try:
        graphed = fake_graphed(ours, None, monkeypatch)
        _run(ours, ip_adapter_image=STYLE)
        assert graphed.captures == 1
        ours.set_ip_adapter_scale(0.9)
        assert np.array_equal(_run(ours, ip_adapter_image=STYLE), rescaled) and graphed.captures == 2
        ours.unload_ip_adapter()
        _run(ours)
        assert graphed.captures == 3
    finally:
        ours._graph = None
        ours.load_ip_adapter(adapter, weight_name="ip-adapter.bin", image_encoder_folder=None)
        ours.image_encoder, ours.feature_extractor = ip_pair[0].image_encoder, ip_pair[0].feature_extractor


@pytest.mark.parametrize("kind", ["cfg-cutoff", "skip-layer-guidance"])
def test_calls_on_the_prompts_rows_get_the_images_features(ip_pair, monkeypatch, kind):
    """After diffusers' SD3CFGCutoffCallback (guidance off after step 0), and in skip-layer guidance's extra call,
    the transformer runs the prompt's rows alone; ours gives them the image's features (not the negative zeros).
    diffusers hands such a call both halves' features, which its IP attention folds into one sample's tokens (a
    silently different image): ours matches diffusers with that call given the image's rows."""
    from diffusers.callbacks import SD3CFGCutoffCallback

    theirs, ours, _ = ip_pair
    kwargs = ({"callback_on_step_end": SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)}
              if kind == "cfg-cutoff" else
              {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0})
    seen, forward = [], ours.transformer.forward

    def spy(hidden_states, *args, ip_adapter_image_embeds=None, **kw):
        seen.append((hidden_states.shape[0], ip_adapter_image_embeds))
        return forward(hidden_states, *args, ip_adapter_image_embeds=ip_adapter_image_embeds, **kw)

    monkeypatch.setattr(ours.transformer, "forward", spy)
    _run(ours, ip_adapter_image=STYLE, **kwargs)
    monkeypatch.undo()
    image = seen[0][1][1:]
    assert seen[0][0] == 2 and not seen[0][1][0].any()  # (the guided call: zeros, then the image's)
    one_row = [embeds for rows, embeds in seen if rows == 1]
    assert len(one_row) == 3 and all(torch.equal(e, image) for e in one_row)
    assert _moved(_run(theirs, ip_adapter_image=STYLE, **kwargs), _run(ours, ip_adapter_image=STYLE, **kwargs))
    real = theirs.transformer.forward

    def fixed(hidden_states=None, joint_attention_kwargs=None, **kw):
        embeds = (joint_attention_kwargs or {}).get("ip_adapter_image_embeds")
        if embeds is not None:
            joint_attention_kwargs = dict(joint_attention_kwargs,
                                          ip_adapter_image_embeds=embeds[-hidden_states.shape[0]:])
        return real(hidden_states=hidden_states, joint_attention_kwargs=joint_attention_kwargs, **kw)

    monkeypatch.setattr(theirs.transformer, "forward", fixed)
    CALL.as_diffusers(theirs, ours, ip_adapter_image=STYLE, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_sd3_ip_adapter_loop_matches_eager_on_gpu(ip_pair):
    """fp16 on CUDA (our Triton attention in the blocks, the adapter's and its projection's): eager, then the
    transformer call captured and replayed with the image features as an input; the capture within fp16's 2e-3 of
    eager, the replay bit for bit, one graph held."""
    from conftest import DEVICE

    pipe = diffusion_fast.load_pipeline(ip_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(ip_pair[2], weight_name="ip-adapter.bin")
    assert_graphed_as_eager(pipe, lambda p: p("a cat", num_inference_steps=3, output_type="latent",
                                              ip_adapter_image=STYLE,
                                              generator=torch.Generator().manual_seed(1)).images, None, 1)


def test_accelerate_runs_diffusers_ip_adapter_attention_on_our_op(ip_pair, monkeypatch):
    """diffusers' SD3 pipeline with the adapter under accelerate: its IP-Adapter processors become ours (a subclass of
    diffusers' holding the same weights, so its set_ip_adapter_scale still reaches them), both attentions of each
    block on our op; the same images at the loaded scale and at a scale set afterwards; restore gives diffusers' back
    bit for bit."""
    from _scheduler_parity import count_op_calls
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    theirs = _tiny_diffusers.sd3_ip_pipeline()
    theirs.load_ip_adapter(ip_pair[2], weight_name="ip-adapter.bin")
    before = {s: None for s in (0.5, 0.9)}
    for scale in before:
        theirs.set_ip_adapter_scale(scale)
        before[scale] = _run(theirs, ip_adapter_image=STYLE)
    theirs.set_ip_adapter_scale(0.5)
    diffusion_fast.accelerate(theirs, attention=True)
    processors = [block.attn.processor for block in theirs.transformer.transformer_blocks]
    assert len(processors) == 3 and all(isinstance(p, SD3IPAdapterJointAttnProcessor2_0) and type(p).__name__ ==
                                        "DiffusionFastSD3IPJointAttnProcessor" for p in processors)
    assert not any("IPAdapter" in why for why in theirs._diffusion_fast_report["skipped"])
    calls = count_op_calls(monkeypatch, "_attention")
    assert np.abs(_run(theirs, ip_adapter_image=STYLE) - before[0.5]).max() <= 1e-3
    assert len(calls) == 4 * 2 * 3 + 1  # (4 steps x 3 blocks x (joint + image), and the VAE's mid attention)
    theirs.set_ip_adapter_scale(0.9)
    assert np.abs(_run(theirs, ip_adapter_image=STYLE) - before[0.9]).max() <= 1e-3
    theirs.set_ip_adapter_scale(0.5)
    diffusion_fast.restore(theirs)
    assert all(type(block.attn.processor) is SD3IPAdapterJointAttnProcessor2_0
               for block in theirs.transformer.transformer_blocks)
    assert np.array_equal(_run(theirs, ip_adapter_image=STYLE), before[0.5])


# ---- the CLI -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["the-model-folders", "beside-the-file"])
def test_generate_with_an_sd3_ip_adapter_gives_diffusers_image(ip_pair, tmp_path, capsys, encoder):
    """``generate --ip-adapter FILE --ip-adapter-image IMG`` on an SD3 folder: the model folder's SigLIP, or one in
    image_encoder/ beside the file; diffusers' PNG for the same seed within one 8-bit level, at --ip-adapter-scale."""
    import shutil

    from diffusion_fast.cli import main

    theirs, _, adapter = ip_pair
    STYLE.save(tmp_path / "style.png")
    weights = f"{adapter}/ip-adapter.bin"
    folder = theirs._saved_to
    if encoder == "beside-the-file":  # (a model folder without an encoder: the adapter's own)
        folder, weights = str(tmp_path / "model"), str(tmp_path / "adapter" / "ip-adapter.bin")
        shutil.copytree(theirs._saved_to, folder, ignore=shutil.ignore_patterns("image_encoder", "feature_extractor"))
        import json

        index = json.loads(open(f"{folder}/model_index.json").read())
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
        open(f"{folder}/model_index.json", "w").write(json.dumps(index))
        shutil.copytree(adapter, tmp_path / "adapter")
        theirs.image_encoder.save_pretrained(tmp_path / "adapter" / "image_encoder")
        theirs.feature_extractor.save_pretrained(tmp_path / "adapter" / "image_encoder")  # (its processor read too)
    out = tmp_path / "ip.png"
    try:
        theirs.set_ip_adapter_scale(0.8)
        assert main(["generate", "--model", folder, "--prompt", "a cat", "--steps", "3", "--seed", "2",
                     "--ip-adapter", weights, "--ip-adapter-image", str(tmp_path / "style.png"),
                     "--ip-adapter-scale", "0.8", "--no-progress", "--output", str(out)]) == 0, capsys.readouterr().err
        from PIL import Image as PILImage

        expected = theirs("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(2),
                          ip_adapter_image=PILImage.open(tmp_path / "style.png")).images[0]
    finally:
        theirs.set_ip_adapter_scale(0.5)
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--pag-scale", "3"], "not with --controlnet or --pag-scale"),
    (["--ip-adapter", "FILE", "--ip-adapter-image", "IMG"], "an SD3 model takes one IP-Adapter"),
], ids=["pag", "two-adapters"])
def test_generate_sd3_ip_adapter_bad_options_one_line(ip_pair, tmp_path, capsys, extra, message):
    from diffusion_fast.cli import main

    STYLE.save(tmp_path / "style.png")
    extra = [{"FILE": f"{ip_pair[2]}/ip-adapter.bin", "IMG": str(tmp_path / "style.png")}.get(a, a) for a in extra]
    assert main(["generate", "--model", ip_pair[0]._saved_to, "--steps", "1", "--ip-adapter",
                 f"{ip_pair[2]}/ip-adapter.bin", "--ip-adapter-image", str(tmp_path / "style.png"), *extra,
                 "--no-progress", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
