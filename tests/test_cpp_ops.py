"""The C++ extension's ops (torch.ops.diffusion_fast.*): parity with the reference and diffusers, opcheck, errors."""
import itertools
import warnings

import pytest
import torch

import diffusion_fast
from _numerics import assert_2x_rule
from diffusion_fast import _cpp, _validate, ops, reference

# the machine's thread count for every test here: GroupNorm's CPU paths depend on it (N*G below it splits the
# statistics over chunks; per-thread partial sums), and the suite's workers otherwise run one thread each (conftest)
pytestmark = [pytest.mark.skipif(_cpp.load_ops() is None, reason="C++ extension not built"),
              pytest.mark.usefixtures("all_threads")]
FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
A_T, A_PREV = torch.tensor([0.05, 0.5, 0.93]), torch.tensor([0.1, 0.62, 1.0])  # per sample; the last at the final step


def test_ops_exist_after_import():
    for name in _cpp.OPS:
        assert hasattr(torch.ops.diffusion_fast, name)
    assert diffusion_fast.ops._resolve("ddim_step", "auto", torch.device("cpu")) == "cpp"


def _randn(gen, dtype, shape=(3, 4, 7, 9)):  # batch 3 (per-sample alphas), odd 7x9 spatial
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Outputs start as NaN: the C++ ops allocate with at::empty_like (not torch.empty, so _numerics'
    poisoned_allocations cannot reach them); PyTorch's deterministic mode fills every fresh float tensor with NaN,
    C++ allocations included. An element an op forgets to write then fails the finiteness check of the 2x rule."""
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()  # the poison really is on
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type, eta, clip, use_clipped", [
    c for c in itertools.product(["epsilon", "v_prediction", "sample"], [0.0, 0.8], [None, 1.5], [False, True])
    if not (c[3] and c[2] is None)
])
def test_cfg_ddim_and_ddim_match_reference(dtype, prediction_type, eta, clip, use_clipped):
    gen = torch.Generator().manual_seed(1)
    u, t, x, noise = (_randn(gen, dtype) for _ in range(4))
    kw = dict(eta=eta, variance_noise=noise if eta > 0 else None, prediction_type=prediction_type,
              clip_sample_range=clip, use_clipped_model_output=use_clipped)
    for cfg in (False, True):
        args = (u, t, 7.5) if cfg else (u,)
        out = (ops.cfg_ddim_step if cfg else ops.ddim_step)(*args, x, A_T, A_PREV, backend="cpp", **kw)
        fn = reference.cfg_ddim_step if cfg else reference.ddim_step

        def run(d):
            kwd = dict(kw, variance_noise=noise.to(d) if eta > 0 else None)
            return fn(*[a.to(d) if torch.is_tensor(a) else a for a in args], x.to(d), A_T.to(d), A_PREV.to(d), **kwd)

        ref64, plain = run(torch.float64), run(dtype)
        for i in range(2):
            scale = max(1.0, ref64[i].abs().max().item())
            assert_2x_rule(out[i] / scale, ref64[i] / scale, plain[i] / scale, floor=FLOOR[dtype], what=f"cfg={cfg} {i}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ddpm_and_euler_match_reference(prediction_type, dtype):
    gen = torch.Generator().manual_seed(2)
    m, x, noise = (_randn(gen, dtype) for _ in range(3))
    std = torch.tensor([0.0, 0.1, 0.3])
    out = ops.ddpm_step(m, x, A_T, A_PREV, std=std, variance_noise=noise, prediction_type=prediction_type,
                        clip_sample_range=2.0, backend="cpp")
    run = lambda d: reference.ddpm_step(m.to(d), x.to(d), A_T.to(d), A_PREV.to(d), std=std.to(d),  # noqa: E731
                                        variance_noise=noise.to(d), prediction_type=prediction_type,
                                        clip_sample_range=2.0)
    for i in range(2):
        ref64 = run(torch.float64)[i]
        s = max(1.0, ref64.abs().max().item())
        assert_2x_rule(out[i] / s, ref64 / s, run(dtype)[i] / s, floor=FLOOR[dtype])
    sig, sig_next = torch.tensor([14.6, 3.0, 0.5]), torch.tensor([10.0, 2.0, 0.0])
    for gamma in (0.0, 0.4):
        out = ops.euler_step(m, x, sig, sig_next, gamma=gamma, s_noise=1.0, noise=noise,
                             prediction_type=prediction_type, backend="cpp")
        ref64 = reference.euler_step(m.double(), x.double(), sig.double(), sig_next.double(), gamma=gamma,
                                     noise=noise.double(), prediction_type=prediction_type)
        plain = reference.euler_step(m, x, sig, sig_next, gamma=gamma, noise=noise, prediction_type=prediction_type)
        for i in range(2):
            s = max(1.0, ref64[i].abs().max().item())
            assert_2x_rule(out[i] / s, ref64[i] / s, plain[i] / s, floor=FLOOR[dtype])
            assert out[i].dtype == dtype
    # ancestral: sigma_next 0 on the last sample (the final step: no noise, sigma_down 0)
    out = ops.euler_ancestral_step(m, x, sig, sig_next, noise, prediction_type=prediction_type, backend="cpp")
    ref64 = reference.euler_ancestral_step(m.double(), x.double(), sig.double(), sig_next.double(), noise.double(),
                                           prediction_type=prediction_type)
    plain = reference.euler_ancestral_step(m, x, sig, sig_next, noise, prediction_type=prediction_type)
    for i in range(2):
        s = max(1.0, ref64[i].abs().max().item())
        assert_2x_rule(out[i] / s, ref64[i] / s, plain[i] / s, floor=FLOOR[dtype])
        assert out[i].dtype == dtype


@pytest.mark.parametrize("shape, groups", [
    ((2, 64, 16, 16), 32),  # SD-like: N*G >= threads, one task per (sample, group)
    ((3, 96, 7, 9), 32),  # C=96 over 32 groups (3 channels each), odd 7x9, batch 3
    ((2, 64, 1, 1), 32),  # a 1x1 map: 2 values per group, variance near eps
    ((2, 40, 300), 8),  # 3-d input
    ((1, 8, 70, 70), 1),  # N*G = 1 < threads: statistics split over chunks; 39200 values is not a chunk multiple
    # 23x25 = 575 positions >= kSmallMap with N*G >= threads: the pipelined NCHW pass (run r's SiLU output fused with
    # run r+1's sums, silu_affine_and_sum_*), which no smaller map reaches; 575 leaves a masked vector tail
    ((2, 32, 23, 25), 8),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_matches_reference(shape, groups, dtype, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-d")
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen) * 3 + 0.7).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], generator=gen).to(dtype) for _ in range(2))
    for weight, bias, silu in ((w, b, True), (None, None, False)):
        out = ops.group_norm_silu(x, groups, weight, bias, silu=silu, backend="cpp")
        ref64 = reference.group_norm_silu(x.double(), groups, None if weight is None else weight.double(),
                                          None if bias is None else bias.double(), silu=silu)
        assert_2x_rule(out, ref64, reference.group_norm_silu(x, groups, weight, bias, silu=silu), floor=FLOOR[dtype])
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


GN_HALF_SHAPES = [
    ((2, 64, 16, 16), 32),
    ((3, 96, 7, 9), 32),  # 63 positions: every chunk conversion ends in a scalar tail
    ((1, 8, 70, 70), 1),  # N*G < threads: the chunked statistics path
    ((2, 32, 23, 25), 8),  # the pipelined NCHW pass
    ((1, 1280, 9, 11), 32),  # channels_last blocks of 12 rows x 1280 channels
]


@pytest.mark.parametrize("shape, groups", GN_HALF_SHAPES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_half_storage_is_the_fp32_kernel_rounded_once(shape, groups, dtype, channels_last):
    """fp16/bf16 are converted chunk by chunk in L1 (csrc/half.h) around the fp32 code, so the output must be bit for
    bit the fp32 op's output on x.float(), rounded once as torch rounds it: that checks every conversion, tails
    included, against torch's own, on values that round both ways, overflow bf16's range or are NaN or inf."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen) * 3 + 0.7).to(dtype)
    if groups > 1:  # NaN and inf in the first group of the first sample only: they poison its statistics
        first = x[0, : shape[1] // groups].view(-1)
        first[::5], first[1::7], first[2::11] = float("nan"), float("inf"), -float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], generator=gen) for _ in range(2))
    w[::7] *= 4e4  # a few channels whose fp16 outputs overflow to inf
    w, b = w.to(dtype), b.to(dtype)
    for weight, bias, silu in ((w, b, True), (None, None, False)):
        out = ops.group_norm_silu(x, groups, weight, bias, silu=silu, backend="cpp")
        want = ops.group_norm_silu(x.float(), groups, weight, bias, silu=silu, backend="cpp").to(dtype)
        assert out.dtype == dtype and out.stride() == want.stride()
        same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
        assert same.all(), f"{(~same).sum().item()} elements differ from the fp32 op rounded once"
        assert out.isfinite().float().mean() > 0.5  # most of the comparison is on finite values


# fp32 SiLU outputs of 4 MiB and more are written with streaming stores from each row's first 64-byte boundary on
# (csrc/silu.h); rows whose starts are not aligned take masked ordinary stores up to it, and tails after it.
STREAMED_SHAPES = [
    ((1, 64, 129, 129), 32, False),  # the pipelined NCHW pass; 129 x 129 runs start anywhere in a cache line
    ((1, 8, 363, 363), 1, False),  # one run for two threads: chunk statistics, output spread over the threads
    ((64, 512, 7, 9), 32, False),  # maps under kSmallMap positions: rows of 63 values
    ((1, 68, 125, 125), 4, True),  # channels_last rows of 68 channels (272 bytes: most start mid-line)
]


@pytest.mark.parametrize("shape, groups, channels_last", STREAMED_SHAPES)
def test_group_norm_streamed_outputs(shape, groups, channels_last):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() * 4 >= 4 << 20  # kStreamBytes
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    out = ops.group_norm_silu(x, groups, w, b, backend="cpp")
    ref64 = reference.group_norm_silu(x.double(), groups, w.double(), b.double())
    assert_2x_rule(out, ref64, reference.group_norm_silu(x, groups, w, b), floor=FLOOR[torch.float32])


def test_non_contiguous_inputs():
    base = torch.randn(3, 4, 9, 7)
    m, x = base.transpose(2, 3), torch.randn(6, 4, 7, 9)[::2]  # a transposed view and a strided slice
    out = ops.ddim_step(m, x, A_T, A_PREV, prediction_type="v_prediction", backend="cpp")
    ref = reference.ddim_step(m, x, A_T, A_PREV, prediction_type="v_prediction")
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 32, 6, 10)[:, :, :, ::2]
    torch.testing.assert_close(ops.group_norm_silu(g, 8, backend="cpp"), reference.group_norm_silu(g, 8),
                               rtol=1e-5, atol=1e-5)


def test_group_norm_statistics_survive_a_large_mean():
    """|mean| >> std: sum(x^2) - n mean^2 would cancel in fp32; chunked mean + M2 (Chan's merge) does not."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 33, 31, generator=gen) * 1e-2 + 300.0  # odd 33x31 so chunks do not divide the run
    x[:, :, 0, 0] += 2.0  # an outlier (200 std) where a block's statistics start: no use as a shift either
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        out = ops.group_norm_silu(xl, 8, silu=False, backend="cpp")
        ref64 = reference.group_norm_silu(x.double(), 8, silu=False)
        assert_2x_rule(out, ref64, reference.group_norm_silu(x, 8, silu=False), floor=1e-4, what=str(layout))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [1, 3])  # batch 3 takes a 23x25 map: the pipelined NCHW pass (fused output + sums)
def test_silu_extremes(layout, batch):
    """The vectorised exp inside SiLU: huge and tiny inputs give SiLU's limits (v, 0), +inf stays inf, -inf gives NaN
    as in PyTorch (-inf * sigmoid(-inf)), NaN stays NaN. 17 channels: a full 16-lane vector plus a masked tail."""
    # Runs whichever build this CPU takes (AVX-512 intrinsics or the portable exp); the baseline-build test below runs
    # the same check with AVX-512 switched off.
    exec(_SILU_EXTREMES_CHECK, {"torch": torch, "layout": layout, "batch": batch})


# weight 0: the SiLU input is exactly the bias, so the bias probes the exp's range ends
_SILU_EXTREMES_CHECK = """
bias = torch.tensor([1e30, -1e30, 90.0, -90.0, 20.0, -20.0, 0.5, 0.0, float("inf"), -float("inf"), 1e-3, -1e-3,
                     88.7, -88.7, 104.0, -104.0, 3.0])
x = torch.randn(batch, 17, *((3, 7) if batch == 1 else (23, 25))).contiguous(memory_format=layout)  # 575 >= kSmallMap
out = torch.ops.diffusion_fast.group_norm_silu(x, 17, torch.zeros(17), bias, 1e-5, True)
expect = (bias.double() * torch.sigmoid(bias.double())).expand(batch, 17)
torch.testing.assert_close(out[:, :, 2, 6].double(), expect, rtol=1e-6, atol=1e-8, equal_nan=True)
torch.testing.assert_close(out[:, :, 0, 0].double(), expect, rtol=1e-6, atol=1e-8, equal_nan=True)
nan_in = torch.ops.diffusion_fast.group_norm_silu(torch.full((1, 2, 2, 2), float("nan")), 1, None, None, 1e-5, True)
assert torch.isnan(nan_in).all()
"""


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_schedulers(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    gen = torch.Generator().manual_seed(4)
    m, x, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    ddim.set_timesteps(20)
    t = ddim.timesteps[5]
    a_t, a_prev = ddim.alphas_cumprod[t], ddim.alphas_cumprod[t - 50]
    theirs = ddim.step(m, t, x, eta=0.3, variance_noise=noise)
    ours = ops.ddim_step(m, x, a_t, a_prev, eta=0.3, variance_noise=noise, prediction_type=prediction_type,
                         clip_sample_range=1.0, backend="cpp")
    torch.testing.assert_close(ours[0], theirs.prev_sample, rtol=1e-5, atol=1e-5)
    clipped = ops.ddim_step(m, x, a_t, a_prev, eta=0.3, variance_noise=noise, prediction_type=prediction_type,
                            clip_sample_range=1.0, use_clipped_model_output=True, backend="cpp")
    theirs = ddim.step(m, t, x, eta=0.3, variance_noise=noise, use_clipped_model_output=True)
    torch.testing.assert_close(clipped[0], theirs.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clipped[1], theirs.pred_original_sample, rtol=1e-5, atol=1e-5)
    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    ddpm.set_timesteps(20)
    t, t_prev = ddpm.timesteps[5], ddpm.timesteps[6]
    a_t, a_prev = ddpm.alphas_cumprod[t], ddpm.alphas_cumprod[t_prev]
    std = ddpm._get_variance(t) ** 0.5  # variance_type "fixed_small": the scheduler's own noise scale
    theirs = ddpm.step(m, t, x, generator=torch.Generator().manual_seed(7))
    drawn = torch.randn(m.shape, generator=torch.Generator().manual_seed(7))  # diffusers' randn_tensor draw
    ours = ops.ddpm_step(m, x, a_t, a_prev, std=std, variance_noise=drawn, prediction_type=prediction_type,
                         clip_sample_range=1.0, backend="cpp")
    torch.testing.assert_close(ours[0], theirs.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs.pred_original_sample, rtol=1e-5, atol=1e-5)
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    euler.set_timesteps(20)
    theirs = euler.step(m, euler.timesteps[0], x)
    ours = ops.euler_step(m, x, euler.sigmas[0], euler.sigmas[1], prediction_type=prediction_type, backend="cpp")
    torch.testing.assert_close(ours[0], theirs.prev_sample, rtol=1e-5, atol=1e-5)
    if prediction_type != "sample":  # diffusers' ancestral Euler raises NotImplementedError for "sample"
        ancestral = diffusers.EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear",
                                                              prediction_type=prediction_type)
        ancestral.set_timesteps(20)
        theirs = ancestral.step(m, ancestral.timesteps[3], x, generator=torch.Generator().manual_seed(8))
        drawn = torch.randn(m.shape, generator=torch.Generator().manual_seed(8))
        ours = ops.euler_ancestral_step(m, x, ancestral.sigmas[3], ancestral.sigmas[4], drawn,
                                        prediction_type=prediction_type, backend="cpp")
        torch.testing.assert_close(ours[0], theirs.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], theirs.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_one_alpha_for_every_sample_broadcasts():
    """The step ops take a single value (0-d or (1,)) for all samples, read in place (ops.* passes a 0-d float32
    alpha through uncopied): the same numbers as the (B,) tensor repeating it."""
    gen = torch.Generator().manual_seed(5)
    m, t, x, n = (torch.randn(3, 4, 5, 7, generator=gen) for _ in range(4))
    lib = torch.ops.diffusion_fast
    calls = [
        lambda a, b: lib.ddim_step(m, x, a, b, 0.5, n, "v_prediction", 1.0, True),
        lambda a, b: lib.cfg_ddim_step(m, t, 7.5, x, a, b, 0.0, None, "epsilon", None, False),
        lambda a, b: lib.ddpm_step(m, x, a, b, b * 0.5, n, "sample", None),
        lambda a, b: lib.euler_step(m, x, a + 1, b, 0.2, 1.0, n, "epsilon"),
        lambda a, b: lib.euler_ancestral_step(m, x, a + 1, b, n, "v_prediction"),
    ]
    for call in calls:
        per_sample = call(torch.full((3,), 0.3), torch.full((3,), 0.45))
        for single in (torch.tensor(0.3), torch.tensor([0.3])):
            got = call(single, torch.tensor(0.45) if single.dim() == 0 else torch.tensor([0.45]))
            for ours, want in zip(got, per_sample):
                torch.testing.assert_close(ours, want, rtol=0, atol=0)
    a, per_sample = torch.tensor(0.3), torch.full((3,), 0.3)
    assert _validate.per_sample_coefficient("alpha_prod_t", a, x, op_checks=True) is a
    assert _validate.per_sample_coefficient("alpha_prod_t", per_sample, x, op_checks=True) is per_sample
    assert _validate.per_sample_coefficient("alpha_prod_t", a, x).shape == (3,)  # Triton and reference: (B,)
    assert _validate.per_sample_coefficient("alpha_prod_t", a.double(), x, op_checks=True).dtype == torch.float32


@pytest.mark.parametrize("clip", [None, 1.5])
def test_nan_propagates_like_the_reference(clip):
    """A NaN in the model output stays NaN in both outputs, clamped or not (the clamp keeps NaN as torch.clamp
    does, and the unclamped loop skips it): a broken UNet step must not turn into plausible latents."""
    gen = torch.Generator().manual_seed(6)
    u, t, x = (torch.randn(2, 4, 3, 5, generator=gen) for _ in range(3))
    u[0, 1, 2, 3] = float("nan")
    ours = ops.cfg_ddim_step(u, t, 7.5, x, 0.3, 0.4, clip_sample_range=clip, backend="cpp")
    ref = reference.cfg_ddim_step(u, t, 7.5, x, torch.full((2,), 0.3), torch.full((2,), 0.4), clip_sample_range=clip)
    for o, r in zip(ours, ref):
        assert torch.equal(torch.isnan(o), torch.isnan(r)) and torch.isnan(o).sum() == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_steps_are_the_fp32_step_rounded_once(dtype):
    """fp16/bf16 latents are converted in L1 chunks around the fp32 loop: bit for bit the fp32 op on the same values,
    rounded once. 4x13x11 = 572 values per sample: a whole 512-value chunk, then a 60-value one ending in a tail the
    8-wide conversions do not cover."""
    gen = torch.Generator().manual_seed(8)
    u, t, x, n = (torch.randn(3, 4, 13, 11, generator=gen).to(dtype) for _ in range(4))
    lib = torch.ops.diffusion_fast
    a, ap, s = torch.tensor([0.05, 0.5, 0.93]), torch.tensor([0.1, 0.62, 1.0]), torch.tensor([0.3, 0.1, 0.0])
    calls = [
        lambda u, t, x, n: lib.cfg_ddim_step(u, t, 7.5, x, a, ap, 0.7, n, "v_prediction", 1.0, True),
        lambda u, t, x, n: lib.cfg_ddim_step(u, t, 7.5, x, a, ap, 0.0, None, "epsilon", None, False),
        lambda u, t, x, n: lib.ddim_step(u, x, a, ap, 0.0, None, "sample", 1.0, False),
        lambda u, t, x, n: lib.ddpm_step(u, x, a, ap, s, n, "epsilon", None),
    ]
    for call in calls:
        got = call(u, t, x, n)
        want = call(u.float(), t.float(), x.float(), n.float())
        for g, w in zip(got, want):
            assert g.dtype == dtype and torch.equal(g.view(torch.int16), w.to(dtype).view(torch.int16))


STEP_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _cpp.has_cuda()), reason="needs a GPU and the C++ extension's CUDA build"))]


@pytest.mark.parametrize("device", STEP_DEVICES)  # cuda: the kernels of csrc/cuda/step_ops.cu
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_step_op_on_each_device_and_layout(device, layout, dtype):
    """Every step op with its options on (noise, clipping, churn, per-sample coefficients, the final step's zero
    sigma), inputs in either layout, by the 2x rule against the float64 reference."""
    gen = torch.Generator().manual_seed(11)
    m, t, x, n = (_in_layout(_randn(gen, dtype), layout).to(device) for _ in range(4))
    a_t, a_prev, std = A_T.to(device), A_PREV.to(device), torch.tensor([0.0, 0.1, 0.3], device=device)
    sig, sig_next = torch.tensor([14.6, 3.0, 0.5], device=device), torch.tensor([10.0, 2.0, 0.0], device=device)
    ddim = dict(eta=0.8, prediction_type="v_prediction", clip_sample_range=1.5)
    linear = dict(cx=1.4, cm=-0.9, p0=0.8, px=0.3, pm=0.1, pe=-0.2)  # DPM-Solver++ 2M's shape of update
    cases = {
        "ddim_step": (lambda: ops.ddim_step(m, x, a_t, a_prev, variance_noise=n, backend="cpp", **ddim),
                      lambda d: reference.ddim_step(m.to(d), x.to(d), a_t.to(d), a_prev.to(d), variance_noise=n.to(d),
                                                    **ddim)),
        "cfg_ddim_step": (lambda: ops.cfg_ddim_step(m, t, 7.5, x, a_t, a_prev, backend="cpp"),
                          lambda d: reference.cfg_ddim_step(m.to(d), t.to(d), 7.5, x.to(d), a_t.to(d), a_prev.to(d))),
        "ddpm_step": (lambda: ops.ddpm_step(m, x, a_t, a_prev, std=std, variance_noise=n, clip_sample_range=2.0,
                                            backend="cpp"),
                      lambda d: reference.ddpm_step(m.to(d), x.to(d), a_t.to(d), a_prev.to(d), std=std.to(d),
                                                    variance_noise=n.to(d), clip_sample_range=2.0)),
        "euler_step": (lambda: ops.euler_step(m, x, sig, sig_next, gamma=0.4, noise=n, backend="cpp"),
                       lambda d: reference.euler_step(m.to(d), x.to(d), sig.to(d), sig_next.to(d), gamma=0.4,
                                                      noise=n.to(d))),
        "linear_step": (lambda: ops.linear_step(m, x, n, backend="cpp", **linear),
                        lambda d: reference.linear_step(m.to(d), x.to(d), n.to(d), **linear)),
        "euler_ancestral_step": (lambda: ops.euler_ancestral_step(m, x, sig, sig_next, n, backend="cpp"),
                                 lambda d: reference.euler_ancestral_step(m.to(d), x.to(d), sig.to(d),
                                                                          sig_next.to(d), n.to(d))),
    }
    for name, (fast, ref) in cases.items():
        out, ref64, plain = fast(), ref(torch.float64), ref(dtype)
        for i in range(2):
            assert out[i].device.type == device and out[i].dtype == dtype
            s = max(1.0, ref64[i].abs().max().item())
            assert_2x_rule(out[i] / s, ref64[i] / s, plain[i] / s, floor=FLOOR[dtype], what=f"{name} output {i}")


def _in_layout(t, layout):
    """t's values in a layout: NCHW, channels_last, dense but permuted (H and W strides swapped), or a strided slice."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        return torch.cat([t, t], dim=3)[..., ::2]
    return t


# The fake's output strides must be the real op's, or torch.compile trusts wrong strides: before, a channels_last or
# permuted sample got outputs that were contiguous in the op and kept the sample's layout in the fake.
@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "permuted", "sliced"])
def test_opcheck_every_op(layout):
    x, m, n = (_in_layout(torch.randn(2, 4, 3, 5), layout) for _ in range(3))
    a, ap, s = torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.7]), torch.tensor([0.1, 0.0])
    lib = torch.ops.diffusion_fast
    cases = [
        (lib.ddim_step, (m, x, a, ap, 0.5, n, "epsilon", 1.0, True)),
        (lib.cfg_ddim_step, (m, n, 7.5, x, a, ap, 0.0, None, "v_prediction", None, False)),
        (lib.cfg_ddim_step, (m, n, 7.5, x, a[0], ap[:1], 0.0, None, "epsilon", None, False)),  # one alpha for all
        (lib.ddpm_step, (m, x, a, ap, s, n, "sample", None)),
        (lib.euler_step, (m, x, a + 1, ap, 0.2, 1.0, n, "epsilon")),
        (lib.euler_step, (m.half(), x, a + 1, ap, 0.0, 1.0, None, "v_prediction")),  # output in model_output's dtype
        (lib.euler_ancestral_step, (m, x, a + 1, ap, n, "epsilon")),
        (lib.linear_step, (m, x, n, 1.4, -0.9, 0.8, 0.3, 0.1, -0.2)),
        (lib.linear_step, (m.half(), x, None, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0)),  # no extra; mixed dtypes
        (lib.euler_ancestral_step, (m.half(), x, a + 1, ap, n.half(), "sample")),  # mixed dtypes: fp32 copies
        (lib.group_norm_silu, (_in_layout(torch.randn(2, 8, 3, 3), layout), 4, torch.randn(8), None, 1e-5, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ops.ddim_step(x[:, :2], x, 0.3, 0.4, backend="cpp"), ValueError, "model_output has shape"),
    (lambda x: ops.ddim_step(x.double(), x, 0.3, 0.4, backend="cpp"), TypeError, "model_output has dtype"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.2, variance_noise=x[:1], backend="cpp"), ValueError,
     "variance_noise has shape"),
    (lambda x: ops.ddim_step(x, x, torch.tensor([0.1, float("nan"), 0.3]), 0.4, backend="cpp"), ValueError,
     "alpha_prod_t contains NaN"),
    (lambda x: ops.ddpm_step(x, x, 0.3, 0.4, std=0.2, backend="cpp"), ValueError, "variance_noise is required"),
    (lambda x: ops.euler_step(x, x, 1.0, 0.5, gamma=0.3, backend="cpp"), ValueError, "noise is required"),
    (lambda x: ops.euler_step(x, x, 1.0, 0.5, prediction_type="flow", backend="cpp"), ValueError, "prediction_type"),
    (lambda x: ops.euler_ancestral_step(x, x, 1.0, 0.5, x[:, :1], backend="cpp"), ValueError, "noise has shape"),
    (lambda x: ops.euler_ancestral_step(x, x, torch.tensor([1.0, float("inf"), 2.0]), 0.5, x, backend="cpp"),
     ValueError, "sigma contains NaN or inf"),
    (lambda x: ops.euler_ancestral_step(x, x, 1.0, 0.5, None, backend="cpp"), TypeError,
     "noise must be a torch.Tensor"),
    (lambda x: ops.linear_step(x, x, x[:1], cx=1.0, cm=0.0, p0=1.0, px=0.0, backend="cpp"), ValueError,
     "extra has shape"),
    (lambda x: ops.linear_step(x, x, cx=float("nan"), cm=0.0, p0=1.0, px=0.0, backend="cpp"), ValueError, "cx"),
    (lambda x: torch.ops.diffusion_fast.linear_step(x, x, None, 1.0, 0.0, float("inf"), 0.0, 0.0, 0.0), ValueError,
     "coefficients must be finite"),  # the op's own check
    (lambda x: ops.attention(x, x, x, backend="cpp"), ValueError, "attention has no C\\+\\+ implementation"),
    # the op itself, as the unchecked internal entry calls it: a meta weight (sequential CPU offload keeps weights
    # there between calls) used to be read as garbage
    (lambda x: ops._group_norm_silu(x, 2, torch.empty(4, device="meta"), None, 1e-5, backend="cpp"), ValueError,
     "weight is on meta but x is on cpu"),
    (lambda x: ops._group_norm_silu(x, 2, None, torch.empty(4, device="meta"), 1e-5, backend="cpp"), ValueError,
     "bias is on meta but x is on cpu"),
    (lambda x: torch.ops.diffusion_fast.ddim_step(x, x, torch.ones(3, device="meta"), torch.ones(3), 0.0, None,
                                                  "epsilon", None, False), ValueError,
     "alpha_prod_t is on meta but sample is on cpu"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(3, 4, 5, 5))


def test_the_op_itself_also_checks(capsys):
    """A direct torch.ops call (bypassing diffusion_fast.ops) still gets a clear error, not garbage."""
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(ValueError, match="alpha_prod_t must be a \\(3,\\) tensor .* or a single value"):
        torch.ops.diffusion_fast.ddim_step(x, x, torch.ones(2), torch.ones(3), 0.0, None, "epsilon", None, False)
    with pytest.raises(ValueError, match="alpha_prod_t_prev must be a \\(3,\\) tensor"):  # one value, but 2-d
        torch.ops.diffusion_fast.ddim_step(x, x, torch.ones(3), torch.ones(1, 1), 0.0, None, "epsilon", None, False)
    with pytest.raises(ValueError, match="alpha_prod_t contains NaN or inf"):  # a single value is checked too
        torch.ops.diffusion_fast.ddim_step(x, x, torch.tensor(float("nan")), torch.ones(3), 0.0, None, "epsilon",
                                           None, False)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        torch.ops.diffusion_fast.ddim_step(x, x, torch.ones(3), torch.ones(3), 0.0, None, "eps", None, False)


def test_no_prebuilt_and_no_jit_gives_one_warning_and_none(monkeypatch):
    """DIFFUSION_FAST_NO_JIT=1 with the prebuilt module missing: load_ops() warns once and returns None."""
    import sys

    monkeypatch.delattr(diffusion_fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "diffusion_fast._C", None)  # `from . import _C` now raises ImportError
    monkeypatch.setenv("DIFFUSION_FAST_NO_JIT", "1")
    monkeypatch.setattr(_cpp, "_state", {"loaded": None, "tried": False})
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension unavailable"):
        assert _cpp.load_ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cpp.load_ops() is None  # cached: no second attempt, no second warning
    assert not _cpp.has_cuda()


def test_jit_build_compiles_with_the_install_build_flags(monkeypatch):
    """The just-in-time build passes the same C++ flags as setup.py (before, it lacked -mavx2 -mfma, so a JIT-built
    extension silently left out the AVX2 SiLU path)."""
    import runpy
    from pathlib import Path

    import torch.utils.cpp_extension as cpp_extension

    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    with pytest.warns(RuntimeWarning, match="building it now"):
        _cpp._jit_build()
    setup_flags = runpy.run_path(str(Path(_cpp.__file__).parent / "_build_flags.py"))
    assert seen["extra_cflags"] == setup_flags["cxx_flags"]() and seen["extra_ldflags"] == setup_flags["link_flags"]()
    try:
        with open("/proc/cpuinfo") as f:
            has_avx2 = {"avx2", "fma"} <= set(f.read().split())
    except OSError:
        has_avx2 = False
    assert ("-mavx2" in seen["extra_cflags"]) == has_avx2


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_cpp, "load_ops", lambda: None)
    monkeypatch.setattr(ops, "_warned", set())
    x = torch.randn(2, 4, 3, 3)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension unavailable, ddim_step runs the reference"):
        out = ops.ddim_step(x, x, 0.3, 0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.ddim_step(x, x, 0.3, 0.4)  # announced once
    torch.testing.assert_close(out[0], reference.ddim_step(x, x, 0.3, 0.4)[0])


_BASELINE_SCRIPT = """
import torch, diffusion_fast
from diffusion_fast import reference
gen = torch.Generator().manual_seed(3)
for shape, groups in (((3, 96, 7, 9), 32), ((2, 64, 16, 16), 32), ((1, 17, 5, 5), 17), ((2, 32, 23, 25), 8)):
    for layout in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype).contiguous(memory_format=layout)
            w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
            out = torch.ops.diffusion_fast.group_norm_silu(x, groups, w, b, 1e-5, True)
            ref = reference.group_norm_silu(x.double(), groups, w.double(), b.double())
            err = (out.double() - ref).abs().max().item()
            assert err < (1e-5 if dtype == torch.float32 else 5e-2), (shape, layout, dtype, err)
for shape, groups, layout in (((1, 64, 129, 129), 32, torch.contiguous_format),  # streamed outputs (>= 4 MiB)
                              ((1, 68, 125, 125), 4, torch.channels_last)):
    x = torch.randn(shape, generator=gen).contiguous(memory_format=layout)
    out = torch.ops.diffusion_fast.group_norm_silu(x, groups, None, None, 1e-5, True)
    err = (out.double() - reference.group_norm_silu(x.double(), groups)).abs().max().item()
    assert err < 1e-5, (shape, err)
for layout in (torch.contiguous_format, torch.channels_last):
    for batch in (1, 3):
        exec(SILU_EXTREMES_CHECK)
print("ok")
""".replace("SILU_EXTREMES_CHECK", repr(_SILU_EXTREMES_CHECK))


@pytest.mark.skipif(_cpp.load_ops() is None, reason="C++ extension not built")
def test_group_norm_baseline_build_without_avx512():
    """CPUs without AVX-512 run the baseline build of the loops (the AVX-512 one is picked at run time): force it.
    SiLU's limits included: the portable exp once stopped at a finite 2^127, so -inf gave -inf there, not NaN."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFUSION_FAST_NO_AVX512": "1"}
    proc = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
