"""RMSNorm and Phi-3's qkv split + RoPE as single autograd functions (see ``fused.py``'s docstring for why).

  RMSNormFn   Phi-3/Llama RMSNorm with a hand-written backward: saves x and one float per row; its arithmetic is
              the custom ops of kernels/rms_norm.py.
  QKVRopeFn   split of the fused qkv projection + rotary embedding, straight into (B, H, T, D) tensors; backward
              writes one gradient tensor (no zero-filled slice gradients, no rotate_half copies). Saves cos, sin.
"""

from __future__ import annotations

import torch

from .kernels import rms_norm as rms_norm_ops


class RMSNormFn(torch.autograd.Function):
    """w · (x / rms(x)) with the statistics in float32 and the product in x's dtype (HF's Phi3RMSNorm), through the
    ``phitune::rms_norm`` custom ops (one Triton kernel per direction on CUDA, the plain torch code elsewhere)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = rms_norm_ops.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        gw = rms_norm_ops.rms_norm_weight_grad(g, x, weight, rstd) if ctx.needs_input_grad[1] else None
        gx = rms_norm_ops.rms_norm_backward(g, x, weight, rstd) if ctx.needs_input_grad[0] else None
        return gx, gw, None


def _rope_into(out, x, cos, sin):
    """out = x·cos + rotate_half(x)·sin on the first cos.shape[-1] features, x copied beyond; no temporaries
    of x's size (rotate_half, cat) are made."""
    R = cos.shape[-1]
    h = R // 2
    x1, x2 = x[..., :h], x[..., h:R]
    o1, o2 = out[..., :h], out[..., h:R]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin[..., :h], value=-1.0)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin[..., h:])
    if R < x.shape[-1]:
        out[..., R:].copy_(x[..., R:])


def _rope_back_into(out, g, cos, sin):
    """The transpose of _rope_into: out = d/dx of <g, rope(x)>."""
    R = cos.shape[-1]
    h = R // 2
    g1, g2 = g[..., :h], g[..., h:R]
    o1, o2 = out[..., :h], out[..., h:R]
    torch.mul(g1, cos[..., :h], out=o1)
    o1.addcmul_(g2, sin[..., h:])
    torch.mul(g2, cos[..., h:], out=o2)
    o2.addcmul_(g1, sin[..., :h], value=-1.0)
    if R < g.shape[-1]:
        out[..., R:].copy_(g[..., R:])


class QKVRopeFn(torch.autograd.Function):
    """Split a fused (B, T, (Hq + 2·Hkv)·D) projection into q, k, v as (B, H, T, D) and rotate q and k.

    Replaces slicing + view + transpose + rotate_half (neg, cat) + two multiplies and an add per tensor, whose
    backward zero-fills a (B, T, F) gradient once per slice; here backward writes each part of one gradient tensor
    once. Saves only cos and sin. Works in the promoted dtype of qkv and cos, like the unfused code.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int, head_dim: int):
        B, T, _ = qkv.shape
        D = head_dim
        dtype = torch.result_type(qkv, cos)
        c, s_ = cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)
        views = _qkv_views(qkv, n_q, n_kv, D)
        q = torch.empty(B, n_q, T, D, dtype=dtype, device=qkv.device)
        k = torch.empty(B, n_kv, T, D, dtype=dtype, device=qkv.device)
        v = torch.empty(B, n_kv, T, D, dtype=qkv.dtype, device=qkv.device)
        _rope_into(q, views[0], c, s_)
        _rope_into(k, views[1], c, s_)
        v.copy_(views[2])
        ctx.save_for_backward(c, s_)
        ctx.meta = (n_q, n_kv, D, qkv.shape, qkv.dtype)
        return q, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        c, s_ = ctx.saved_tensors
        n_q, n_kv, D, shape, dtype = ctx.meta
        g = torch.empty(shape, dtype=dtype, device=c.device)
        views = _qkv_views(g, n_q, n_kv, D)
        for view, grad, rotate in zip(views, (gq, gk, gv), (True, True, False)):
            if grad is None:
                view.zero_()
            elif rotate:
                _rope_back_into(view, grad.to(dtype) if grad.dtype != c.dtype else grad, c, s_)
            else:
                view.copy_(grad)
        return g, None, None, None, None, None


def _qkv_views(t, n_q, n_kv, D):
    B, T, _ = t.shape
    q = t[..., : n_q * D].view(B, T, n_q, D).transpose(1, 2)
    k = t[..., n_q * D: (n_q + n_kv) * D].view(B, T, n_kv, D).transpose(1, 2)
    v = t[..., (n_q + n_kv) * D:].view(B, T, n_kv, D).transpose(1, 2)
    return q, k, v
