"""Perturbed-attention guidance for SD3: our StableDiffusion3PAGPipeline and StableDiffusion3PAGImg2ImgPipeline
against diffusers' on tiny models written by save_pretrained and loaded by load_pipeline.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference (pixels in [0, 1]) of diffusers' for the same
seed, scales, applied layers and weights: diffusers' own on SD3's shape; on SD3.5 Medium's (q/k RMSNorm, a second
image-only attention in blocks 0 and 1) diffusers' with the norms its PAG processors skip put back and that second
attention perturbed as a self-attention (diffusers fails on it), the two deliberate differences the module says.
Each comparison also checks that PAG moves the image (against a PAG scale of 0).
"""
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _tiny_diffusers
from _fake_graphs import assert_graphed_as_eager, use_fake_graphs
import diffusion_fast
from conftest import ON_GPU
from diffusion_fast import StableDiffusion3PAGImg2ImgPipeline, StableDiffusion3PAGPipeline, StableDiffusion3Pipeline
from diffusion_fast.models.sd3_transformer import JointAttention, SD3Transformer2DModel

CALL = _tiny_diffusers.Comparison(prompt="a cat on a mat", num_inference_steps=4)
_run, _moved = CALL.run, CALL.moved
_rng = np.random.default_rng(0)
IMAGE = torch.from_numpy(_rng.random((1, 3, 40, 48), dtype=np.float32))  # in [0, 1]; 40x48: not square


def _assert_as_diffusers(theirs, ours, backend_name="fast", **kwargs):
    b = CALL.as_diffusers(theirs, ours, backend_name, **kwargs)
    assert _moved(_run(ours, backend_name, **dict(kwargs, pag_scale=0.0)), b)  # PAG matters
    return b


def _pair(folder, variant, cls=StableDiffusion3PAGPipeline):
    """diffusers' SD3 PAG pipeline (``cls``'s counterpart) on the tiny SD3 (or SD3.5 Medium) components, and ours
    loaded from the folder it saved."""
    import diffusers

    base = _tiny_diffusers.sd3_pipeline(variant=variant).components
    with torch.no_grad():  # (peakier attention, as a trained model's: SD3's shape has no q/k norms to sharpen it)
        for name, p in base["transformer"].named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight", "add_q_proj.weight", "add_k_proj.weight")):
                p.mul_(3.0)
    theirs = getattr(diffusers, cls.__name__)(**{k: v for k, v in base.items()
                                                 if k not in ("image_encoder", "feature_extractor")})
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, cls)
    theirs._saved_to = str(folder)
    if variant == "sd3.5":  # diffusers' processors with the norms they skip (and the second attention) put back
        theirs.set_pag_applied_layers(theirs.pag_applied_layers, pag_attn_processors=(_WithNorms(3), _WithNorms(2)))
    return theirs, ours


def _set_layers(pipes, layers):
    """Our pipelines' and diffusers' applied layers (diffusers' keeping their SD3 processors: its default is the
    UNets')."""
    for pipe in pipes:
        if hasattr(pipe, "_pag_attn_processors"):
            pipe.set_pag_applied_layers(layers, pag_attn_processors=pipe._pag_attn_processors)
        else:
            pipe.set_pag_applied_layers(layers)


@pytest.fixture(scope="module")
def sd3_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("tiny-sd3-pag"), "sd3")


@pytest.fixture(scope="module")
def sd35_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("tiny-sd35-pag"), "sd3.5")


class _WithNorms:
    """diffusers' PAGCFGJointAttnProcessor2_0 (``copies=3``: uncond, text, perturbed rows) or
    PAGJointAttnProcessor2_0 (2) as they would be with SD3.5's q/k RMSNorms: the guidance rows through diffusers'
    JointAttnProcessor2_0, which applies them, the perturbed rows through it too with diffusers' PAG mask (image
    tokens see only themselves among the image tokens) put into its attention; SD3.5 Medium's image-only second
    attention perturbed as diffusers' identity self-attention processors perturb a UNet's (each token's value)."""

    def __init__(self, copies):
        self.copies = copies

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        joint, n = JointAttnProcessor2_0(), hidden_states.shape[0] // self.copies
        if encoder_hidden_states is None:
            perturbed = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states[-n:])))
            return torch.cat([joint(attn, hidden_states[:-n]), perturbed])
        image, text = joint(attn, hidden_states[:-n], encoder_hidden_states[:-n])
        real, tokens = F.scaled_dot_product_attention, hidden_states.shape[1]

        def masked(q, k, v, **kw):
            mask = torch.zeros(q.shape[2], q.shape[2], dtype=q.dtype)
            mask[:tokens, :tokens] = float("-inf")
            mask[:tokens, :tokens].fill_diagonal_(0)
            return real(q, k, v, attn_mask=mask, **kw)

        with mock.patch.object(F, "scaled_dot_product_attention", masked):
            p_image, p_text = joint(attn, hidden_states[-n:], encoder_hidden_states[-n:])
        return torch.cat([image, p_image]), torch.cat([text, p_text])


# ---- the same images as diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},  # diffusers' defaults: pag_scale 3, guidance 7 (uncond, text and perturbed rows), block 1
    {"guidance_scale": 1.0, "pag_scale": 5.0},  # PAG alone: text and perturbed rows
    # the scale falls with the timestep (1000 sigma): pag 5 - 0.004 * (1000 - t)
    {"pag_scale": 5.0, "pag_adaptive_scale": 0.004},
    # two prompts, two images each, negatives, another size
    {"prompt": ["a cat", "a hat"], "num_images_per_prompt": 2, "negative_prompt": ["dull", "dark"], "height": 48,
     "width": 32},
])
def test_sd3_pag_matches_diffusers(sd3_pair, kwargs):
    _assert_as_diffusers(*sd3_pair, **kwargs)


@pytest.mark.parametrize("layers", [
    "blocks.0",
    ["blocks.0", "blocks.2"],  # block 2 is the last: its text stream only feeds the attention (no to_add_out)
    "transformer_blocks.(1|2).attn",
])
def test_sd3_pag_applied_layers_match_diffusers(sd3_pair, layers):
    _set_layers(sd3_pair, layers)
    try:
        _assert_as_diffusers(*sd3_pair)
    finally:
        _set_layers(sd3_pair, "blocks.1")


@pytest.mark.parametrize("kwargs", [
    {},  # block 1: a joint attention and a second, image-only one, both with q/k norms
    {"guidance_scale": 1.0},
])
def test_sd35_pag_matches_diffusers_with_its_norms_put_back(sd35_pair, kwargs):
    _assert_as_diffusers(*sd35_pair, **kwargs)


def test_sd35_pag_keeps_the_norms_diffusers_skips(sd35_pair, tmp_path):
    """At a PAG scale near 0 ours gives the plain SD3.5 image; diffusers' own PAG pipeline does not (its processors
    drop the q/k norms of the applied layer's guidance rows too). Block 2 has no second attention, which diffusers'
    processors fail on."""
    import diffusers

    theirs, ours = sd35_pair
    plain = StableDiffusion3Pipeline.from_pipe(ours)
    own = diffusers.StableDiffusion3PAGPipeline(**theirs.components, pag_applied_layers="blocks.2")
    own.set_progress_bar_config(disable=True)
    ours.set_pag_applied_layers("blocks.2")
    try:
        near_zero = _run(ours, pag_scale=1e-6)
        assert np.abs(near_zero - _run(plain)).max() < 1e-5
        assert _moved(_run(own, pag_scale=1e-6), near_zero)
    finally:
        ours.set_pag_applied_layers("blocks.1")


def test_sd3_pag_image_to_image_matches_diffusers(tmp_path):
    theirs, ours = _pair(tmp_path, "sd3", StableDiffusion3PAGImg2ImgPipeline)
    _assert_as_diffusers(theirs, ours, image=IMAGE, strength=0.7, height=40, width=48)
    _assert_as_diffusers(theirs, ours, image=IMAGE, guidance_scale=1.0, pag_scale=6.0)


def test_sd3_pag_reference_backend_and_scale_zero(sd3_pair):
    """The reference backend (plain PyTorch) matches diffusers too; PAG at scale 0, or with no layers, is the plain
    pipeline bit for bit."""
    theirs, ours = sd3_pair
    _assert_as_diffusers(theirs, ours, backend_name="reference")
    plain = StableDiffusion3Pipeline.from_pipe(ours)
    assert np.array_equal(_run(ours, pag_scale=0.0), _run(plain))
    ours.set_pag_applied_layers([])
    try:
        assert np.array_equal(_run(ours), _run(plain))
    finally:
        ours.set_pag_applied_layers("blocks.1")


# ---- the perturbation itself --------------------------------------------------------------------------------------
@pytest.mark.parametrize("joint, context_out", [(True, True), (True, False), (False, True)],
                         ids=["joint", "last-block", "image-only"])
def test_perturbed_rows_attend_as_diffusers_masks_them(joint, context_out):
    """JointAttention.perturbed_rows: the batch's last rows attend as diffusers' PAG mask says (image tokens to
    themselves and the text, text tokens to all), against a float64 masked attention; an image-only attention's
    perturbed rows output their values; the other rows are untouched. 7 image and 5 text tokens: odd lengths."""
    torch.manual_seed(0)
    attn = JointAttention(16, heads=2, dim_head=8, qk_norm="rms_norm", joint=joint, context_out=context_out).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, context = torch.randn(3, 7, 16).double(), (torch.randn(3, 5, 16).double() if joint else None)
    full = attn(x, context)
    attn.perturbed_rows = 1
    out = attn(x, context)
    attn.perturbed_rows = 0
    full, out = (o if joint else (o, None) for o in (full, out))
    for a, b in zip(full, out):
        if a is not None:  # (the same rows in a smaller batch: the op may block them otherwise)
            torch.testing.assert_close(b[:2], a[:2], rtol=1e-6, atol=1e-6)
    if not joint:
        torch.testing.assert_close(out[0][2:], attn.to_out[0](attn.to_v(x[2:])))
        return
    q, k, v = (torch.cat([a.view(1, -1, 2, 8) for a in pair], 1).transpose(1, 2) for pair in (
        (attn.norm_q(attn.to_q(x[2:]).view(1, 7, 2, 8)), attn.norm_added_q(attn.add_q_proj(context[2:]).view(1, 5, 2, 8))),
        (attn.norm_k(attn.to_k(x[2:]).view(1, 7, 2, 8)), attn.norm_added_k(attn.add_k_proj(context[2:]).view(1, 5, 2, 8))),
        (attn.to_v(x[2:]), attn.add_v_proj(context[2:]))))
    mask = torch.zeros(12, 12, dtype=torch.float64)
    mask[:7, :7] = float("-inf")
    mask[:7, :7].fill_diagonal_(0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, 12, 16)
    torch.testing.assert_close(out[0][2:], attn.to_out[0](expected[:, :7]))
    text = expected[:, 7:]
    torch.testing.assert_close(out[1][2:], attn.to_add_out(text) if context_out else text)


def test_layers_are_chosen_as_diffusers_chooses_them():
    """diffusers' own selection (PAGMixin._set_pag_attn_processor) on a 12-block SD3.5 Medium-shaped transformer,
    against ours on the same config: "blocks.1" takes blocks 1 and 10-11 too (diffusers#13594), both attentions of a
    dual block; r"blocks\\.1\\." block 1 alone."""
    import diffusers
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    from diffusion_fast.pipeline_pag import pag_layers

    config = dict(_tiny_diffusers.SD35_TINY, num_layers=12)
    theirs = diffusers.SD3Transformer2DModel(**config)
    ours = SD3Transformer2DModel(config)
    for layers in (["blocks.1"], [r"blocks\.1\."], ["blocks.(0|11)", "attn2"], ["13"]):
        if layers == ["13"]:  # (no block 13: both refuse it)
            with pytest.raises(ValueError, match="'13' matches no self-attention of the transformer"):
                pag_layers(ours, layers)
            continue
        marker = object()
        pipe = type("Pipe", (), {"transformer": theirs, "_pag_attn_processors": (marker, marker)})()
        theirs.set_attn_processor(diffusers.models.attention_processor.JointAttnProcessor2_0())
        PAGMixin._set_pag_attn_processor(pipe, layers, True)
        chosen = {name for name, m in theirs.named_modules() if getattr(m, "processor", None) is marker}
        assert set(pag_layers(ours, layers)) == chosen, layers
    assert set(pag_layers(ours, ["blocks.1"])) == {"transformer_blocks.1.attn", "transformer_blocks.1.attn2",
                                                   "transformer_blocks.10.attn", "transformer_blocks.11.attn"}


def test_only_the_main_call_is_perturbed(sd3_pair, monkeypatch):
    """Each step's transformer call has the perturbed copy (3 copies of the batch, its last rows perturbed in the
    applied block alone); skip-layer guidance's extra call on the prompt's rows is not perturbed; diffusers'
    SD3CFGCutoffCallback (which diffusers' PAG pipelines cannot run) turns guidance off and PAG goes on with the
    prompt's and the perturbed rows. The setting is put back after the call."""
    from diffusers.callbacks import SD3CFGCutoffCallback

    _, ours = sd3_pair
    seen, real = [], JointAttention.forward

    def spy(self, x, context=None, ip=None):
        seen.append((x.shape[0], self.perturbed_rows))
        return real(self, x, context, ip)

    monkeypatch.setattr(JointAttention, "forward", spy)
    slg = dict(skip_guidance_layers=[2], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    _run(ours, num_inference_steps=2, **slg)
    main, skipped = [(3, 0), (3, 1), (3, 0)], [(1, 0), (1, 0)]  # (the skip call runs blocks 0 and 1)
    assert seen == main + main + skipped  # (skip-layer guidance from step 1: 0 < i < 2)
    seen.clear()
    _run(ours, num_inference_steps=3, callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    assert seen == main + [(2, 0), (2, 1), (2, 0)] * 2
    assert all(m.perturbed_rows == 0 for m in ours.transformer.modules() if isinstance(m, JointAttention))
    monkeypatch.undo()
    assert _moved(_run(ours, **slg), _run(ours))


def test_graphed_transformer_call_follows_the_layers(sd3_pair, monkeypatch):
    """On CUDA the transformer call replays from a graph with the perturbation captured in it (capture stood in for
    on the CPU): the eager images bit for bit; another layer set gets fresh graphs rather than replaying the old
    perturbation, the same set keeps them, another batch gets fresh ones too."""
    _, ours = sd3_pair
    eager = {}
    for layers in ("blocks.1", "blocks.0"):
        ours.set_pag_applied_layers(layers)
        eager[layers] = _run(ours)
    monkeypatch.setattr(ours, "_graphs_on", lambda device: True)
    real, graphs = type(ours)._model, []

    def with_fake(self, device):
        graphed = real(self, device)
        if not hasattr(graphed, "captures"):
            use_fake_graphs(graphed)
        graphs.append(graphed)
        return graphed

    monkeypatch.setattr(ours, "_model", with_fake.__get__(ours))
    try:
        for layers in ("blocks.1", "blocks.0", "blocks.0"):
            ours.set_pag_applied_layers(layers)
            assert np.array_equal(_run(ours), eager[layers])
        assert graphs[0] is not graphs[1] and graphs[1] is graphs[2] and graphs[2].captures == 1
        _run(ours, num_images_per_prompt=2)  # (another batch: other perturbed rows, which a graph bakes in)
        assert graphs[3] is not graphs[2]
    finally:
        ours._graph = None
        ours.set_pag_applied_layers("blocks.1")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_sd3_pag_loop_matches_eager_on_gpu(sd35_pair):
    """fp16 on CUDA (our Triton attention for the guidance rows and the perturbed text queries): eager, then the
    transformer call captured and replayed with block 1's perturbation in it; the capture within fp16's 2e-3 of
    eager, the replay bit for bit, one graph held."""
    from conftest import DEVICE

    pipe = diffusion_fast.load_pipeline(sd35_pair[0]._saved_to, dtype=torch.float16, device=DEVICE)
    pipe.set_progress_bar_config(disable=True)
    assert_graphed_as_eager(pipe, lambda p: p("a cat", num_inference_steps=3, output_type="latent",
                                              generator=torch.Generator().manual_seed(1)).images, None, 1)


# ---- construction, errors, accelerate ------------------------------------------------------------------------------
def test_sd3_pag_from_pipe_and_errors(sd3_pair):
    _, ours = sd3_pair
    plain = StableDiffusion3Pipeline.from_pipe(ours)
    pag = StableDiffusion3PAGPipeline.from_pipe(plain)
    assert pag.pag_applied_layers == ["blocks.1"] and pag.transformer is ours.transformer
    assert StableDiffusion3PAGImg2ImgPipeline.from_pipe(pag, pag_applied_layers="blocks.2").pag_applied_layers == [
        "blocks.2"]
    assert StableDiffusion3PAGPipeline.from_pipe(StableDiffusion3PAGPipeline.from_pipe(
        plain, pag_applied_layers=["blocks.0"])).pag_applied_layers == ["blocks.0"]
    with pytest.raises(ValueError, match=r"'blocks.7' matches no self-attention of the transformer .*blocks\\.1"):
        ours.set_pag_applied_layers("blocks.7")
    with pytest.raises(TypeError, match="pag_scale must be a finite float"):
        _run(ours, pag_scale=None)
    with pytest.raises(ValueError, match="pag_adaptive_scale must be >= 0"):
        _run(ours, pag_adaptive_scale=-1.0)
    assert ours.pag_applied_layers == ["blocks.1"]


def test_accelerate_keeps_diffusers_sd3_pag_images(sd3_pair):
    """diffusers' SD3 PAG pipeline under accelerate: its PAG processors take the applied layer for the call, ours
    the rest; the same images, restored exactly."""
    import diffusers

    theirs = diffusers.StableDiffusion3PAGPipeline(**sd3_pair[0].components)
    theirs.set_progress_bar_config(disable=True)
    _tiny_diffusers.assert_accelerate_keeps_images(theirs, _run)


# ---- the CLI and check ---------------------------------------------------------------------------------------------
def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def plain_folder(sd3_pair, tmp_path_factory):
    """The PAG pair's components saved as diffusers' plain StableDiffusion3Pipeline."""
    import diffusers

    folder = tmp_path_factory.mktemp("tiny-sd3-plain")
    diffusers.StableDiffusion3Pipeline(**sd3_pair[0].components).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("how", ["plain-folder-with-flags", "pag-folder", "pag-folder-image-to-image"])
def test_generate_sd3_with_pag_gives_diffusers_image(sd3_pair, plain_folder, tmp_path, capsys, how):
    """--pag-scale / --pag-layers on a plain SD3 folder, or a folder diffusers saved its SD3 PAG pipeline in
    (scale 3 and "blocks.1" by default), text-to-image or with --image: diffusers' PAG image within one 8-bit
    level."""
    import diffusers
    from PIL import Image

    from diffusion_fast.cli import main

    theirs, folder, flags, kwargs = sd3_pair[0], sd3_pair[0]._saved_to, [], {}
    if how == "plain-folder-with-flags":
        folder, flags, kwargs = plain_folder, ["--pag-scale", "4", "--pag-layers", "blocks.0"], dict(pag_scale=4.0)
        _set_layers([theirs], "blocks.0")
    if how == "pag-folder-image-to-image":
        Image.fromarray((IMAGE[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "in.png")
        theirs = diffusers.StableDiffusion3PAGImg2ImgPipeline(**theirs.components)
        theirs.set_progress_bar_config(disable=True)
        flags = ["--image", str(tmp_path / "in.png")]
        kwargs = dict(image=Image.open(tmp_path / "in.png"), strength=0.6, height=40, width=48)
    try:
        out = tmp_path / "pag.png"
        assert main(["generate", "--model", folder, "--prompt", "a cat", "--steps", "3", "--seed", "2", *flags,
                     "--no-progress", "--output", str(out)]) == 0, capsys.readouterr().err
        expected = theirs("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(2),
                          **kwargs).images[0]
        assert np.abs(_png(out) - np.asarray(expected, dtype=np.int16)).max() <= 1
    finally:
        _set_layers([sd3_pair[0]], "blocks.1")


@pytest.mark.parametrize("extra, message", [
    (["--image", "IN", "--mask", "IN", "--pag-scale", "3"],
     "with a Stable Diffusion 3 model perturbed-attention guidance runs text-to-image and image-to-image"),
    (["--pag-scale", "3", "--pag-layers", "blocks.9"], "--pag-layers: .*'blocks.9' matches no self-attention"),
    (["--pag-adaptive-scale", "0.1"], "go with --pag-scale"),
    (["--pag-scale", "-1"], "--pag-scale must be a finite number >= 0"),
], ids=["inpainting", "no-such-layer", "adaptive-alone", "negative-scale"])
def test_generate_sd3_pag_bad_options_one_line(plain_folder, tmp_path, capsys, extra, message):
    import re

    from PIL import Image

    from diffusion_fast.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IN" else a for a in extra]
    assert main(["generate", "--model", plain_folder, "--steps", "1", *extra, "--no-progress", "--output",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_check_runs_an_sd3_pag_folder(sd3_pair, capsys, monkeypatch):
    """``check`` runs a PAG SD3 folder both ways at the pipeline's PAG scale; a fast path whose perturbed rows
    attend as usual fails it."""
    from diffusion_fast import current_backend
    from diffusion_fast.cli import main

    assert main(["check", "--model", sd3_pair[0]._saved_to, "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "PAG SD3 text-to-image pipeline (2 FlowMatchEuler steps" in text and "0 failed" in text, text
    real = JointAttention._perturbed

    def unperturbed(self, image, text):
        if current_backend() == "reference":
            return real(self, image, text)
        return self._attend(*(torch.cat([i, t], dim=1) for i, t in zip(image, text))) if text else image[2]

    monkeypatch.setattr(JointAttention, "_perturbed", unperturbed)
    assert main(["check", "--model", sd3_pair[0]._saved_to, "--steps", "2"]) == 1
