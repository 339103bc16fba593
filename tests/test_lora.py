"""LoRA files merged into our pipelines, against diffusers' load_lora_weights on the same tiny models and files.

Stated tolerance: fp32 images within 1e-3 max abs pixel difference of diffusers' (its LoRA layers run unfused, ours
are merged into the weights). Each LoRA is random and strong enough to move the image well past that, so a LoRA
that was skipped, merged into the wrong module or at the wrong scale fails.
"""
import json
import re

import numpy as np
import pytest
import torch
from conftest import ON_GPU
from safetensors.torch import load_file, save_file

import _tiny_diffusers
import diffusion_fast
from diffusion_fast.lora_files import _sgm_name
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = [pytest.mark.skipif(ON_GPU, reason="LoRA merging is device-independent; the CPU runs it"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# what LoRA trainers target: attention projections, the transformer's in/out projections and feed-forward, and
# (LoCon) the resnets' 3x3 convolutions, time projections and 1x1 shortcuts
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CHANGED = 0.02  # a LoRA must move the image by more than this (the tolerance is 1e-3)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    _tiny_diffusers.pipeline("sd1", seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    _tiny_diffusers.sdxl_pipeline(seed=1).save_pretrained(folder)
    return folder


def _theirs(folder):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(folder):
    pipe = diffusion_fast.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe("a red cube", negative_prompt="blurry", num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(3)).images


def _targets(model, suffixes):
    """(name, weight) of each module of ``model`` whose name ends with one of ``suffixes``."""
    return [(n.removesuffix(".weight"), p) for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() in (2, 4)
            and any(n.removesuffix(".weight").endswith(s) for s in suffixes)]


def _factors(weight, rank, generator):
    """Random (down, up) for ``weight``: a 3x3 conv gets a 3x3 down and a 1x1 up (LoCon), as trainers write them."""
    out, fan_in = weight.shape[0], weight[0].numel()
    down = torch.randn((rank, *weight.shape[1:]), generator=generator) / fan_in ** 0.5
    up = torch.randn((out, rank, *([1, 1] if weight.dim() == 4 else [])), generator=generator) * 0.3
    return down, up


def _kohya_file(path, theirs, *, sgm=False, rank=4, alpha=2.0, seed=0):
    """A kohya (sd-scripts) LoRA: lora_unet_* named as diffusers names the UNet, or as SGM does (SDXL), and
    lora_te_* (lora_te1_*/lora_te2_* with two encoders), each with an alpha."""
    generator, state = torch.Generator().manual_seed(seed), {}
    encoders = [("te1" if hasattr(theirs, "text_encoder_2") else "te", theirs.text_encoder)]
    encoders += [("te2", theirs.text_encoder_2)] if hasattr(theirs, "text_encoder_2") else []
    parts = [("unet", theirs.unet, UNET_TARGETS)] + [(p, m, TEXT_TARGETS) for p, m in encoders]
    for prefix, model, targets in parts:
        for name, weight in _targets(model, targets):
            if sgm and prefix == "unet":
                name = _sgm_name(model.config, name)
            key = f"lora_{prefix}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _factors(weight, rank, generator)
            state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, path)
    return path


def _peft_folder(folder, model_folder, *, rank=4, alpha=8, alpha_pattern=None, seed=0):
    """A LoRA as diffusers' training scripts save it: a PEFT adapter on the UNet, its state dict through
    save_lora_weights with the adapter's config as metadata. The text encoder's part is written in the same format
    (transformers' own add_adapter wants a newer peft than the test extra may install)."""
    from diffusers import StableDiffusionPipeline as Theirs
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = _theirs(model_folder)
    torch.manual_seed(seed)
    source.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS,
                                       alpha_pattern=alpha_pattern or {}))
    generator, text = torch.Generator().manual_seed(seed), {}
    for name, weight in _targets(source.text_encoder, TEXT_TARGETS):
        text[f"{name}.lora_A.weight"], text[f"{name}.lora_B.weight"] = _factors(weight, rank, generator)
    Theirs.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(source.unet),
                             text_encoder_lora_layers=text,
                             unet_lora_adapter_metadata=source.unet.peft_config["default"].to_dict(),
                             text_encoder_lora_adapter_metadata=dict(r=rank, lora_alpha=alpha // 2,
                                                                     target_modules=TEXT_TARGETS))
    return folder


def _compare(model_folder, lora, **ours_kwargs):
    theirs, ours = _theirs(model_folder), _ours(model_folder)
    before = _image(ours)
    theirs.load_lora_weights(lora)
    ours.load_lora_weights(lora, **ours_kwargs)
    a, b = _image(theirs), _image(ours)
    assert np.abs(a - before).max() > CHANGED  # the LoRA matters
    return np.abs(a - b).max()


def test_diffusers_peft_lora_same_image_as_diffusers(sd_folder, tmp_path):
    # alpha 8 at rank 4 (scale 2), one module group at another alpha: both come from the file's metadata
    lora = _peft_folder(tmp_path, sd_folder, alpha_pattern={"ff.net.2": 1})
    assert _compare(sd_folder, lora) <= PIPELINE_FP32_MAX_ABS


def test_older_diffusers_lora_format_same_image_as_diffusers(sd_folder, tmp_path):
    """diffusers' formats before PEFT: attention processors' to_q_lora.down/up (the UNet's attn1/attn2 and the text
    encoder's self-attention), lora.down/up elsewhere in the UNet, lora_linear_layer in the text encoder's MLP."""
    peft_state = load_file(_peft_folder(tmp_path, sd_folder, rank=2, alpha=2) / "pytorch_lora_weights.safetensors")
    processor = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
                 "q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    old = {}
    for key, value in peft_state.items():
        module, _, factor = key.rpartition(".lora_")
        role = "down" if factor == "A.weight" else "up"
        unet_attention = re.fullmatch(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)", module)
        text_attention = re.fullmatch(r"(.*\.self_attn)\.(q_proj|k_proj|v_proj|out_proj)", module)
        if unet_attention:
            old[f"{unet_attention[1]}.processor.{processor[unet_attention[2]]}.{role}.weight"] = value
        elif text_attention:
            old[f"{text_attention[1]}.{processor[text_attention[2]]}.{role}.weight"] = value
        elif key.startswith("text_encoder."):
            old[f"{module}.lora_linear_layer.{role}.weight"] = value
        else:
            old[f"{module}.lora.{role}.weight"] = value
    assert any(".processor.to_out_lora.up" in k for k in old) and any("self_attn.to_k_lora" in k for k in old)
    save_file(old, tmp_path / "old.safetensors")
    assert _compare(sd_folder, str(tmp_path / "old.safetensors")) <= PIPELINE_FP32_MAX_ABS


def test_kohya_lora_same_image_as_diffusers(sd_folder, tmp_path):
    lora = _kohya_file(str(tmp_path / "kohya.safetensors"), _theirs(sd_folder))
    assert _compare(sd_folder, lora) <= PIPELINE_FP32_MAX_ABS


def test_kohya_sdxl_lora_with_sgm_names_same_image_as_diffusers(sdxl_folder, tmp_path):
    """kohya trains SDXL on SGM's UNet: input_blocks/middle_block/output_blocks, in_layers/emb_layers/skip_connection,
    and two encoders (lora_te1_, lora_te2_)."""
    lora = _kohya_file(str(tmp_path / "kohya_xl.safetensors"), _theirs(sdxl_folder), sgm=True)
    assert any("input_blocks" in k for k in load_file(lora))
    assert _compare(sdxl_folder, lora) <= PIPELINE_FP32_MAX_ABS


def test_sgm_names_of_sdxl_unet():
    """SGM's numbering for SDXL's real UNet (3 blocks, 2 layers each), as kohya's SDXL LoRAs name it."""
    config = type("C", (), dict(layers_per_block=2, up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                    "UpBlock2D"]))
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.2.resnets.1.time_emb_proj": "input_blocks.8.0.emb_layers.1",
        "mid_block.resnets.0.conv2": "middle_block.0.out_layers.3",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.3.1.transformer_blocks.0.ff.net.2",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "add_embedding.linear_1": "label_emb.0.0",
        "conv_out": "out.2",
    }
    assert {name: _sgm_name(config, name) for name in expected} == expected


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # diffusers' second adapter
def test_scale_and_several_adapters_as_diffusers_set_adapters(sd_folder, tmp_path):
    a = _kohya_file(str(tmp_path / "a.safetensors"), _theirs(sd_folder), seed=1)
    b = _kohya_file(str(tmp_path / "b.safetensors"), _theirs(sd_folder), rank=2, alpha=1.0, seed=2)
    theirs, ours = _theirs(sd_folder), _ours(sd_folder)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(a, adapter_name="a")
        pipe.load_lora_weights(b, adapter_name="b")
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["b"]  # the last one loaded, as diffusers
    only_b = _image(ours)
    assert np.abs(_image(theirs) - only_b).max() <= PIPELINE_FP32_MAX_ABS
    for names, weights in ((["a", "b"], [0.5, 1.5]), (["a"], [0.7])):
        theirs.set_adapters(names, adapter_weights=weights)
        ours.set_adapters(names, adapter_weights=weights)
        assert ours.get_active_adapters() == names
        image = _image(ours)
        assert np.abs(image - only_b).max() > CHANGED
        assert np.abs(_image(theirs) - image).max() <= PIPELINE_FP32_MAX_ABS
    # load_lora_weights(scale=) is diffusers' fuse_lora(lora_scale=); our fuse_lora gives diffusers' images:
    # unfuse_lora keeps the scale, a fuse after it scales again (0.6 x 0.5)
    theirs, fused = _theirs(sd_folder), _ours(sd_folder)
    for pipe in (theirs, fused):
        pipe.load_lora_weights(a)
    full = _image(fused)
    reference = {}
    for scale in (0.6, 0.3):
        ours = _ours(sd_folder)
        ours.load_lora_weights(a, scale=scale)
        reference[scale] = _image(ours)
    assert np.abs(reference[0.6] - full).max() > CHANGED and np.abs(reference[0.3] - reference[0.6]).max() > CHANGED
    for action, expected in (("fuse_lora(lora_scale=0.6)", 0.6), ("unfuse_lora()", 0.6),
                             ("fuse_lora(lora_scale=0.5)", 0.3)):
        for pipe in (theirs, fused):
            eval(f"pipe.{action}")
        image = _image(fused)
        assert np.abs(image - reference[expected]).max() <= 1e-5, action
        assert np.abs(_image(theirs) - image).max() <= PIPELINE_FP32_MAX_ABS, action
    fused.fuse_lora(lora_scale=0.5)  # fused already: nothing changes until unfuse_lora
    assert np.abs(_image(fused) - reference[0.3]).max() <= 1e-5
    with pytest.raises(ValueError, match=r"adapter_names: \['x'\] are not active"):
        fused.fuse_lora(adapter_names=["x"])


@pytest.mark.parametrize("folder_name", ["sd_folder", "sdxl_folder"])
def test_cross_attention_kwargs_scale_for_one_call_as_diffusers(folder_name, tmp_path, request):
    """diffusers' per-call LoRA scale, cross_attention_kwargs={"scale": s}: UNet and text encoders at s for this call,
    the weights as they were after it."""
    folder = request.getfixturevalue(folder_name)
    lora = _kohya_file(str(tmp_path / "a.safetensors"), _theirs(folder), sgm=folder_name == "sdxl_folder")
    theirs, ours = _theirs(folder), _ours(folder)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(lora)
    full = _image(ours)
    kwargs = dict(num_inference_steps=3, output_type="np", cross_attention_kwargs={"scale": 0.4})
    a = theirs("a red cube", generator=torch.Generator().manual_seed(3), **kwargs).images
    b = ours("a red cube", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert np.abs(b - full).max() > CHANGED and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
    assert np.abs(_image(ours) - full).max() == 0  # back to weight 1 after the call
    with pytest.raises(ValueError, match=r"only 'scale'.*\['gligen'\]"):
        ours("a red cube", num_inference_steps=1, cross_attention_kwargs={"scale": 0.4, "gligen": {}})
    with pytest.raises(TypeError, match="cross_attention_kwargs\\['scale'\\] must be a finite float"):
        ours("a red cube", num_inference_steps=1, cross_attention_kwargs={"scale": "0.4"})


def test_unload_restores_the_weights_exactly_and_in_place(sd_folder, tmp_path):
    """The merge writes in place (a CUDA graph reads weights by address); unloading gives back the very same values,
    also after set_adapters has re-merged many times; a fused q/k/v copy follows the weights."""
    ours = _ours(sd_folder)
    image = _image(ours)  # (the first call puts the weights in channels_last on the CPU: new storage)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in ours.unet.named_parameters()}
    te_before = {n: p.detach().clone() for n, p in ours.text_encoder.named_parameters()}
    ours.unet.fuse_qkv_projections()
    lora = _kohya_file(str(tmp_path / "a.safetensors"), _theirs(sd_folder))
    ours.load_lora_weights(lora)
    with_lora = _image(ours)
    ours.unet.unfuse_qkv_projections()
    assert np.abs(_image(ours) - with_lora).max() <= 1e-5  # the fused copy had the LoRA too
    ours.unet.fuse_qkv_projections()
    for weight in (0.3, 1.7, -0.5, 1.0):
        ours.set_adapters("default_0", weight)
    assert np.abs(_image(ours) - with_lora).max() <= 1e-5
    ours.unload_lora_weights()
    assert ours.get_active_adapters() == []
    for name, param in ours.unet.named_parameters():
        assert param.data_ptr() == before[name][0] and torch.equal(param, before[name][1]), name
    for name, param in ours.text_encoder.named_parameters():
        assert torch.equal(param, te_before[name]), name
    assert np.abs(_image(ours) - image).max() == 0


def test_bad_lora_is_one_clear_error(sd_folder, tmp_path):
    ours = _ours(sd_folder)
    weight = ours.unet.get_parameter("down_blocks.0.attentions.0.proj_in.weight")
    down, up = torch.randn(4, *weight.shape[1:]), torch.randn(weight.shape[0], 4, *weight.shape[2:])
    key = "unet.down_blocks.0.attentions.0.proj_in"
    # every key that matches no module is listed, in one error
    with pytest.raises(ValueError, match=r"matching no module.*lora_unet_nowhere.*unet\.nowhere"):
        ours.load_lora_weights({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up,
                                "lora_unet_nowhere.lora_down.weight": down, "unet.nowhere.lora_A.weight": down})
    with pytest.raises(ValueError, match="do not fit.*proj_in"):
        ours.load_lora_weights({f"{key}.lora_A.weight": down[:, :3], f"{key}.lora_B.weight": up})
    with pytest.raises(ValueError, match=r"an alpha of shape \(2,\)"):
        ours.load_lora_weights({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": torch.ones(2)})
    torch.save({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, "note": "trained"}, tmp_path / "l.bin")
    with pytest.raises(TypeError, match=r"maps names to tensors.*note"):
        ours.load_lora_weights(str(tmp_path / "l.bin"))
    with pytest.raises(ValueError, match="has only lora down"):
        ours.load_lora_weights({f"{key}.lora_A.weight": down})
    with pytest.raises(ValueError, match="DoRA"):
        ours.load_lora_weights({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up,
                                f"{key}.lora_magnitude_vector": torch.ones(weight.shape[0])})
    with pytest.raises(ValueError, match="LoHa"):
        ours.load_lora_weights({"lora_unet_x.hada_w1_a": down})
    with pytest.raises(ValueError, match="no text_encoder_2"):
        ours.load_lora_weights({"lora_te2_text_model_x.lora_down.weight": down})
    with pytest.raises(FileNotFoundError, match="lora"):
        ours.load_lora_weights(str(tmp_path / "missing.safetensors"))
    for name in ("a.safetensors", "b.safetensors"):
        save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, tmp_path / name)
    with pytest.raises(ValueError, match="weight_name"):
        ours.load_lora_weights(str(tmp_path))
    with pytest.raises(TypeError, match="lora must be a path"):
        ours.load_lora_weights(3)
    with pytest.raises(TypeError, match="scale"):
        ours.load_lora_weights(str(tmp_path), weight_name="a.safetensors", scale=float("nan"))
    assert ours.get_active_adapters() == []  # nothing half-loaded
    ours.load_lora_weights(str(tmp_path), weight_name="a.safetensors", adapter_name="a")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(str(tmp_path), weight_name="b.safetensors", adapter_name="a")
    with pytest.raises(ValueError, match=r"adapter_names.*\['z'\]"):
        ours.set_adapters(["a", "z"])
    with pytest.raises(ValueError, match="adapter_weights has 2"):
        ours.set_adapters(["a"], [1.0, 2.0])
    for method in (ours.set_adapters, ours.delete_adapters, ours.fuse_lora):  # not a name: named, not list()'s error
        with pytest.raises(TypeError, match="adapter_names must be a str or a list of str, got 3"):
            method(adapter_names=3)


def test_metadata_alpha_pattern_and_rslora():
    from diffusion_fast.lora_files import _metadata_alpha

    meta = {"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}, "text_encoder.use_rslora": True,
            "text_encoder.lora_alpha": 4}
    assert _metadata_alpha(meta, "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4) == (2, False)
    assert _metadata_alpha(meta, "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", 4) == (8, False)
    assert _metadata_alpha(meta, "text_encoder", "text_model.encoder.layers.0.mlp.fc1", 4) == (4, True)
    assert _metadata_alpha(None, "unet", "conv_in", 4) == (4, False)  # no metadata: alpha = rank, scale 1
    assert json.loads(json.dumps(meta)) == meta


def test_disable_and_enable_lora_as_diffusers(sd_folder, tmp_path):
    """disable_lora puts the original weights back exactly and keeps the adapters; as diffusers (checked here on its
    pipeline), set_adapters and a LoRA loaded meanwhile stay off until enable_lora, which brings back the active one."""
    a = _kohya_file(str(tmp_path / "a.safetensors"), _theirs(sd_folder), seed=1)
    b = _kohya_file(str(tmp_path / "b.safetensors"), _theirs(sd_folder), rank=2, alpha=1.0, seed=2)
    theirs, ours = _theirs(sd_folder), _ours(sd_folder)
    base = _image(ours)
    weights = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    for pipe in (theirs, ours):
        pipe.load_lora_weights(a, adapter_name="a")
    assert np.abs(_image(ours) - base).max() > CHANGED
    steps = [("disable_lora", ()), ("set_adapters", (["a"], [0.5])), ("load_lora_weights", (b, "b"))]
    for method, args in steps:
        for pipe in (theirs, ours):
            getattr(pipe, method)(*args)
        image = _image(ours)
        assert np.array_equal(image, base), method  # the weights as they were, bit for bit
        assert np.abs(_image(theirs) - image).max() <= PIPELINE_FP32_MAX_ABS, method
    assert all(torch.equal(v, weights[k]) for k, v in ours.unet.state_dict().items())
    for pipe in (theirs, ours):
        pipe.enable_lora()
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["b"]
    image = _image(ours)
    assert np.abs(image - base).max() > CHANGED
    assert np.abs(_image(theirs) - image).max() <= PIPELINE_FP32_MAX_ABS


@pytest.mark.parametrize("with_text_encoder", [False, True])
def test_kohya_lora_on_an_sdxl_refiner_same_image_as_diffusers(tmp_path, with_text_encoder):
    """A LoRA for SDXL's refiner (image-to-image, no first text encoder): its UNet part (and its second encoder's,
    lora_te2_) merged into our refiner gives diffusers' image from the same image, strength and seed."""
    from PIL import Image

    folder = tmp_path / "refiner"
    _tiny_diffusers.sdxl_refiner_pipeline(_tiny_diffusers.sdxl_pipeline(seed=1), seed=2).save_pretrained(folder)
    theirs, ours = _theirs(folder), _ours(folder)
    generator, state = torch.Generator().manual_seed(4), {}
    parts = [("unet", theirs.unet, UNET_TARGETS)] + ([("te2", theirs.text_encoder_2, TEXT_TARGETS)]
                                                     if with_text_encoder else [])
    for prefix, model, targets in parts:
        for name, weight in _targets(model, targets):
            key = f"lora_{prefix}_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _factors(weight, 4, generator)
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "refiner_lora.safetensors"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def refined(pipe):
        return pipe("a red cube", image=image, strength=0.6, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images

    before = refined(ours)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(str(tmp_path / "refiner_lora.safetensors"))
    a, b = refined(theirs), refined(ours)
    assert np.abs(a - before).max() > CHANGED and np.abs(a - b).max() <= PIPELINE_FP32_MAX_ABS
