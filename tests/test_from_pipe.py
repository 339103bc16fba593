"""``from_pipe``: another kind of our pipelines on a loaded pipeline's components, as diffusers' from_pipe builds one.

The new pipeline shares the components (the same objects: nothing is loaded or copied) and gives the same images as
the class loaded from the folder; its settings, image encoder, safety checker and LoRA bookkeeping come along; a
component it needs that the source lacks, or an argument it does not take, is refused by name.
"""
import numpy as np
import pytest
import torch

import _tiny_diffusers
import diffusion_fast
from diffusion_fast import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                            StableDiffusionPAGPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                            StableDiffusionXLPipeline)

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers' tiny SD pipeline, its folder, ours loaded from it)."""
    folder = str(tmp_path_factory.mktemp("from-pipe-sd"))
    theirs, folder = _tiny_diffusers.saved_pipeline(folder, "sd1", seed=3)
    ours = diffusion_fast.load_pipeline(folder)
    ours.set_progress_bar_config(disable=True)
    return theirs, folder, ours


def _image(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cube", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(3),
                **kwargs).images


def test_img2img_from_pipe_shares_the_components_and_gives_the_loaded_class_image(sd):
    _, folder, ours = sd
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(ours)
    assert type(img2img) is StableDiffusionImg2ImgPipeline
    assert all(getattr(img2img, name) is getattr(ours, name) for name in SD_PARTS)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loaded = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    assert np.array_equal(_image(img2img, image=image), _image(loaded, image=image))


def test_pag_from_pipe_takes_its_settings_as_keywords(sd):
    _, folder, ours = sd
    pag = StableDiffusionPAGPipeline.from_pipe(ours, pag_applied_layers=["down_blocks.0"])
    assert pag.pag_applied_layers == ["down_blocks.0"] and pag.unet is ours.unet
    loaded = StableDiffusionPAGPipeline.from_pretrained(folder, pag_applied_layers="down_blocks.0")
    assert np.array_equal(_image(pag), _image(loaded))
    back = StableDiffusionPipeline.from_pipe(pag)  # (and back: the plain pipeline takes no PAG setting)
    assert type(back) is StableDiffusionPipeline and np.array_equal(_image(back), _image(ours))


def test_controlnet_from_pipe_takes_the_net_and_names_it_when_missing(sd):
    theirs, _, ours = sd
    with pytest.raises(ValueError, match=r"from_pipe: StableDiffusionControlNetPipeline needs controlnet, which pipe "
                                         r"\(StableDiffusionPipeline\) does not have: pass it as "
                                         r"from_pipe\(pipe, controlnet=...\)"):
        StableDiffusionControlNetPipeline.from_pipe(ours)
    torch.manual_seed(0)
    net = ControlNetModel.from_config(dict(_tiny_diffusers.random_controlnet(theirs.unet).config))
    control = StableDiffusionControlNetPipeline.from_pipe(ours, controlnet=net)
    assert control.controlnet is net and control.unet is ours.unet
    plain = StableDiffusionPipeline.from_pipe(control)  # (the net is left behind)
    assert not hasattr(plain, "controlnet")


def test_settings_and_what_rides_along_are_carried(sd, tmp_path):
    """cuda_graph / channels_last, the safety checker, the image encoder and the LoRA bookkeeping (the same merged
    modules: unloading from the new pipeline restores the shared weights); a given component replaces the source's."""
    from test_lora import _kohya_file

    theirs, folder, _ = sd
    ours = diffusion_fast.load_pipeline(folder, cuda_graph=False, channels_last=False)
    ours.safety_checker, ours.image_encoder = object(), object()  # (carried as they are)
    before = {n: p.detach().clone() for n, p in ours.unet.named_parameters()}
    ours.load_lora_weights(_kohya_file(str(tmp_path / "a.safetensors"), theirs))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(ours)
    assert img2img.cuda_graph is False and img2img.channels_last is False
    assert img2img.safety_checker is ours.safety_checker and img2img.image_encoder is ours.image_encoder
    assert img2img.get_active_adapters() == ["default_0"]
    img2img.unload_lora_weights()
    assert all(torch.equal(p, before[n]) for n, p in ours.unet.named_parameters())
    other_vae = diffusion_fast.AutoencoderKL.from_config(dict(ours.vae.config))
    assert StableDiffusionImg2ImgPipeline.from_pipe(ours, vae=other_vae).vae is other_vae


def test_sdxl_from_pipe_keeps_its_settings_and_sd_to_sdxl_is_refused(sd, tmp_path):
    _, _, ours = sd
    theirs_xl = _tiny_diffusers.sdxl_pipeline(seed=1)
    theirs_xl.save_pretrained(tmp_path / "xl")
    xl = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"))
    xl.force_zeros_for_empty_prompt = False
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(xl)
    assert img2img.text_encoder_2 is xl.text_encoder_2 and img2img.force_zeros_for_empty_prompt is False
    with pytest.raises(ValueError, match="needs text_encoder_2, tokenizer_2, which pipe .* pass them"):
        StableDiffusionXLPipeline.from_pipe(ours)


def test_unknown_arguments_are_refused_by_name(sd):
    _, _, ours = sd
    with pytest.raises(TypeError, match=r"from_pipe: StableDiffusionImg2ImgPipeline takes no pag_applied_layers, "
                                        r"torch_dtype \(its components and settings: unet, vae"):
        StableDiffusionImg2ImgPipeline.from_pipe(ours, torch_dtype=torch.float16, pag_applied_layers="mid")


def test_a_diffusers_pipeline_is_refused_with_what_to_do_instead(sd):
    """Our pipelines run our models: a diffusers pipeline's are refused by name (its UNet would otherwise fail deep
    inside the first call), pointing to accelerate and load_pipeline."""
    theirs, _, _ = sd
    with pytest.raises(TypeError, match=r"pipe must be one of diffusion_fast's pipelines, got diffusers\..*"
                                        r"StableDiffusionPipeline \(for a diffusers pipeline: "
                                        r"diffusion_fast.accelerate\(pipe\)"):
        StableDiffusionPipeline.from_pipe(theirs)
