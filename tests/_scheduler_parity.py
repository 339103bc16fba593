"""Scheduler parity with diffusers, step by step: shared by test_schedulers (our schedulers) and
test_accelerate_schedulers (diffusers' schedulers with accelerate's fused steps)."""
import diffusers
import torch

SHAPE = (2, 4, 5, 7)  # odd latent size, batch 2
# fp32 parity with diffusers, relative to max(|x|, 1): 2e-6, widened only where the step is ill-conditioned. With
# alpha_prod_t = 4e-5 (linear schedule, t=999), x0 = (x - sqrt(1-a) eps) / sqrt(a) amplifies one fp32 rounding by
# 1/sqrt(a) = 158, so two implementations that round in a different order (FMA contraction, a fused kernel) differ
# by ~1.4e-5 there (measured), while every step with alpha_prod_t >= 0.01 agrees within ~1e-6.
TOL = 2e-6


def _allowed(theirs, t):
    """The per-step tolerance: TOL, times the x0 amplification 1/sqrt(alpha_prod_t) / 10 where that exceeds 1."""
    if isinstance(theirs, diffusers.EulerDiscreteScheduler):  # its metric is already relative to |x| ~ sigma
        return TOL
    if not hasattr(theirs, "alphas_cumprod"):  # the EDM schedulers: x0 = c_skip x + c_out m, no 1 / sqrt(alpha)
        return TOL
    alpha = float(theirs.alphas_cumprod[int(t)])
    return TOL * max(1.0, 0.1 / max(alpha, 1e-30) ** 0.5)


def _compare(ta, tb):
    """Worst |a - b| / max(|a|, 1) over finite entries; NaN/inf must sit at the same places in both."""
    ta, tb = ta.double(), tb.double()
    for check in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(check(ta), check(tb)), f"non-finite values differ ({check.__name__})"
    finite = torch.isfinite(ta)
    if not finite.any():
        return 0.0
    return ((ta - tb).abs()[finite].max() / ta[finite].abs().max().clamp(min=1)).item()


def _same_timesteps(ours, theirs, atol):
    """The same schedule: values and dtype (int64/fp32), or within ``atol`` where timesteps are interpolated
    fractions (DPM2's midpoints: one fp32 ulp apart; diffusers keeps its Karras ones in float64)."""
    if atol:
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=0, atol=atol)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _loop(ours, theirs, steps=4, dtype=torch.float32, noise="generator", schedule=None, timestep_atol=0.0,
          **step_kwargs):
    """Run both schedulers on the same random model outputs; return the worst difference / its allowed value.

    noise="generator": both draw their step noise from equally seeded generators (diffusers' randn_tensor rules);
    noise="given": DDIM gets the same variance_noise tensor instead; None: no noise argument at all.
    schedule: set_timesteps keywords (else steps).
    """
    ours.set_timesteps(**(schedule or {"num_inference_steps": steps}))
    theirs.set_timesteps(**(schedule or {"num_inference_steps": steps}))
    _same_timesteps(ours.timesteps, theirs.timesteps, timestep_atol)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma).double(),
                               torch.as_tensor(theirs.init_noise_sigma).double(), rtol=1e-6, atol=0)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=gen) * float(theirs.init_noise_sigma)).to(dtype)
    worst = 0.0
    for t in theirs.timesteps:
        model_output = torch.randn(SHAPE, generator=gen).to(dtype)
        scaled_theirs, scaled_ours = theirs.scale_model_input(x, t), ours.scale_model_input(x.clone(), t)
        torch.testing.assert_close(scaled_ours, scaled_theirs, rtol=1e-6, atol=1e-6)
        if noise is None:  # a deterministic scheduler whose step takes no generator (PNDM)
            kw_a = kw_b = dict(step_kwargs)
        elif noise == "given":
            kw_a = kw_b = dict(step_kwargs, variance_noise=torch.randn(SHAPE, generator=gen).to(dtype))
        else:
            kw_a = dict(step_kwargs, generator=torch.Generator().manual_seed(1))
            kw_b = dict(step_kwargs, generator=torch.Generator().manual_seed(1))
        a = theirs.step(model_output, t, scaled_theirs, **kw_a)
        b = ours.step(model_output, t, scaled_ours, **kw_b)
        allowed = _allowed(theirs, t) if dtype == torch.float32 else 1.0
        pairs = [(a.prev_sample, b.prev_sample)]
        for field in ("pred_original_sample", "denoised"):  # (DPM-Solver's output has neither, LCM's the second)
            if hasattr(a, field):
                pairs.append((getattr(a, field), getattr(b, field)))
        for ta, tb in pairs:
            assert tb.dtype == ta.dtype and tb.shape == ta.shape
            worst = max(worst, _compare(ta, tb) / allowed)
        x = a.prev_sample
    return worst


def _loop_by_2x_rule(ours, theirs, exact, steps, timestep_atol=0.0, generator=False, dtype=torch.float32):
    """PNDM's and UniPC's parity: each step of ``ours`` (fp32) within the 2x rule of ``theirs`` (diffusers, fp32)
    against ``exact`` (diffusers' arithmetic in float64: its tables too, so its coefficients are float64 like ours),
    all three fed the same float64 trajectory (``generator``: each step's noise from equally seeded generators;
    ``dtype``: what ours and diffusers are fed, fp32 or fp16).
    With v_prediction at t=999 PNDM's fp32 update cancels (a sample
    coefficient ~158 against a term almost as large), and UniPC's high orders solve an ill-conditioned system, so a
    plain tolerance around diffusers' fp32 numbers would fault the more exact result. Returns the number of steps."""
    from _numerics import assert_2x_rule

    for sched in (ours, theirs, exact):
        sched.set_timesteps(steps)
    for name in ("sigmas", "alphas_cumprod", "final_alpha_cumprod",  # the same values, computed with in float64
                 "sigmas_interpol", "sigmas_up", "sigmas_down"):  # (DPM2's)
        if torch.is_tensor(getattr(exact, name, None)):
            setattr(exact, name, getattr(exact, name).double())
    _same_timesteps(ours.timesteps, exact.timesteps, timestep_atol)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    for i, t in enumerate(exact.timesteps):
        m = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        kw = (lambda: {"generator": torch.Generator().manual_seed(i)}) if generator else dict
        ref = exact.step(m, t, x, **kw()).prev_sample
        plain = theirs.step(m.to(dtype), t, x.to(dtype), **kw()).prev_sample
        fast = ours.step(m.to(dtype), t, x.to(dtype), **kw()).prev_sample
        assert fast.dtype == plain.dtype and fast.shape == plain.shape
        s = max(1.0, ref.abs().max().item())
        floor = 1e-6 if dtype == torch.float32 else 2e-3  # (an fp16 rounding of the result)
        assert_2x_rule(fast / s, ref / s, plain / s, floor=floor, what=f"step {i} (t={int(t)})")
        x = ref
    return len(exact.timesteps)


def assert_add_noise_matches(ours, theirs, steps=8):
    """add_noise with a timestep per sample (training's use) equals diffusers', after set_timesteps(steps)."""
    x, noise = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    for sched in (ours, theirs):
        sched.set_timesteps(steps)
    ts = theirs.timesteps[[0, steps // 2, steps - 1]]  # a timestep per sample
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts), rtol=1e-6, atol=1e-6)


def _run_schedule(sched, steps, **step_kwargs):
    """The sample after every step of a ``steps``-step schedule, on random samples and model outputs."""
    sched.set_timesteps(steps)
    x = torch.randn(SHAPE)
    for t in sched.timesteps:
        x = sched.step(torch.randn(SHAPE), t, x, **step_kwargs).prev_sample
    return x


def _diffusers_unipc_is_finite(cfg, steps):
    """Whether diffusers' own UniPC gives a finite sample for this config (it can raise, or give NaN or inf)."""
    try:
        return bool(_run_schedule(diffusers.UniPCMultistepScheduler(**cfg), steps).isfinite().all())
    except RuntimeError:  # torch.linalg.solve on a singular system (repeated sigmas)
        return False


def check_two_call_run_errors(sched, x):
    """A second-order scheduler (two calls a step) at the end of a 2-step run, then a new batch between a step's
    two calls: each a clear ValueError."""
    import pytest

    with pytest.raises(ValueError, match=r"step called 4 times for a 2-step schedule \(3 calls\)"):
        sched.step(x, sched.timesteps[-1], x)
    _new_batch_mid_run_refused(sched, x, steps=3)  # (the first call keeps the sample for the second)


def _new_batch_mid_run_refused(sched, x, steps):
    """After a run's first call (which keeps tensors for the next), a sample of another batch is a ValueError."""
    import pytest

    sched.set_timesteps(steps)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="call set_timesteps to start a new run"):
        sched.step(x[:1], sched.timesteps[1], x[:1])


def check_multistep_run_errors(sched, x):
    """A multistep scheduler (it keeps tensors from earlier steps) on a bad sample, a call past a 2-step schedule
    and a new batch in the middle of a run: each a clear error naming what is wrong, not a failure inside the op."""
    import pytest

    sched.set_timesteps(2)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor, got NoneType"):  # (named, not from .float())
        sched.step(x, sched.timesteps[0], None)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="step called 3 times for a 2-step schedule"):
        sched.step(x, sched.timesteps[-1], x)
    _new_batch_mid_run_refused(sched, x, steps=4)  # (the first step keeps a tensor for the second)


def count_op_calls(monkeypatch, op):
    """A list that gets one entry per call of ``diffusion_fast.ops.<op>`` (spied for the test's duration)."""
    from diffusion_fast import ops

    calls = []
    real = getattr(ops, op)

    def spy(*args, **kwargs):
        calls.append(op)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, op, spy)
    return calls


def fused(name, **cfg):
    """diffusers' scheduler ``name`` with accelerate's fused step patched in."""
    from diffusion_fast import diffusers_schedulers

    sched = getattr(diffusers, name)(**cfg)
    assert diffusers_schedulers.fuse_step(sched) is None
    return sched
