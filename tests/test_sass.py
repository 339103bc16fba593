"""What the Triton kernels compile to for an H100 (sm_90), checked without a GPU (benchmarks/sass_report.py).

The interpreter proves the kernels right but says nothing about how they compile. These tests compile them for sm_90
with the ptxas that ships with Triton and read the machine code for the structure that decides speed on a GPU:
16-byte vector loads and stores, asynchronous copies into shared memory (software pipelining), tensor-core MMAs, and
no register spills. Before the launcher passed strides in units of their alignment, head dim 40 (SD1.5's 4096-token
attention) compiled to one 2-byte load per element, no asynchronous copies and 56 bytes of stack spills.
"""
import json
import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(TOOLS, tool)) for tool in ("ptxas", "cuobjdump", "nvdisasm")),
    reason="this Triton ships no NVIDIA tools (ptxas, cuobjdump, nvdisasm) to compile for sm_90 with",
)


def sass_report(kernel, processes=1):
    """The report's rows for one kernel, compiled by `processes` concurrent processes (each takes every n-th case)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "sass_report.py"), "--json",
                               "--kernel", kernel, "--shard", f"{k}/{processes}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k in range(processes)]
    rows = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        rows += json.loads(stdout)["rows"]
    return rows


@pytest.fixture(scope="module")
def attention_rows():
    return sass_report("attention")


def test_attention_covers_the_sd_head_dims(attention_rows):
    head_dims = {row["constexprs"]["HEAD_DIM"] for row in attention_rows}
    assert {40, 64, 80, 160} <= head_dims


def test_attention_moves_memory_in_vectors(attention_rows):
    """Every global load, asynchronous copy and store moves 16 bytes, at every SD head dim, self and cross; only a
    head-dim tail tile too small to give each thread 8 elements (80's 16-lane tail over 8 warps) moves 8."""
    for row in attention_rows:
        memory = {op: n for op, n in row["instructions"].items() if op.split(".")[0] in ("LDG", "LDGSTS", "STG")}
        narrow = {op: n for op, n in memory.items() if not op.endswith((".128", ".64"))}
        assert memory and not narrow, f"{row['case']}: narrow memory instructions {narrow}"
        if not row["constexprs"]["D_TAIL"]:
            assert all(op.endswith(".128") for op in memory), f"{row['case']}: {memory}"


def test_attention_head_dim_split_saves_tensor_core_work(attention_rows):
    """80 = 64 + 16, 160 = 128 + 32: MMA work (the sum of the instructions' N widths) drops by 37.5% against padding
    to the next power of two (head dim 40, whose split saved a quarter and measured slower, is padded)."""
    def mma_work(row):
        return sum(int(op.split(".")[1].split("x")[1]) * n for op, n in row["instructions"].items()
                   if op.startswith("HGMMA"))

    by_case = {row["case"]: row for row in attention_rows}
    pairs = [(by_case[c], by_case[c[:-len("split")] + "padded"]) for c in by_case if c.endswith(" split")]
    assert {row["constexprs"]["HEAD_DIM"] for row, _ in pairs} == {80, 160}
    for split, padded in pairs:
        d = split["constexprs"]["HEAD_DIM"]
        expected = (split["constexprs"]["D_MAIN"] + split["constexprs"]["D_TAIL"]) / padded["constexprs"]["D_MAIN"]
        assert mma_work(split) <= expected * mma_work(padded) + 1e-9, (d, mma_work(split), mma_work(padded))


def test_attention_pipelines_loads_and_uses_tensor_cores(attention_rows):
    for row in attention_rows:
        ops = row["instructions"]
        assert any(op.startswith("LDGSTS") for op in ops), f"{row['case']}: no asynchronous copies (not pipelined)"
        assert any(op.startswith(("HGMMA", "HMMA")) for op in ops), f"{row['case']}: no tensor-core MMA"


def test_attention_does_not_spill(attention_rows):
    for row in attention_rows:
        assert row["stack_bytes"] == 0, f"{row['case']}: {row['stack_bytes']} bytes of stack (register spills)"


@pytest.fixture(scope="module")
def group_norm_rows():
    return sass_report("group_norm_silu")


def test_group_norm_never_stores_one_element_at_a_time(group_norm_rows):
    """Outputs go out at least 4 bytes at a time in both layouts. In channels_last a group's C/G channels are the
    contiguous run: with C/G a compile-time constant the compiler vectorises it (2-byte stores before, at SD's
    C/G of 10, 20 and 40)."""
    for row in group_norm_rows:
        stores = [op for op in row["instructions"] if op.startswith("STG")]
        assert stores and "STG.E.U16" not in stores, f"{row['case']}: {stores}"


def test_group_norm_channels_last_loads_are_vectors(group_norm_rows):
    for row in group_norm_rows:
        if row["constexprs"].get("CHANNELS_LAST") or " cl-" in row["case"]:
            assert "LDG.E.U16" not in row["instructions"], f"{row['case']}: {row['instructions']}"


def test_large_channels_last_tensors_move_16_bytes_at_every_channels_per_group(group_norm_rows):
    """The three-launch channels_last plan tiles 64 whole channels across groups, so its input and output passes
    move 16 bytes at a time whatever C/G is (10, 20 or 4 here; the one-launch plan gets 4 or 8 there)."""
    cl = {row["case"]: row["instructions"] for row in group_norm_rows if " cl-" in row["case"]}
    assert {case.split()[2] for case in cl} >= {"2x320x64x64", "2x640x32x32", "1x128x1024x1024"}
    for case, ops in cl.items():
        if "cl-stats" in case or "cl-apply" in case:
            assert "LDG.E.128" in ops, f"{case}: {ops}"
        if "cl-apply" in case:
            assert [op for op in ops if op.startswith("STG")] == ["STG.E.128"], f"{case}: {ops}"


def test_group_norm_statistics_passes_stream_16_bytes_without_spills(group_norm_rows):
    """The statistics passes keep a Welford state per lane ((positions x 64 channels) in the channels_last pass: two
    fp32 values for each loaded element) and still load 16 bytes at a time and hold it all in registers."""
    stats = [row for row in group_norm_rows if " stats " in row["case"] or "cl-stats" in row["case"]]
    assert any(" stats " in row["case"] for row in stats) and any("cl-stats" in row["case"] for row in stats)
    for row in stats:
        assert "LDG.E.128" in row["instructions"], f"{row['case']}: {row['instructions']}"
        assert row["stack_bytes"] == 0, f"{row['case']}: {row['stack_bytes']} bytes of stack"


def test_group_norm_two_loads_in_flight_variant(group_norm_rows):
    """LOADS_IN_FLIGHT = 2, the GPU benchmark's A/B for the NCHW split plan: the statistics pass issues two 16-byte
    loads back to back (its Welford state covers twice the lanes: with two blocks an iteration over BLOCK lanes,
    Triton 3.6 issued the second load after using the first), and the output pass issues the next block's load
    before this block's SiLU (at 1 a thread has no load in flight while it computes). No spills."""
    rows = [row for row in group_norm_rows if row["case"].endswith(", 2 loads")]
    assert any(" stats " in row["case"] for row in rows) and any(" apply " in row["case"] for row in rows)
    for row in rows:
        loads = [i for i, name in row["sequence"] if name == "LDG.E.128"]
        if " stats " in row["case"]:
            assert any(b - a <= 8 for a, b in zip(loads, loads[1:])), f"{row['case']}: loads at {loads}"
        else:  # the first load is the prologue's (the chunk's first block); the second, the loop's, is issued ahead
            exps = [i for i, name in row["sequence"] if name == "MUFU.EX2"]
            assert len(loads) == 2 and loads[1] < min(exps), f"{row['case']}: loads at {loads}, exp at {exps}"
        assert row["stack_bytes"] == 0


def test_group_norm_nchw_reads_weight_and_bias_once_per_block(group_norm_rows):
    """NCHW with H*W a multiple of the block: two scalar loads (weight, bias) a block, not a gather per element."""
    per_block = [row for row in group_norm_rows if row["constexprs"].get("CHANNEL_PER_BLOCK")]
    assert per_block
    for row in per_block:
        assert row["instructions"].get("LDG.E.U16", 0) <= 2, f"{row['case']}: {row['instructions']}"


def test_cfg_ddim_reads_alphas_once_per_program_and_moves_16_bytes():
    """Each program lies in one sample: two scalar alpha loads (not a gather and an int64 divide per element), the
    coefficients' IEEE divides once, no divide per element (x0 multiplies by 1/sqrt(a_t)), and SD latents in 16-byte
    vectors. The flat-block version compiled to 13 reciprocals (one per element of the thread's eight, plus the
    coefficients') and 600 instructions; this one to 5 and 400."""
    rows = sass_report("cfg_ddim_step")
    assert len(rows) == 3
    for row in rows:
        ops = row["instructions"]
        assert ops.get("LDG.E", 0) == 2, f"{row['case']}: {ops}"  # alpha_t, alpha_prev
        # the sample index's integer divide, div_rn(1, sqrt(a_t)) and the variance's two divides, one slow path's
        assert ops.get("MUFU.RCP", 0) <= 5, f"{row['case']}: {ops}"
        assert row["stack_bytes"] == 0
    for row in rows[:2]:  # SD latents (the third, 3x4x7x9, has 252-element samples: no aligned 16-byte rows)
        latent = {op: n for op, n in row["instructions"].items() if op.startswith(("LDG", "STG")) and op != "LDG.E"}
        assert latent and all(op.endswith(".128") for op in latent), f"{row['case']}: {latent}"


def test_linear_step_moves_16_bytes_at_a_time():
    """The linear step streams SD latents in 16-byte vectors: fp16 tensors 8 elements a load, the schedulers' fp32
    sample two 16-byte loads for the same 8; nothing moves element by element."""
    rows = sass_report("linear_step")
    assert len(rows) == 6
    for row in rows:
        memory = {op: n for op, n in row["instructions"].items() if op.startswith(("LDG", "STG"))}
        assert memory and all(op.endswith(".128") for op in memory), f"{row['case']}: {memory}"
        assert row["stack_bytes"] == 0


def test_euler_reads_sigmas_once_per_program_and_moves_16_bytes():
    """Two scalar sigma loads a program, not a gather per element, and SDXL's latents (the fp16 model output and the
    schedulers' fp32 sample) in 16-byte vectors; no spills."""
    rows = sass_report("euler")
    assert len(rows) == 4  # Euler and ancestral, at SDXL's latents and at 252-element samples
    assert all(row["stack_bytes"] == 0 for row in rows)
    for row in rows[:2]:  # (at 252 elements the fp32 sample moves in 4-byte loads, as the sigmas do)
        assert row["instructions"].get("LDG.E", 0) == 2, f"{row['case']}: {row['instructions']}"  # the sigmas
        latent = {op: n for op, n in row["instructions"].items() if op.startswith(("LDG", "STG")) and op != "LDG.E"}
        assert latent and all(op.endswith(".128") for op in latent), f"{row['case']}: {latent}"


def test_ddpm_reads_its_coefficients_once_per_program_and_moves_16_bytes():
    """Three scalar loads a program (alpha_t, alpha_prev, std), no divide per element (x0 multiplies by
    1/sqrt(a_t)), and 16-byte latent vectors at SD's latents."""
    rows = sass_report("ddpm_step")
    assert len(rows) == 2
    for row in rows:
        ops = row["instructions"]
        assert ops.get("LDG.E", 0) == 3, f"{row['case']}: {ops}"
        assert ops.get("MUFU.RCP", 0) <= 6, f"{row['case']}: {ops}"  # the coefficients' (8 more a per-element divide)
        assert row["stack_bytes"] == 0
    latent = {op: n for op, n in rows[0]["instructions"].items() if op.startswith(("LDG", "STG")) and op != "LDG.E"}
    assert latent and all(op.endswith(".128") for op in latent), latent


def test_fp32_attention_tiles_fit_without_spilling():
    """fp32 attention (IEEE dots, no tensor cores) gets its own small tiles: with the 16-bit tiles it spilled
    0.5-9.7 KB of registers a thread at SD's head dims. At most a small spill at 160, and within shared memory."""
    for row in sass_report("attention_fp32"):
        if row["case"].endswith("padded"):  # the benchmark's A/B variant, not what the launcher runs
            continue
        assert row["stack_bytes"] <= 256, f"{row['case']}: {row['stack_bytes']} bytes of stack"
        assert row["shared_bytes"] <= 227 * 1024, f"{row['case']}: {row['shared_bytes']} bytes of shared memory"


def test_every_kind_of_launch_compiles_for_sm90():
    """The interpreter runs every constexpr combination the launchers make, but it accepts code the compiler can
    reject: each kind (dtypes, layouts, affine or not, SiLU or not, all three passes of GroupNorm, all prediction
    types and flags of the DDIM step, padded/split/unmasked/masked attention) must compile for sm_90, fit in shared
    memory, and not spill (the fp32 padded attention, an A/B variant only, spills a little)."""
    rows = sass_report("variants", processes=2)  # the longest report: two compiling processes
    assert len(rows) > 60
    for row in rows:
        assert row["shared_bytes"] <= 227 * 1024, f"{row['case']}: {row['shared_bytes']} bytes of shared memory"
        allowed = 256 if row["case"].endswith("fp32 padded") else 0
        assert row["stack_bytes"] <= allowed, f"{row['case']}: {row['stack_bytes']} bytes of stack"
