"""RMSNorm (Phi-3/Llama/Mistral/Qwen2: ``w · (x / rms(x))``) as two custom ops, forward and input gradient.

  phitune::rms_norm           (x, weight, eps) -> (y, rstd)   y in promote(x, weight), rstd = 1/rms per row
  phitune::rms_norm_backward  (g, x, weight, rstd) -> gx      gx in x's dtype
  phitune::add_rms_norm       (x, residual, weight, eps) -> (s, y, rstd)   s = x + residual, y = rms_norm(s)
  phitune::add_rms_norm_backward  (g_y, g_s, s, weight, rstd) -> g   rms_norm_backward(g_y, s) + g_s, s's dtype

The ``add_`` pair is a decoder layer's residual add fused with the norm after it (``residual + attn_out`` then
post_attention_layernorm), and in backward the gradient reaching s along the residual stream added to the norm's.
Its backward also serves a norm whose input continues along the residual stream (input_layernorm: g_s is the
gradient of the residual branch), see ``norm_rope.ResidualRMSNormFn``. Predicted for Phi-3-mini (32 layers, batch
4 x 2048, H200 roofline, benchmarks/gpu_predicted.py blocks_b4): the plain adds (each read 2, write 1) went from 132
ops / 4.52 ms to 37 / 1.14 ms, adds and norms together from 8.34 to 6.47 ms, the step from 231.8 to 229.9 ms.

Arithmetic (the references below, and the Triton kernels in ``rms_norm_triton.py`` step for step): the statistics in
float32 (float64 for float64 inputs), ``x · rstd`` rounded to x's dtype before the weight multiplies it, as HF's
Phi3RMSNorm does; backward rounds ``g · w`` to their promoted dtype, as the plain autograd graph does. Each kernel is
one read of each input and one write of each output: on a GPU the plain graph's pow, mean, rsqrt, casts and
multiplies were ~42 ms of a predicted 326 ms Phi-3-mini step (32 layers, batch 4 x 2048, H200 rates).

The weight gradient is not an op: LoRA's norm weights are frozen, so it is never asked for on phitune's path;
``rms_norm_weight_grad`` (plain torch) serves the rare caller that trains them.
"""

from __future__ import annotations

import math

import torch

from . import register_flops, use_triton

# The kernels hold a whole row in registers: wider rows (no model of phitune's zoo has one) run the reference.
MAX_KERNEL_WIDTH = 8192
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# FLOPs per element (see the references): forward x², sum, · rstd, · w; backward g · w, x · rstd, product, sum,
# xhat · dot, subtraction, · rstd. The add_ ops: one more (the residual add, the gradients' sum).
FORWARD_FLOPS_PER_ELEMENT = 4
BACKWARD_FLOPS_PER_ELEMENT = 7
ADD_FORWARD_FLOPS_PER_ELEMENT = FORWARD_FLOPS_PER_ELEMENT + 1
ADD_BACKWARD_FLOPS_PER_ELEMENT = BACKWARD_FLOPS_PER_ELEMENT + 1


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics (rstd) for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch forward: ``(weight · (x · rstd).to(x.dtype), rstd)`` with rstd of shape ``(..., 1)``."""
    xf = x.to(stat_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * (xf * rstd).to(x.dtype), rstd


def rms_norm_backward_reference(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                rstd: torch.Tensor) -> torch.Tensor:
    """Plain torch input gradient: ``rstd · (gw - xhat · mean(gw · xhat))`` with ``gw = g · weight``."""
    xhat = x.to(rstd.dtype) * rstd
    gxh = (g * weight).to(rstd.dtype)
    dot = (gxh * xhat).mean(-1, keepdim=True)
    return gxh.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch forward of the fused pair: ``(s, y, rstd)`` with ``s = residual + x`` (the decoder's add)."""
    s = residual + x
    y, rstd = rms_norm_reference(s, weight, eps)
    return s, y, rstd


def add_rms_norm_backward_reference(g: torch.Tensor, g_s: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                                    rstd: torch.Tensor) -> torch.Tensor:
    """Plain torch gradient of x and residual (the same): the norm's input gradient plus ``g_s``, in s's dtype."""
    return rms_norm_backward_reference(g, s, weight, rstd).add_(g_s)


def rms_norm_weight_grad(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The norm weight's gradient, ``sum over rows of g · xhat`` (xhat rounded to x's dtype as in forward)."""
    xhat = (x.to(rstd.dtype) * rstd).to(x.dtype)
    return (g * xhat).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)


def _kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    width = x.shape[-1]
    return (use_triton(x) and x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES
            and weight.shape == (width,) and 0 < width <= MAX_KERNEL_WIDTH and x.numel() > 0)


def _triton_module():
    # Imported here, not at the top: Triton is loaded only when a kernel is launched (import phitune never loads it).
    from . import rms_norm_triton

    return rms_norm_triton


@torch.library.custom_op("phitune::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward: ``(y, rstd)``; the Triton kernel where ``use_triton(x)``, else the reference."""
    if _kernel_fits(x, weight):
        return _triton_module().rms_norm_forward(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    y = x.new_empty(torch.broadcast_shapes(x.shape, weight.shape), dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty((*x.shape[:-1], 1), dtype=stat_dtype(x.dtype))


@torch.library.custom_op("phitune::rms_norm_backward", mutates_args=())
def rms_norm_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """RMSNorm input gradient in x's dtype; the Triton kernel where ``use_triton(x)``, else the reference."""
    if _kernel_fits(x, weight) and g.shape == x.shape and rstd.dtype == torch.float32:
        return _triton_module().rms_norm_backward(g, x, weight, rstd)
    return rms_norm_backward_reference(g, x, weight, rstd)


@rms_norm_backward.register_fake
def _rms_norm_backward_fake(g, x, weight, rstd):
    return x.new_empty(x.shape)


@torch.library.custom_op("phitune::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm forward: ``(s, y, rstd)``; one Triton kernel where ``use_triton(x)``, else the
    reference."""
    if _kernel_fits(x, weight) and residual.shape == x.shape and residual.dtype in _KERNEL_DTYPES:
        return _triton_module().add_rms_norm_forward(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    s = x.new_empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype))
    y, rstd = _rms_norm_fake(s, weight, eps)
    return s, y, rstd


@torch.library.custom_op("phitune::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward(g: torch.Tensor, g_s: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> torch.Tensor:
    """The gradient of x and residual (the same) in s's dtype; one Triton kernel where ``use_triton(s)``, else the
    reference."""
    if (_kernel_fits(s, weight) and g.shape == s.shape and g_s.shape == s.shape and g_s.dtype == s.dtype
            and rstd.dtype == torch.float32):
        return _triton_module().add_rms_norm_backward(g, g_s, s, weight, rstd)
    return add_rms_norm_backward_reference(g, g_s, s, weight, rstd)


@add_rms_norm_backward.register_fake
def _add_rms_norm_backward_fake(g, g_s, s, weight, rstd):
    return s.new_empty(s.shape)


def _forward_flops(x_shape, weight_shape, eps, out_shape=None, **kwargs) -> int:
    return FORWARD_FLOPS_PER_ELEMENT * math.prod(x_shape)


def _backward_flops(g_shape, x_shape, weight_shape, rstd_shape, out_shape=None, **kwargs) -> int:
    return BACKWARD_FLOPS_PER_ELEMENT * math.prod(x_shape)


register_flops(torch.ops.phitune.rms_norm, _forward_flops)
register_flops(torch.ops.phitune.rms_norm_backward, _backward_flops)


def _add_forward_flops(x_shape, residual_shape, weight_shape, eps, out_shape=None, **kwargs) -> int:
    return ADD_FORWARD_FLOPS_PER_ELEMENT * math.prod(x_shape)


def _add_backward_flops(g_shape, g_s_shape, s_shape, weight_shape, rstd_shape, out_shape=None, **kwargs) -> int:
    return ADD_BACKWARD_FLOPS_PER_ELEMENT * math.prod(s_shape)


register_flops(torch.ops.phitune.add_rms_norm, _add_forward_flops)
register_flops(torch.ops.phitune.add_rms_norm_backward, _add_backward_flops)
