"""diffusion_fast: fused Triton and C++ kernels for diffusion-model sampling, checked against a PyTorch reference.

    import diffusion_fast
    pipe = diffusion_fast.StableDiffusionPipeline.from_pretrained("path/to/sd-folder", dtype=torch.float16, device="cuda")
    image = pipe("a photo of a cat", generator=torch.Generator("cuda").manual_seed(0)).images[0]

    diffusion_fast.accelerate(diffusers_pipe)      # patch a diffusers pipeline in place
    with diffusion_fast.backend("reference"):      # run every op through the plain PyTorch reference
        ...
"""
from . import ops, reference
from ._backend import BACKENDS, backend, current_backend
from ._cpp import load_ops as _load_cpp_ops
from ._source_tree import unshadow_hf_kernels as _unshadow_hf_kernels

__version__ = "0.1.0"

_load_cpp_ops()  # registers torch.ops.diffusion_fast.* (prebuilt, else JIT-built, else one warning)
_unshadow_hf_kernels()  # (run from the source tree: our kernels/ folder must not stand in for Hugging Face's)

_LAZY = {
    "StableDiffusionPipeline": ("pipeline", "StableDiffusionPipeline"),
    "StableDiffusionXLPipeline": ("pipeline_xl", "StableDiffusionXLPipeline"),
    "StableDiffusionImg2ImgPipeline": ("pipeline_img2img", "StableDiffusionImg2ImgPipeline"),
    "StableDiffusionXLImg2ImgPipeline": ("pipeline_img2img", "StableDiffusionXLImg2ImgPipeline"),
    "StableDiffusionInpaintPipeline": ("pipeline_inpaint", "StableDiffusionInpaintPipeline"),
    "StableDiffusionXLInpaintPipeline": ("pipeline_inpaint", "StableDiffusionXLInpaintPipeline"),
    "StableDiffusionControlNetPipeline": ("pipeline_controlnet", "StableDiffusionControlNetPipeline"),
    "StableDiffusionXLControlNetPipeline": ("pipeline_controlnet", "StableDiffusionXLControlNetPipeline"),
    **{name: ("pipeline_controlnet_image", name) for name in ("StableDiffusionControlNetImg2ImgPipeline",
                                                              "StableDiffusionXLControlNetImg2ImgPipeline",
                                                              "StableDiffusionControlNetInpaintPipeline",
                                                              "StableDiffusionXLControlNetInpaintPipeline")},
    **{name: ("pipeline_controlnet_union", name) for name in ("StableDiffusionXLControlNetUnionPipeline",
                                                              "StableDiffusionXLControlNetUnionImg2ImgPipeline",
                                                              "StableDiffusionXLControlNetUnionInpaintPipeline")},
    "StableDiffusionAdapterPipeline": ("pipeline_t2i_adapter", "StableDiffusionAdapterPipeline"),
    "StableDiffusionXLAdapterPipeline": ("pipeline_t2i_adapter", "StableDiffusionXLAdapterPipeline"),
    "LatentConsistencyModelPipeline": ("pipeline_lcm", "LatentConsistencyModelPipeline"),
    "LatentConsistencyModelImg2ImgPipeline": ("pipeline_lcm", "LatentConsistencyModelImg2ImgPipeline"),
    "StableDiffusionInstructPix2PixPipeline": ("pipeline_pix2pix", "StableDiffusionInstructPix2PixPipeline"),
    "StableDiffusionXLInstructPix2PixPipeline": ("pipeline_pix2pix", "StableDiffusionXLInstructPix2PixPipeline"),
    "StableDiffusionUpscalePipeline": ("pipeline_upscale", "StableDiffusionUpscalePipeline"),
    "StableDiffusionDepth2ImgPipeline": ("pipeline_depth2img", "StableDiffusionDepth2ImgPipeline"),
    "StableDiffusionImageVariationPipeline": ("pipeline_variation", "StableDiffusionImageVariationPipeline"),
    "StableDiffusion3Pipeline": ("pipeline_sd3", "StableDiffusion3Pipeline"),
    "StableDiffusion3Img2ImgPipeline": ("pipeline_sd3_img2img", "StableDiffusion3Img2ImgPipeline"),
    "StableDiffusion3InpaintPipeline": ("pipeline_sd3_inpaint", "StableDiffusion3InpaintPipeline"),
    "StableDiffusion3ControlNetPipeline": ("pipeline_sd3_controlnet", "StableDiffusion3ControlNetPipeline"),
    "StableDiffusion3ControlNetInpaintingPipeline": ("pipeline_sd3_controlnet_inpaint",
                                                     "StableDiffusion3ControlNetInpaintingPipeline"),
    "StableDiffusion3PAGPipeline": ("pipeline_sd3_pag", "StableDiffusion3PAGPipeline"),
    "StableDiffusion3PAGImg2ImgPipeline": ("pipeline_sd3_pag", "StableDiffusion3PAGImg2ImgPipeline"),
    **{name: ("pipeline_pag", name) for name in (
        "StableDiffusionPAGPipeline", "StableDiffusionXLPAGPipeline", "StableDiffusionPAGImg2ImgPipeline",
        "StableDiffusionXLPAGImg2ImgPipeline", "StableDiffusionPAGInpaintPipeline",
        "StableDiffusionXLPAGInpaintPipeline", "StableDiffusionControlNetPAGPipeline",
        "StableDiffusionControlNetPAGInpaintPipeline", "StableDiffusionXLControlNetPAGPipeline",
        "StableDiffusionXLControlNetPAGImg2ImgPipeline")},
    "AutoencoderKL": ("models", "AutoencoderKL"),
    "AutoencoderTiny": ("models", "AutoencoderTiny"),
    "SD3Transformer2DModel": ("models", "SD3Transformer2DModel"),
    "SD3ControlNetModel": ("models", "SD3ControlNetModel"),
    "ControlNetModel": ("models", "ControlNetModel"),
    "ControlNetUnionModel": ("models", "ControlNetUnionModel"),
    "T2IAdapter": ("models", "T2IAdapter"),
    "MultiAdapter": ("models", "MultiAdapter"),
    "IPAdapterMaskProcessor": ("ip_adapter", "IPAdapterMaskProcessor"),
    "load_pipeline": ("pipeline_xl", "load_pipeline"),
    "accelerate": ("diffusers_patch", "accelerate"),
    "restore": ("diffusers_patch", "restore"),
    "models": ("models", None),
    "schedulers": ("schedulers", None),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(f".{module_name}", __name__)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'diffusion_fast' has no attribute {name!r}")


__all__ = ["ops", "reference", "backend", "current_backend", "BACKENDS", *_LAZY]
