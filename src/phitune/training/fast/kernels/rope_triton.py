"""Triton kernels of ``rope.py``: the qkv split + RoPE in one pass each way (imported only when one is launched).

One program per tile of BLOCK_T tokens holds that tile's cos and sin in registers (as a multiplier per feature and a
signed multiplier of each feature's rotation partner, float32) and walks every head: q and k heads are rotated,
v heads copied. Every input element is read once from HBM (the partner load hits the same cache lines) and every
output written once, so the kernel moves its inputs plus its outputs and nothing else.

Block sizes are chosen for an H100/H200 without having been timed on one (no GPU here): BLOCK_T = 8 tokens x the
head width padded to a power of two (128 for Phi-3's 96) is 1,024 elements per step of the head loop, 8 per thread
at 4 warps (16-byte bf16 vectors); 8,192 tokens (batch 4 x 2048) give 1,024 programs, several per SM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 8
NUM_WARPS = 4


@triton.jit
def _multipliers(cos_ptr, sin_ptr, b, t, row_ok, stride_cb, stride_ct, R: tl.constexpr, DP: tl.constexpr,
                 BACKWARD: tl.constexpr):
    """(BLOCK_T, DP) float32 tiles c, s with out[d] = x[d]·c[d] + x[partner(d)]·s[d]; partner(d) = d ± R/2 inside
    the rotary width, and c = 1, s = 0 beyond it (a copy)."""
    H2: tl.constexpr = R // 2
    d = tl.arange(0, DP)[None, :]
    rot = d < R
    first = d < H2
    partner = tl.where(first, d + H2, d - H2)
    base = b[:, None] * stride_cb + t[:, None] * stride_ct
    m = row_ok[:, None] & rot
    c = tl.load(cos_ptr + base + d, mask=m, other=1.0).to(tl.float32)
    if BACKWARD:
        # transpose of the forward: the partner's sin, + for the first half, - for the second
        s = tl.load(sin_ptr + base + partner, mask=m, other=0.0).to(tl.float32)
        s = tl.where(first, s, -s)
    else:
        s = tl.load(sin_ptr + base + d, mask=m, other=0.0).to(tl.float32)
        s = tl.where(first, -s, s)
    c = tl.where(rot, c, 1.0)
    s = tl.where(rot, s, 0.0)
    return c, s, partner


@triton.jit
def _qkv_rope_fwd(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, N, T, stride_xb, stride_xt, stride_cb, stride_ct,
                  n_q, n_kv, D: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < N
    b, t = rows // T, rows % T
    c, s, partner = _multipliers(cos_ptr, sin_ptr, b, t, row_ok, stride_cb, stride_ct, R, DP, False)
    d = tl.arange(0, DP)[None, :]
    m = row_ok[:, None] & (d < D)
    src = qkv_ptr + b[:, None] * stride_xb + t[:, None] * stride_xt
    for h in range(0, n_q):
        x = tl.load(src + h * D + d, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(src + h * D + partner, mask=m & (d < R), other=0.0).to(tl.float32)
        tl.store(q_ptr + (rows[:, None] * n_q + h) * D + d, (x * c + xp * s).to(q_ptr.dtype.element_ty), mask=m)
    src += n_q * D
    for h in range(0, n_kv):
        x = tl.load(src + h * D + d, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(src + h * D + partner, mask=m & (d < R), other=0.0).to(tl.float32)
        tl.store(k_ptr + (rows[:, None] * n_kv + h) * D + d, (x * c + xp * s).to(k_ptr.dtype.element_ty), mask=m)
    src += n_kv * D
    for h in range(0, n_kv):
        x = tl.load(src + h * D + d, mask=m)
        tl.store(v_ptr + (rows[:, None] * n_kv + h) * D + d, x, mask=m)


@triton.jit
def _qkv_rope_bwd(gq_ptr, gk_ptr, gv_ptr, cos_ptr, sin_ptr, g_ptr, N, T, n_q, n_kv,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, stride_cb, stride_ct,
                  D: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < N
    b, t = rows // T, rows % T
    c, s, partner = _multipliers(cos_ptr, sin_ptr, b, t, row_ok, stride_cb, stride_ct, R, DP, True)
    d = tl.arange(0, DP)[None, :]
    m = row_ok[:, None] & (d < D)
    dst = g_ptr + rows[:, None] * ((n_q + 2 * n_kv) * D)
    src = gq_ptr + b[:, None] * sqb + t[:, None] * sqt
    for h in range(0, n_q):
        x = tl.load(src + h * sqh + d, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(src + h * sqh + partner, mask=m & (d < R), other=0.0).to(tl.float32)
        tl.store(dst + h * D + d, (x * c + xp * s).to(g_ptr.dtype.element_ty), mask=m)
    dst += n_q * D
    src = gk_ptr + b[:, None] * skb + t[:, None] * skt
    for h in range(0, n_kv):
        x = tl.load(src + h * skh + d, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(src + h * skh + partner, mask=m & (d < R), other=0.0).to(tl.float32)
        tl.store(dst + h * D + d, (x * c + xp * s).to(g_ptr.dtype.element_ty), mask=m)
    dst += n_kv * D
    src = gv_ptr + b[:, None] * svb + t[:, None] * svt
    for h in range(0, n_kv):
        x = tl.load(src + h * svh + d, mask=m)
        tl.store(dst + h * D + d, x.to(g_ptr.dtype.element_ty), mask=m)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _cos_sin(cos, sin, B: int, T: int):
    # A batch of 1 (one position_ids row for the whole batch) is broadcast by a zero stride.
    cos, sin = _last_dim_dense(cos).expand(B, T, -1), _last_dim_dense(sin).expand(B, T, -1)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def qkv_rope(qkv, cos, sin, n_q: int, n_kv: int, head_dim: int, outputs):
    """Launch the forward kernel into ``outputs`` (q, k, v: (B, H, T, D) views of (B, T, H, D) tensors)."""
    q, k, v = outputs
    B, T, _ = qkv.shape
    qkv = _last_dim_dense(qkv)
    cos, sin = _cos_sin(cos, sin, B, T)
    N, R = B * T, cos.shape[-1]
    _qkv_rope_fwd[(triton.cdiv(N, BLOCK_T),)](
        qkv, cos, sin, q, k, v, N, T, qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), n_q, n_kv,
        D=head_dim, R=R, DP=triton.next_power_of_2(head_dim), BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return q, k, v


def qkv_rope_backward(gq, gk, gv, cos, sin, n_q: int, n_kv: int, head_dim: int):
    """Launch the backward kernel: one (B, T, F) gradient in gv's dtype, from (B, H, T, D) gradients of any strides
    with a dense last dimension."""
    B, _, T, _ = gv.shape
    gq, gk, gv = _last_dim_dense(gq), _last_dim_dense(gk), _last_dim_dense(gv)
    cos, sin = _cos_sin(cos, sin, B, T)
    g = torch.empty(B, T, (n_q + 2 * n_kv) * head_dim, dtype=gv.dtype, device=gv.device)
    N, R = B * T, cos.shape[-1]
    _qkv_rope_bwd[(triton.cdiv(N, BLOCK_T),)](
        gq, gk, gv, cos, sin, g, N, T, n_q, n_kv,
        gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1), gk.stride(2),
        gv.stride(0), gv.stride(1), gv.stride(2), cos.stride(0), cos.stride(1),
        D=head_dim, R=R, DP=triton.next_power_of_2(head_dim), BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return g
