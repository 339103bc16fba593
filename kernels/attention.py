"""Flash-attention forward: softmax(q k^T * scale) v without materialising the Lq x Lk score matrix.

One program computes a BLOCK_M tile of query rows for one (batch, head): it streams the keys and values in BLOCK_N
tiles, keeping a running row maximum and row sum (the online softmax), and rescales its fp32 accumulator as the
maximum grows. Scores use exp2 with log2(e) folded into the scale.

Head dims that are not powers of two are split into a power-of-two main block and a power-of-two tail of at least
16 lanes where that saves more than a quarter of the padded lanes: 80 = 64 + 16, 160 = 128 + 32 (SD1.5's deeper
levels), none of it padding, against 37.5% when padded to the next power of two (masked lanes load zeros, which
contribute nothing to q k^T or to p v). Each product is then two tl.dots. SD1.5's head dim 40 is padded to 64 in
16-bit: split as 32 + 16 it saves 16 of 64 lanes, and the H200 ran it 7% slower than padded in three runs (the
16-wide tail dots cost more than they save). fp32, on the FMA units, splits it. ``SPLIT_HEAD_DIM = False`` pads
every head dim; benchmarks/gpu_kernels.py times both. Key and query lengths that are not block multiples (77 text
tokens) are masked, masked scores set to -inf before the row maximum. q, k and v may be any strided views with a
unit last stride, so the models pass (B, L, H*D) projections viewed as (B, H, L, D) without a copy. fp32 inputs use
IEEE fp32 dot products (no tf32), so an fp32 caller gets fp32 accuracy.

Alignment. Triton vectorises a load (and pipelines it through shared memory with 16-byte async copies) only when it
can prove each row starts 16 bytes apart. It learns that from integer arguments divisible by 16, which head dim 40's
strides (40, or 320 and 40 in the models' views) are not: compiled for sm_90, the plain kernel issued one 2-byte load
per element, no async copies, and spilled registers at head dim 40 (SD1.5's 4096-token level, its costliest
attention), against 16-byte pipelined loads at head dims 64, 80 and 160. So the launcher passes every stride divided
by ALIGN (the largest power of two, at most 16 bytes' worth of elements, dividing all of them) and the kernel
multiplies it back: the compiler then knows each row offset is a multiple of ALIGN. HEAD_DIM is a compile-time
constant for the same reason: the head-dim mask is then known constant over ALIGN-wide runs.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from diffusion_fast import _validate
from ._host import cdiv, next_power_of_2

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis
SPLIT_HEAD_DIM = True  # a power-of-two main block plus a tail (see above); False pads to the next power of two


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-d tile, masking only the dimensions that can run past the tensor (masked lanes read 0)."""
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # q (B, H, Lq, D), k and v (B, H, Lk, D), o (B, H, Lq, D) contiguous
    stride_qb, stride_qh, stride_qm,  # q strides in units of ALIGN elements (the last stride is 1)
    stride_kb, stride_kh, stride_kn,  # k strides, in units of ALIGN
    stride_vb, stride_vh, stride_vn,  # v strides, in units of ALIGN
    stride_ob, stride_oh, stride_om,  # o strides, in units of ALIGN
    heads, len_q, len_k,  # H, Lq, Lk
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    ALIGN: tl.constexpr,  # a power of two dividing every stride above (in elements)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    D_MAIN: tl.constexpr,  # head-dim lanes [0, D_MAIN): a power of two >= 16, masked where >= HEAD_DIM
    D_TAIL: tl.constexpr,  # lanes [D_MAIN, D_MAIN + D_TAIL): a power of two >= 16, masked where >= HEAD_DIM; 0: none
    EVEN_M: tl.constexpr,  # Lq % BLOCK_M == 0: no query-row masks
    EVEN_N: tl.constexpr,  # Lk % BLOCK_N == 0: no key masks (self-attention at SD's lengths)
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" (ignored for 16-bit inputs) otherwise
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_qb can pass 2^31 elements
    b = pid_bh // heads
    h = pid_bh % heads
    q_ptr += (b * stride_qb + h * stride_qh) * ALIGN
    k_ptr += (b * stride_kb + h * stride_kh) * ALIGN
    v_ptr += (b * stride_vb + h * stride_vh) * ALIGN
    o_ptr += (b * stride_ob + h * stride_oh) * ALIGN
    stride_qm *= ALIGN  # multiplying by the constexpr is what tells the compiler the rows are ALIGN-aligned
    stride_kn *= ALIGN
    stride_vn *= ALIGN
    stride_om *= ALIGN

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < len_q
    offs_d = tl.arange(0, D_MAIN)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = D_MAIN > HEAD_DIM  # the main block runs past the head dim (padded, no tail)
    q = _load_tile(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], m_ok, d_ok, not EVEN_M, MASK_D)
    acc = tl.zeros([BLOCK_M, D_MAIN], dtype=tl.float32)
    if D_TAIL > 0:
        offs_t = D_MAIN + tl.arange(0, D_TAIL)
        t_ok = offs_t < HEAD_DIM
        MASK_T: tl.constexpr = D_MAIN + D_TAIL > HEAD_DIM
        q_tail = _load_tile(q_ptr + offs_m[:, None] * stride_qm + offs_t[None, :], m_ok, t_ok, not EVEN_M, MASK_T)
        acc_tail = tl.zeros([BLOCK_M, D_TAIL], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < len_k
        k = _load_tile(k_ptr + n[None, :] * stride_kn + offs_d[:, None], d_ok, n_ok, MASK_D, not EVEN_N)  # (D, N)
        s = tl.dot(q, k, input_precision=PRECISION)
        if D_TAIL > 0:
            k_tail = _load_tile(k_ptr + n[None, :] * stride_kn + offs_t[:, None], t_ok, n_ok, MASK_T, not EVEN_N)
            s = tl.dot(q_tail, k_tail, s, input_precision=PRECISION)
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # qk_scale > 0: the max commutes with the scale
        p = tl.exp2(s * qk_scale - m_new[:, None])  # the scale and the shift in one FMA per score
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_ptr + n[:, None] * stride_vn + offs_d[None, :], n_ok, d_ok, not EVEN_N, MASK_D)  # (N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # accumulates in place
        if D_TAIL > 0:
            v_tail = _load_tile(v_ptr + n[:, None] * stride_vn + offs_t[None, :], n_ok, t_ok, not EVEN_N, MASK_T)
            acc_tail = tl.dot(p.to(v.dtype), v_tail, acc_tail * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out_rows = o_ptr + offs_m[:, None] * stride_om
    tl.store(out_rows + offs_d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    if D_TAIL > 0:
        tl.store(out_rows + offs_t[None, :], (acc_tail / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & t_ok[None, :])


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel covers q's head dim and dtype (the VAE's single 512-wide head is out of range)."""
    return q.shape[-1] <= MAX_HEAD_DIM and q.dtype in DTYPES


def _config(block_d: int, len_k: int, dtype: torch.dtype = torch.float16):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), by head-dim block and key length (16-bit: measured on an H100)."""
    if INTERPRET:
        return 32, 32, 4, 1
    if dtype == torch.float32:
        # IEEE fp32 dots run without tensor cores and hold twice the bytes: the 16-bit tiles spilled 0.5-9.7 KB of
        # registers a thread compiled for sm_90 (benchmarks/sass_report.py). These tiles spill nothing at head dims
        # up to 128 and 136 bytes at 160. Not a speed path (fp32 callers get fp32 accuracy), but no reason to crawl.
        if block_d <= 64:
            return 64, 32, 4, 1
        return (32, 32, 4, 1) if block_d <= 128 else (32, 32, 8, 1)
    if block_d >= 256:
        return 64, 64, 8, 2
    if block_d >= 128:
        return 128, 64, 8, 3
    if len_k <= 128:  # cross-attention over 77 text tokens: one key tile
        return 128, 128, 8, 2
    return 128, 64, 4, 3


def _alignment(strides, element_size: int) -> int:
    """The largest power of two, at most 16 bytes' worth of elements, that divides every stride: the lowest set bit
    of their bitwise OR with that bound (zero strides add no bits)."""
    bits = 16 // element_size
    for s in strides:
        bits |= s
    return bits & -bits


def _head_dim_blocks(head_dim: int, split: bool, dtype: torch.dtype = torch.float16):
    """(D_MAIN, D_TAIL): a power-of-two main block and tail covering head_dim (tail 0 when one block does)."""
    padded = max(16, next_power_of_2(head_dim))
    main = padded // 2
    tail = max(16, next_power_of_2(head_dim - main)) if head_dim > main else 0
    # 16-bit (tensor cores): a split must save more than a quarter of the padded lanes (40 = 32 + 16 saves 16 of 64
    # and measured slower). fp32's IEEE dots run on the FMA units, where any saved lane is saved work (and its padded
    # 64-wide tiles spilled registers at head dim 40, compiled for sm_90). 24 = 16 + 16 saves nothing either way.
    needed = padded if dtype == torch.float32 else 3 * padded / 4
    if not split or head_dim <= main or main + tail >= needed:
        return padded, 0
    return main, tail


def _launch(q, k, v, out, scale, config, split=None):
    """Launch the kernel on validated q, k, v (unit last strides) into out with config = (BLOCK_M, BLOCK_N,
    num_warps, num_stages); split overrides SPLIT_HEAD_DIM. benchmarks/tune_attention.py sweeps configs through this
    same function."""
    block_m, block_n, num_warps, num_stages = config
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    d_main, d_tail = _head_dim_blocks(head_dim, SPLIT_HEAD_DIM if split is None else split, q.dtype)
    # a size-1 dim's stride never multiplies a nonzero index: 0, so it cannot lower the alignment
    strides = [st if n > 1 else 0 for t in (q, k, v, out) for st, n in zip(t.stride()[:3], t.shape[:3])]
    align = _alignment(strides, q.element_size())
    # the grid's second axis (one program column per (batch, head)) stops at MAX_GRID_Y: launch batch chunks beyond
    if heads > MAX_GRID_Y:
        raise ValueError(f"q has {heads} heads; the kernel launches at most {MAX_GRID_Y} per batch element")
    chunk = MAX_GRID_Y // heads
    for b0 in range(0, batch, chunk):
        tensors = (q, k, v, out) if batch <= chunk else (t[b0:b0 + chunk] for t in (q, k, v, out))
        grid = (cdiv(len_q, block_m), min(chunk, batch - b0) * heads)
        _flash_attention_kernel[grid](
            *tensors,
            *(s // align for s in strides),
            heads, len_q, len_k, scale * LOG2E,
            HEAD_DIM=head_dim, ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, D_MAIN=d_main, D_TAIL=d_tail,
            EVEN_M=len_q % block_m == 0, EVEN_N=len_k % block_n == 0,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )


def _kernel_ready(t):
    """t itself when its last stride is 1, its row offsets inside one head fit the kernel's int32 arithmetic, and its
    base and its batch, head and row strides are 16-byte aligned; else a copy whose rows are 16 bytes apart
    (contiguous when the head dim is a multiple of 16 bytes, padded past it otherwise).

    Rows not 16 bytes apart are copied because, compiled for sm_90, the kernel read views with a row stride of 41 fp16
    elements wrongly (error 0.97 on the H200; the interpreter was right). SD's head dims (40, 64, 80, 160 in 16-bit)
    never need the copy; a row stride like 41, a head dim like 12 in fp16 or an offset base does."""
    stride, shape = t.stride(), t.shape
    elems = 16 // t.element_size()
    if (stride[3] == 1 and stride[2] * shape[2] < 2**31 and t.data_ptr() % 16 == 0
            and all(st % elems == 0 for st, n in zip(stride[:3], shape[:3]) if n > 1)):
        return t
    return _empty_aligned(shape, t).copy_(t)


def _empty_aligned(shape, like):
    """An uninitialised (B, H, L, D) tensor like ``like`` whose rows are 16 bytes apart: contiguous when D allows."""
    elems = 16 // like.element_size()
    padded = cdiv(shape[-1], elems) * elems
    if padded == shape[-1]:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return torch.empty(*shape[:-1], padded, device=like.device, dtype=like.dtype)[..., :shape[-1]]


def attention(q, k, v, *, scale=None):
    """Flash attention of q (B, H, Lq, D) against k, v (B, H, Lk, D); returns (B, H, Lq, D) contiguous."""
    _validate.attention_args(q, k, v, scale)
    return _attention_unchecked(q, k, v, scale)


def _attention_unchecked(q, k, v, scale=None):
    """``attention`` for arguments its caller has validated: ``diffusion_fast.ops`` checks the public call's once,
    and its internal entry passes the q, k and v our models and the accelerate processor build. Outside a CUDA graph
    this host code runs before every launch (benchmarks/launcher_host_cost.py). It still refuses a head dim, dtype or
    device the kernel cannot run."""
    if not supports(q):
        raise ValueError(f"q: head dim {q.shape[-1]} / dtype {q.dtype} is outside the kernel's range "
                         f"(head dim <= {MAX_HEAD_DIM}, dtype in {DTYPES}); use diffusion_fast.ops.attention")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("q is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    out = _empty_aligned(q.shape, q)
    head_dim = q.shape[-1]
    _launch(q, k, v, out, scale, _config(max(16, next_power_of_2(head_dim)), k.shape[2], q.dtype))
    return out if out.is_contiguous() else out.contiguous()
