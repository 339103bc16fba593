"""diffusion_fast.accelerate / restore on tiny diffusers pipelines: same images, our ops really run, undo is exact."""
import numpy as np
import pytest
import torch
from conftest import DEVICE, ON_GPU

import _tiny_diffusers
from _fake_graphs import use_fake_graphs
import diffusion_fast
from diffusion_fast import ops
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS


def _images(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe("a red cube", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.fixture(params=["sd1", "sd2"])
def pipe(request):
    return _tiny_diffusers.pipeline(request.param, seed=2)


@pytest.mark.parametrize("kwargs", [{}, {"eta": 0.5}, {"height": 48, "width": 64}])
def test_same_images_and_exact_restore(pipe, kwargs):
    # eta > 0 draws DDIM noise from the generator inside our fused step; 48x64 is a non-square size (no rebuild).
    before = _images(pipe, **kwargs)
    diffusion_fast.accelerate(pipe, attention=True)  # our attention processor too, wherever the tests run
    fast = _images(pipe, **kwargs)
    assert np.abs(fast - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe, **kwargs), before)


def test_patched_modules_really_run_our_ops(pipe, monkeypatch):
    counts = {"_group_norm_silu": 0, "_attention": 0, "ddim_step": 0}  # the patches call the unchecked entries
    for name in counts:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    diffusion_fast.accelerate(pipe, attention=True)  # on the CPU "auto" leaves attention to diffusers (see below)
    report = pipe._diffusion_fast_report
    _images(pipe, num_inference_steps=2)
    unet_resnets = sum(1 for m in pipe.unet.modules() if type(m).__name__ == "ResnetBlock2D")
    vae_dec_resnets = sum(1 for m in pipe.vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    # per UNet call: 2 fused ops per resnet + conv_norm_out; 2 UNet calls (steps); then one VAE decode
    assert counts["_group_norm_silu"] == 2 * (2 * unet_resnets + 1) + 2 * vae_dec_resnets + 1
    assert counts["_attention"] > 0 and counts["ddim_step"] == 2
    assert report["resnets"] > 0 and report["attention"] > 0 and report["scheduler"] == 1
    diffusion_fast.restore(pipe)


def test_unsupported_pieces_are_left_alone_and_listed(caplog):
    from diffusers import SASolverScheduler

    pipe = _tiny_diffusers.pipeline("sd1")
    pipe.scheduler = SASolverScheduler.from_config(pipe.scheduler.config)  # no fused step
    block = pipe.unet.down_blocks[0].resnets[0]
    block.time_embedding_norm = "scale_shift"  # a resnet setting accelerate does not mirror
    before = pipe.scheduler.step
    with caplog.at_level("INFO", logger="diffusion_fast"):
        diffusion_fast.accelerate(pipe)
    skipped = pipe._diffusion_fast_report["skipped"]
    assert any("SASolverScheduler" in s for s in skipped)
    assert any("down_blocks.0.resnets.0" in s for s in skipped)
    assert "forward" not in block.__dict__ and pipe.scheduler.step == before
    assert "left alone" in caplog.text
    diffusion_fast.restore(pipe)


def test_idempotent_and_bad_arguments(pipe):
    assert diffusion_fast.accelerate(diffusion_fast.accelerate(pipe)) is pipe
    diffusion_fast.restore(pipe)
    diffusion_fast.restore(pipe)  # restoring twice is a no-op
    with pytest.raises(TypeError, match="pipe must be a diffusers Stable Diffusion pipeline"):
        diffusion_fast.accelerate(object())
    with pytest.raises(ValueError, match="cuda_graph must be"):
        diffusion_fast.accelerate(pipe, cuda_graph="sometimes")
    if not ON_GPU:
        with pytest.raises(ValueError, match="cuda_graph=True needs the pipeline on a CUDA device"):
            diffusion_fast.accelerate(pipe, cuda_graph=True)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])  # sdxl: the UNet call carries added_cond_kwargs
def test_cuda_graph_unet_on_gpu(kind):
    pipe = (_tiny_diffusers.pipeline("sd1") if kind == "sd1" else _tiny_diffusers.sdxl_pipeline()).to(
        DEVICE, torch.float16)
    before = _images(pipe)
    diffusion_fast.accelerate(pipe)
    assert pipe._diffusion_fast_report["cuda_graph"] == 1
    first, second = _images(pipe), _images(pipe)  # capture, then replay
    assert len(pipe.unet.forward.graphed) == 1  # one graph for the one shape: no call fell back to eager
    assert np.abs(first - before).max() < 2e-2 and np.array_equal(first, second)
    diffusion_fast.restore(pipe)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_pipelines_keep_their_images(task):
    """accelerate takes any SD pipeline built on the same components: img2img starts part-way through the
    timesteps (strength), inpainting blends a masked init image at every step."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    components = _tiny_diffusers.pipeline("sd1", seed=2).components
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if task == "img2img":
        pipe, extra = StableDiffusionImg2ImgPipeline(**components), {"image": image, "strength": 0.6}
    else:
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1
        pipe, extra = StableDiffusionInpaintPipeline(**components), {"image": image, "mask_image": mask}
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe, num_inference_steps=4, **extra)
    diffusion_fast.accelerate(pipe, attention=True)
    assert pipe._diffusion_fast_report["scheduler"] == 1 and pipe._diffusion_fast_report["resnets"] > 0
    assert np.abs(_images(pipe, num_inference_steps=4, **extra) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe, num_inference_steps=4, **extra), before)


def _add_lora(pipe, name="a"):
    """A PEFT LoRA on the attention projections and the resnet convs, as pipe.load_lora_weights would add; random
    (not zero) up-projections, so the adapter changes the image."""
    # CI installs peft (the test extra); the offline GPU image may lack it or its dependencies: skip there, said so
    peft = pytest.importorskip("peft", reason="peft (LoRA) is not installed") if ON_GPU else __import__("peft")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets),
                          adapter_name=name)


def test_lora_adapters_run_through_the_patched_modules():
    """A user's LoRA lives in PEFT layers wrapping the projections and convs our patched resnets and attention
    processor call: the same images as diffusers with the same adapter, also after a scale change made after
    accelerate."""
    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    base = _images(pipe)
    _add_lora(pipe)
    with_lora = _images(pipe)
    assert np.abs(with_lora - base).max() > 0.05  # the adapter matters, so skipping it would fail below
    diffusion_fast.accelerate(pipe, attention=True)
    assert pipe._diffusion_fast_report["resnets"] > 0 and pipe._diffusion_fast_report["attention"] > 0
    assert np.abs(_images(pipe) - with_lora).max() <= PIPELINE_FP32_MAX_ABS
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    half = _images(pipe)
    diffusion_fast.restore(pipe)
    assert np.abs(half - _images(pipe)).max() <= PIPELINE_FP32_MAX_ABS
    assert np.abs(half - with_lora).max() > 0.02


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_follows_a_lora_added_and_rescaled_after_capture():
    """A graph bakes in the modules and the Python scales it captured: a LoRA added, or rescaled, after the first
    image must reach the next image (the graph is recaptured), as in diffusers without accelerate."""
    pipe = _tiny_diffusers.pipeline("sd1", seed=2).to(DEVICE, torch.float16)
    diffusion_fast.accelerate(pipe)
    before = _images(pipe)  # captured without the adapter
    _add_lora(pipe)
    graphed_lora = _images(pipe)
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    graphed_half = _images(pipe)
    assert len(pipe.unet.forward.graphed) == 1  # the stale graphs were dropped
    diffusion_fast.restore(pipe)
    eager_half = _images(pipe)
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    eager_lora = _images(pipe)
    assert np.abs(graphed_lora - before).max() > 0.05 and np.abs(graphed_half - graphed_lora).max() > 0.02
    assert np.abs(graphed_lora - eager_lora).max() < 2e-2 and np.abs(graphed_half - eager_half).max() < 2e-2


def test_sequential_offload_hooks_keep_their_modules():
    """Sequential CPU offload leaves the weights on the meta device and loads each leaf's weights in a hook at its
    call. A fused op that read a norm's weights without calling it got meta tensors (NaN images, then restore failed
    on channels_last). Now hooked norms keep their own calls, hooked models keep their layout, and the images match.
    The hooks run here with the CPU as the execution device."""
    from accelerate import cpu_offload

    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    before = _images(pipe)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        cpu_offload(model, execution_device=torch.device("cpu"))
    assert pipe.unet.conv_norm_out.weight.device.type == "meta"
    diffusion_fast.accelerate(pipe, attention=True)
    report = pipe._diffusion_fast_report
    assert report["resnets"] == report["norm_out"] == report["channels_last"] == 0 and report["attention"] > 0
    assert any("sequential CPU offload" in item for item in report["skipped"])
    assert np.abs(_images(pipe) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe), before)


def test_model_level_hook_is_wrapped_by_the_graph_and_put_back(monkeypatch):
    """enable_model_cpu_offload puts one hook on the whole UNet (an instance forward that moves it before each call).
    The graph wraps that forward, and restore puts it back rather than deleting it. Run on the CPU with accelerate
    told the pipeline runs on CUDA, so the CUDA configuration is built (its graph helper calls through eagerly)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    before = _images(pipe)
    add_hook_to_module(pipe.unet, ModelHook())
    hooked_forward = vars(pipe.unet)["forward"]
    monkeypatch.setattr(diffusers_patch, "_execution_device", lambda pipe: torch.device("cuda"))
    diffusion_fast.accelerate(pipe)
    assert pipe._diffusion_fast_report["cuda_graph"] == 1 and pipe.unet.forward is not hooked_forward
    assert np.abs(_images(pipe) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert vars(pipe.unet)["forward"] is hooked_forward and np.array_equal(_images(pipe), before)


def test_layerwise_casting_keeps_the_model_out_of_graphs(monkeypatch):
    """diffusers' layerwise casting stores weights in fp8 and casts each leaf's weights in a hook at its call (new
    tensors every call): such a model stays eager, and says so. The CUDA configuration, built on the CPU as above."""
    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    if not hasattr(pipe.unet, "enable_layerwise_casting"):
        pytest.skip("diffusers < 0.32 has no layerwise casting")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = _images(pipe)
    monkeypatch.setattr(diffusers_patch, "_execution_device", lambda pipe: torch.device("cuda"))
    diffusion_fast.accelerate(pipe)
    report = pipe._diffusion_fast_report
    assert report["cuda_graph"] == 0 and not hasattr(pipe.unet.forward, "graphed")
    assert any(item.startswith("CUDA graph for UNet2DConditionModel") for item in report["skipped"])
    assert report["resnets"] > 0  # the norms are not cast (diffusers skips them), so the resnets are still fused
    assert np.abs(_images(pipe) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe), before)


def test_model_level_offload_hooks_keep_channels_last():
    """The hooks enable_model_cpu_offload puts on each model (accelerate's cpu_offload_with_hook; here with the CPU
    as the execution device) move a model whole before its forward, in its memory format: the UNet and VAE still go
    to channels_last (on CUDA too, since "auto" picks it there), the image is unchanged, restore converts back."""
    from accelerate import cpu_offload_with_hook

    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    before = _images(pipe)
    for model in (pipe.unet, pipe.vae):
        cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
    diffusion_fast.accelerate(pipe)
    assert pipe._diffusion_fast_report["channels_last"] == 2
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(_images(pipe) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert pipe.unet.conv_in.weight.is_contiguous() and pipe.vae.decoder.conv_in.weight.is_contiguous()


@pytest.mark.skipif(not ON_GPU, reason="CPU offload hooks need a GPU")
def test_model_cpu_offload_then_accelerate_graphs_and_keeps_images():
    """enable_model_cpu_offload keeps the UNet on the CPU between calls: accelerate must see the GPU it runs on (our
    attention, a graph, channels_last for the UNet and VAE: the hook on each model moves it whole, in its layout), and
    the UNet's return to the GPU for each image (new addresses) must not replay stale ones."""
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs Hugging Face accelerate")
    pipe = _tiny_diffusers.pipeline("sd1", seed=2).to(torch.float16)
    pipe.enable_model_cpu_offload()
    before = _images(pipe)
    diffusion_fast.accelerate(pipe)
    report = pipe._diffusion_fast_report
    assert report["cuda_graph"] == 1 and report["attention"] > 0 and report["channels_last"] == 2
    first, second = _images(pipe), _images(pipe)
    assert np.abs(first - before).max() < 2e-2 and np.abs(second - first).max() < 2e-2
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    diffusion_fast.restore(pipe)
    assert pipe.unet.conv_in.weight.is_contiguous()


@torch.no_grad()  # as diffusers' pipelines call the UNet: with autograd on, it runs eagerly
def test_graph_wrapper_takes_every_tensor_argument_and_announces_eager_calls():
    """The graph wrapper's call path, run on the CPU (where the graph helper calls through eagerly): SDXL's UNet call
    goes through the helper at every step with its added_cond_kwargs as graph inputs, and gives the same images bit
    for bit. A ControlNet residual is a graph input too. A timestep given as a Python number runs eagerly (each value
    would need a graph of its own), with one warning naming it."""
    import warnings

    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.sdxl_pipeline(seed=3)
    before = _images(pipe)
    diffusers_patch._graph_models(pipe, {"skipped": []})
    graphed = pipe.unet.forward.graphed
    calls, fn = [], graphed.fn
    graphed.fn = lambda spec, *tensors: calls.append(len(tensors)) or fn(spec, *tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(_images(pipe), before)
    assert calls == [5] * 3  # sample, t, prompt embeds, text_embeds, time_ids: one batched (CFG) call per step

    sample = torch.randn(2, 4, 4, 4)
    hidden = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 24), "time_ids": torch.randn(2, 6)}
    shapes = []  # what a ControlNet returns: a residual per down-block output (conv_in's first), one for the mid block
    hooks = [pipe.unet.conv_in.register_forward_hook(lambda m, i, out: shapes.append(out.shape))]
    hooks += [block.register_forward_hook(lambda m, i, out: shapes.extend(r.shape for r in out[1]))
              for block in pipe.unet.down_blocks]
    hooks.append(pipe.unet.mid_block.register_forward_hook(lambda m, i, out: shapes.append(out.shape)))
    plain = pipe.unet(sample, torch.tensor(10), hidden, added_cond_kwargs=added).sample
    for hook in hooks:
        hook.remove()
    residuals = {"down_block_additional_residuals": tuple(torch.randn(shape) for shape in shapes[:-1]),
                 "mid_block_additional_residual": torch.randn(shapes[-1])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pipe.unet(sample, torch.tensor(10), hidden, added_cond_kwargs=added, **residuals).sample
    assert calls[-1] == 5 + len(shapes) and not torch.equal(out, plain)  # the residuals went in, as graph inputs
    eager = type(pipe.unet).forward(pipe.unet, sample, torch.tensor(10), hidden, added_cond_kwargs=added,
                                    **residuals).sample  # the class's own forward
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="UNet2DConditionModel call has a timestep that is not a tensor"):
        out = pipe.unet(sample, 10, hidden, added_cond_kwargs=added).sample
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced once
        pipe.unet(sample, 10, hidden, added_cond_kwargs=added)
    assert len(calls) == 5  # the two calls with a Python-number timestep did not go through the helper
    del pipe.unet.forward


@torch.no_grad()
def test_graphed_unet_outputs_survive_the_next_call():
    """diffusers' SAG pipeline keeps one UNet output while it calls the UNet again at the same shape, and a replay
    overwrites the graph's static output: the wrapper must hand out copies. Run on the CPU with capture stood in for
    (every call is "captured"; a replay runs the call into the static output, as a real one writes it)."""
    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    diffusers_patch._graph_models(pipe, {"skipped": []})
    graphed = use_fake_graphs(pipe.unet.forward.graphed)
    hidden = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    first = pipe.unet(torch.randn(2, 4, 4, 4), torch.tensor(10), hidden).sample
    kept = first.clone()
    second = pipe.unet(torch.randn(2, 4, 4, 4), torch.tensor(10), hidden).sample
    assert graphed.captures == 1 and len(graphed) == 1  # the second call replayed the first call's graph
    assert torch.equal(first, kept) and not torch.equal(first, second)
    _add_lora(pipe)  # the graph watches the UNet (ModuleState): new LoRA layers mean a new capture
    pipe.unet(torch.randn(2, 4, 4, 4), torch.tensor(10), hidden)
    assert graphed.captures == 2
    with torch.enable_grad(), pytest.warns(RuntimeWarning, match="autograd enabled"):
        out = pipe.unet(torch.randn(2, 4, 4, 4), torch.tensor(10), hidden).sample  # e.g. attend-and-excite
    assert out.requires_grad and graphed.captures == 2  # eager: a replay would have recorded no gradients
    del pipe.unet.forward


def _controlnet_images(pipe, nets, **kwargs):
    cond = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return _images(pipe, image=cond if nets == 1 else [cond, cond.flip(-1)], **kwargs)


@pytest.mark.parametrize("variant, nets", [
    ("sd1", 1),
    ("sd1", 2),  # a MultiControlNetModel, whose nets are called with keywords only
    ("sdxl", 1),  # SDXL's ControlNet takes added_cond_kwargs too
])
def test_controlnet_pipelines_keep_their_images_and_every_call_can_be_graphed(variant, nets):
    """ControlNet pipelines: the ControlNets' resnets and attention are ours too, the images stay within the fp32
    tolerance and come back bit-identical after restore. With capture stood in for on the CPU, the UNet's call (with
    the ControlNet residuals as graph inputs) and each ControlNet's call are graphed once and replayed at every step,
    and the image is the eager one bit for bit."""
    import warnings

    from diffusion_fast import diffusers_patch

    pipe = _tiny_diffusers.controlnet_pipeline(seed=4, nets=nets, variant=variant)
    before = _controlnet_images(pipe, nets)
    no_control = _controlnet_images(pipe, nets, controlnet_conditioning_scale=0.0 if nets == 1 else [0.0, 0.0])
    assert np.abs(before - no_control).max() > 0.05  # the residuals matter, so dropping one would fail below
    unet_only = _tiny_diffusers.pipeline("sd1", seed=4) if variant == "sd1" else _tiny_diffusers.sdxl_pipeline(seed=4)
    diffusion_fast.accelerate(unet_only, attention=True)
    diffusion_fast.accelerate(pipe, attention=True)
    report, report_without = pipe._diffusion_fast_report, unet_only._diffusion_fast_report
    assert report["resnets"] > report_without["resnets"] and report["attention"] > report_without["attention"]
    assert np.abs(_controlnet_images(pipe, nets) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_controlnet_images(pipe, nets), before)

    graphed = [use_fake_graphs(model.forward.graphed)
               for model, _ in diffusers_patch._graph_models(pipe, {"skipped": []})]
    assert len(graphed) == 1 + nets
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no call fell back to eager
        assert np.array_equal(_controlnet_images(pipe, nets), before)
    assert [g.captures for g in graphed] == [1] * (1 + nets) and all(len(g) == 1 for g in graphed)
    if variant == "sd1" and nets == 1:  # a direct call with return_dict=True gets diffusers' output class
        with torch.no_grad():
            out = pipe.controlnet(torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 77, 32),
                                  controlnet_cond=torch.rand(2, 3, 32, 32))
        assert type(out).__name__ == "ControlNetOutput" and out.mid_block_res_sample.shape[0] == 2
        assert graphed[1].captures == 2  # its own signature, through the graph helper


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_controlnet_pipeline_graphs_on_gpu():
    pipe = _tiny_diffusers.controlnet_pipeline(seed=4).to(DEVICE, torch.float16)
    before = _controlnet_images(pipe, 1)
    diffusion_fast.accelerate(pipe)
    assert pipe._diffusion_fast_report["cuda_graph"] == 2  # the UNet and the ControlNet
    first, second = _controlnet_images(pipe, 1), _controlnet_images(pipe, 1)  # capture, then replay
    assert len(pipe.unet.forward.graphed) == 1 and len(pipe.controlnet.forward.graphed) == 1
    assert np.abs(first - before).max() < 2e-2 and np.array_equal(first, second)
    diffusion_fast.restore(pipe)


@pytest.mark.skipif(ON_GPU, reason="the CPU default")
def test_cpu_default_leaves_attention_to_diffusers_and_says_so(caplog):
    import logging

    pipe = _tiny_diffusers.pipeline("sd1")
    processors = [type(m.processor) for m in pipe.unet.modules() if type(m).__name__ == "Attention"]
    with caplog.at_level(logging.INFO, logger="diffusion_fast"):
        diffusion_fast.accelerate(pipe)
    assert [type(m.processor) for m in pipe.unet.modules() if type(m).__name__ == "Attention"] == processors
    report = pipe._diffusion_fast_report
    assert report["attention"] == 0 and report["resnets"] > 0 and any("attention" in s for s in report["skipped"])
    assert "attention=True patches it" in caplog.text
    # channels_last on the CPU: the conv weights are converted, and converted back by restore
    assert report["channels_last"] == 2
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    diffusion_fast.restore(pipe)
    assert pipe.unet.conv_in.weight.is_contiguous() and pipe.vae.decoder.conv_in.weight.is_contiguous()
    with pytest.raises(ValueError, match="attention must be 'auto', True or False"):
        diffusion_fast.accelerate(_tiny_diffusers.pipeline("sd1"), attention="yes")


def test_sdxl_pipeline_same_images_and_exact_restore():
    """StableDiffusionXLPipeline: its resnets, attention and DDIM step are ours. Same images within the fp32
    tolerance, exact restore."""
    pipe = _tiny_diffusers.sdxl_pipeline(seed=3)
    before = _images(pipe)
    assert np.isfinite(before).all() and before.shape == (1, 32, 32, 3)
    diffusion_fast.accelerate(pipe, attention=True)
    report = pipe._diffusion_fast_report
    assert report["resnets"] > 0 and report["attention"] > 0 and report["scheduler"] == 1
    assert np.abs(_images(pipe) - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe), before)


@pytest.mark.parametrize("variant, task", [("sd1", ""), ("sdxl", ""), ("sd1", "Img2Img"), ("sd1", "Inpaint"),
                                           ("sdxl", "Inpaint")])
def test_perturbed_attention_guidance_pipelines_keep_their_images(variant, task):
    """diffusers' PAG pipelines (text-to-image, image-to-image, inpainting) install their perturbed-attention
    processors on the applied layers at each call and put the pipeline's back after it: with ours patched in
    (attention=True, as on the GPU) they still run on the mid block, and the image is the same; restore() undoes it
    exactly."""
    import diffusers

    base = _tiny_diffusers.pipeline("sd1", seed=3) if variant == "sd1" else _tiny_diffusers.sdxl_pipeline(seed=3)
    components = {k: v for k, v in base.components.items()
                  if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    cls = getattr(diffusers, f"StableDiffusion{'XL' if variant == 'sdxl' else ''}PAG{task}Pipeline")
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) if variant == "sd1" else {}
    pipe = cls(**components, **extra, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    inputs = {} if not task else {"image": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                                  "strength": 0.75}
    if task == "Inpaint":
        inputs["mask_image"] = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    before = _images(pipe, pag_scale=3.0, **inputs)
    assert np.abs(_images(pipe, pag_scale=0.0, **inputs) - before).max() > 0.005  # the perturbed branch matters
    diffusion_fast.accelerate(pipe, attention=True)
    try:
        assert np.abs(_images(pipe, pag_scale=3.0, **inputs) - before).max() <= PIPELINE_FP32_MAX_ABS
    finally:
        diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe, pag_scale=3.0, **inputs), before)
