"""QLoRA (4-bit base) on the fast path: the same fused LoRA branch as full-precision layers, with bitsandbytes'
matmul for the frozen base, and SwiGLU + a 4-bit down_proj that dequantizes its weight again in backward instead
of saving a 16-bit copy (as bitsandbytes' own MatMul4Bit does)."""

from __future__ import annotations

import contextlib

import torch

from ...lora import quantized
from .lora_autograd import (
    LoRABranchFn,
    _as_2d,
    _compute_dtype,
    _dropout_p,
    _fusable,
    _swiglu_down_grads,
    swiglu_lora,
)


class SwiGLUDown4bitFn(torch.autograd.Function):
    """SwiGLUDownFn for a 4-bit (QLoRA) down_proj: bitsandbytes' matmul in forward, and in backward the weight
    dequantized again (as bitsandbytes' own MatMul4Bit does) instead of a saved 16-bit copy. ``layer`` is the
    lora.quantized layer (its frozen base and bias are not inputs of the function)."""

    @staticmethod
    def forward(ctx, gu, layer, A, B, scaling: float, p: float):
        cdt = gu.dtype
        Ac, Bc = A.to(cdt), B.to(cdt)
        h, xa, mask, seed = swiglu_lora(gu, Ac, p)
        s = scaling / (1.0 - p) if p > 0 else scaling
        y = layer.base_forward(h)
        del h
        y = y.addmm_(xa, Bc.t(), alpha=s)
        ctx.save_for_backward(gu, Ac, Bc, xa, mask)
        ctx.layer, ctx.scaling, ctx.p, ctx.seed, ctx.dtypes = layer, s, p, seed, (A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        gu, Ac, Bc, xa, mask = ctx.saved_tensors
        need_gu, _, need_A, need_B = ctx.needs_input_grad[:4]
        g = g.to(gu.dtype)
        Wc = quantized.dequantize_weight(ctx.layer).to(gu.dtype) if need_gu else None
        ggu, gA, gB = _swiglu_down_grads(g, gu, Wc, Ac, Bc, xa, mask, ctx.scaling, need_gu, need_A, need_B,
                                         ctx.p, ctx.seed)
        gA = None if gA is None else gA.to(ctx.dtypes[0])
        gB = None if gB is None else gB.to(ctx.dtypes[1])
        return ggu, None, gA, gB, None, None


def lora_linear_4bit(layer, x: torch.Tensor, input_saved: bool = False) -> torch.Tensor:
    """The fused forward of a phitune LoRA layer on a 4-bit base: bitsandbytes' matmul, then LoRABranchFn.
    ``input_saved``: x is saved for backward by the op that made it (see LoRALinearFn)."""
    if not _fusable(layer):
        return super(type(layer), layer).forward(x)
    result = layer.base_forward(x)
    cdt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
        branch = LoRABranchFn.apply(_as_2d(x).to(cdt), layer.lora_A, layer._lora_B_full(), layer.scaling,
                                    _dropout_p(layer), input_saved and x.dtype == cdt)
    return result + branch.view(*x.shape[:-1], branch.shape[-1]).to(result.dtype)


class FusedLoRALinear4bit(quantized.Linear4bit):
    """quantized.Linear4bit whose LoRA branch is one autograd function (LoRABranchFn)."""

    def forward(self, x, input_saved: bool = False):
        return lora_linear_4bit(self, x, input_saved)


class FusedLoRAMergedLinear4bit(quantized.MergedLinear4bit):
    """quantized.MergedLinear4bit whose LoRA branch is one autograd function (LoRABranchFn)."""

    def forward(self, x, input_saved: bool = False):
        return lora_linear_4bit(self, x, input_saved)
