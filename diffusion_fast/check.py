"""``diffusion-fast check``: every op and a whole pipeline, fast path vs reference, on fresh random inputs.

Ops pass by the 2x rule (error against a float64 reference at most twice plain PyTorch's error in the same dtype,
plus a floor). The pipeline passes in fp32 when the max abs pixel difference between the fast and reference images
is at most 1e-3, and in fp16/bf16 when the fast image's PSNR against the fp32 reference image is at least 35 dB. The
fp32 reference runs with TF32 off (``numerics.strict_fp32``).
"""
from __future__ import annotations

import math
import time

import torch

from . import backend, ops, reference
from .numerics import (PIPELINE_FP32_MAX_ABS, PIPELINE_LOWP_MIN_PSNR, max_abs_err, psnr, seed_latents, strict_fp32,
                       two_x_rule)
from .schedulers.common import float32_draws


def _op_cases(device, dtype, gen):
    """(name, fast_fn, reference_fn(dtype, upcast)) on awkward SD-like shapes with fresh random inputs."""

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    # GroupNorm: C=96 over 32 groups (3 channels a group), odd 7x9 map, batch 3; both layouts.
    x = rand(3, 96, 7, 9, scale=2.0) + 0.5
    w, b = rand(96), rand(96)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    # Attention: SD1.5's head dim 40 (not a power of two) against 77 text keys (not a block multiple).
    q, k, v = rand(2, 3, 50, 40), rand(2, 3, 77, 40), rand(2, 3, 77, 40)
    # Steps: batch 3 with a different timestep per sample, odd latent size.
    mo, uncond, text, sample, noise = (rand(3, 4, 7, 9) for _ in range(5))
    a_t = torch.tensor([0.2, 0.5, 0.9], device=device)
    a_prev = torch.tensor([0.35, 0.6, 0.95], device=device)
    cases = [
        ("group_norm_silu (NCHW)", lambda: ops.group_norm_silu(x, 32, w, b),
         lambda d, up: reference.group_norm_silu(x.to(d), 32, w.to(d), b.to(d), upcast=up)),
        ("group_norm_silu (channels_last)", lambda: ops.group_norm_silu(x_cl, 32, w, b),
         lambda d, up: reference.group_norm_silu(x_cl.to(d), 32, w.to(d), b.to(d), upcast=up)),
        ("attention (D=40, Lk=77)", lambda: ops.attention(q, k, v),
         lambda d, up: reference.attention(q.to(d), k.to(d), v.to(d), upcast=up)),
        ("ddim_step (v_prediction, eta=0.5)",
         lambda: ops.ddim_step(mo, sample, a_t, a_prev, eta=0.5, variance_noise=noise, prediction_type="v_prediction")[0],
         lambda d, up: reference.ddim_step(mo.to(d), sample.to(d), a_t.to(d), a_prev.to(d), eta=0.5,
                                           variance_noise=noise.to(d), prediction_type="v_prediction", upcast=up)[0]),
        ("cfg_ddim_step (epsilon, s=7.5)",
         lambda: ops.cfg_ddim_step(uncond, text, 7.5, sample, a_t, a_prev)[0],
         lambda d, up: reference.cfg_ddim_step(uncond.to(d), text.to(d), 7.5, sample.to(d), a_t.to(d),
                                               a_prev.to(d), upcast=up)[0]),
        ("ddpm_step (epsilon, std)",
         lambda: ops.ddpm_step(mo, sample, a_t, a_prev, std=0.1, variance_noise=noise)[0],
         lambda d, up: reference.ddpm_step(mo.to(d), sample.to(d), a_t.to(d), a_prev.to(d), std=0.1,
                                           variance_noise=noise.to(d), upcast=up)[0]),
        ("euler_step (epsilon)",
         lambda: ops.euler_step(mo, sample, 2.5, 1.7)[0],
         lambda d, up: reference.euler_step(mo.to(d), sample.to(d), 2.5, 1.7, upcast=up)[0]),
        ("linear_step (DPM-Solver++ 2M's update)",
         lambda: ops.linear_step(mo, sample, noise, cx=1.4, cm=-0.9, p0=0.8, px=0.3, pe=-0.2)[0],
         lambda d, up: reference.linear_step(mo.to(d), sample.to(d), noise.to(d), cx=1.4, cm=-0.9, p0=0.8, px=0.3,
                                             pe=-0.2, upcast=up)[0]),
        ("euler_ancestral_step (v_prediction)",
         lambda: ops.euler_ancestral_step(mo, sample, 2.5, 1.7, noise, prediction_type="v_prediction")[0],
         lambda d, up: reference.euler_ancestral_step(mo.to(d), sample.to(d), 2.5, 1.7, noise.to(d),
                                                      prediction_type="v_prediction", upcast=up)[0]),
    ]
    return cases


def check_ops(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, fast_fn, ref_fn in _op_cases(device, dtype, gen):
        out = fast_fn()
        ref64 = ref_fn(torch.float64, False)
        eager = ref_fn(dtype, False)
        if name.startswith("euler"):  # diffusers computes Euler in fp32 whatever the dtype: so does plain PyTorch
            eager = ref_fn(dtype, True)
        ok, err, base = two_x_rule(out, ref64, eager)
        rows.append({"check": name, "max_abs_err": err, "pytorch_err": base, "passed": ok})
    return rows


def check_pipeline(args, device, dtype):
    """``_check_pipeline`` with TF32 off (``numerics.strict_fp32``): the fp32 reference is real fp32, and an fp32
    fast path is compared with it on equal terms (a 16-bit fast path does not use TF32 either way)."""
    with strict_fp32():
        return _check_pipeline(args, device, dtype)


def _check_pipeline(args, device, dtype):
    """The whole pipeline, fast vs reference, plus where any difference comes from.

    Besides the image, three stages are compared against the fp32 reference run, so a failure points at its
    source: the UNet's first noise prediction (same inputs), the latents after the loop, and the VAE decode of the
    reference latents. In fp16/bf16 the plain-PyTorch run in the same dtype (the reference path) is measured too:
    it shows how far that dtype alone moves this model's image. On CUDA the fast path also runs without CUDA graphs,
    which separates a replay problem from a kernel problem.
    """
    from .models.layers import guidance_scale_embedding
    from .pipeline import StableDiffusionPipeline
    from .pipeline_sd3 import StableDiffusion3Pipeline
    from .pipeline_xl import load_pipeline

    def load(dt):
        if args.model:
            return load_pipeline(args.model, dtype=dt, device=device)  # SD 1.x/2.x, SDXL or SD3, by the folder
        return StableDiffusionPipeline.from_tiny("sd1", seed=args.seed, dtype=dt, device=device)

    def run(pipe, name):
        """(final latents, image, first noise prediction) of one pipeline run on one backend."""
        pipe.set_progress_bar_config(disable=True)
        kind, inputs = pipeline_inputs(pipe, args.seed, args.steps)
        # (image-to-image and depth-to-image draw their noise themselves: float32_draws below)
        if not kind.endswith(("image-to-image", "depth-to-image")):
            inputs["latents"] = seed_latents(_denoiser(pipe).config, args.seed,
                                             channels=pipe.vae.config.latent_channels)
        # one noise for every dtype: the given latents (see seed_latents), and every draw a pipeline makes itself
        # (the image's latent sample and noise) in float32, rounded
        torch.manual_seed(args.seed)  # (the same draws from the global generator in every run: SD3 ControlNets')
        with backend(name), float32_draws():
            text = {} if kind == "image variation" else {"prompt": "a red cube on a table"}
            latents = pipe(num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent",
                           generator=torch.Generator("cpu").manual_seed(args.seed), **text, **inputs).images
        return latents, decode(pipe, latents, name), first_noise_pred(pipe, name)

    def decode(pipe, latents, name):
        from .pipeline_common import postprocess

        with backend(name), torch.no_grad():
            image = pipe._decode(latents.to(pipe.dtype))  # (SDXL's: an fp16 VAE with force_upcast decodes in fp32)
        return postprocess(image, "np")

    gen = torch.Generator("cpu").manual_seed(args.seed + 1)
    probe = None  # the same UNet inputs for every run: (latents, timestep, text embeddings[, SDXL's pooled, time ids])

    def first_noise_pred(pipe, name):
        nonlocal probe
        if isinstance(pipe, StableDiffusion3Pipeline):  # the transformer: latents, timestep, joint text, pooled
            if probe is None:  # (and an SD3 ControlNet pipeline's nets at scale 1: control latents each)
                cfg = pipe.transformer.config
                probe = (torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
                         torch.tensor(1000.0), torch.randn(2, 77 + 256, cfg.joint_attention_dim, generator=gen),
                         torch.randn(2, cfg.pooled_projection_dim, generator=gen))
                probe += tuple(torch.randn(2, net.config.in_channels + net.config.extra_conditioning_channels,
                                           cfg.sample_size, cfg.sample_size, generator=gen)
                               for net in getattr(pipe, "_nets", ()))
            with backend(name), torch.no_grad():
                x, t, emb, pooled, *control = (v.to(device=device, dtype=pipe.dtype) for v in probe)
                nets = getattr(pipe, "_nets", ())
                inputs = () if not nets else (
                    emb if nets[0].config.joint_attention_dim is not None else None,
                    torch.zeros_like(pooled) if nets[0].config.force_zeros_for_pooled_projection else pooled,
                    *control, (1.0,) * len(nets))
                return pipe._transformer_call(x, t, emb, pooled, *inputs).float().cpu()
        if probe is None:
            cfg = pipe.unet.config
            probe = (torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
                     torch.tensor(pipe.scheduler.config.num_train_timesteps - 1),
                     torch.randn(2, 77, cfg.cross_attention_dim, generator=gen))
            if hasattr(pipe, "text_encoder_2"):  # SDXL: the pooled projection and the size ids
                size = float(cfg.sample_size * pipe.vae_scale_factor)
                # (a refiner's: original size, crop, aesthetic score)
                ids = [size, size, 0.0, 0.0, 6.0] if pipe.requires_aesthetics_score else [size, size, 0.0, 0.0,
                                                                                           size, size]
                probe += (torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=gen),
                          torch.tensor([ids] * 2))
            for net in getattr(pipe, "_nets", ()):  # a conditioning image per ControlNet, in [0, 1]
                side = cfg.sample_size * net.image_scale
                probe += (torch.rand(2, net.config.conditioning_channels, side, side, generator=gen),)
            for adapter in getattr(pipe, "_adapters", ()):  # and per T2I-Adapter
                side = cfg.sample_size * pipe.vae_scale_factor
                probe += (torch.rand(2, adapter.config.in_channels, side, side, generator=gen),)
        with backend(name), torch.no_grad():
            x, t, emb, *cond = (v.to(device=device, dtype=pipe.dtype if v.is_floating_point() else v.dtype)
                                for v in probe)
            if hasattr(pipe, "_nets"):  # each net at scale 1, no guess mode
                if "mask" in pipe._added_names:  # an inpainting UNet's: the nets take the latents alone, and the
                    latent = pipe.vae.config.latent_channels  # mask inputs come after SDXL's added conditioning
                    x, mask, masked = x[:, :latent], x[:, latent:latent + 1], x[:, latent + 1:]
                    cond[len(pipe._added_names) - 2:len(pipe._added_names) - 2] = [mask, masked]
                settings = ((1.0,) * len(pipe._nets), False, False)
                if hasattr(pipe, "_modes"):  # a union net: its first mode, as the one-hot vector and the setting
                    modes = torch.zeros(2, pipe.controlnet.config.num_control_type)
                    modes[:, 0] = 1.0
                    cond.append(modes.to(device, pipe.dtype))
                    settings += ((0,),)
                cond.append(settings)
            if pipe._unet_takes_image:  # InstructPix2Pix's: the latents, then the image's latents beside them
                latent = pipe.vae.config.latent_channels  # (after SDXL's added conditioning)
                x, cond = x[:, :latent], [*cond, x[:, latent:]]
                if hasattr(pipe, "low_res_scheduler"):  # an x4 upscaler's: the image beside, noise level 20
                    cond.append(torch.full((2,), 20, device=device))
            if hasattr(pipe, "_adapters"):  # each adapter's feature maps at scale 1
                n = len(pipe._adapters)
                cond = [*cond[:-n], *pipe._adapter_states(cond[-n:], [1.0] * n, x.shape, 1, False)]
            dim = pipe.unet.config.time_cond_proj_dim  # an LCM-distilled UNet's: the embedding of the call's 7.5 - 1
            timestep_cond = None if dim is None else guidance_scale_embedding(torch.full((2,), 6.5), dim).to(
                device, pipe.dtype)
            return pipe._unet_call(x, t, emb, *cond, timestep_cond=timestep_cond).float().cpu()

    pipe = load(dtype)
    fast_latents, fast, fast_eps = run(pipe, "fast")
    ref_pipe = pipe if dtype == torch.float32 else load(torch.float32)
    ref_latents, ref, ref_eps = run(ref_pipe, "reference")
    ref_decoded = decode(ref_pipe, ref_latents, "reference")

    def rel(a, b):
        return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()

    model = "transformer velocity prediction" if hasattr(pipe, "transformer") else "UNet noise prediction"
    stages = {"model": model, "unet_rel_err": rel(fast_eps, ref_eps),
              "latents_rel_err": rel(fast_latents, ref_latents),
              "vae_psnr_db": psnr(decode(pipe, ref_latents, "fast"), ref_decoded)}
    diff = max_abs_err(torch.from_numpy(fast), torch.from_numpy(ref))
    quality = psnr(fast, ref)
    sampler = type(pipe.scheduler).__name__.replace("Scheduler", "").replace("Discrete", "").replace("Multistep", "")
    kind = pipeline_kind(pipe)
    lcm = "LCM-distilled UNet, " if getattr(_denoiser(pipe).config, "time_cond_proj_dim", None) is not None else ""
    row = {"check": f"{kind} pipeline ({lcm}{args.steps} {sampler} steps, {str(dtype).replace('torch.', '')})",
           "max_abs_err": diff, "psnr_db": quality, "stages": stages}
    if dtype == torch.float32:
        row.update(passed=diff <= PIPELINE_FP32_MAX_ABS, rule=f"max abs <= {PIPELINE_FP32_MAX_ABS:g}")
    else:
        base_latents, base, base_eps = run(pipe, "reference")  # plain PyTorch in the same low precision
        row["baseline"] = {"psnr_db": psnr(base, ref), "unet_rel_err": rel(base_eps, ref_eps),
                           "latents_rel_err": rel(base_latents, ref_latents)}
        row.update(passed=quality >= PIPELINE_LOWP_MIN_PSNR,
                   rule=f"PSNR >= {PIPELINE_LOWP_MIN_PSNR:g} dB vs fp32 reference")
    if pipe.device.type == "cuda" and pipe.cuda_graph is not False:
        # The fast path once more without CUDA graphs: separates a graph's replay from the kernels it replays.
        setting, pipe.cuda_graph = pipe.cuda_graph, False
        try:
            no_graph_latents, no_graph, _ = run(pipe, "fast")
        finally:
            pipe.cuda_graph = setting
        row["fast_without_graph"] = {"psnr_db": psnr(no_graph, ref), "latents_rel_err": rel(no_graph_latents,
                                                                                            ref_latents)}
    return row


def _db(value):
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _denoiser(pipe):
    """The pipeline's UNet, or SD3's transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def pipeline_kind(pipe):
    """"inpainting", "image-to-image" (an SDXL refiner's folder loads as such), "text-to-image", "SD3 text-to-image",
    "SD3 image-to-image", "SD3 inpainting", "SD3 ControlNet", "SD3 ControlNet inpainting",
    "InstructPix2Pix", "x4 upscaler", "depth-to-image", "image variation",
    or one of the first three guided by the folder's ControlNets ("ControlNet", "ControlNet image-to-image",
    "ControlNet inpainting"), or text-to-image guided by its T2I-Adapters ("T2I-Adapter") or its ControlNet-Union net
    ("ControlNet-Union"); with PAG (a PAG folder's) "PAG " before the kind ("PAG text-to-image", "PAG ControlNet",
    "PAG SD3 image-to-image")."""
    from .pipeline_controlnet import ControlNetGuidance
    from .pipeline_img2img import _ImageToImage
    from .pipeline_inpaint import _Inpainting
    from .pipeline_pag import PAGSettings
    from .pipeline_pix2pix import _InstructPix2Pix
    from .pipeline_t2i_adapter import AdapterGuidance
    from .pipeline_depth2img import StableDiffusionDepth2ImgPipeline
    from .pipeline_sd3 import StableDiffusion3Pipeline
    from .pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline
    from .pipeline_sd3_inpaint import StableDiffusion3InpaintPipeline
    from .pipeline_upscale import StableDiffusionUpscalePipeline
    from .pipeline_variation import StableDiffusionImageVariationPipeline

    if isinstance(pipe, StableDiffusion3InpaintPipeline):
        return "SD3 inpainting"
    if isinstance(pipe, StableDiffusion3ControlNetPipeline):
        return "SD3 ControlNet inpainting" if pipe._inpainting else "SD3 ControlNet"
    pag = "PAG " if isinstance(pipe, PAGSettings) else ""
    if isinstance(pipe, StableDiffusion3Pipeline):
        return pag + ("SD3 image-to-image" if isinstance(pipe, _ImageToImage) else "SD3 text-to-image")
    if isinstance(pipe, StableDiffusionImageVariationPipeline):
        return "image variation"
    if isinstance(pipe, StableDiffusionDepth2ImgPipeline):
        return "depth-to-image"
    if isinstance(pipe, AdapterGuidance):
        return "T2I-Adapter"
    if isinstance(pipe, _InstructPix2Pix):  # (SD's or SDXL's)
        return "InstructPix2Pix"
    if isinstance(pipe, StableDiffusionUpscalePipeline):
        return "x4 upscaler"
    kind = "inpainting" if isinstance(pipe, _Inpainting) else "image-to-image" if isinstance(pipe, _ImageToImage) \
        else "text-to-image"
    if isinstance(pipe, ControlNetGuidance):
        union = "-Union" if hasattr(pipe, "_modes") else ""
        kind = f"ControlNet{union}" if kind == "text-to-image" else f"ControlNet{union} {kind}"
    return pag + kind


def pipeline_inputs(pipe, seed, steps):
    """(kind, the call's inputs beyond the prompt): an inpainting pipeline's image and mask, an image-to-image one's
    image (an SDXL refiner's folder), an InstructPix2Pix one's image to edit, an x4 upscaler's image (at the
    latents' size), a depth-to-image one's image (its depth from the folder's estimator), a ControlNet or T2I-Adapter
    one's conditioning image (as ``control_image`` beside an image), made
    from the seed at the UNet's default size, and a strength that leaves at least one of ``steps`` to run (half the
    schedule for image-to-image, all of it for inpainting); none for text-to-image."""
    import numpy as np
    from PIL import Image

    pag_kind = pipeline_kind(pipe)
    kind = pag_kind.removeprefix("PAG ")  # (PAG at the pipeline's scale, 3 by default: nothing more to give)
    if kind.endswith("text-to-image"):  # (SD's, SDXL's or SD3's)
        return pag_kind, {}
    # (an upscaler's image is at the latents' size: it conditions the UNet beside them)
    size = _denoiser(pipe).config.sample_size * (1 if kind == "x4 upscaler" else pipe.vae_scale_factor)
    ramp = np.linspace(0, 255, size)
    rng = np.random.default_rng(seed)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                      np.full((size, size), 128.0)], axis=-1) + rng.normal(0, 20, (size, size, 3))
    image = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    nets = len(getattr(pipe, "_nets", ()))
    per_net = image if nets == 1 else [image] * nets  # (a ControlNet pipeline's conditioning image for each net)
    union = {"control_mode": 0} if hasattr(pipe, "_modes") else {}  # (a union net: the image in its first mode)
    if kind == "SD3 ControlNet":  # (encoded by the VAE: its posterior sampled with the global generator)
        return pag_kind, {"control_image": per_net}
    if kind == "SD3 ControlNet inpainting":  # the image to inpaint is each net's, with the mask
        return pag_kind, {"control_image": per_net, "control_mask": _middle_mask(size)}
    if kind == "ControlNet":  # the image conditions each net; the size is the UNet's default
        return pag_kind, {"image": per_net}
    if kind == "ControlNet-Union":
        return pag_kind, {"control_image": image, **union}
    # the image to edit, upscale or vary, its size the UNet's default
    if kind in ("InstructPix2Pix", "x4 upscaler", "image variation"):
        return pag_kind, {"image": image}
    if kind == "T2I-Adapter":  # the image (grayscale for a sketch adapter) conditions each adapter
        images = [image.convert("L") if a.config.in_channels == 1 else image for a in pipe._adapters]
        return pag_kind, {"image": images[0] if len(images) == 1 else images}
    inputs = {"image": image, "strength": 1.0 if kind.endswith("inpainting") else max(0.5, 1 / steps)}
    if kind.startswith("ControlNet"):  # the same image as the start and each net's condition
        inputs.update(control_image=per_net, **union)
    if kind.endswith("inpainting"):
        inputs["mask_image"] = _middle_mask(size)
    return pag_kind, inputs


def _middle_mask(size):
    """A size x size mask, white (repainted) in the middle half of each side."""
    import numpy as np
    from PIL import Image

    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return Image.fromarray(mask)


def run_check(args, device, dtype) -> int:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"diffusion-fast check on {device} ({dtype}); ops: 2x rule vs float64 reference")
    rows = check_ops(device, dtype, args.seed)
    print(f"{'check':40s} {'max abs err':>12s} {'PyTorch err':>12s}  result")
    for r in rows:
        print(f"{r['check']:40s} {r['max_abs_err']:12.3e} {r['pytorch_err']:12.3e}  {'PASS' if r['passed'] else 'FAIL'}")
    p = check_pipeline(args, device, dtype)
    print(f"{p['check']:40s} max abs pixel diff {p['max_abs_err']:.3e}, PSNR {_db(p['psnr_db'])} dB ({p['rule']})  "
          f"{'PASS' if p['passed'] else 'FAIL'}")
    st = p["stages"]
    print(f"  stages vs fp32 reference: {st['model']} rel err {st['unet_rel_err']:.2e}, final latents rel "
          f"err {st['latents_rel_err']:.2e}, VAE decode PSNR {_db(st['vae_psnr_db'])} dB")
    if "fast_without_graph" in p:
        g = p["fast_without_graph"]
        print(f"  the fast path without CUDA graphs: PSNR {_db(g['psnr_db'])} dB, latents rel err "
              f"{g['latents_rel_err']:.2e}")
    if "baseline" in p:
        b = p["baseline"]
        print(f"  plain PyTorch in {str(dtype).replace('torch.', '')} (reference path) for comparison: PSNR "
              f"{_db(b['psnr_db'])} dB, UNet rel err {b['unet_rel_err']:.2e}, latents rel err {b['latents_rel_err']:.2e}")
    failed = [r["check"] for r in rows + [p] if not r["passed"]]
    print(f"{len(rows) + 1 - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0
