"""The fused (CFG+)DDIM Triton kernel against the float64 reference and against diffusers' DDIMScheduler.step.

Without a GPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one, on CUDA.
"""
import itertools

import pytest
import torch
from conftest import DEVICE, ON_GPU

from _numerics import assert_2x_rule, poisoned_allocations
from diffusion_fast import ops, reference
from diffusion_fast.kernels import ddim as ddim_kernel

FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])  # the interpreter has no bf16 math
SHAPE = (3, 4, 7, 9)  # batch 3 so each sample gets its own alpha (per-sample indexing); 7x9 is an odd latent size


def _alphas(kind):
    if kind == "float":
        return 0.3, 0.45
    if kind == "0-d":
        return torch.tensor(0.3, device=DEVICE), torch.tensor(0.45, device=DEVICE)
    # per-sample, all different: a noisy first step, a middle one, and the final step (alpha_prev = 1, as with
    # set_alpha_to_one) where the direction and noise terms vanish
    return torch.tensor([0.05, 0.5, 0.93], device=DEVICE), torch.tensor([0.1, 0.62, 1.0], device=DEVICE)


def _d(a, dtype):
    return a.to(dtype) if torch.is_tensor(a) else a


def _check_2x(out, ref64, plain, dtype):
    for i, name in enumerate(("prev_sample", "pred_original_sample")):
        assert out[i].dtype == dtype and out[i].is_contiguous()
        scale = max(1.0, ref64[i].abs().max().item())  # x0 = x / sqrt(0.05) reaches ~20: compare relative
        assert_2x_rule(out[i] / scale, ref64[i] / scale, plain[i] / scale, floor=FLOOR[dtype], what=name)


@pytest.mark.parametrize("prediction_type, eta, clip, use_clipped", [
    c for c in itertools.product(["epsilon", "v_prediction", "sample"], [0.0, 0.8], [None, 1.5], [False, True])
    if not (c[3] and c[2] is None)  # the clipped model output only differs when clipping
])
@pytest.mark.parametrize("alphas", ["float", "0-d", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
def test_ops_match_reference(prediction_type, eta, clip, use_clipped, alphas, dtype, cfg):
    gen = torch.Generator().manual_seed(7)
    u, t, x, noise = (torch.randn(SHAPE, generator=gen).to(DEVICE, dtype) for _ in range(4))
    a_t, a_prev = _alphas(alphas)
    kw = dict(eta=eta, variance_noise=noise if eta > 0 else None, prediction_type=prediction_type,
              clip_sample_range=clip, use_clipped_model_output=use_clipped)

    def run_reference(dt):  # the reference in dt; upcast=False so fp16 really computes in fp16 (the 2x rule's base)
        args = (u.to(dt), t.to(dt), 7.5) if cfg else (u.to(dt),)
        kwx = dict(kw, variance_noise=noise.to(dt) if eta > 0 else None)
        fn = reference.cfg_ddim_step if cfg else reference.ddim_step
        return fn(*args, x.to(dt), _d(a_t, dt), _d(a_prev, dt), **kwx)

    with poisoned_allocations():
        if cfg:
            out = ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev, backend="triton", **kw)
        else:
            out = ops.ddim_step(u, x, a_t, a_prev, backend="triton", **kw)
    _check_2x(out, run_reference(torch.float64), run_reference(dtype), dtype)


@pytest.mark.parametrize("shape", [
    (3, 4, 7, 9),  # odd latent, batch 3
    (3, 4, 1, 1),  # a 1x1 map: 4 elements per sample, most of the block masked
    (2, 4, 17, 19),  # 1292 elements per sample: more than one block per sample, with a ragged tail
    (1, 4, 8, 8),  # batch 1, per_sample a multiple of 16 (Triton specialises such ints)
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_directly(shape, dtype):
    gen = torch.Generator().manual_seed(11)
    u, t, x, noise = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(4))
    a_t = torch.linspace(0.1, 0.8, shape[0]).to(DEVICE)
    a_prev = (a_t + 0.07).to(DEVICE)
    with poisoned_allocations():
        out = ddim_kernel.cfg_ddim_step(u, t, 5.0, x, a_t, a_prev, 0.6, noise, "epsilon", 2.0, True)
    ref = [reference.cfg_ddim_step(u.to(dt), t.to(dt), 5.0, x.to(dt), a_t.to(dt), a_prev.to(dt), eta=0.6,
                                   variance_noise=noise.to(dt), clip_sample_range=2.0, use_clipped_model_output=True)
           for dt in (torch.float64, dtype)]
    _check_2x(out, ref[0], ref[1], dtype)


def test_channels_last_and_strided_inputs():
    # the launcher copies non-contiguous inputs once; outputs are always contiguous
    base = torch.randn(4, 4, 8, 8, device=DEVICE)
    u, t = base[:2].transpose(2, 3), base[2:].transpose(2, 3)  # strided halves
    x = torch.randn(2, 4, 7, 9, device=DEVICE)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    u2, t2 = (torch.randn_like(x).contiguous(memory_format=torch.channels_last) for _ in range(2))
    for uu, tt, xx in ((u, t, torch.randn(2, 4, 8, 8, device=DEVICE)), (u2, t2, x_cl)):
        with poisoned_allocations():
            out = ops.cfg_ddim_step(uu, tt, 5.0, xx, 0.4, 0.5, backend="triton")
        ref = reference.cfg_ddim_step(uu, tt, 5.0, xx, 0.4, 0.5)
        for o, r in zip(out, ref):
            assert o.is_contiguous()
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def _diffusers_alphas(sched, timestep):
    """alpha_prod_t and alpha_prod_t_prev exactly as DDIMScheduler.step derives them."""
    prev_t = timestep - sched.config.num_train_timesteps // sched.num_inference_steps  # for every spacing
    a_t = sched.alphas_cumprod[timestep]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    return a_t, a_prev


@pytest.mark.parametrize("config, eta, use_clipped", [
    (dict(prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1), 0.0, False),  # SD1.5's scheduler
    # leading spacing, steps_offset 0: the last timestep is 0, so past the end alpha_prev = alphas_cumprod[0] = a_t
    (dict(prediction_type="epsilon", set_alpha_to_one=False, clip_sample=True), 0.5, True),
    (dict(prediction_type="v_prediction", set_alpha_to_one=True, timestep_spacing="trailing"), 0.0, False),
    (dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=1.5, timestep_spacing="linspace"),
     1.0, False),
    (dict(prediction_type="sample", set_alpha_to_one=True, clip_sample=True), 0.3, True),
])
@pytest.mark.parametrize("cfg", [False, True])
def test_matches_diffusers_scheduler_step(config, eta, use_clipped, cfg):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", **config)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(3)
    u, t, x, noise = (torch.randn(3, 4, 5, 6, generator=gen) for _ in range(4))
    # one launch, three samples at three timesteps: the first step, a middle one, and the last (prev_t < 0)
    timesteps = [sched.timesteps[0], sched.timesteps[5], sched.timesteps[-1]]
    alphas = [_diffusers_alphas(sched, ts) for ts in timesteps]
    a_t = torch.stack([a for a, _ in alphas]).to(DEVICE)
    a_prev = torch.stack([p for _, p in alphas]).to(DEVICE)
    clip = sched.config.clip_sample_range if sched.config.clip_sample else None
    kw = dict(eta=eta, variance_noise=noise.to(DEVICE) if eta > 0 else None, prediction_type=config["prediction_type"],
              clip_sample_range=clip, use_clipped_model_output=use_clipped, backend="triton")
    ud, td, xd = (v.to(DEVICE) for v in (u, t, x))
    if cfg:
        ours = ops.cfg_ddim_step(ud, td, 7.5, xd, a_t, a_prev, **kw)
    else:
        ours = ops.ddim_step(ud, xd, a_t, a_prev, **kw)
    for i, timestep in enumerate(timesteps):
        model_output = u[i:i + 1] + 7.5 * (t[i:i + 1] - u[i:i + 1]) if cfg else u[i:i + 1]
        theirs = sched.step(model_output, timestep, x[i:i + 1], eta=eta, use_clipped_model_output=use_clipped,
                            variance_noise=noise[i:i + 1] if eta > 0 else None)
        torch.testing.assert_close(ours[0][i:i + 1].cpu(), theirs.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1][i:i + 1].cpu(), theirs.pred_original_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_reads_alphas_on_device():
    u, t, x = (torch.randn(2, 4, 16, 16, device="cuda") for _ in range(3))
    a_t, a_prev = torch.tensor([0.3, 0.5], device="cuda"), torch.tensor([0.4, 0.6], device="cuda")
    ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev, backend="triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev, backend="triton")
    a_t.copy_(torch.tensor([0.2, 0.7])), a_prev.copy_(torch.tensor([0.25, 0.9]))  # new timestep, same graph
    graph.replay()
    ref = reference.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ops.ddim_step(x[:1], x, 0.3, 0.4), ValueError, "model_output has shape"),
    (lambda x: ops.cfg_ddim_step(x, x[:, :2], 7.5, x, 0.3, 0.4), ValueError, "noise_pred_text has shape"),
    (lambda x: ops.ddim_step(x.half(), x, 0.3, 0.4), TypeError, "model_output has dtype"),
    (lambda x: ops.ddim_step(x.tolist(), x, 0.3, 0.4), TypeError, "model_output must be a torch.Tensor"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.5, variance_noise=x[:, :2]), ValueError, "variance_noise has shape"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.5, variance_noise=x.half()), TypeError, "variance_noise has dtype"),
    (lambda x: ops.ddim_step(x, x, float("nan"), 0.4), ValueError, "alpha_prod_t must be finite"),
    (lambda x: ops.ddim_step(x, x, 0.3, torch.tensor([0.4, float("nan"), 0.2])), ValueError,
     "alpha_prod_t_prev contains NaN"),
    (lambda x: ops.ddim_step(x, x, torch.tensor([0.3, 0.4]), 0.4), ValueError, r"alpha_prod_t must be .* shape \(3,\)"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.5), ValueError, "variance_noise is required when eta > 0"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (lambda x: ops.cfg_ddim_step(x, x, float("inf"), x, 0.3, 0.4), ValueError, "guidance_scale must be finite"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=-1.0), ValueError, "eta must be >= 0"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, clip_sample_range=0.0), ValueError, "clip_sample_range must be > 0"),
])
def test_bad_input_through_ops_names_the_argument(call, error, message):
    x = torch.randn(SHAPE)  # CPU tensors: the NaN checks read CPU alphas, which costs no device sync
    with pytest.raises(error, match=message):
        call(x)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dtype=torch.float64), TypeError, "takes float16, bfloat16 or float32"),
    (dict(eta=0.5), ValueError, "variance_noise is required when eta > 0"),
    (dict(prediction_type="x0"), ValueError, "prediction_type must be one of"),
])
def test_bad_input_to_the_kernel_directly(kwargs, error, message):
    x = torch.randn(SHAPE, device=DEVICE, dtype=kwargs.pop("dtype", torch.float32))
    a = torch.full((3,), 0.5, device=DEVICE)
    args = dict(eta=0.0, variance_noise=None, prediction_type="epsilon", clip_sample_range=None,
                use_clipped_model_output=False)
    with pytest.raises(error, match=message):
        ddim_kernel.ddim_step(x, x, a, a, **dict(args, **kwargs))
