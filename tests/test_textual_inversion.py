"""Textual inversion embeddings in our pipelines against diffusers' load_textual_inversion on the same tiny weights
and files: the same images within the fp32 pipeline tolerance (1e-3), each embedding moving the image well past it."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _tiny_diffusers
import diffusion_fast
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CHANGED = 0.02


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("textual-inversion")
    _tiny_diffusers.pipeline("sd1", seed=1).save_pretrained(root / "sd")
    base = _tiny_diffusers.sdxl_pipeline(seed=1)
    base.save_pretrained(root / "sdxl")
    _tiny_diffusers.sdxl_refiner_pipeline(base, seed=2).save_pretrained(root / "refiner")
    return root


def _pair(folder):
    import diffusers

    pipes = diffusers.DiffusionPipeline.from_pretrained(folder), diffusion_fast.load_pipeline(folder)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _image(pipe, prompt, negative_prompt):
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(3)).images


def test_sd_embeddings_same_image_as_diffusers(folders, tmp_path):
    """A diffusers file of three vectors (multi-vector: the prompt's token spelt out as three), an Automatic1111 .pt
    in the negative prompt, a folder holding diffusers' learned_embeds.safetensors, and a bare tensor with its
    token."""
    g = torch.Generator().manual_seed(0)
    save_file({"<cat-toy>": torch.randn(3, 32, generator=g)}, tmp_path / "cat.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=g)}, "name": "bad-hands", "step": 100,
                "string_to_token": {"*": 265}, "sd_checkpoint": "abc"}, tmp_path / "negative.pt")
    (tmp_path / "style").mkdir()
    save_file({"<style>": torch.randn(1, 32, generator=g)}, tmp_path / "style" / "learned_embeds.safetensors")
    bare = torch.randn(32, generator=g)
    theirs, ours = _pair(folders / "sd")
    before = _image(ours, "a photo of <cat-toy> in <style> <dog>", "bad-hands, blurry")
    for pipe in (theirs, ours):
        pipe.load_textual_inversion(str(tmp_path / "cat.safetensors"))
        pipe.load_textual_inversion(str(tmp_path / "negative.pt"))
        pipe.load_textual_inversion(str(tmp_path / "style"))
        pipe.load_textual_inversion(bare, token="<dog>")
    assert ours.maybe_convert_prompt("a <cat-toy>", ours.tokenizer) == "a <cat-toy> <cat-toy>_1 <cat-toy>_2"
    image = _image(ours, "a photo of <cat-toy> in <style> <dog>", "bad-hands, blurry")
    assert np.abs(image - before).max() > CHANGED
    assert np.abs(_image(theirs, "a photo of <cat-toy> in <style> <dog>", "bad-hands, blurry") - image).max() \
        <= PIPELINE_FP32_MAX_ABS
    # the negative prompt's embedding alone matters too
    negative_only = _image(ours, "a photo", "bad-hands, blurry")
    assert np.abs(negative_only - _image(ours, "a photo", "blurry")).max() > CHANGED
    assert np.abs(_image(theirs, "a photo", "bad-hands, blurry") - negative_only).max() <= PIPELINE_FP32_MAX_ABS


def test_sdxl_embedding_loads_into_both_encoders(folders, tmp_path):
    """An SDXL embedding (clip_l for the first encoder, clip_g for the second) in one call; diffusers needs one call
    per encoder, as its documentation shows."""
    g = torch.Generator().manual_seed(1)
    state = {"clip_l": torch.randn(2, 16, generator=g), "clip_g": torch.randn(2, 24, generator=g)}
    save_file(state, tmp_path / "xl.safetensors")
    theirs, ours = _pair(folders / "sdxl")
    before = _image(ours, "a <xl-style> cube", "blurry")
    ours.load_textual_inversion(str(tmp_path / "xl.safetensors"), token="<xl-style>")
    theirs.load_textual_inversion(state["clip_l"], token="<xl-style>", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token="<xl-style>", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    image = _image(ours, "a <xl-style> cube", "blurry")
    assert np.abs(image - before).max() > CHANGED
    assert np.abs(_image(theirs, "a <xl-style> cube", "blurry") - image).max() <= PIPELINE_FP32_MAX_ABS


def test_bad_embeddings_are_refused_before_anything_changes(folders, tmp_path):
    _, ours = _pair(folders / "sd")
    g = torch.Generator().manual_seed(2)
    save_file({"<a>": torch.randn(2, 32, generator=g)}, tmp_path / "a.safetensors")
    ours.load_textual_inversion(str(tmp_path / "a.safetensors"))
    size = len(ours.tokenizer)
    for args, kwargs, error, message in [
        ((str(tmp_path / "a.safetensors"),), {}, ValueError, "'<a>' is already in the tokenizer's vocabulary"),
        ((torch.randn(3, 32),), {}, ValueError, "a bare tensor embedding needs token="),
        (({"<w>": torch.randn(2, 20)},), {}, ValueError, "'<w>' has 20-wide vectors but the text encoder's token "
                                                         "embeddings are 32 wide"),
        (({"x": torch.randn(1, 32), "y": torch.randn(1, 32)},), {}, ValueError, "not a textual inversion state dict"),
        ((str(tmp_path / "missing.pt"),), {}, FileNotFoundError, "no such textual inversion file"),
        ((tmp_path,), {}, FileNotFoundError, "holds no textual inversion file"),
        ((3,), {}, TypeError, "pretrained_model_name_or_path must be a path"),
        (([torch.randn(32), torch.randn(32)],), {"token": ["<p>", "<p>"]}, ValueError, "token: duplicates"),
    ]:
        with pytest.raises(error, match=message):
            ours.load_textual_inversion(*args, **kwargs)
    assert len(ours.tokenizer) == size  # nothing was added by a refused call
    (tmp_path / "pickle.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) can read"):
        ours.load_textual_inversion(str(tmp_path / "pickle.pt"), token="<q>")
    refiner = diffusion_fast.load_pipeline(folders / "refiner")
    with pytest.raises(ValueError, match="no first text encoder .* tokenizer=pipe.tokenizer_2"):
        refiner.load_textual_inversion(torch.randn(24), token="<r>")
    refiner.load_textual_inversion(torch.randn(24), token="<r>", tokenizer=refiner.tokenizer_2,
                                   text_encoder=refiner.text_encoder_2)
    assert "<r>" in refiner.tokenizer_2.get_vocab()


def test_unload_one_embedding_then_all_as_diffusers(folders, tmp_path):
    """Unloading a multi-vector embedding by its token (diffusers needs every one of its tokens named), then the
    rest: the kept embedding still gives diffusers' image, and after the last the tokenizer, the token embeddings and
    the image are as before any load; the same file loads again."""
    g = torch.Generator().manual_seed(5)
    save_file({"<cat-toy>": torch.randn(3, 32, generator=g)}, tmp_path / "cat.safetensors")
    style = torch.randn(32, generator=g)
    theirs, ours = _pair(folders / "sd")
    prompt = "a photo of <cat-toy> in <style>"
    size, rows = len(ours.tokenizer), ours.text_encoder.get_input_embeddings().weight.shape[0]
    before = _image(ours, prompt, "blurry")
    for pipe in (theirs, ours):
        pipe.load_textual_inversion(str(tmp_path / "cat.safetensors"))
        pipe.load_textual_inversion(style, token="<style>")
    both = _image(ours, prompt, "blurry")
    theirs.unload_textual_inversion(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"])
    tokenizer = ours.tokenizer
    ours.unload_textual_inversion("<cat-toy>")
    assert ours.tokenizer is tokenizer and "<cat-toy>_1" not in tokenizer.get_vocab()  # changed in place, whole
    assert ours.text_encoder.get_input_embeddings().weight.shape[0] == rows + 1 and len(tokenizer) == size + 1
    style_only = _image(ours, prompt, "blurry")
    assert np.abs(style_only - both).max() > CHANGED and np.abs(style_only - before).max() > CHANGED
    assert np.abs(_image(theirs, prompt, "blurry") - style_only).max() <= PIPELINE_FP32_MAX_ABS
    ours.unload_textual_inversion()
    assert len(tokenizer) == size and ours.text_encoder.get_input_embeddings().weight.shape[0] == rows
    assert np.array_equal(_image(ours, prompt, "blurry"), before)
    ours.load_textual_inversion(str(tmp_path / "cat.safetensors"))  # no "already in the vocabulary"
    assert np.abs(_image(ours, "a photo of <cat-toy>", "blurry") - _image(ours, "a photo of", "blurry")).max() \
        > CHANGED


def test_unload_sdxl_embedding_from_both_encoders_and_bad_calls(folders, tmp_path):
    g = torch.Generator().manual_seed(6)
    state = {"clip_l": torch.randn(2, 16, generator=g), "clip_g": torch.randn(2, 24, generator=g)}
    _, ours = _pair(folders / "sdxl")
    sizes = len(ours.tokenizer), len(ours.tokenizer_2)
    before = _image(ours, "a <xl-style> cube", "blurry")
    with pytest.raises(ValueError, match="tokens: none not loaded by load_textual_inversion here"):
        ours.unload_textual_inversion()
    ours.load_textual_inversion(state, token="<xl-style>")
    with pytest.raises(ValueError, match=r"tokens: \['<other>'\] not loaded .* \(loaded: \['<xl-style>', "
                                         r"'<xl-style>_1'\]\)"):
        ours.unload_textual_inversion(["<xl-style>", "<other>"])
    with pytest.raises(TypeError, match="tokens must be a token, a list of tokens or None"):
        ours.unload_textual_inversion(3)
    with pytest.raises(ValueError, match="tokens: an empty list names no embedding"):  # (diffusers unloads all)
        ours.unload_textual_inversion([])
    assert len(ours.tokenizer) == sizes[0] + 2  # a refused call changes nothing
    ours.unload_textual_inversion("<xl-style>_1")  # any of its tokens names the embedding
    assert (len(ours.tokenizer), len(ours.tokenizer_2)) == sizes
    assert np.array_equal(_image(ours, "a <xl-style> cube", "blurry"), before)


def test_prompts_are_tokenized_for_conversion_only_with_a_multi_vector_embedding(folders, monkeypatch):
    """maybe_convert_prompt runs at every call: without a multi-vector embedding there is nothing to spell out, so
    the prompt is not tokenized for it (a single-vector token needs no conversion either)."""
    _, ours = _pair(folders / "sd")
    ours.load_textual_inversion(torch.randn(32), token="<one>")
    calls = []
    real = ours.tokenizer.tokenize
    monkeypatch.setattr(ours.tokenizer, "tokenize", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert ours.maybe_convert_prompt(["a <one> cube", "b"], ours.tokenizer) == ["a <one> cube", "b"] and not calls
    ours.load_textual_inversion(torch.randn(2, 32), token=["<two>", "<two>_1"])  # (names its tokens as diffusers)
    assert ours.maybe_convert_prompt("a <two>", ours.tokenizer) == "a <two> <two>_1" and len(calls) == 1
