"""Kernel benchmark on a CUDA GPU, one command:

    python benchmarks/gpu_kernels.py [--out benchmarks/results/gpu_kernels.jsonl] [--quick] [--dry-run]

Measures in one run, with triton.testing.do_bench medians (do_bench clears the L2 cache before every timed call, so
each row is a cold-cache time: small tensors that would stay in L2 inside a real pipeline are marked fits_L2):
  (a) the ceilings: device-to-device copy bandwidth (1 GiB, bytes read + written) and 8192^3 fp16/bf16 matmul rates;
  (b) group_norm_silu (ours, Triton) vs F.group_norm + F.silu, fp16, NCHW and channels_last, SD1.5 and SDXL UNet and
      VAE-decoder shapes: time, GB/s (ideal bytes: read once + write once), fraction of copy bandwidth, speedup; for
      tensors that take the one-launch plan, the split two-launch plan too (an A/B for ONE_PASS_MAX_ELEMENTS, which
      was chosen against eager launch costs, not graphed ones); for larger ones, four times the programs (an A/B for
      TARGET_PROGRAMS: are enough loads in flight to cover HBM's latency?);
  (c) attention (ours) vs F.scaled_dot_product_attention, fp16, SD1.5 and SDXL shapes: TFLOP/s (4*B*H*Lq*Lk*D) and
      fraction of the fp16 matmul rate; at head dims 80 and 160 also the same kernel with the head dim padded to a
      power of two instead of split (kernels/attention.py, SPLIT_HEAD_DIM), an A/B in the same run;
  (d) cfg_ddim_step (ours, one launch) vs diffusers' CFG combine + DDIMScheduler.step, fp16 latents: GPU time, GB/s
      (read uncond, text, sample; write prev and x0), fraction of copy bandwidth, speedup; plus the wall time per
      call with Python launch cost (what an ungraphed loop pays), and a device copy of the same bytes in a CUDA
      graph: a 2.6 MB step cannot approach the 1 GiB copy rate, so "fraction of a same-size copy" is its ceiling;
  (e) linear_step (ours, one launch: DPM-Solver++ 2M's second-order update, as our DPM-Solver and accelerate's fused
      diffusers step run it; PNDM and UniPC use the same kernel) vs diffusers' DPMSolverMultistepScheduler.step at
      a second-order step, fp16 latents: the same columns as (d) (bytes: read model output, sample, previous x0;
      write prev and x0).
Every row is also timed inside a CUDA graph, ours and the baseline alike (20 back-to-back calls captured once,
replayed, per-call median): device time without the host's launch cost, which is what our graphed sampling loop
pays. A small kernel's do_bench time is mostly that launch cost (the last H100 run had a floor of about 33 us per
GroupNorm call), so the graphed columns are the kernels' own speed; a baseline that cannot be captured (diffusers'
scheduler indexes a CPU table) records why.
Prints a table and appends one JSON record (GPU, torch/triton/CUDA versions, date, ceilings, rows) to --out.
A failing row records its error and the run goes on. Needs the package installed (benchmarks/run_gpu.sh does it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from results_table import A_B_VARIANTS  # (this script's folder is on sys.path, run or imported by the tests)

GN = {  # (N, C, H, W): UNet shapes carry the CFG batch of 2, VAE decoder shapes batch 1
    "SD1.5 UNet 512px": [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)],
    "SD1.5 VAE dec 512px": [(1, 512, 64, 64), (1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 512, 512),
                            (1, 128, 512, 512)],
    "SDXL UNet 1024px": [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32)],
    # the decoder's up blocks at 1024px: 512 channels at 128 and 256, 256 at 512, 128 at 1024
    "SDXL VAE dec 1024px": [(1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 512, 512), (1, 128, 1024, 1024)],
}
ATTN = {  # (B, H, Lq, Lk, D): self-attention Lk = Lq, cross-attention Lk = 77 text tokens
    "SD1.5 512px": [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
                    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160)],
    "SDXL 1024px": [(2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64)],
}
LATENTS = {"SD1.5 512px": [(1, 4, 64, 64), (2, 4, 64, 64)], "SDXL 1024px": [(1, 4, 128, 128), (4, 4, 128, 128)]}
FP16_BYTES = 2


def plan(quick=False):
    """Every row the run will measure, as dicts without tensors (what --dry-run prints)."""
    rows = []
    for model, shapes in GN.items():
        for shape in shapes[:2] if quick else shapes:
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            for layout in ("NCHW", "channels_last"):
                rows.append(dict(kernel="group_norm_silu", model=model, shape=shape, layout=layout, unit="GB/s",
                                 amount=2 * numel * FP16_BYTES, baseline="F.group_norm + F.silu"))
    for model, shapes in ATTN.items():  # (quick: SD1.5's head dim 80 too, the split head dim's A/B)
        for bsz, heads, lq, lk, d in shapes[:3 if model.startswith("SD1.5") else 2] if quick else shapes:
            rows.append(dict(kernel="attention", model=model, shape=(bsz, heads, lq, lk, d), layout="fp16",
                             unit="TFLOP/s", amount=4 * bsz * heads * lq * lk * d, baseline="F.sdpa"))
    for model, shapes in LATENTS.items():
        for shape in shapes:
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            rows.append(dict(kernel="cfg_ddim_step", model=model, shape=shape, layout="fp16", unit="GB/s",
                             amount=5 * numel * FP16_BYTES, baseline="diffusers CFG + DDIMScheduler.step"))
            rows.append(dict(kernel="linear_step", model=model, shape=shape, layout="fp16", unit="GB/s",
                             amount=5 * numel * FP16_BYTES, baseline="diffusers DPMSolverMultistepScheduler.step"))
    for row in rows:
        row["shape"] = "x".join(map(str, row["shape"]))
    return rows


# ---- timing -------------------------------------------------------------------------------------------------------

def median_ms(fn):
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except TypeError:  # a triton without return_mode
        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0]


def wall_ms(fn, calls=200):
    """Host wall time per call for back-to-back calls, synchronised at the end: includes Python launch cost."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def graphed_ms(fn, calls=20):
    """Per-call time of fn replayed from a CUDA graph holding `calls` back-to-back calls: no Python, no launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay) / calls


def _syncs_with_host(fn) -> bool:
    """Whether fn waits for the device (e.g. diffusers' scheduler step reading a tensor on the host): such a call
    cannot be captured, and trying to leaves the CUDA context (its RNG offsets) broken for every row after it."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError as exc:
        if "synchronizing" not in str(exc):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def ceilings():
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB: far past L2
    dst = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / (median_ms(lambda: dst.copy_(big)) * 1e-3) / 1e9
    del big, dst
    rates = {}
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        rates[str(dtype).replace("torch.", "")] = 2 * 8192**3 / (median_ms(lambda: a @ b) * 1e-3) / 1e12
        del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "matmul_TFLOPs": rates}


# ---- the three kernels: each returns (ours, baseline or None, extra) for one planned row; extra() gives more columns

def _shape(row):
    return tuple(int(s) for s in row["shape"].split("x"))


def group_norm_fns(row, ops):
    shape = _shape(row)
    fmt = torch.channels_last if row["layout"] == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
    w, b = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))

    def other_plan():
        """A/B: a tensor small enough for the one-launch plan, timed with the split plan too; a larger one with
        four times the programs (TARGET_PROGRAMS): 4 x 132 programs of 8 warps keep 32 warps an SM busy with one
        16-byte load a thread in flight, which may be too few loads in flight to cover HBM's latency; and, in NCHW,
        with two loads a thread in flight (LOADS_IN_FLIGHT = 2), the other way to the same end."""
        from diffusion_fast.kernels import group_norm_silu as kernel

        if x.numel() <= kernel.ONE_PASS_MAX_ELEMENTS:
            variants = [("two_launch", "ONE_PASS_MAX_ELEMENTS", 0)]
        else:
            variants = [("more_programs", "TARGET_PROGRAMS", 4 * kernel.TARGET_PROGRAMS)]
            if row["layout"] == "NCHW":
                variants.append(("two_loads", "LOADS_IN_FLIGHT", 2))
        times = {}
        for variant, setting, value in variants:
            saved = getattr(kernel, setting)
            setattr(kernel, setting, value)
            try:
                fn = lambda: kernel.group_norm_silu(x, 32, w, b)  # noqa: E731
                fn()
                times.update({f"{variant}_ms": median_ms(fn), f"{variant}_graphed_ms": graphed_ms(fn)})
            finally:
                setattr(kernel, setting, saved)
        return times

    return lambda: ops.group_norm_silu(x, 32, w, b), lambda: F.silu(F.group_norm(x, 32, w, b)), other_plan


def attention_fns(row, ops):
    import triton

    from diffusion_fast.kernels import attention as kernel

    bsz, heads, lq, lk, d = _shape(row)
    q = torch.randn(bsz, heads, lq, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(bsz, heads, lk, d, device="cuda", dtype=torch.float16) for _ in range(2))
    if not kernel.supports(q):
        note = {"note": "outside the Triton kernel's range: ops falls back to SDPA"}
        return lambda: ops.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v), lambda: note

    def padded_variant():  # the same kernel with the head dim padded to a power of two instead of split (A/B)
        if not kernel._head_dim_blocks(d, True)[1]:
            return {}
        out = torch.empty_like(q)
        config = kernel._config(max(16, triton.next_power_of_2(d)), lk)
        padded = lambda: kernel._launch(q, k, v, out, None, config, split=False)  # noqa: E731
        padded()
        return {"padded_ms": median_ms(padded), "padded_graphed_ms": graphed_ms(padded)}

    return lambda: ops.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v), padded_variant


def cfg_ddim_fns(row, ops, sched):
    from diffusion_fast.kernels.ddim import _cfg_ddim_step_unchecked as kernel

    shape = _shape(row)
    u, t, x = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
    # (B,) fp32 device alphas, as diffusion_fast's scheduler hands them to the op: no conversion kernels
    a_t = torch.full((shape[0],), 0.3, device="cuda")
    a_prev = torch.full((shape[0],), 0.4, device="cuda")

    def ours():
        return ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev)

    def launcher_only():  # the Triton launcher without ops' validation: splits the host cost in two
        return kernel(u, t, x, a_t, a_prev, 7.5, 0.0, None, "epsilon", None, False)

    src = torch.empty(row["amount"] // 2, dtype=torch.uint8, device="cuda")  # reads + writes = the step's bytes
    dst = torch.empty_like(src)

    def same_size_copy():  # the best any kernel moving these bytes can do at this size, launch latency included
        graphed = graphed_ms(lambda: dst.copy_(src))
        return {"copy_same_bytes_graphed_ms": graphed}

    if sched is None:
        return ours, None, lambda: {"ours_wall_ms": wall_ms(ours), "launcher_wall_ms": wall_ms(launcher_only),
                                    **same_size_copy(), "note": "diffusers not importable: no baseline column"}
    timestep = sched.timesteps[10]  # a 0-d CUDA tensor, as the pipeline's loop passes it

    def diffusers_step():  # what diffusers' pipeline runs per step: the CFG combine, then the scheduler
        return sched.step(u + 7.5 * (t - u), timestep, x)

    return ours, diffusers_step, lambda: {"ours_wall_ms": wall_ms(ours), "launcher_wall_ms": wall_ms(launcher_only),
                                          "baseline_wall_ms": wall_ms(diffusers_step), **same_size_copy()}


def linear_step_fns(row, ops, dpm):
    from diffusion_fast.kernels.linear_step import _linear_step_unchecked as kernel
    from diffusion_fast.schedulers import dpm_solver

    shape = _shape(row)
    mo, x, earlier = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
    sigmas = [14.6, 9.7, 6.4, 4.1, 0.0]  # a second-order step at index 2
    cx, cm, p0, px, (w,), _ = dpm_solver.solver_coefficients(sigmas, 2, 2, "epsilon")
    coefficients = dict(cx=cx, cm=cm, p0=p0, px=px, pe=w)

    def ours():
        return ops.linear_step(mo, x, earlier, **coefficients)

    def launcher_only():
        return kernel(mo, x, earlier, pm=0.0, **coefficients)

    src = torch.empty(row["amount"] // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def same_size_copy():
        return {"copy_same_bytes_graphed_ms": graphed_ms(lambda: dst.copy_(src))}

    if dpm is None:
        return ours, None, lambda: {"ours_wall_ms": wall_ms(ours), "launcher_wall_ms": wall_ms(launcher_only),
                                    **same_size_copy(), "note": "diffusers not importable: no baseline column"}
    timestep = dpm.timesteps[10]

    def diffusers_step():  # a second-order step of DPM++ 2M, its earlier x0 at hand
        dpm.model_outputs, dpm.lower_order_nums, dpm._step_index = [earlier, earlier], 2, 10
        return dpm.step(mo, timestep, x)

    return ours, diffusers_step, lambda: {"ours_wall_ms": wall_ms(ours), "launcher_wall_ms": wall_ms(launcher_only),
                                          "baseline_wall_ms": wall_ms(diffusers_step), **same_size_copy()}


def measure(row, fns, ceiling):
    """Fill one row in place; an exception is recorded in the row and the run goes on."""
    try:
        ours, baseline, extra = fns()
        ours()  # compile, autotune, warm up
        if baseline is not None:
            baseline()
        scale = 1e9 if row["unit"] == "GB/s" else 1e12
        row["ours_ms"] = median_ms(ours)
        row["ours_rate"] = row["amount"] / (row["ours_ms"] * 1e-3) / scale
        row["ours_fraction"] = row["ours_rate"] / ceiling
        if baseline is not None:
            row["baseline_ms"] = median_ms(baseline)
            row["baseline_rate"] = row["amount"] / (row["baseline_ms"] * 1e-3) / scale
            row["baseline_fraction"] = row["baseline_rate"] / ceiling
            row["speedup"] = row["baseline_ms"] / row["ours_ms"]
        row.update(extra())
        row["ours_graphed_ms"] = graphed_ms(ours)
        row["ours_graphed_fraction"] = row["amount"] / (row["ours_graphed_ms"] * 1e-3) / scale / ceiling
        if "copy_same_bytes_graphed_ms" in row:  # a 2.6 MB step cannot reach the 1 GiB copy rate: compare like sizes
            row["ours_fraction_of_same_size_copy"] = row["copy_same_bytes_graphed_ms"] / row["ours_graphed_ms"]
        if baseline is not None and _syncs_with_host(baseline):
            row["baseline_graph_error"] = "syncs with the host (checked before capture: a failed capture leaves " \
                                          "CUDA's RNG unusable for the rows after it)"
        elif baseline is not None:
            try:
                row["baseline_graphed_ms"] = graphed_ms(baseline)
                row["graphed_speedup"] = row["baseline_graphed_ms"] / row["ours_graphed_ms"]
            except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside the baseline: not capturable
                row["baseline_graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        torch.cuda.empty_cache()
    print(format_row(row), flush=True)


# ---- output -------------------------------------------------------------------------------------------------------

HEADER = (f"{'kernel':16s} {'model':20s} {'shape':22s} {'layout':13s} {'ours ms':>9s} {'rate':>8s} {'unit':7s} "
          f"{'of ceil':>7s} {'base ms':>9s} {'speedup':>7s}  notes")


def _num(row, key, fmt):
    value = row.get(key)
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def format_row(row):
    notes = []
    if "error" in row:
        notes.append("ERROR " + row["error"])
    if row.get("ours_wall_ms") is not None:
        notes.append(f"wall {row['ours_wall_ms']:.4f} ms (launcher alone {_num(row, 'launcher_wall_ms', '.4f')}, "
                     f"diffusers {_num(row, 'baseline_wall_ms', '.4f')})")
    if row.get("ours_graphed_ms") is not None:
        notes.append(f"in a CUDA graph {row['ours_graphed_ms']:.4f} ms ({_num(row, 'ours_graphed_fraction', '.1%')}) "
                     f"vs {_num(row, 'baseline_graphed_ms', '.4f')} ms: x{_num(row, 'graphed_speedup', '.2f')}")
    if row.get("ours_fraction_of_same_size_copy") is not None:
        notes.append(f"a same-size copy in a graph {row['copy_same_bytes_graphed_ms']:.4f} ms: ours at "
                     f"{row['ours_fraction_of_same_size_copy']:.0%} of it")
    for variant, what in A_B_VARIANTS.items():  # (the README tables' names for them)
        if row.get(f"{variant}_ms") is not None:
            notes.append(f"{what}: {row[f'{variant}_ms']:.4f} ms, in a CUDA graph "
                         f"{_num(row, f'{variant}_graphed_ms', '.4f')} ms")
    if row.get("baseline_graph_error"):
        notes.append("baseline not capturable: " + row["baseline_graph_error"][:80])
    if row.get("fits_L2"):
        notes.append("fits L2")
    if row.get("note"):
        notes.append(row["note"])
    speedup = f"x{row['speedup']:.2f}" if isinstance(row.get("speedup"), float) else "-"
    return (f"{row['kernel']:16s} {row['model']:20s} {row['shape']:22s} {row['layout']:13s} "
            f"{_num(row, 'ours_ms', '9.4f'):>9s} {_num(row, 'ours_rate', '8.1f'):>8s} {row['unit']:7s} "
            f"{_num(row, 'ours_fraction', '.1%'):>7s} {_num(row, 'baseline_ms', '9.4f'):>9s} {speedup:>7s}  "
            + "; ".join(notes))


def write_record(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {path}")


def run(rows):
    import diffusion_fast  # noqa: F401  (registers the ops)
    from diffusion_fast import ops

    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read + write); matmul 8192^3 "
          + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in ceil["matmul_TFLOPs"].items()), flush=True)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    try:
        import diffusers

        sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1)
        sched.set_timesteps(50, device="cuda")
        dpm = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                    beta_end=0.012, use_karras_sigmas=True)
        dpm.set_timesteps(25, device="cuda")
    except ImportError:
        sched = dpm = None
        print("diffusers is not importable: the cfg_ddim_step and linear_step rows have no diffusers column",
              flush=True)
    print(HEADER)
    for row in rows:
        row["fits_L2"] = bool(l2_bytes) and row["unit"] == "GB/s" and row["amount"] < l2_bytes
        if row["kernel"] == "group_norm_silu":
            measure(row, lambda: group_norm_fns(row, ops), ceil["copy_GBps"])
        elif row["kernel"] == "attention":
            measure(row, lambda: attention_fns(row, ops), ceil["matmul_TFLOPs"]["float16"])
        elif row["kernel"] == "linear_step":
            measure(row, lambda: linear_step_fns(row, ops, dpm), ceil["copy_GBps"])
        else:
            measure(row, lambda: cfg_ddim_fns(row, ops, sched), ceil["copy_GBps"])
    return ceil


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time our Triton kernels against PyTorch eager and diffusers on SD1.5/SDXL shapes (CUDA).")
    parser.add_argument("--out", default=None,
                        help="JSON-lines file to append the record to (default benchmarks/results/gpu_kernels.jsonl)")
    parser.add_argument("--quick", action="store_true", help="two shapes per model in (b) and (c), three for SD1.5's attention")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned rows without CUDA; writes a record only when --out is given")
    args = parser.parse_args(argv)
    rows = plan(args.quick)
    record = {"benchmark": "gpu_kernels", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "cuda": torch.version.cuda}
    if args.dry_run:
        print(HEADER)
        for row in rows:
            print(format_row(row))
        print(f"{len(rows)} rows planned")
        if args.out:
            write_record(args.out, dict(record, dry_run=True, rows=rows))
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA GPU (--dry-run lists the rows without one)")
    import triton

    ceil = run(rows)
    record.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__, ceilings=ceil, rows=rows)
    write_record(args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_kernels.jsonl"),
                 record)
    errors = sum("error" in row for row in rows)
    print(f"{len(rows)} rows, {errors} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
