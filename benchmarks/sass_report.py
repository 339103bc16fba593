"""What our Triton kernels compile to on an H100 (sm_90), without a GPU: registers, spills, load widths, MMAs.

    python benchmarks/sass_report.py [--json] [--kernel NAME]  (NAME: attention,
    attention_fp32, group_norm_silu, cfg_ddim_step, linear_step, euler, ddpm_step, variants)

Triton ships ptxas and nvdisasm, so a kernel can be compiled for sm_90 on any machine and its machine code read.
That cannot time anything, but it shows the structure that decides speed: whether global loads are 16-byte vectors
or one element at a time, whether loads go through shared memory asynchronously (software pipelining), whether the
kernel spills registers to the stack, and which tensor-core instructions run. Each case is compiled with the tile
config and constexprs its launcher picks for a real SD shape, and with the integer specialisation Triton applies at
launch (an int argument divisible by 16 is marked so; an int equal to 1 becomes a constant), emulated from the
strides the launcher would pass. tests/test_sass.py asserts the properties that matter on these reports.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sass_report.py compiles for a GPU: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from diffusion_fast.kernels._per_sample import sample_blocks  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
INSTRUCTION = re.compile(r"\b((?:LDGSTS|LDG|STG|UTMALDG|HGMMA|HMMA|MUFU\.EX2|MUFU\.RCP)\b(?:\.\w+)*)")


def compile_case(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Compile ``kernel`` for sm_90. args: name -> tensor (a pointer, assumed 16-byte aligned), int or float."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton turns an int argument equal to 1 into a constant
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def machine_code_summary(compiled) -> dict:
    """Registers, stack (spill) bytes, and a count of each global-memory and tensor-core instruction."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        # -c: the code sections alone; -ndf: no dataflow analysis (the same instructions, a quarter less time)
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", "-ndf", path], capture_output=True, text=True,
                              check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    code = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]  # one instruction a line
    sequence = [[i, m.group(1)] for i, line in enumerate(code) if (m := INSTRUCTION.search(line))]
    counts = collections.Counter(name for _, name in sequence)
    # sequence: [position among all instructions, name] of the counted ones, in program order (what is issued before
    # what: loads ahead of the arithmetic that does not need them, for instance)
    return {"registers": field("REG"), "stack_bytes": field("STACK"), "instructions": dict(sorted(counts.items())),
            "sequence": sequence}


# ---- the cases: each builds (kernel, args, constexprs, warps, stages) the way its launcher would -----------------

ATTENTION_SHAPES = {"SD1.5 64x64 self": (2, 8, 4096, 4096, 40), "SD1.5 64x64 cross": (2, 8, 4096, 77, 40),
                    "SD1.5 32x32 self": (2, 8, 1024, 1024, 80), "SD1.5 16x16 self": (2, 8, 256, 256, 160),
                    "SDXL 64x64 self": (2, 10, 4096, 4096, 64),
                    # SD3.5 Medium at 1024x1024: 4096 image + 333 text tokens in one attention (no block multiple)
                    "SD3 joint 1024px": (2, 24, 4429, 4429, 64)}


def attention_fp32_cases():
    return attention_cases(torch.float32, {k: v for k, v in ATTENTION_SHAPES.items() if k.startswith("SD1.5")})


def attention_cases(dtype=torch.float16, shapes=ATTENTION_SHAPES):
    from diffusion_fast.kernels import attention as A

    dtype_name = str(dtype).replace("torch.float", "fp")
    for name, (b, h, lq, lk, d) in shapes.items():
        # the models' layout: (B, L, H*D) projections viewed as (B, H, L, D); meta tensors carry strides only
        view = lambda length: torch.empty(b, length, h * d, device="meta", dtype=dtype).view(  # noqa: E731
            b, length, h, d).transpose(1, 2)
        q, k, v = view(lq), view(lk), view(lk)
        out = torch.empty(q.shape, device="meta", dtype=q.dtype)
        strides = [t.stride(i) if t.shape[i] > 1 else 0 for t in (q, k, v, out) for i in range(3)]
        align = A._alignment(strides, q.element_size())
        block_m, block_n, warps, stages = A._config(max(16, triton.next_power_of_2(d)), lk, dtype)
        names = [f"stride_{t}{s}" for t in "qkvo" for s in ("b", "h", "m" if t in "qo" else "n")]
        args = dict(zip(names, (s // align for s in strides)), q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, heads=h,
                    len_q=lq, len_k=lk, qk_scale=0.5)
        variants = {"split": True, "padded": False} if A._head_dim_blocks(d, True, dtype)[1] else {"": False}
        for label, split in variants.items():
            d_main, d_tail = A._head_dim_blocks(d, split, dtype)
            constexprs = dict(HEAD_DIM=d, ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, D_MAIN=d_main,
                              D_TAIL=d_tail, EVEN_M=lq % block_m == 0, EVEN_N=lk % block_n == 0,
                              PRECISION="ieee" if dtype == torch.float32 else "tf32")
            yield (f"attention {name} {b}x{h}x{lq}x{lk}x{d} {dtype_name} {label}".rstrip(), A._flash_attention_kernel,
                   args, constexprs, warps, stages)


def _cl_split_cases(x, groups, label, has_affine=True, silu=True):
    """The three kernels of the large channels_last plan, as group_norm_silu launches them for x."""
    from diffusion_fast.kernels import _group_norm_channels_last as C
    from diffusion_fast.kernels import group_norm_silu as G

    n, c = x.shape[:2]
    hw, cpg = x.shape[2] * x.shape[3], c // groups
    block_c = min(C.CL_BLOCK_C, triton.next_power_of_2(c))
    partials, stats = torch.empty(64, device="meta"), torch.empty(2 * n * groups, device="meta")
    sizes = dict(hw=hw, channels=c, chunk=8 * (G.BLOCK // block_c))
    tiles = dict(BLOCK_P=G.BLOCK // block_c, BLOCK_C=block_c)
    yield (f"group_norm_silu cl-stats {label}", C._cl_channel_stats_kernel,
           dict(sizes, x_ptr=x, partials_ptr=partials, c_tiles=triton.cdiv(c, block_c)), tiles,
           G.NUM_WARPS, 3)
    yield (f"group_norm_silu cl-groups {label}", C._cl_group_stats_kernel,
           dict(sizes, split=3, partials_ptr=partials, stats_ptr=stats, cpg=cpg, num_groups=groups,
                eps=1e-5),
           dict(SPLIT_BLOCK=4, CPG_BLOCK=triton.next_power_of_2(cpg)), 8, 3)
    # the largest chunks x C/G tile the launcher allows (4096 values)
    yield (f"group_norm_silu cl-groups {label} largest tile", C._cl_group_stats_kernel,
           dict(sizes, split=3, partials_ptr=partials, stats_ptr=stats, cpg=cpg, num_groups=groups,
                eps=1e-5),
           dict(SPLIT_BLOCK=4096 // triton.next_power_of_2(cpg), CPG_BLOCK=triton.next_power_of_2(cpg)), 8, 3)
    yield (f"group_norm_silu cl-apply {label}", C._cl_apply_kernel,
           dict(sizes, x_ptr=x, y_ptr=x, w_ptr=x, b_ptr=x, stats_ptr=stats, cpg=cpg, num_groups=groups,
                c_tiles=triton.cdiv(c, block_c)),
           dict(tiles, HAS_WEIGHT=has_affine, HAS_BIAS=has_affine, SILU=silu), G.NUM_WARPS, 3)


def group_norm_cases():
    from diffusion_fast.kernels import group_norm_silu as G

    for n, c, hw_side in ((2, 320, 64), (2, 640, 32), (2, 1280, 16), (1, 512, 256), (1, 128, 1024)):
        hw, groups = hw_side * hw_side, 32
        cpg = c // groups
        x = torch.empty(n, c, hw_side, hw_side, device="meta", dtype=torch.float16)
        for channels_last in (False, True):
            flags = dict(CPG=cpg if channels_last else 0, CHANNELS_LAST=channels_last, HAS_WEIGHT=True,
                         HAS_BIAS=True, SILU=True, CHANNEL_PER_BLOCK=not channels_last and hw % G.BLOCK == 0,
                         BLOCK=G.BLOCK)
            layout = "channels_last" if channels_last else "NCHW"
            label = f"{n}x{c}x{hw_side}x{hw_side} {layout} fp16"
            common = dict(x_ptr=x, y_ptr=x, w_ptr=x, b_ptr=x, hw=hw, cpg=cpg, channels=c, group_len=cpg * hw,
                          num_groups=groups, eps=1e-5)
            if x.numel() <= G.ONE_PASS_MAX_ELEMENTS:
                yield f"group_norm_silu one-pass {label}", G._group_norm_one_pass_kernel, common, flags, G.NUM_WARPS, 3
            elif channels_last:
                yield from _cl_split_cases(x, groups, label)
            else:
                del flags["CPG"], flags["CHANNELS_LAST"]
                for loads in (1, 2):  # LOADS_IN_FLIGHT: the default, and the GPU benchmark's A/B
                    tag = "" if loads == 1 else ", 2 loads"
                    yield (f"group_norm_silu stats {label}{tag}", G._group_stats_kernel,
                           dict(x_ptr=x, partials_ptr=x.float(), hw=hw, cpg=cpg,
                                channels=c, group_len=cpg * hw, chunk_len=4096, split=16, num_groups=groups),
                           dict(BLOCK=G.BLOCK * loads), G.NUM_WARPS, 3)
                    yield (f"group_norm_silu apply {label}{tag}", G._group_apply_kernel,
                           dict(common, partials_ptr=x.float(), chunk_len=4096, split=16),
                           dict(flags, SPLIT_BLOCK=16, LOADS=loads), G.NUM_WARPS, 3)


def cfg_ddim_cases():
    from diffusion_fast.kernels import ddim as K

    alphas = torch.empty(4, device="meta")
    for shape in ((2, 4, 64, 64), (4, 4, 128, 128), (3, 4, 7, 9)):  # the last: a sample of 252, no 16-byte rows
        x = torch.empty(shape, device="meta", dtype=torch.float16)
        args = dict(out_ptr=x, text_ptr=x, sample_ptr=x, noise_ptr=x, prev_ptr=x, x0_ptr=x, alpha_t_ptr=alphas,
                    alpha_prev_ptr=alphas, guidance_scale=7.5, eta=0.0, clip_range=0.0, per_sample=x[0].numel(),
                    blocks_per_sample=sample_blocks(x.shape, K.BLOCK)[2])
        constexprs = dict(CFG=True, PRED=0, CLIP=False, USE_CLIPPED=False, HAS_NOISE=False, BLOCK=K.BLOCK)
        yield f"cfg_ddim_step {'x'.join(map(str, shape))} fp16", K._cfg_ddim_kernel, args, constexprs, 4, 3


def linear_step_cases():
    from diffusion_fast.kernels import linear_step as L

    for shape in ((2, 4, 64, 64), (2, 4, 128, 128)):
        mo = torch.empty(shape, device="meta", dtype=torch.float16)
        for sample_dtype, extra in ((torch.float16, True), (torch.float32, True), (torch.float16, False)):
            x = torch.empty(shape, device="meta", dtype=sample_dtype)  # the schedulers pass an fp32 sample
            args = dict(mo_ptr=mo, x_ptr=x, extra_ptr=mo, prev_ptr=mo, x0_ptr=mo, cx=1.4, cm=-0.9, p0=0.8, px=0.3,
                        pm=0.1, pe=-0.2, numel=mo.numel())
            label = f"{'x'.join(map(str, shape))} fp16, sample {str(sample_dtype)[6:]}{'' if extra else ', no extra'}"
            yield f"linear_step {label}", L._linear_step_kernel, args, dict(HAS_EXTRA=extra, BLOCK=L.BLOCK), 4, 3


def euler_cases():
    from diffusion_fast.kernels import euler as E

    sigmas = torch.empty(4, device="meta")
    for shape in ((2, 4, 128, 128), (3, 4, 7, 9)):  # SDXL's latents with CFG; 252-element samples (a masked block)
        mo = torch.empty(shape, device="meta", dtype=torch.float16)
        x = torch.empty(shape, device="meta", dtype=torch.float32)  # the schedulers pass an fp32 sample
        args = dict(mo_ptr=mo, x_ptr=x, noise_ptr=mo, prev_ptr=mo, x0_ptr=mo, sigma_ptr=sigmas,
                    sigma_next_ptr=sigmas, gamma=0.0, s_noise=1.0, per_sample=mo[0].numel(),
                    blocks_per_sample=sample_blocks(mo.shape, E.BLOCK)[2])
        for ancestral in (False, True):
            constexprs = dict(PRED=0, ANCESTRAL=ancestral, HAS_NOISE=ancestral, BLOCK=E.BLOCK)
            yield (f"{'euler_ancestral_step' if ancestral else 'euler_step'} {'x'.join(map(str, shape))} fp16",
                   E._euler_kernel, args, constexprs, 4, 3)


def ddpm_cases():
    from diffusion_fast.kernels import ddpm as D

    coefficients = torch.empty(4, device="meta")
    for shape in ((2, 4, 64, 64), (3, 4, 7, 9)):  # whole blocks per sample; 252-element samples (a masked block)
        x = torch.empty(shape, device="meta", dtype=torch.float16)
        args = dict(mo_ptr=x, x_ptr=x, noise_ptr=x, prev_ptr=x, x0_ptr=x, alpha_t_ptr=coefficients,
                    alpha_prev_ptr=coefficients, std_ptr=coefficients, clip_range=1.0, per_sample=x[0].numel(),
                    blocks_per_sample=sample_blocks(x.shape, D.BLOCK)[2])
        constexprs = dict(PRED=0, CLIP=True, HAS_NOISE=True, BLOCK=D.BLOCK)
        yield f"ddpm_step {'x'.join(map(str, shape))} fp16", D._ddpm_kernel, args, constexprs, 4, 3


def variant_cases():
    """Every kind of constexpr combination the launchers can produce, beyond the SD shapes above: each must compile
    (the interpreter runs all of them, but it accepts code the compiler may reject)."""
    for dtype in (torch.bfloat16, torch.float32):
        yield from attention_cases(dtype, {"SD1.5 64x64 self": ATTENTION_SHAPES["SD1.5 64x64 self"]})
    yield from attention_cases(torch.float16, {
        "uneven, head dim 24 (padded, masked)": (1, 2, 50, 77, 24), "uneven, head dim 80 (split)": (3, 2, 50, 77, 80),
        "head dim 8": (1, 2, 20, 20, 8), "head dim 256": (1, 2, 64, 64, 256), "single query row": (2, 1, 1, 77, 40)})

    from diffusion_fast.kernels import ddim as K
    from diffusion_fast.kernels import ddpm as D
    from diffusion_fast.kernels import euler as E
    from diffusion_fast.kernels import group_norm_silu as G
    from diffusion_fast.kernels import linear_step as L

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        shapes = (((3, 96, 7, 9), 32), ((2, 64, 1, 1), 32), ((2, 320, 64, 64), 32))
        for shape, groups in shapes if dtype == torch.float16 else shapes[:1]:
            x = torch.empty(shape, device="meta", dtype=dtype)
            c, hw = shape[1], shape[2] * shape[3]
            cpg = c // groups
            for channels_last, affine, silu in ((False, True, True), (True, False, False), (True, True, False)):
                flags = dict(CPG=cpg if channels_last else 0, CHANNELS_LAST=channels_last, HAS_WEIGHT=affine,
                             HAS_BIAS=affine, SILU=silu, CHANNEL_PER_BLOCK=not channels_last and hw % G.BLOCK == 0,
                             BLOCK=G.BLOCK)
                common = dict(x_ptr=x, y_ptr=x, w_ptr=x, b_ptr=x, hw=hw, cpg=cpg, channels=c, group_len=cpg * hw,
                              num_groups=groups, eps=1e-5)
                label = f"{'x'.join(map(str, shape))} {'channels_last' if channels_last else 'NCHW'} {dtype}"
                yield (f"group_norm_silu one-pass {label}", G._group_norm_one_pass_kernel, common, flags,
                       G.NUM_WARPS, 3)
                if channels_last:
                    yield from _cl_split_cases(x, groups, label, affine, silu)
                    continue
                partials = torch.empty(16, device="meta")
                del flags["CPG"], flags["CHANNELS_LAST"]
                for loads in (1, 2):
                    yield (f"group_norm_silu stats {label} loads {loads}", G._group_stats_kernel,
                           dict(x_ptr=x, partials_ptr=partials, hw=hw, cpg=cpg,
                                channels=c, group_len=cpg * hw, chunk_len=4096, split=3, num_groups=groups),
                           dict(BLOCK=G.BLOCK * loads), G.NUM_WARPS, 3)
                    yield (f"group_norm_silu apply {label} loads {loads}", G._group_apply_kernel,
                           dict(common, partials_ptr=partials, chunk_len=4096, split=3),
                           dict(flags, SPLIT_BLOCK=4, LOADS=loads), G.NUM_WARPS, 3)
        alphas = torch.empty(3, device="meta")
        for pred in (0, 1, 2):
            for shape in ((3, 4, 7, 9), (3, 4, 16, 32)):
                x = torch.empty(shape, device="meta", dtype=dtype)
                args = dict(out_ptr=x, text_ptr=x, sample_ptr=x, noise_ptr=x, prev_ptr=x, x0_ptr=x,
                            alpha_t_ptr=alphas, alpha_prev_ptr=alphas, guidance_scale=7.5, eta=0.5, clip_range=1.5,
                            per_sample=x[0].numel(), blocks_per_sample=sample_blocks(x.shape, K.BLOCK)[2])
                constexprs = dict(CFG=pred == 0, PRED=pred, CLIP=pred != 1, USE_CLIPPED=pred == 2, HAS_NOISE=True,
                                  BLOCK=K.BLOCK)
                yield (f"cfg_ddim_step pred {pred} {'x'.join(map(str, shape))} {dtype}", K._cfg_ddim_kernel, args,
                       constexprs, 4, 3)
        x = torch.empty((3, 4, 16, 32), device="meta", dtype=dtype)
        values = torch.empty(3, device="meta")  # the per-sample sigmas or alphas
        for pred in (0, 1, 2):  # Euler with churn (noise), every prediction type
            yield (f"euler_step churn pred {pred} 3x4x16x32 {dtype}", E._euler_kernel,
                   dict(mo_ptr=x, x_ptr=x, noise_ptr=x, prev_ptr=x, x0_ptr=x, sigma_ptr=values, sigma_next_ptr=values,
                        gamma=0.3, s_noise=1.0, per_sample=x[0].numel(), blocks_per_sample=2),
                   dict(PRED=pred, ANCESTRAL=False, HAS_NOISE=True, BLOCK=E.BLOCK), 4, 3)
        for pred in (1, 2):  # DDPM's other prediction types, without clipping or noise (the last step)
            yield (f"ddpm_step pred {pred} 3x4x16x32 {dtype}", D._ddpm_kernel,
                   dict(mo_ptr=x, x_ptr=x, noise_ptr=x, prev_ptr=x, x0_ptr=x, alpha_t_ptr=values,
                        alpha_prev_ptr=values, std_ptr=values, clip_range=0.0, per_sample=x[0].numel(),
                        blocks_per_sample=2),
                   dict(PRED=pred, CLIP=False, HAS_NOISE=False, BLOCK=D.BLOCK), 4, 3)
        x = torch.empty((3, 4, 7, 9), device="meta", dtype=dtype)  # a partial last block
        yield (f"linear_step 3x4x7x9 {dtype}", L._linear_step_kernel,
               dict(mo_ptr=x, x_ptr=x, extra_ptr=x, prev_ptr=x, x0_ptr=x, cx=1.0, cm=-1.0, p0=0.5, px=0.5, pm=0.0,
                    pe=1.0, numel=x.numel()), dict(HAS_EXTRA=True, BLOCK=L.BLOCK), 4, 3)


CASES = {"attention": attention_cases, "attention_fp32": attention_fp32_cases, "group_norm_silu": group_norm_cases,
         "cfg_ddim_step": cfg_ddim_cases, "linear_step": linear_step_cases, "euler": euler_cases,
         "ddpm_step": ddpm_cases,
         "variants": variant_cases}


def report(kernels=tuple(CASES), shard=(0, 1)):
    """Compile every case of these kernels; shard (k, n): only cases k, k + n, k + 2n, ... (one of n processes)."""
    rows = []
    index = -1
    for kernel_name in kernels:
        for name, kernel, args, constexprs, warps, stages in CASES[kernel_name]():
            index += 1
            if index % shard[1] != shard[0]:
                continue
            compiled = compile_case(kernel, args, constexprs, warps, stages)
            rows.append(dict(case=name, kernel=kernel_name, num_warps=warps, num_stages=stages,
                             constexprs={k: v for k, v in constexprs.items() if k != "PRECISION"},
                             shared_bytes=compiled.metadata.shared, **machine_code_summary(compiled)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    parser.add_argument("--kernel", choices=sorted(CASES), action="append", help="only this kernel (repeatable)")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="compile only cases K, K+N, K+2N, ... (to split a long report over N processes)")
    args = parser.parse_args(argv)
    try:
        shard = tuple(int(v) for v in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # newer Tritons warn when it is unset; 1 is the default
    rows = report(args.kernel or tuple(CASES), shard)
    if args.json:
        print(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}))
        return 0
    print(f"Triton {triton.__version__}, compiled for sm_90 (H100); instruction counts are static, not executed")
    for row in rows:
        print(f"{row['case']:58s} regs {row['registers']:3d}  stack {row['stack_bytes']:3d} B  shared "
              f"{row['shared_bytes'] // 1024:3d} KB  warps {row['num_warps']} stages {row['num_stages']}")
        print("    " + ", ".join(f"{k} x{v}" for k, v in row["instructions"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
