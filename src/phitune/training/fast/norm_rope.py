"""RMSNorm and Phi-3's qkv split + RoPE as single autograd functions (see ``fused.py``'s docstring for why).

  RMSNormFn   Phi-3/Llama RMSNorm with a hand-written backward: saves x and one float per row; its arithmetic is
              the custom ops of kernels/rms_norm.py.
  AddRMSNormFn       a decoder layer's residual add + the norm after it: (x, residual) -> (s, norm(s)); backward adds
                     the gradient reaching s along the residual stream to the norm's, one op per direction
                     (kernels/rms_norm.py's add_rms_norm pair). Saves s and one float per row, as RMSNormFn.
  ResidualRMSNormFn  a norm whose input also continues as the residual: h -> (norm(h), h); backward sums the two
                     gradients of h in the norm's backward op (no separate add).
  QKVRopeFn   split of the fused qkv projection + rotary embedding, straight into (B, H, T, D) tensors; backward
              writes one gradient tensor (no zero-filled slice gradients, no rotate_half copies). Saves cos, sin.
              Both directions are custom ops (kernels/rope.py; one Triton kernel each on a GPU).
"""

from __future__ import annotations

import torch

from .kernels import rms_norm as rms_norm_ops
from .kernels import rope


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


class AddRMSNormFn(torch.autograd.Function):
    """``s = residual + x`` and ``w · (s / rms(s))`` through ``phitune::add_rms_norm``; returns ``(s, y)``. x and
    residual get the same gradient, the norm's input gradient plus the one reaching s directly, in one op."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float):
        s, y, rstd = rms_norm_ops.add_rms_norm(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.dtypes = (x.dtype, residual.dtype)
        return s, y

    @staticmethod
    def backward(ctx, g_s, g_y):
        s, weight, rstd = ctx.saved_tensors
        g = rms_norm_ops.add_rms_norm_backward(g_y, g_s, s, weight, rstd)
        gw = rms_norm_ops.rms_norm_weight_grad(g_y, s, weight, rstd) if ctx.needs_input_grad[2] else None
        x_dtype, residual_dtype = ctx.dtypes
        return g.to(x_dtype), g.to(residual_dtype), gw, None


class ResidualRMSNormFn(torch.autograd.Function):
    """``(w · (h / rms(h)), h)``: the norm of a residual-stream tensor and the tensor itself as a second output, so
    that backward gets both of h's gradients and sums them inside ``phitune::add_rms_norm_backward``."""

    @staticmethod
    def forward(ctx, h, weight, eps: float):
        y, rstd = rms_norm_ops.rms_norm(h, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        # autograd returns an unmodified input as a view of it: no copy
        return y, h

    @staticmethod
    def backward(ctx, g_y, g_h):
        h, weight, rstd = ctx.saved_tensors
        gw = rms_norm_ops.rms_norm_weight_grad(g_y, h, weight, rstd) if ctx.needs_input_grad[1] else None
        gx = rms_norm_ops.add_rms_norm_backward(g_y, g_h, h, weight, rstd) if ctx.needs_input_grad[0] else None
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
