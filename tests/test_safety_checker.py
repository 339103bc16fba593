"""The SD safety checker: our StableDiffusionSafetyChecker against diffusers' (the same transformers CLIP vision tower,
tiny), and our SD pipelines running it as diffusers' do, on a folder saved with one.

Stated tolerance: the flags equal diffusers' (its rounding of the scores to 3 decimals and its special-care
adjustment included); the images within 1e-3 of diffusers', a flagged one black in both.
"""
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as Theirs
from transformers import CLIPConfig, CLIPImageProcessor

import _tiny_diffusers
import diffusion_fast
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS
from diffusion_fast.safety_checker import StableDiffusionSafetyChecker

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

CONFIG = CLIPConfig(  # a tiny CLIP: 32x32 images in 8x8 patches, 16-wide projections
    text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8), projection_dim=16)
EXTRACTOR = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _theirs(seed=0):
    torch.manual_seed(seed)
    checker = Theirs(CONFIG).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    return checker


def _ours_from(theirs, folder):
    theirs.save_pretrained(folder)
    return StableDiffusionSafetyChecker.from_pretrained(folder)


def _cosines(checker, clip_input):
    """(special, concept) cosines per image, as the checker computes them."""
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(clip_input)[1]))
        return [(embeds @ torch.nn.functional.normalize(c).t()) for c in (checker.special_care_embeds,
                                                                           checker.concept_embeds)]


def _set_thresholds(checkers, special, concept):
    for checker in checkers:
        with torch.no_grad():
            checker.special_care_embeds_weights.copy_(special)
            checker.concept_embeds_weights.copy_(concept)


def test_flags_match_diffusers(tmp_path):
    """64 images in three regimes: concepts alone (each concept's threshold at its 90th percentile); special-care
    scores above 0 for some images, which lift their concept scores by 0.01 (each concept's threshold 0.007 above
    its highest cosine among every third image: flagged only with the lift); and thresholds 0.0004 to 0.0006 off an
    image's cosine, where diffusers' rounding to 3 decimals decides."""
    theirs = _theirs()
    ours = _ours_from(theirs, tmp_path)
    clip_input = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    special, concept = _cosines(theirs, clip_input)
    regimes = {
        "concepts": (torch.ones(3), concept.quantile(0.9, dim=0)),
        "special-care lift": (special.quantile(0.8, dim=0), concept[::3].amax(dim=0) + 0.007),
    }
    lifted = None
    for name, (special_t, concept_t) in regimes.items():
        _set_thresholds((theirs, ours), special_t, concept_t)
        images = torch.zeros(64, 3, 4, 4)
        _, expected = theirs(clip_input=clip_input, images=images.clone())
        flags = ours.flags(clip_input)
        assert flags == expected and any(flags) and not all(flags), name
        if name == "special-care lift":
            lifted = flags
            _set_thresholds((theirs,), torch.ones(3), concept_t)  # without the lift: fewer flagged
            assert sum(theirs(clip_input=clip_input, images=images.clone())[1]) < sum(lifted)
    # rounding: image i alone, concept 0's threshold its cosine plus an offset (the others never reached); a score
    # of +0.0004 rounds to 0 (not flagged), +0.0006 to 0.001 (flagged)
    flags, expected = [], []
    for i, offset in enumerate([-6e-4, -4e-4, 4e-4, 6e-4] * 2):
        _set_thresholds((theirs, ours), torch.ones(3), torch.tensor([concept[i, 0] + offset] + [1.0] * 16))
        flags += ours.flags(clip_input[i:i + 1])
        expected += theirs(clip_input=clip_input[i:i + 1], images=torch.zeros(1, 3, 4, 4))[1]
    assert flags == expected == [True, False, False, False] * 2
    out, flags = ours(clip_input[:8], torch.ones(8, 3, 4, 4))
    assert all(bool((out[i] == 0).all()) == f for i, f in enumerate(flags))


def test_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    _theirs().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["concept_embeds"]
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['concept_embeds'\], unexpected \['extra'\]"):
        StableDiffusionSafetyChecker.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no safety checker weights"):
        StableDiffusionSafetyChecker.from_pretrained(tmp_path)


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a safety checker folder"):
        StableDiffusionSafetyChecker.from_pretrained(tmp_path)
    ours = _ours_from(_theirs(), tmp_path)
    with pytest.raises(ValueError, match=r"clip_input must be a \(B, 3, 32, 32\) tensor .* got \(3, 32, 32\)"):
        ours.flags(torch.zeros(3, 32, 32))


def test_a_variant_file_is_read_first(tmp_path):
    """With variant="fp16" (as a pipeline's from_pretrained passes it), model.fp16.safetensors is read first."""
    from safetensors.torch import load_file, save_file

    theirs = _theirs()
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "model.fp16.safetensors")
    (tmp_path / "model.safetensors").unlink()
    ours = StableDiffusionSafetyChecker.from_pretrained(tmp_path, variant="fp16")
    torch.testing.assert_close(ours.concept_embeds, theirs.concept_embeds.half().float())


# ---- in the pipelines -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """diffusers' tiny SD pipeline with a checker that flags the first of two images (a concept embedding along the
    difference of the two images' unit embeddings, threshold 0: the first image's cosine with it is positive, the
    second's negative), saved; ours loaded from it."""
    base = _tiny_diffusers.pipeline("sd1", seed=1)
    images = base("a red cube", num_inference_steps=3, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(3)).images
    checker = _theirs()
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(EXTRACTOR(images, return_tensors="pt").pixel_values)[1])
        unit = torch.nn.functional.normalize(embeds)
        checker.concept_embeds[0] = unit[0] - unit[1]
        cos = torch.nn.functional.cosine_similarity(embeds, checker.concept_embeds[:1])
    assert cos[0] > 0.01 and cos[1] < -0.01
    _set_thresholds((checker,), torch.ones(3), torch.tensor([0.0] + [1.0] * 16))
    theirs = diffusers.StableDiffusionPipeline(**dict(base.components, safety_checker=checker,
                                                      feature_extractor=EXTRACTOR))
    folder = tmp_path_factory.mktemp("sd-safety")
    theirs, ours = _tiny_diffusers.saved_pair(theirs, folder, diffusion_fast.StableDiffusionPipeline)
    return theirs, ours, str(folder)


def _run(pipe, **kwargs):
    return pipe("a red cube", num_inference_steps=3, num_images_per_prompt=2, output_type="np",
                generator=torch.Generator().manual_seed(3), **kwargs)


def test_pipeline_flags_and_blackens_as_diffusers(pair):
    theirs, ours, _ = pair
    expected = _run(theirs)
    with pytest.warns(UserWarning, match="Potential NSFW content was detected"):
        out = _run(ours)
    assert out.nsfw_content_detected == expected.nsfw_content_detected == [True, False]
    assert np.abs(out.images - expected.images).max() <= PIPELINE_FP32_MAX_ABS
    assert (out.images[0] == 0).all() and out.images[1].max() > 0.1
    pil = ours("a red cube", num_inference_steps=3, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(3)).images
    assert np.asarray(pil[0]).max() == 0  # black as a PIL image too


def test_safety_checker_none_turns_it_off(pair):
    theirs, _, folder = pair
    ours = diffusion_fast.load_pipeline(folder, safety_checker=None)
    ours.set_progress_bar_config(disable=True)
    out = _run(ours)
    assert out.nsfw_content_detected is None and out.images[0].max() > 0.1


def test_pipelines_built_on_it_keep_it(pair):
    """Image-to-image (the CLI's way: on the components) and ControlNet (from_pipeline) keep the checker; unloading
    an IP-Adapter keeps the feature extractor the checker reads, as diffusers does."""
    from diffusion_fast.generate import _img2img

    _, ours, _ = pair
    assert _img2img(ours).safety_checker is ours.safety_checker
    net = diffusion_fast.ControlNetModel.from_config(dict(_tiny_diffusers.random_controlnet(
        _tiny_diffusers.pipeline("sd1").unet).config))
    control = diffusion_fast.StableDiffusionControlNetPipeline.from_pipeline(ours, net)
    assert control.safety_checker is ours.safety_checker and control.feature_extractor is ours.feature_extractor
    control.unload_ip_adapter()
    assert control.feature_extractor is not None


# ---- the CLI ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("off", [False, True], ids=["checked", "no-safety-checker"])
def test_generate_runs_the_checker_unless_turned_off(pair, tmp_path, capsys, off):
    """The folder's checker runs (image 0 written black, said in one line); --no-safety-checker does not load it."""
    from PIL import Image

    from diffusion_fast.cli import main

    _, _, folder = pair
    argv = ["generate", "--model", folder, "--prompt", "a red cube", "--steps", "3", "--batch", "2", "--seed", "3",
            "--output", str(tmp_path / "out.png"), "--no-progress"] + (["--no-safety-checker"] if off else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the checker's own warning)
        assert main(argv) == 0
    text = capsys.readouterr().out
    first, second = (np.asarray(Image.open(tmp_path / f"out_{i}.png")) for i in range(2))
    assert ("safety checker: image 0 flagged, written black" in text) != off, text
    assert (first.max() == 0) != off and second.max() > 0


def test_no_safety_checker_on_a_folder_without_one_is_one_line(tmp_path, capsys):
    from diffusion_fast.cli import main

    _tiny_diffusers.pipeline("sd1").save_pretrained(tmp_path)  # (saved with safety_checker=None)
    assert main(["generate", "--model", str(tmp_path), "--no-safety-checker", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--no-safety-checker: " in err and "has no safety checker" in err and "Traceback" not in err
