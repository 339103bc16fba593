"""What the cache does to the CPU ops' times: each op timed back to back, after its baseline's call, and after a plain
copy of as much memory (which evicts as the baseline does, without its other work). The issue's two CPU targets
(benchmarks/test_bench_cpu.py's groups and its test_paired) differ by exactly this.

    python benchmarks/cpu_cache_effects.py [--jsonl FILE]

Cases: GroupNorm+SiLU at 2x320x64x64 fp32 (ours after eager's call, after a 64 MB copy; eager the same way round),
the fused CFG+DDIM step at 2x4x128x128 fp32 (after diffusers' step, after an 8 MB copy, after 150 us of Python), and
GroupNorm+SiLU at 1x512x128x128, whose 33.5 MB outputs are fresh memory mappings (past glibc's 32 MiB mmap ceiling),
so page faults dominate it: run once more with THP_MEM_ALLOC_ENABLE=1 set before Python starts (PyTorch then asks for
huge pages for large CPU tensors) to see their share. Prints the medians (microseconds); --jsonl appends a record.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import test_bench_cpu as bench  # (importing it pins the allocator as the benchmark does)
from diffusion_fast import ops

CALLS = 200


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _copy(megabytes):
    src = torch.empty(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _busy(seconds):
    def spin():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    return spin


def median_us(fn, before=None, calls=CALLS):
    """Median time of fn() over `calls` calls, each after before() (untimed) when given."""
    fn()
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", help="append the record to this file")
    parser.add_argument("--calls", type=int, default=CALLS, help="timed calls per GroupNorm row (the step's: twice "
                        "as many; the 1x512x128x128 rows': a seventh)")
    args = parser.parse_args(argv)
    calls = args.calls
    rows = []

    def row(case, what, us):
        rows.append({"case": case, "timed": what, "median_us": round(us, 1)})
        print(f"{case:44s} {what:34s} {us:9.1f} us")

    ours, eager, _ = bench._paired_calls("group_norm_silu 2x320x64x64 NCHW fp32")
    case = "group_norm_silu 2x320x64x64 NCHW fp32"
    flush = _copy(64)
    row(case, "ours, back to back", median_us(ours, calls=calls))
    row(case, "ours, after eager's call", median_us(ours, eager, calls=calls))
    row(case, "ours, after a 64 MB copy", median_us(ours, flush, calls=calls))
    row(case, "eager, back to back", median_us(eager, calls=calls))
    row(case, "eager, after ours", median_us(eager, ours, calls=calls))
    row(case, "eager, after a 64 MB copy", median_us(eager, flush, calls=calls))

    ours, diffusers_step, _ = bench._paired_calls("cfg_ddim_step 2x4x128x128 fp32")
    case = "cfg_ddim_step 2x4x128x128 fp32"
    row(case, "ours, back to back", median_us(ours, calls=2 * calls))
    row(case, "ours, after diffusers' step", median_us(ours, diffusers_step, calls=2 * calls))
    row(case, "ours, after an 8 MB copy", median_us(ours, _copy(8), calls=2 * calls))
    row(case, "ours, after 150 us of Python", median_us(ours, _busy(150e-6), calls=2 * calls))

    x, w, b = torch.randn(1, 512, 128, 128), torch.randn(512), torch.randn(512)
    case = "group_norm_silu 1x512x128x128 NCHW fp32"
    row(case, "ours, back to back", median_us(lambda: ops.group_norm_silu(x, 32, w, b, backend="cpp"),
                                                   calls=max(2, calls // 7)))
    row(case, "eager, back to back", median_us(lambda: F.silu(F.group_norm(x, 32, w, b)), calls=max(2, calls // 7)))

    record = {"benchmark": "cpu_cache_effects", "cpu": _cpu_name(), "cores": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "calls": calls,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    print(f"{record['cpu']}, {record['cores']} cores, torch {record['torch']}, "
          f"THP_MEM_ALLOC_ENABLE={record['THP_MEM_ALLOC_ENABLE']}")
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
