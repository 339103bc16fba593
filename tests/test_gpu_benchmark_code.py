"""benchmarks/gpu_kernels.py's row code, run on the CPU with its timers replaced, and benchmarks/gpu_e2e.py's whole
run in its --dry-run form, so a slip in either is caught here.

The GPU benchmark records a failing row's exception and goes on (one bad row must not end a GPU run), so a Python
error in a row function would only show up as a column of errors at the end of a scarce GPU session. Here each kind
of row runs end to end on small shapes: CUDA tensors become CPU tensors, the kernels run under the interpreter,
and the timers call their function once and return a fixed time.
"""
import os
import sys

import pytest
import torch
from conftest import ON_GPU

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_kernels  # noqa: E402

from diffusion_fast import ops  # noqa: E402

pytestmark = pytest.mark.skipif(ON_GPU, reason="on a GPU, benchmarks/run_gpu.sh runs the real benchmark")


@pytest.fixture
def cpu_benchmark(monkeypatch):
    """Timers that run the function once and return 1 ms; tensor factories that put "cuda" tensors on the CPU."""
    calls = []

    def timer(fn, *args, **kwargs):
        calls.append(fn)
        fn()
        return 1.0

    for name in ("median_ms", "graphed_ms", "wall_ms"):
        monkeypatch.setattr(gpu_kernels, name, timer)
    monkeypatch.setattr(gpu_kernels, "_syncs_with_host", lambda fn: False)  # (CUDA's sync detector: no CPU form)
    for name in ("randn", "empty", "full"):
        factory = getattr(torch, name)

        def on_cpu(*args, _factory=factory, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return _factory(*args, **kwargs)

        monkeypatch.setattr(torch, name, on_cpu)
    return calls


def _row(kernel, shape, layout, unit):
    dims = [int(s) for s in shape.split("x")]
    numel = dims[0] * dims[1] * dims[2] * dims[3]
    amount = {"group_norm_silu": 2 * numel * 2, "cfg_ddim_step": 5 * numel * 2, "linear_step": 5 * numel * 2}.get(
        kernel, 4 * dims[0] * dims[1] * dims[2] * dims[3] * dims[-1])
    return dict(kernel=kernel, model="test", shape=shape, layout=layout, unit=unit, amount=amount)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_group_norm_row(cpu_benchmark, layout):
    row = _row("group_norm_silu", "1x64x8x8", layout, "GB/s")
    gpu_kernels.measure(row, lambda: gpu_kernels.group_norm_fns(row, ops), 1000.0)
    assert "error" not in row, row.get("error")
    assert row["speedup"] == 1.0 and row["graphed_speedup"] == 1.0
    assert row["two_launch_ms"] == 1.0 and row["two_launch_graphed_ms"] == 1.0  # the one-launch shape's A/B ran


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_large_group_norm_row_times_more_programs_and_two_loads(cpu_benchmark, monkeypatch, layout):
    """A tensor past the one-launch size: its A/Bs are four times the programs and, in NCHW (the plan that has it),
    two loads a thread in flight; the settings come back."""
    from diffusion_fast.kernels import group_norm_silu as kernel

    monkeypatch.setattr(kernel, "ONE_PASS_MAX_ELEMENTS", 0)
    target, loads = kernel.TARGET_PROGRAMS, kernel.LOADS_IN_FLIGHT
    row = _row("group_norm_silu", "1x64x8x8", layout, "GB/s")
    gpu_kernels.measure(row, lambda: gpu_kernels.group_norm_fns(row, ops), 1000.0)
    assert "error" not in row, row.get("error")
    assert row["more_programs_ms"] == 1.0 and row["more_programs_graphed_ms"] == 1.0 and "two_launch_ms" not in row
    assert ("two_loads_ms" in row) == (layout == "NCHW")
    if layout == "NCHW":
        assert row["two_loads_ms"] == 1.0 and row["two_loads_graphed_ms"] == 1.0
        assert "two loads a thread in flight" in gpu_kernels.format_row(row)
    assert kernel.TARGET_PROGRAMS == target and kernel.LOADS_IN_FLIGHT == loads
    assert "four times the programs" in gpu_kernels.format_row(row)


def test_attention_row_with_the_padded_variant(cpu_benchmark):
    row = _row("attention", "1x2x16x16x80", "fp16", "TFLOP/s")  # (80: a split head dim)
    row["shape"] = "1x2x16x16x80"
    gpu_kernels.measure(row, lambda: gpu_kernels.attention_fns(row, ops), 1000.0)
    assert "error" not in row, row.get("error")
    assert row["padded_ms"] == 1.0 and row["padded_graphed_ms"] == 1.0


def _ddim_scheduler(diffusers):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1)
    sched.set_timesteps(50)
    return sched


def _dpm_scheduler(diffusers):
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    sched.set_timesteps(25)
    return sched


# the step kernels' rows: (d) the CFG+DDIM step against diffusers' combine + DDIM step, (e) the linear step
# against diffusers' DPM-Solver++ 2M step; with diffusers importable and without (no baseline column)
@pytest.mark.parametrize("kernel, fns, make_scheduler", [("cfg_ddim_step", "cfg_ddim_fns", _ddim_scheduler),
                                                         ("linear_step", "linear_step_fns", _dpm_scheduler)])
@pytest.mark.parametrize("with_diffusers", [True, False])
def test_step_kernel_rows(cpu_benchmark, with_diffusers, kernel, fns, make_scheduler):
    sched = make_scheduler(pytest.importorskip("diffusers")) if with_diffusers else None
    row = _row(kernel, "2x4x16x16", "fp16", "GB/s")
    gpu_kernels.measure(row, lambda: getattr(gpu_kernels, fns)(row, ops, sched), 1000.0)
    assert "error" not in row, row.get("error")
    assert row["ours_fraction_of_same_size_copy"] == 1.0
    assert ("baseline_wall_ms" in row) == with_diffusers
    assert gpu_kernels.format_row(row)  # the printed line renders every column it has


def test_a_baseline_that_syncs_is_not_captured(cpu_benchmark, monkeypatch):
    """A baseline that waits for the host (diffusers' step on the H200) is not captured: a failed capture broke CUDA's
    RNG for every row after it ("Offset increment outside graph capture"), so that run lost 7 of its 28 rows."""
    monkeypatch.setattr(gpu_kernels, "_syncs_with_host", lambda fn: True)
    row = _row("cfg_ddim_step", "2x4x16x16", "fp16", "GB/s")
    gpu_kernels.measure(row, lambda: gpu_kernels.cfg_ddim_fns(row, ops, _ddim_scheduler(pytest.importorskip(
        "diffusers"))), 1000.0)
    assert "error" not in row and "baseline_graphed_ms" not in row and "syncs" in row["baseline_graph_error"]
    assert "not capturable" in gpu_kernels.format_row(row)


def test_attention_tile_sweep_record_renders(tmp_path):
    """tune_attention.py's record (written on a GPU) becomes a README table: SDPA, the table's config, the best."""
    import json

    import results_table

    record = {"benchmark": "attention_tiles", "date": "2026-11-23", "gpu": "H100", "split_head_dim": True,
              "shapes": [{"shape": [2, 8, 4096, 4096, 40], "sdpa_ms": 0.17, "current": [128, 64, 4, 3],
                          "current_ms": 0.2, "configs": [[[128, 64, 4, 3], 0.2], [[128, 128, 8, 2], 0.1]]}]}
    path = tmp_path / "attention_tiles.jsonl"
    path.write_text(json.dumps(record) + "\n")
    text = results_table.render(str(path))
    assert "| 2x8x4096x4096x40 | 0.1700 | (128, 64, 4, 3) | 0.2000 | (128, 128, 8, 2) | 0.1000 | 1.70x |" in text


def test_cpu_record_speedups_are_against_the_eager_baseline(tmp_path):
    """The CPU targets are stated against diffusers' step and F.group_norm + F.silu, not the slowest row: a group's
    speedups divide that baseline's median (the reference is slower than diffusers here, as it often is)."""
    import json

    import results_table

    def bench(group, impl, median):
        return {"group": group, "name": f"t[{impl}]", "params": {"impl": impl}, "stats": {"median": median}}

    record = {"machine_info": {"cpu": {"brand_raw": "AMD EPYC", "count": 2}}, "datetime": "2026-12-01T20:00:00",
              "benchmarks": [bench("step", "cpp fused", 1e-4), bench("step", "reference", 6e-4),
                             bench("step", "diffusers", 5e-4), bench("half", "cpp fused", 2e-4),
                             bench("half", "reference", 5e-4)]}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(record))
    text = results_table.render(str(path))
    assert "| step | cpp fused | 0.100 | 5.00x vs diffusers |" in text
    assert "| step | reference | 0.600 | 0.83x vs diffusers |" in text
    assert "| half | cpp fused | 0.200 | 2.50x vs reference |" in text
    # an unparametrized benchmark (params None), alone in its group: named by its test, no speedup column value
    record["benchmarks"] = [{"group": "key", "name": "test_graph_weights_key", "params": None,
                             "stats": {"median": 4.7e-4}}]
    path.write_text(json.dumps(record))
    assert "| key | test_graph_weights_key | 0.470 |  |" in results_table.render(str(path))


def test_group_norm_a_b_columns_render(tmp_path):
    """Both GroupNorm A/B variants reach the README table: the split plan beside a one-launch row, the launch-order
    output pass beside a large one."""
    import json

    import results_table

    def row(shape, **extra):
        return dict(kernel="group_norm_silu", model="VAE", shape=shape, layout="NCHW", unit="GB/s", ours_ms=0.1,
                    ours_rate=1000.0, ours_fraction=0.5, baseline_ms=1.0, speedup=10.0, **extra)

    record = {"benchmark": "gpu_kernels", "date": "2026-12-01", "gpu": "H100", "ceilings": {"copy_GBps": 3000.0},
              "rows": [row("1x512x64x64", two_launch_ms=0.05, two_launch_graphed_ms=0.04),
                       row("1x128x512x512", launch_order_ms=0.12, launch_order_graphed_ms=0.11),
                       row("1x256x512x512", per_block_stats_ms=0.13, per_block_stats_graphed_ms=0.12),
                       row("1x256x256x256", more_programs_ms=0.14, more_programs_graphed_ms=0.13,
                           two_loads_ms=0.15, two_loads_graphed_ms=0.14)]}
    path = tmp_path / "gpu_kernels.jsonl"
    path.write_text(json.dumps(record) + "\n")
    text = results_table.render(str(path))
    assert "NCHW (two-launch plan: 0.0500 ms, in a graph 0.0400 ms)" in text
    assert "NCHW (output pass in launch order, no cache hints: 0.1200 ms, in a graph 0.1100 ms)" in text
    assert "NCHW (statistics reduced block by block: 0.1300 ms, in a graph 0.1200 ms)" in text
    assert ("NCHW (four times the programs: 0.1400 ms, in a graph 0.1300 ms) (two loads a thread in flight: 0.1500 ms, "
            "in a graph 0.1400 ms)") in text


def _dry_run(script, tmp_path, systems, qualities):
    """Run an end-to-end script's --dry-run; check what every dry run must hold (no failing system, every system
    timed once, finite quality figures, a record the README's tables skip) and return the record."""
    import json
    import math

    import results_table

    out = tmp_path / "dry_run.jsonl"
    script.main(["--dry-run", "--out", str(out)])
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["dry_run"] is True and record["notes"] == [], record["notes"]
    names = [r["system"] for r in record["rows"]]
    assert len(names) == systems and "diffusers + diffusion_fast.accelerate" in names, names
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 1 for r in record["rows"])
    assert len(record["quality"]) == qualities and not any(math.isnan(v) for v in record["quality"].values())
    assert results_table.latest_record(str(out)) is None
    return record


def test_e2e_dry_run_runs_every_system_and_is_left_out_of_the_tables(tmp_path):
    """gpu_e2e.py --dry-run: the script's every system, quality comparison and first-image subprocess, on the CPU
    with the tiny model; no system may fail (a failing one is a note), and the record is marked so that the README's
    tables skip it."""
    import gpu_e2e
    import results_table

    record = _dry_run(gpu_e2e, tmp_path, systems=10, qualities=9)
    for layout in ("channels_last", "nchw"):  # (fp32 here: the same image)
        assert record["quality"][f"psnr_ours_fp16_{layout}_vs_fp32_reference_db"] > 40
    assert record["quality"]["psnr_accelerated_nchw_vs_diffusers_fp16_db"] > 40
    pag = next(r for r in record["rows"] if r["system"] == gpu_e2e.OURS_PAG)
    assert pag["speedup_vs_diffusers_pag"] > 0 and "vs diffusers PAG" in results_table.gpu_e2e(record)
    assert record["first_image_seconds"] is not None


def test_sd3_e2e_dry_run_runs_every_system_and_is_left_out_of_the_tables(tmp_path):
    """gpu_e2e_sd3.py --dry-run: its random SD3 folder, every system (the ControlNet rows too) and quality comparison,
    on the CPU with a tiny SD3.5-shaped model; no system may fail, and the record is marked so that the README's tables skip it."""
    import gpu_e2e_sd3
    import results_table

    record = _dry_run(gpu_e2e_sd3, tmp_path, systems=8, qualities=4)
    assert record["quality"]["psnr_accelerated_vs_diffusers_fp16_db"] > 40  # (fp32 here: the same image)
    assert "SD3.5" in results_table.gpu_e2e(record)
    ours = next(r for r in record["rows"] if r["system"] == gpu_e2e_sd3.OURS_CONTROLNET)
    assert ours["speedup_vs_diffusers_controlnet"] > 0 and "vs diffusers ControlNet" in results_table.gpu_e2e(record)


def test_launcher_host_cost_script_runs():
    """benchmarks/launcher_host_cost.py (no GPU needed) in its own process, since it replaces the kernels' launches:
    a time per call for each launcher it names."""
    import re
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "launcher_host_cost.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, check=True).stdout
    times = re.findall(r"^(attention|group_norm_silu|cfg_ddim_step) .* ([\d.]+) us per call$", out, re.M)
    assert len(times) == 4 and all(0 < float(t) < 10_000 for _, t in times), out


def test_cpu_cache_effects_script_runs(tmp_path):
    """benchmarks/cpu_cache_effects.py in its own process (it pins the allocator, as the CPU benchmark does), two
    calls a row: every row it names, a positive time each, and the record it appends."""
    import json
    import subprocess

    pytest.importorskip("diffusers")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "cpu_cache_effects.py")
    out = tmp_path / "effects.jsonl"
    subprocess.run([sys.executable, script, "--calls", "2", "--jsonl", str(out)], capture_output=True, text=True,
                   timeout=300, check=True)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["calls"] == 2 and len(record["rows"]) == 12
    assert all(r["median_us"] > 0 for r in record["rows"]), record["rows"]
