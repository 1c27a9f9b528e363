"""RMSNorm and Phi-3's qkv split + RoPE as single autograd functions (see ``fused.py``'s docstring for why).

  RMSNormFn   Phi-3/Llama RMSNorm with a hand-written backward: saves x and one float per row.
  QKVRopeFn   split of the fused qkv projection + rotary embedding, straight into (B, H, T, D) tensors; backward
              writes one gradient tensor (no zero-filled slice gradients, no rotate_half copies). Saves cos, sin.
              Both directions are custom ops (kernels/rope.py; one Triton kernel each on a GPU).
"""

from __future__ import annotations

import torch

from .kernels import rope


def _stat_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


class RMSNormFn(torch.autograd.Function):
    """w · (x / rms(x)) with the statistics in float32 and the product in x's dtype (HF's Phi3RMSNorm)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(_stat_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * xhat.to(x.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gxh = (g * weight).to(rstd.dtype)
            dot = (gxh * xhat).mean(-1, keepdim=True)
            gx = gxh.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return gx, gw, None


class QKVRopeFn(torch.autograd.Function):
    """Split a fused (B, T, (Hq + 2·Hkv)·D) projection into q, k, v as (B, H, T, D) and rotate q and k.

    Replaces slicing + view + transpose + rotate_half (neg, cat) + two multiplies and an add per tensor, whose
    backward zero-fills a (B, T, F) gradient once per slice; here each direction is one custom op
    (``kernels/rope.py``: one Triton kernel on a GPU) and backward writes each part of one gradient tensor once.
    Saves only cos and sin. Works in the promoted dtype of qkv and cos, like the unfused code.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int, head_dim: int):
        q, k, v = rope.qkv_rope(qkv, cos, sin, n_q, n_kv, head_dim)
        ctx.save_for_backward(cos, sin)
        ctx.meta = (n_q, n_kv, head_dim, [(t.shape, t.dtype) for t in (q, k, v)])
        return q, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        n_q, n_kv, D, outputs = ctx.meta
        # autograd hands zeros for unused outputs already; None only where materialising is switched off
        gq, gk, gv = (torch.zeros(shape, dtype=dtype, device=cos.device) if grad is None else grad
                      for grad, (shape, dtype) in zip((gq, gk, gv), outputs))
        g = rope.qkv_rope_backward(gq, gk, gv, cos, sin, n_q, n_kv, D)
        return g, None, None, None, None, None
