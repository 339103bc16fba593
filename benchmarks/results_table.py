"""Markdown tables from the benchmark results, for the README:

    python benchmarks/results_table.py [FILE_OR_DIR ...]      (default: benchmarks/results/)

Per file, the latest record: *.jsonl files hold one JSON record per run (gpu_kernels.jsonl from gpu_kernels.py,
gpu_e2e.jsonl from gpu_e2e.py; --dry-run records are skipped), *.json files are pytest-benchmark reports (the CPU
benchmarks). Records of an unknown kind are printed as a generic table of their rows.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# A kernel row's A/B variants (gpu_kernels.py times each as <key>_ms and <key>_graphed_ms), as the tables name them.
# per_block_stats and launch_order are in the records of 2026-12-04 only: designs since decided.
A_B_VARIANTS = {
    "two_launch": "two-launch plan",
    "more_programs": "four times the programs",
    "two_loads": "two loads a thread in flight",
    "per_block_stats": "statistics reduced block by block",
    "launch_order": "output pass in launch order, no cache hints",
    "padded": "head dim padded, not split",
}


def fmt(value, spec=".3g"):
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def latest_record(path):
    if path.endswith(".jsonl"):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        records = [r for r in records if not r.get("dry_run")]
        return records[-1] if records else None
    with open(path) as f:
        return json.load(f)


def machine(record):
    return ", ".join(f"{k} {record[k]}" for k in ("gpu", "torch", "triton", "cuda", "diffusers") if record.get(k))


OLD_KEYS = {"eager_ms": "baseline_ms", "eager_rate": "baseline_rate", "ours_fraction_of_ceiling": "ours_fraction",
            "eager_fraction_of_ceiling": "baseline_fraction"}  # names used by the first gpu_kernels.py records


def gpu_kernels(record):
    c = record.get("ceilings", {})
    matmul = c.get("matmul_TFLOPs") or {"float16": c.get("matmul_fp16_TFLOPs")}
    mm = ", ".join(f"{k} {fmt(v, '.0f')} TFLOP/s" for k, v in matmul.items())
    out = [f"Kernels, {machine(record)}, {record.get('date', '')}. Ceilings measured in the same run: copy "
           f"{fmt(c.get('copy_GBps'), '.0f')} GB/s (read + write), matmul 8192^3 {mm}. Medians of "
           "triton.testing.do_bench (L2 cleared before each call, so cold-cache times; (L2) marks tensors that fit in L2)."]
    rows = [{OLD_KEYS.get(k, k): v for k, v in r.items()} for r in record.get("rows", [])]
    for kernel, baseline, extra in (("group_norm_silu", "F.group_norm + F.silu", False),
                                    ("attention", "F.scaled_dot_product_attention", False),
                                    ("cfg_ddim_step", "diffusers CFG + DDIMScheduler.step", True),
                                    ("linear_step", "diffusers DPMSolverMultistepScheduler.step", True)):
        mine = [r for r in rows if r["kernel"] == kernel]
        if not mine:
            continue
        unit = mine[0]["unit"]
        header = ["model", "shape", "layout", "ours ms", f"ours {unit}", "of ceiling", f"{baseline} ms", "speedup",
                  "in a CUDA graph: ours ms / baseline ms / speedup"]
        if extra:
            header += ["wall ms per call: ops / launcher alone / diffusers", "of a same-size copy (graphed)"]
        body = []
        for r in mine:
            if "error" in r:
                body.append([r["model"], r["shape"], r["layout"], "error: " + r["error"][:80]]
                            + [""] * (len(header) - 4))
                continue
            shape = r["shape"] + (" (L2)" if r.get("fits_L2") else "")
            layout = r["layout"] + (f" ({r['note']})" if r.get("note") else "")
            for variant, what in A_B_VARIANTS.items():
                if f"{variant}_ms" in r:
                    layout += (f" ({what}: {fmt(r[f'{variant}_ms'], '.4f')} ms, in a graph "
                               f"{fmt(r.get(f'{variant}_graphed_ms'), '.4f')} ms)")
            line = [r["model"], shape, layout, fmt(r.get("ours_ms"), ".4f"), fmt(r.get("ours_rate"), ".0f"),
                    fmt(r.get("ours_fraction"), ".0%"), fmt(r.get("baseline_ms"), ".4f"),
                    f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"]
            graphed = [fmt(r.get("ours_graphed_ms"), ".4f"), fmt(r.get("baseline_graphed_ms"), ".4f"),
                       fmt(r.get("graphed_speedup"), ".2f") + "x" if "graphed_speedup" in r else "n/a"]
            line.append(" / ".join(graphed) if "ours_graphed_ms" in r else "")
            if extra:
                wall = " / ".join(fmt(r.get(k), ".4f") for k in ("ours_wall_ms", "launcher_wall_ms", "baseline_wall_ms"))
                line += [wall if "ours_wall_ms" in r else "", fmt(r.get("ours_fraction_of_same_size_copy"), ".0%")]
            body.append(line)
        out.append(f"**{kernel}** vs {baseline} (fp16):\n\n" + table(header, body))
    return "\n\n".join(out)


def gpu_e2e(record):
    out = [f"End to end: {record.get('config', '')}; {machine(record)}, {record.get('date', '')}."]
    body = [[r.get("system"), fmt(r.get("it_per_s"), ".2f"), fmt(r.get("median_s"), ".3f"),
             (fmt(r.get("speedup_vs_diffusers_eager"), ".2f") + "x" if "speedup_vs_diffusers_eager" in r else "")
             + (f" ({fmt(r['speedup_vs_diffusers_pag'], '.2f')}x vs diffusers PAG)"
                if "speedup_vs_diffusers_pag" in r else "")
             + (f" ({fmt(r['speedup_vs_diffusers_controlnet'], '.2f')}x vs diffusers ControlNet)"
                if "speedup_vs_diffusers_controlnet" in r else "")]
            for r in record.get("rows", [])]
    out.append(table(["system", "it/s", "median s", "vs diffusers eager"], body))
    if record.get("quality"):
        out.append(table(["quality", "value"], [[k, fmt(v, ".2f")] for k, v in record["quality"].items()]))
    if record.get("first_image_seconds") is not None:
        out.append(f"First image from process start: {fmt(record['first_image_seconds'], '.1f')} s.")
    return "\n\n".join(out)


# The eager baseline each CPU group's target is stated against, in order of preference.
CPU_BASELINES = ("diffusers", "F.group_norm + F.silu", "reference")


def _impl(bench):
    """The implementation a row times: its impl parameter, else the test's name (an unparametrized benchmark)."""
    return (bench.get("params") or {}).get("impl") or bench.get("param") or bench["name"].split("[")[0]


def pytest_benchmark(record):
    info = record.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "")
    groups = {}
    for b in record.get("benchmarks", []):
        groups.setdefault(b.get("group") or b["name"].split("[")[0], []).append(b)
    out = [f"CPU benchmarks ({cpu}, {info.get('cpu', {}).get('count', '?')} cores, {record.get('datetime', '')[:10]}), "
           "pytest-benchmark medians of one run; speedup is against the group's eager baseline (diffusers' CFG "
           "combine + DDIMScheduler.step, F.group_norm + F.silu, or our reference where neither ran)."]
    body = []
    for group, items in groups.items():
        if len(items) == 1 and items[0].get("extra_info", {}).get("paired"):  # test_paired: medians of one loop
            e = items[0]["extra_info"]
            body.append([group, "cpp fused", fmt(e["ours_median_ms"], ".3f"),
                         f"{e['speedup']:.2f}x vs {e['baseline']} ({fmt(e['baseline_median_ms'], '.3f')} ms), "
                         f"calls alternated"])
            continue
        by_impl = {_impl(b): b for b in items}
        base = next((by_impl[name] for name in CPU_BASELINES if name in by_impl), None)
        base = base or max(items, key=lambda b: b["stats"]["median"])
        for b in items:  # a group of one row has nothing to compare against
            ratio = base["stats"]["median"] / b["stats"]["median"]
            speedup = f"{ratio:.2f}x vs {_impl(base)}" if len(items) > 1 else ""
            body.append([group, _impl(b), fmt(b["stats"]["median"] * 1e3, ".3f"), speedup])
    out.append(table(["benchmark", "implementation", "median ms", "speedup"], body))
    return "\n\n".join(out)


def cli_bench(record):
    out = [f"`{record['benchmark']}` ({record.get('steps')} steps end to end, {record.get('dtype')}) on "
           f"{record.get('device')}, torch {record.get('torch')}, diffusers {record.get('diffusers')}, "
           f"{record.get('date', '')}. Medians; systems timed round robin; speedup against PyTorch/diffusers eager."]
    body = [[r.get("op"), r.get("shape"), r.get("impl"), fmt(r.get("median_ms"), ".3f"),
             f"{fmt(r.get('throughput'), '.2f')} {r.get('unit', '')}", fmt(r.get("speedup_vs_eager"), ".2f") + "x"]
            for r in record.get("rows", [])]
    out.append(table(["op", "shape", "implementation", "median ms", "throughput", "vs eager"], body))
    return "\n\n".join(out)


def attention_tiles(record):
    out = [f"Attention tile sweep (benchmarks/tune_attention.py), {machine(record)}, {record.get('date', '')}, head "
           f"dim {'split' if record.get('split_head_dim') else 'padded'}. do_bench medians, fp16."]
    body = []
    for r in record.get("shapes", []):
        best = min(r.get("configs") or [[None, float("nan")]], key=lambda c: c[1])
        body.append(["x".join(map(str, r["shape"])), fmt(r.get("sdpa_ms"), ".4f"), str(tuple(r.get("current", ()))),
                     fmt(r.get("current_ms"), ".4f"), str(tuple(best[0] or ())), fmt(best[1], ".4f"),
                     fmt(r["sdpa_ms"] / best[1], ".2f") + "x" if best[1] == best[1] else "n/a"])
    out.append(table(["shape (B, H, Lq, Lk, D)", "SDPA ms", "table config", "table ms", "best config", "best ms",
                      "best vs SDPA"], body))
    return "\n\n".join(out)


def generic(record):
    rows = record.get("rows", [])
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if all(not isinstance(r.get(k), (list, dict))
                                                                         for r in rows)]
    return f"{record.get('benchmark', 'results')}, {record.get('date', '')}:\n\n" + table(
        keys, [[r.get(k) for k in keys] for r in rows])


def render(path):
    record = latest_record(path)
    if record is None:
        return f"_{os.path.basename(path)}: no records_"
    if "benchmarks" in record and "machine_info" in record:
        return pytest_benchmark(record)
    kind = record.get("benchmark", "")
    if kind.startswith("diffusion-fast bench"):
        return cli_bench(record)
    renderers = {"gpu_kernels": gpu_kernels, "gpu_e2e": gpu_e2e, "attention_tiles": attention_tiles}
    return renderers.get(kind, generic)(record)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render committed results files as the README's Markdown tables.")
    parser.add_argument("paths", nargs="*", default=[RESULTS], help=f"results files or folders (default: {RESULTS})")
    args = parser.parse_args(argv)
    paths = []
    for arg in args.paths:
        if os.path.isdir(arg):
            paths += sorted(glob.glob(os.path.join(arg, "*.jsonl")) + glob.glob(os.path.join(arg, "*.json")))
        elif os.path.isfile(arg):
            paths.append(arg)
        else:
            parser.error(f"paths: no such file or folder: {arg}")
    if not paths:
        print(f"no results files found in {RESULTS}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"### {os.path.basename(path)}\n\n{render(path)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
