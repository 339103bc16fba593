"""Sweep the flash-attention kernel's tile configs on SD shapes (CUDA only) and print the best per shape.

    python benchmarks/tune_attention.py [--out benchmarks/results/attention_tiles.jsonl] [--quick] [--max-seconds S]

kernels/attention.py launches a fixed tile table (``_config``), so the first image pays no tuning; this script is
how that table is chosen. It launches through the kernel's own ``_launch`` (the same strides, alignment and grid as
the library), checks each config's output against SDPA before timing it, and prints SDPA, the current table entry
and the three fastest configs. Times are triton.testing.do_bench medians, fp16, inputs laid out as the models pass
them ((B, L, H*D) projections viewed as (B, H, L, D)). Appends one JSON record (GPU, versions, date, and per shape:
SDPA, the current entry and every config's time) to --out. --quick sweeps 24 configs (BLOCK_N 64 or 128) on the
three self-attention shapes that cost the most (SD1.5's head dims 40 and 80, SDXL's 64), about a minute and a half on
an H200; --max-seconds stops the sweep when its time is up and records the shapes finished by then.
"""
import argparse
import datetime
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64)]
CONFIGS = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))  # BLOCK_M, BLOCK_N, warps, stages
QUICK_SHAPES = [SHAPES[0], SHAPES[6], SHAPES[2]]
QUICK_CONFIGS = [c for c in CONFIGS if c[1] != 32]


def model_view(b, length, h, d):
    return torch.randn(b, length, h * d, device="cuda", dtype=torch.float16).view(b, length, h, d).transpose(1, 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "attention_tiles.jsonl"))
    parser.add_argument("--quick", action="store_true", help="3 self-attention shapes, 24 configs")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop sweeping after this long")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_attention.py needs a CUDA GPU")
    import triton
    import triton.testing

    from diffusion_fast.kernels import attention as A

    record = {"benchmark": "attention_tiles", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "split_head_dim": A.SPLIT_HEAD_DIM, "shapes": []}
    import time

    start = time.perf_counter()
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    for b, h, lq, lk, d in QUICK_SHAPES if args.quick else SHAPES:
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            print(f"--max-seconds {args.max_seconds:g} reached: {(b, h, lq, lk, d)} and later shapes not swept")
            break
        q, k, v = model_view(b, lq, h, d), model_view(b, lk, h, d), model_view(b, lk, h, d)
        out = torch.empty(q.shape, device="cuda", dtype=q.dtype)
        ref = F.scaled_dot_product_attention(q, k, v)
        sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        results = []
        for cfg in configs:
            try:
                A._launch(q, k, v, out, None, cfg)
                if not torch.allclose(out, ref, atol=2e-2, rtol=2e-2):
                    print(f"  {cfg}: wrong output, skipped", flush=True)
                    continue
                results.append((triton.testing.do_bench(lambda: A._launch(q, k, v, out, None, cfg),
                                                        return_mode="median"), cfg))
            except Exception as exc:  # noqa: BLE001 - out of shared memory / registers: skip the config
                print(f"  {cfg}: {type(exc).__name__}, skipped", flush=True)
        results.sort()
        current = A._config(max(16, triton.next_power_of_2(d)), lk)
        cur_ms = next((t for t, c in results if c == current), float("nan"))
        print(f"{(b, h, lq, lk, d)}: sdpa {sdpa * 1e3:.1f} us | current {current} {cur_ms * 1e3:.1f} us | best "
              + ", ".join(f"{c} {t * 1e3:.1f} us" for t, c in results[:3]), flush=True)
        record["shapes"].append({"shape": [b, h, lq, lk, d], "sdpa_ms": sdpa, "current": list(current),
                                 "current_ms": cur_ms, "configs": [[list(c), t] for t, c in results]})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
