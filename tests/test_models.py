"""Our UNet and VAE against diffusers' own models: same folders, same weights, same outputs.

diffusers is the reference here (imported by the tests only; the package never imports it). Each diffusers model is
built from the tiny configs in ``diffusion_fast.tiny`` with a fixed seed, written with ``save_pretrained`` and read
back by our ``from_pretrained``. fp32 outputs must agree to a relative error (||ours - theirs|| / ||theirs||) of 1e-5
under the "reference" backend (plain PyTorch ops) and the default "fast" one (C++ GroupNorm, SDPA on CPU).
"""
import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_fast
from diffusion_fast import ops, tiny
from diffusion_fast.models import AutoencoderKL, UNet2DConditionModel
from diffusion_fast.models.attention import fuse_qkv_projections
from diffusion_fast.numerics import strict_fp32

diffusers = pytest.importorskip("diffusers")

REL = 1e-5
BACKENDS = ("reference", "fast")

from _tiny_diffusers import SDXL_TINY  # noqa: E402  (after the diffusers importorskip)


def rel_err(ours, theirs):
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert torch.isfinite(ours).all(), "non-finite output"
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


def _save(model, folder, **kwargs):
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return str(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """diffusers models (seeded) and the folders they were written to, built once for the module."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in (
        ("sd1", lambda: diffusers.UNet2DConditionModel(**tiny.unet_config("sd1"))),
        ("sd2", lambda: diffusers.UNet2DConditionModel(**tiny.unet_config("sd2"))),
        ("sdxl", lambda: diffusers.UNet2DConditionModel(**SDXL_TINY)),
        ("vae", lambda: diffusers.AutoencoderKL(**tiny.vae_config())),
    ):
        torch.manual_seed({"sd1": 0, "sd2": 1, "sdxl": 2, "vae": 3}[name])
        model = build().eval()
        out[name] = (model, _save(model, root / name))
    return out


def unet_inputs(variant, batch=2, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = (SDXL_TINY if variant == "sdxl" else tiny.unet_config(variant))["cross_attention_dim"]
    sample = torch.randn(batch, 4, *hw, generator=g)
    # 77 keys: CLIP's real sequence length, not a multiple of any block size.
    context = torch.randn(batch, 77, cross, generator=g)
    return sample, context


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_unet_matches_diffusers(saved, variant, backend):
    theirs, folder = saved[variant]
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, context = unet_inputs(variant)
    # One timestep per sample (the pipeline's CFG batch shares one; img2img batches need not), and a shared int one.
    for timestep in (torch.tensor([981, 3]), 500):
        with torch.no_grad(), diffusion_fast.backend(backend):
            out = ours(sample, timestep, context)
        with torch.no_grad():
            ref = theirs(sample, timestep, context).sample
        assert rel_err(out, ref) <= REL, (variant, backend, timestep)


@pytest.mark.parametrize("hw", [(7, 9), (8, 10)])
def test_unet_odd_latent_sizes(saved, hw):
    # 7x9: odd on both sides, so the upsampler must take the skip's size, not 2x; 8x10 (64x80 px): 10 is not a
    # multiple of 4 (two upsamplers in the sd2 config), so the first upsample must be told its output size.
    theirs, folder = saved["sd2"]
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, context = unet_inputs("sd2", batch=1, hw=hw)
    with torch.no_grad():
        out = ours(sample, 250, context)
        ref = theirs(sample, 250, context).sample
    assert rel_err(out, ref) <= REL


@pytest.mark.parametrize("timestep", [
    7, 7.0,  # Python int and float
    torch.tensor(7), torch.tensor(7.0, dtype=torch.float64),  # 0-d int and float tensors
    torch.tensor([7, 7]),  # already per-sample
], ids=["int", "float", "0d-int", "0d-float64", "per-sample"])
def test_unet_timestep_forms(saved, timestep):
    theirs, folder = saved["sd1"]
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, context = unet_inputs("sd1", hw=(4, 4))
    with torch.no_grad():
        ref = theirs(sample, torch.tensor([7, 7]), context).sample
        assert rel_err(ours(sample, timestep, context), ref) <= REL


def test_unet_forward_never_reads_values_on_host():
    # Meta tensors have no values: any .item(), bool() or Python branch on a device value raises. A forward that runs
    # on meta can be captured in a CUDA graph (no host sync).
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(tiny.unet_config("sd1"))
        sample, t, context = torch.randn(2, 4, 7, 9), torch.tensor([1.0, 500.0]), torch.randn(2, 5, 32)
    with diffusion_fast.backend("reference"):  # our kernels need real memory; the reference ops run on meta
        assert model(sample, t, context).shape == (2, 4, 7, 9)


def test_unet_bad_inputs_name_the_argument(saved):
    ours = UNet2DConditionModel.from_pretrained(saved["sd1"][1])
    sample, context = unet_inputs("sd1", hw=(4, 4))
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.tensor([1, 2, 3]), context)
    with pytest.raises(TypeError, match="timestep"):
        ours(sample, "10", context)
    with pytest.raises(ValueError, match="sample"):
        ours(sample[:, :3], 10, context)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(sample, 10, context[..., :31])


@pytest.fixture(scope="module")
def saved_upscaler_unet(tmp_path_factory):
    """diffusers' UNet shaped as the x4 upscaler's (7 input channels, a 1000-entry class embedding, only-cross
    attention in the first down block and the last up block beside ordinary attention blocks), and its folder."""
    from _tiny_diffusers import upscale_unet_config

    torch.manual_seed(4)
    theirs = diffusers.UNet2DConditionModel(**upscale_unet_config()).eval()
    return theirs, _save(theirs, tmp_path_factory.mktemp("upscaler-unet"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_upscaler_unet_matches_diffusers(saved_upscaler_unet, backend):
    """The class embedding of each sample's label added to the time embedding, and only-cross attention (the first
    attention attends to the text, not to itself), against diffusers; the labels matter, per sample."""
    theirs, folder = saved_upscaler_unet
    ours = UNet2DConditionModel.from_pretrained(folder)
    assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.is_cross  # (only-cross)
    assert not ours.down_blocks[1].attentions[0].transformer_blocks[0].attn1.is_cross
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 7, 7, 9, generator=g), torch.randn(2, 77, 48, generator=g)
    for labels in (torch.tensor([20, 350]), torch.tensor(20), 20):
        with torch.no_grad(), diffusion_fast.backend(backend):
            out = ours(sample, 500, context, class_labels=labels)
        with torch.no_grad():
            ref = theirs(sample, 500, context, class_labels=torch.as_tensor(labels).expand(2)).sample
        assert rel_err(out, ref) <= REL, labels
    with torch.no_grad():  # each sample's own label: another first label moves the first sample alone
        base = ours(sample, 500, context, class_labels=torch.tensor([20, 350]))
        other = ours(sample, 500, context, class_labels=torch.tensor([21, 350]))
    assert (other[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(other[1], base[1], rtol=1e-6, atol=1e-6)


def test_class_labels_are_checked_by_name(saved_upscaler_unet, saved):
    ours = UNet2DConditionModel.from_pretrained(saved_upscaler_unet[1])
    sample, context = torch.randn(2, 7, 4, 4), torch.randn(2, 77, 48)
    with pytest.raises(ValueError, match=r"class_labels: this UNet has a class embedding \(num_class_embeds=1000\)"):
        ours(sample, 10, context)
    for bad in (torch.tensor([0.5, 1.0]), torch.tensor([1, 2, 3]), "20", True):
        with pytest.raises(ValueError, match="class_labels must be an int or an integer"):
            ours(sample, 10, context, class_labels=bad)
    plain = UNet2DConditionModel.from_pretrained(saved["sd1"][1])  # labels given to a UNet without a class
    sample, context = unet_inputs("sd1", hw=(4, 4))  # embedding are ignored, as in diffusers
    with torch.no_grad():
        assert torch.equal(plain(sample, 10, context, class_labels=torch.tensor([3, 4])), plain(sample, 10, context))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_matches_diffusers(saved, backend):
    theirs, folder = saved["vae"]
    ours = AutoencoderKL.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    # 24x40 px: 3x5 latents, odd, and wider than tall.
    image, latents = torch.randn(2, 3, 24, 40, generator=g), torch.randn(2, 4, 6, 10, generator=g)
    with torch.no_grad(), diffusion_fast.backend(backend):
        decoded = ours.decode(latents)
        posterior = ours.encode(image)
        drawn = posterior.sample(generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_decoded = theirs.decode(latents).sample
        ref_posterior = theirs.encode(image).latent_dist
        ref_drawn = ref_posterior.sample(generator=torch.Generator().manual_seed(5))
    assert rel_err(decoded, ref_decoded) <= REL
    assert rel_err(posterior.mean, ref_posterior.mean) <= REL
    assert rel_err(posterior.std, ref_posterior.std) <= REL
    assert rel_err(drawn, ref_drawn) <= REL  # noise drawn exactly as diffusers draws it
    assert posterior.latent_dist is posterior and torch.equal(posterior.mode(), posterior.mean)
    assert ours.config.scaling_factor == theirs.config.scaling_factor
    with pytest.raises(ValueError, match="z"):
        ours.decode(latents[:, :3])


# latents larger than the tiny VAE's 16-latent tile: 2x3 tiles (odd 17 rows), a 3x1 column of a batch of 3, and one
# tile exactly (no tiling); each decoded and, as images, encoded
@pytest.mark.parametrize("shape", [(2, 4, 17, 40), (3, 4, 33, 9), (1, 4, 16, 16)])
@pytest.mark.parametrize("tiling, slicing", [(True, False), (True, True), (False, True)])
def test_vae_tiling_and_slicing_match_diffusers(saved, shape, tiling, slicing):
    """diffusers' VAE tiling (overlapping tiles blended at the seams) and slicing (one image at a time): the same
    results as diffusers' with the same switches; tiling changes the result where it applies, slicing never."""
    theirs, folder = saved["vae"]
    ours = AutoencoderKL.from_pretrained(folder)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size) == (theirs.tile_sample_min_size,
                                                                       theirs.tile_latent_min_size)
    g = torch.Generator().manual_seed(2)
    scale = 2 ** (len(ours.config.block_out_channels) - 1)
    latents = torch.randn(shape, generator=g)
    images = torch.rand(shape[0], 3, shape[2] * scale, shape[3] * scale, generator=g) * 2 - 1
    with torch.no_grad():
        plain = (ours.decode(latents), ours.encode(images).mean)
        if tiling:
            ours.enable_tiling()
        if slicing:
            ours.enable_slicing()
        batches = []  # the batch of every decoder call: slicing decodes one image at a time
        hook = ours.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
        got = (ours.decode(latents), ours.encode(images).mean)
        hook.remove()
        assert set(batches) == ({1} if slicing else {shape[0]})
        theirs.use_tiling, theirs.use_slicing = tiling, slicing
        try:
            expected = (theirs.decode(latents).sample, theirs.encode(images).latent_dist.mean)
        finally:
            theirs.use_tiling = theirs.use_slicing = False
    for a, b, p in zip(got, expected, plain):
        assert rel_err(a, b) <= REL
        tiled = tiling and max(shape[2:]) > ours.tile_latent_min_size
        assert (rel_err(a, p) > 1e-3) == tiled  # (a tile sees less context: the seams differ, as in diffusers)
    ours.disable_tiling()
    ours.disable_slicing()
    assert not ours.use_tiling and not ours.use_slicing


def test_vae_legacy_attention_keys_load(saved, tmp_path):
    # Old SD VAE files name the mid-block attention query/key/value/proj_attn, some as 1x1-conv (C, C, 1, 1) weights.
    theirs, folder = saved["vae"]
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
            if ".attentions.0." in key and new in key:
                key = key.replace(new, old)
                value = value[:, :, None, None] if value.dim() == 2 and old != "value." else value
        legacy[key] = value.contiguous()
    assert any("proj_attn" in k for k in legacy)
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    ours = AutoencoderKL.from_pretrained(tmp_path)
    latents = torch.randn(1, 4, 3, 5)
    with torch.no_grad():
        assert rel_err(ours.decode(latents), theirs.decode(latents).sample) <= REL


def test_triton_path_matches_reference(saved):
    # The Triton kernels (interpreter on CPU, compiled on GPU) inside a whole UNet: batch 1 and 3x5 latents keep the
    # interpreter fast; 3x5 is odd, so the upsampler gets an explicit size. sd1 has head dim 12 (not a power of 2).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = UNet2DConditionModel.from_pretrained(saved["sd1"][1], device=device)
    sample, context = unet_inputs("sd1", batch=1, hw=(3, 5))
    sample, context = sample.to(device), context.to(device)
    # Fused q/k/v in the down blocks only: the kernel sees both the fused (B, L, 3, H, D) strides and plain views.
    fuse_qkv_projections(ours.down_blocks)
    # IEEE fp32 convolutions: with cuDNN's default TF32 the two paths differed by 4.7e-4 on the H200
    with torch.no_grad(), strict_fp32():
        with diffusion_fast.backend("reference"):
            ref = ours(sample, 321, context)
        with diffusion_fast.backend("triton"):
            out = ours(sample, 321, context)
    assert rel_err(out, ref) <= 1e-4


def test_fused_ops_run_at_every_site(saved, monkeypatch):
    """Every GroupNorm->SiLU site calls the fused op once, every transformer GroupNorm calls it without SiLU, and
    attention gets (B, H, L, D) views of the projections (no copies)."""
    ours = UNet2DConditionModel.from_pretrained(saved["sd1"][1])
    calls = {"gn_silu": 0, "gn": 0, "attention": 0, "views": 0}
    real_gn, real_attn = ops._group_norm_silu, ops._attention  # the models call the unchecked entry points

    def gn_spy(x, groups, weight, bias, eps, silu=True, backend="auto"):
        calls["gn_silu" if silu else "gn"] += 1
        return real_gn(x, groups, weight, bias, eps, silu, backend)

    def attn_spy(q, k, v, scale=None, backend="auto"):
        calls["attention"] += 1
        calls["views"] += all(t._base is not None for t in (q, k, v))
        return real_attn(q, k, v, scale, backend)

    monkeypatch.setattr(ops, "_group_norm_silu", gn_spy)
    monkeypatch.setattr(ops, "_attention", attn_spy)
    sample, context = unet_inputs("sd1", hw=(4, 4))
    with torch.no_grad():
        ours(sample, 10, context)
    names = [type(m).__name__ for m in ours.modules()]
    # Two GN+SiLU per resnet plus conv_norm_out; one plain GN per Transformer2DModel; self + cross per block.
    assert calls["gn_silu"] == 2 * names.count("ResnetBlock2D") + 1
    assert calls["gn"] == names.count("Transformer2DModel") > 0
    assert calls["attention"] == 2 * names.count("BasicTransformerBlock") > 0
    assert calls["views"] == calls["attention"]


@pytest.mark.parametrize("kind", ["sd2", "vae"])
def test_fused_qkv_matches_diffusers_and_keeps_names(saved, kind, monkeypatch):
    theirs, folder = saved[kind]
    ours = (AutoencoderKL if kind == "vae" else UNet2DConditionModel).from_pretrained(folder)
    names = set(ours.state_dict())
    ours.fuse_qkv_projections()
    assert set(ours.state_dict()) == names  # fused weights are private: saving/loading is unchanged
    strides = []
    real_attn = ops._attention
    monkeypatch.setattr(ops, "_attention",
                        lambda q, k, v, *a: strides.append((q.stride(2), q.shape)) or real_attn(q, k, v, *a))
    with torch.no_grad():
        if kind == "vae":
            latents = torch.randn(1, 4, 3, 5)
            out, ref = ours.decode(latents), theirs.decode(latents).sample
        else:
            sample, context = unet_inputs(kind, hw=(4, 6))
            out, ref = ours(sample, 42, context), theirs(sample, 42, context).sample
    assert rel_err(out, ref) <= REL
    # q's token stride is 3 x (heads x head dim) when q, k and v are views of one GEMM's output: the fused path ran.
    token_stride, shape = strides[0]
    assert token_stride == 3 * shape[1] * shape[3]
    ours.unfuse_qkv_projections()
    assert all(a.fused_qkv_weight is None for a in ours.modules() if hasattr(a, "fused_qkv_weight"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_2x_of_diffusers(saved, dtype):
    # flash-attention's rule at model level: our half-precision error against the fp64 model is at most twice
    # diffusers' own error in the same dtype (plus a small floor). sd2 has upcast_attention: the fp32 attention path.
    theirs, folder = saved["sd2"]
    sample, context = unet_inputs("sd2", batch=1, hw=(5, 7))  # small: fp16 matmuls are slow on CPU
    with torch.no_grad():
        ref64 = UNet2DConditionModel.from_pretrained(folder, dtype=torch.float64)(sample.double(), 77, context.double())
        ours = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)(sample.to(dtype), 77, context.to(dtype))
        half = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).eval()
        base = half(sample.to(dtype), 77, context.to(dtype)).sample
    assert ours.dtype == dtype
    err, base_err = rel_err(ours, ref64), rel_err(base, ref64)
    assert err <= 2 * base_err + 1e-3, f"{dtype}: ours {err:.2e} vs diffusers {base_err:.2e}"


def test_channels_last_model_same_output(saved):
    ours = UNet2DConditionModel.from_pretrained(saved["sd2"][1])
    sample, context = unet_inputs("sd2", hw=(7, 9))  # odd sizes: channels_last strides are not trivially NCHW's
    with torch.no_grad():
        ref = ours(sample, 99, context)
        ours = ours.to(memory_format=torch.channels_last)
        assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = ours(sample.to(memory_format=torch.channels_last), 99, context)
    assert rel_err(out, ref) <= REL


def test_sdxl_text_time_matches_diffusers(saved):
    theirs, folder = saved["sdxl"]
    ours = UNet2DConditionModel.from_pretrained(folder)
    sample, context = unet_inputs("sdxl")
    g = torch.Generator().manual_seed(3)
    added = {"text_embeds": torch.randn(2, 24, generator=g),
             "time_ids": torch.tensor([[64.0, 80.0, 0.0, 0.0, 64.0, 80.0]] * 2)}  # SDXL's size/crop conditioning
    with torch.no_grad():
        out = ours(sample, torch.tensor([10, 900]), context, added_cond_kwargs=added)
        ref = theirs(sample, torch.tensor([10, 900]), context, added_cond_kwargs=added).sample
    assert rel_err(out, ref) <= REL
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        ours(sample, 10, context)


def test_config_and_properties(saved):
    ours = UNet2DConditionModel.from_pretrained(saved["sd1"][1], dtype=torch.float64)
    assert ours.config.in_channels == 4 and ours.config["sample_size"] == 8
    assert ours.config.norm_eps == 1e-5 and ours.config.upcast_attention is False  # diffusers' defaults filled in
    assert ours.dtype == torch.float64 and ours.device == torch.device("cpu")
    assert not ours.training
    with pytest.raises(TypeError):
        ours.config["in_channels"] = 3
    changed = UNet2DConditionModel.from_config(ours.config, cross_attention_dim=16)
    assert changed.config.cross_attention_dim == 16
    vae = AutoencoderKL.from_pretrained(saved["vae"][1], dtype=torch.float16)
    assert vae.dtype == torch.float16 and vae.config.force_upcast is True
    # models copy and pickle with their read-only configs (deepcopy failed: dict's protocol sets items one by one)
    for model in (ours, vae):
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert twin.config == model.config and type(twin.config) is type(model.config)
            assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))
            with pytest.raises(TypeError, match="read-only"):
                twin.config["in_channels"] = 3
    with pytest.raises(TypeError, match="dtype"):
        AutoencoderKL.from_pretrained(saved["vae"][1], dtype="fp16")


# ---------------------------------------------------------------------------------------------------------- loading


def _copy_folder(src, dst, state=None, config=None):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**cfg, **(config or {})}, f)
    if state is not None:
        save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return str(dst)


def test_missing_unexpected_and_misshaped_keys_in_one_error(saved, tmp_path):
    folder = saved["sd1"][1]
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    del state["conv_in.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(4, 48, 1, 1)
    bad = _copy_folder(folder, tmp_path / "bad", state)
    with pytest.raises(ValueError) as info:
        UNet2DConditionModel.from_pretrained(bad)
    msg = str(info.value)
    assert "missing" in msg and "conv_in.bias" in msg
    assert "unexpected" in msg and "extra.weight" in msg
    assert "mis-shaped" in msg and "conv_out.weight" in msg and "(4, 48, 1, 1)" in msg


def test_pickle_bin_loads_through_weights_only(saved, tmp_path):
    theirs, folder = saved["vae"]
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    dst = _copy_folder(folder, tmp_path / "bin")
    torch.save(state, os.path.join(dst, "diffusion_pytorch_model.bin"))
    ours = AutoencoderKL.from_pretrained(dst)
    latents = torch.randn(1, 4, 2, 3)
    with torch.no_grad():
        assert rel_err(ours.decode(latents), theirs.decode(latents).sample) <= REL
    # A pickle that would run code (any non-tensor object) is refused, naming the file.
    torch.save({"conv_in.weight": _NotATensor()}, os.path.join(dst, "diffusion_pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin.*weights_only"):
        AutoencoderKL.from_pretrained(dst)


class _NotATensor:
    pass


def test_variant_and_sharded_weights(saved, tmp_path):
    theirs, _ = saved["sd1"]
    sample, context = unet_inputs("sd1", hw=(4, 4))
    with torch.no_grad():
        ref = theirs(sample, 10, context).sample
    variant = _save(theirs, tmp_path / "variant", variant="fp16")  # the name only: the data stays fp32
    sharded = _save(theirs, tmp_path / "sharded", max_shard_size="200KB")
    assert any(name.endswith(".index.json") for name in os.listdir(sharded))
    for folder, kwargs in ((variant, {"variant": "fp16"}), (sharded, {})):
        ours = UNet2DConditionModel.from_pretrained(folder, **kwargs)
        with torch.no_grad():
            assert rel_err(ours(sample, 10, context), ref) <= REL, folder
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        UNet2DConditionModel.from_pretrained(variant)  # no variant asked: the plain file is not there


def test_missing_folder_and_missing_weights(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UNet2DConditionModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    no_weights = _copy_folder(saved["sd1"][1], tmp_path / "noweights")
    with pytest.raises(FileNotFoundError) as info:
        UNet2DConditionModel.from_pretrained(no_weights)
    for looked_for in ("diffusion_pytorch_model.safetensors", "safetensors.index.json", "diffusion_pytorch_model.bin"):
        assert looked_for in str(info.value)


@pytest.mark.parametrize("field, value, named", [
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("up_block_types", ["AttnUpBlock2D", "CrossAttnUpBlock2D"], "AttnUpBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("only_cross_attention", [True, False, True], "only_cross_attention"),  # 3 flags for 2 blocks
    ("num_class_embeds", 0, "num_class_embeds"),
    ("attention_type", "gated", "attention_type"),
    ("addition_embed_type", "text_time", "addition_time_embed_dim"),  # text_time without its sizes
])
def test_unsupported_unet_config_names_the_field(field, value, named):
    with pytest.raises(ValueError, match=named):
        UNet2DConditionModel.from_config({**tiny.unet_config("sd1"), field: value})


def test_unsupported_vae_config_names_the_field():
    with pytest.raises(ValueError, match="'AttnDownEncoderBlock2D'"):
        AutoencoderKL.from_config({**tiny.vae_config(), "down_block_types": ["AttnDownEncoderBlock2D"] * 3})
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL.from_config({**tiny.vae_config(), "act_fn": "gelu"})
