"""Flash-attention forward: softmax(q k^T * scale) v without materialising the Lq x Lk score matrix.

One program computes a BLOCK_M tile of query rows for one (batch, head): it streams the keys and values in BLOCK_N
tiles, keeping a running row maximum and row sum (the online softmax), and rescales its fp32 accumulator as the
maximum grows. Scores use exp2 with log2(e) folded into the scale (the Triton tutorial's trick). Both products are
tl.dot in the input dtype with fp32 accumulation; fp32 inputs use IEEE fp32 dot products (no tf32), so an fp32 caller
gets fp32 accuracy.

Head dims that are not powers of two (SD1.5's 40, 80, 160) are padded to the next power of two with masked loads
(zeros contribute nothing to q k^T or to p v). HEAD_DIM is a compile-time constant so the compiler knows the mask is
constant over 8-element runs and still emits vector loads. Padding 40 to 64 wastes 37% of the dot work (80 -> 128:
37%, 160 -> 256: 37%); SDPA's flash kernels pad the same way. The key loop runs over whole BLOCK_N tiles without a key
mask and finishes with one masked tile when Lk is not a block multiple (77 text tokens); masked scores are -inf
before the row maximum. q, k and v may be any strided views with a unit last stride, so the models pass (B, L, H*D)
projections viewed as (B, H, L, D) without a copy.

On a GPU the tile sizes come from the fixed table in ``_config`` (chosen with benchmarks/tune_attention.py on an
H100), so the first image pays no tuning. DIFFUSION_FAST_ATTENTION_AUTOTUNE=1 autotunes instead (triton.autotune over
a small pruned list keyed on Lq, Lk and the head-dim block: a few seconds per new key, once per process). Under
TRITON_INTERPRET=1 one small config is pinned.
"""
from __future__ import annotations

import itertools
import math
import os

import torch
import triton
import triton.language as tl

from diffusion_fast import _validate

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Off by default: tuning costs about a minute across SD1.5's shapes before the first image (the promise is no
# minutes-long warm-up); DIFFUSION_FAST_ATTENTION_AUTOTUNE=1 opts in for long-running services.
AUTOTUNE = not INTERPRET and os.environ.get("DIFFUSION_FAST_ATTENTION_AUTOTUNE", "0") == "1"
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
INTERPRETER_CONFIG = (32, 32, 4, 1)  # (BLOCK_M, BLOCK_N, num_warps, num_stages): small, and one config, no tuning


@triton.jit
def _attend_key_tile(
    acc, l_i, m_i,  # (BLOCK_M, BLOCK_D) fp32 unnormalised output, (BLOCK_M,) row sums, (BLOCK_M,) row maxima (log2)
    q,  # (BLOCK_M, BLOCK_D) query tile, input dtype
    k_ptrs,  # (BLOCK_D, BLOCK_N) pointers to this tile of k, transposed
    v_ptrs,  # (BLOCK_N, BLOCK_D) pointers to this tile of v
    key_index,  # (BLOCK_N,) key positions of this tile
    len_k, qk_scale, d_mask,  # Lk, scale * log2(e), (BLOCK_D,) lanes < HEAD_DIM
    MASK_KEYS: tl.constexpr,  # this tile runs past Lk
    MASK_D: tl.constexpr,  # HEAD_DIM < BLOCK_D
    PRECISION: tl.constexpr,
):
    if MASK_KEYS:
        key_ok = key_index < len_k
        k = tl.load(k_ptrs, mask=key_ok[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_mask[None, :], other=0.0)
    elif MASK_D:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, k, input_precision=PRECISION)
    if MASK_KEYS:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    # Every tile handed here holds at least one real key (the masked tail exists only when Lk % BLOCK_N != 0), so
    # m_new is finite after the first tile: no row ever computes exp2(-inf - -inf) = NaN.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # q (B, H, Lq, D), k and v (B, H, Lk, D), o (B, H, Lq, D) contiguous
    stride_qb, stride_qh, stride_qm,  # q strides in elements (the last is 1)
    stride_kb, stride_kh, stride_kn,  # k strides
    stride_vb, stride_vh, stride_vn,  # v strides
    stride_ob, stride_oh, stride_om,  # o strides
    heads, len_q, len_k,  # H, Lq, Lk
    HEAD_DIM: tl.constexpr,  # D
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    BLOCK_D: tl.constexpr,  # D padded to a power of two (>= 16)
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs; "tf32" (the default, unused by 16-bit dots) otherwise
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: B*H*L*D can pass 2^31 for large batches
    b = pid_bh // heads
    h = pid_bh % heads
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    o_ptr += b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = (offs_m[:, None] < len_q) & d_mask[None, :]
    q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_mask, other=0.0)
    k_ptrs = k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    len_k_whole = len_k - len_k % BLOCK_N  # keys in whole tiles: no key mask needed
    for start_n in range(0, len_k_whole, BLOCK_N):
        acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n + offs_n, len_k, qk_scale,
                                         d_mask, False, HEAD_DIM < BLOCK_D, PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if len_k_whole < len_k:
        acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, len_k_whole + offs_n, len_k, qk_scale,
                                         d_mask, True, HEAD_DIM < BLOCK_D, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(o_ptr + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(o_ptr.dtype.element_ty), mask=row_mask)


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel covers q's head dim and dtype (the VAE's single 512-wide head is out of range)."""
    return q.shape[-1] <= MAX_HEAD_DIM and q.dtype in DTYPES


def _config(block_d: int, len_k: int, dtype: torch.dtype = torch.float16):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU without tuning (measured on an H100 for 16-bit inputs)."""
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory: small tiles, no pipelining
        return (32 if block_d >= 256 else 64), 32, 4, 1
    if block_d >= 256:
        return 64, 64, 8, 2
    if block_d >= 128:  # head dim 80: 64-row tiles won the H100 sweep (26.9 us vs 28.2 at 2x8x1024x1024)
        return 64, 64, 4, 3
    if len_k <= 128:  # cross-attention over 77 text tokens: 32-key tiles won (22.0 us vs 29.5 for one 128 tile)
        return 128, 32, 4, 3
    return 128, 64, 4, 2


# The tuning space: BLOCK_M x warps (64 rows on 4 warps, 128 rows on 4 or 8), BLOCK_N, stages; pruned per call.
_TUNING_SPACE = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for (m, w), n, s in itertools.product(((64, 4), (128, 4), (128, 8), (64, 8)), (32, 64, 128), (2, 3, 4))
]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs worth timing for this call: at most 14, all within shared memory and registers."""
    block_d = kwargs["BLOCK_D"]
    len_q, len_k = named_args["len_q"], named_args["len_k"]
    if named_args["q_ptr"].dtype == torch.float32:  # nobody times fp32 attention: use the safe default, no tuning
        m, n, w, s = _config(block_d, len_k, torch.float32)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)]
    key_tile = max(32, triton.next_power_of_2(len_k))  # the narrowest key tile in the tuning space is 32
    widest_key_tile = 64 if block_d >= 256 else 128  # a 128 x 256 fp16 k or v tile alone is 64 KB of shared memory
    kept = []
    for c in configs:
        m, n, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if key_tile <= widest_key_tile:
            ok = n == key_tile and s == 2  # all keys in one tile (cross-attention's 77): no loop to pipeline
        elif block_d <= 64:
            ok = n in (64, 128) and s in (2, 3) or (n, m, s) == (64, 128, 4)
        else:
            ok = n in (32, 64) and s in (2, 3) and (block_d <= 128 or s == 2)
        if block_d >= 256:
            ok = ok and m == 64  # a 64 x 256 fp32 accumulator alone: 64 registers a thread on 8 warps
        elif m == 64 and w == 8:
            ok = False  # 8 warps on 64 rows only for the 256-wide heads
        if m == 128 and len_q <= 64:
            ok = False  # a 128-row tile on a short query wastes half the program
        if ok:
            kept.append(c)
    return kept or [configs[0]]


_flash_attention_autotuned = triton.autotune(
    configs=_TUNING_SPACE, key=["len_q", "len_k", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune_configs},
)(_flash_attention_kernel)


def attention(q, k, v, *, scale=None):
    """Flash attention of q (B, H, Lq, D) against k, v (B, H, Lk, D); returns (B, H, Lq, D) contiguous."""
    _validate.attention_args(q, k, v, scale)
    if not supports(q):
        raise ValueError(f"q: head dim {q.shape[-1]} / dtype {q.dtype} is outside the kernel's range "
                         f"(head dim <= {MAX_HEAD_DIM}, dtype in {DTYPES}); use diffusion_fast.ops.attention")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"q is on {q.device}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    # Row offsets inside one head are int32: a view whose rows lie 2^31 elements apart is copied first.
    q, k, v = (t if t.stride(-1) == 1 and t.stride(2) * t.shape[2] < 2**31 else t.contiguous() for t in (q, k, v))
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    if batch * heads > 65535:  # the grid's second axis (one program column per batch x head) stops at 65535
        raise ValueError(f"q has batch x heads = {batch * heads} (shape {tuple(q.shape)}); the kernel takes <= 65535")
    out = torch.empty((batch, heads, len_q, head_dim), device=q.device, dtype=q.dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(head_dim))
    args = (q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            heads, len_q, len_k, head_dim, scale * LOG2E)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if AUTOTUNE:
        grid = lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _flash_attention_autotuned[grid](*args, BLOCK_D=block_d, PRECISION=precision)
    else:
        block_m, block_n, num_warps, num_stages = (
            INTERPRETER_CONFIG if INTERPRET else _config(block_d, len_k, q.dtype))
        _flash_attention_kernel[(triton.cdiv(len_q, block_m), batch * heads)](
            *args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages)
    return out
