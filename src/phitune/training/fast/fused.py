"""Fused autograd functions for the LoRA blocks of Phi-3-style decoders, and the instance swaps that use them.

Why: LoRA adds about 1% of the FLOPs, yet a module-by-module autograd graph (base matmul, dropout, two skinny
matmuls, a scaling multiply, an add; SwiGLU as chunk/SiLU/multiply) costs 35-42% of the step on an H200 and about
40% of a CPU step outside the matmuls (the transformers Trainer + peft peer measured side by side; a torch.profiler
run of the peer on the `small` shape, benchmarks/step_profile.py). These functions do the same arithmetic with fewer
passes over memory and save only what backward needs:

  lora_linear   y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ. Saves drop(x) and the (N, r) product; backward forms grad_x,
                grad_A, grad_B with skinny matmuls accumulated in place (no (N, out) temporaries). On a 4-bit
                (QLoRA) base the base matmul stays bitsandbytes' and only the LoRA branch is one function.
  swiglu_down   y = down(silu(gate)·up) with down's LoRA, from the gate_up output. Saves gate_up and a 1-byte
                dropout mask; silu(gate)·up is recomputed in backward instead of being stored.
  rms_norm      Phi-3/Llama RMSNorm with a hand-written backward: saves x and one float per row.
  qkv_rope      split of the fused qkv projection + rotary embedding, straight into (B, H, T, D) tensors; backward
                writes one gradient tensor (no zero-filled slice gradients, no rotate_half copies). Saves cos, sin.

Arithmetic runs in the compute dtype (the autocast dtype when autocast is on, else the input's); LoRA weights kept
in float32 are cast to it once per call (r x in elements), and their gradients are returned in float32.

How they are used: ``install(model)`` changes the class of matching module instances to a phitune subclass of the
same class (``lora.Linear`` -> ``FusedLoRALinear``, ``Phi3MLP`` -> a fused subclass, ``Phi3RMSNorm`` -> likewise).
Parameters, buffers, names and ``isinstance`` checks stay exactly as they were, so adapters save, merge and load as
before; ``uninstall(model)`` restores the original classes. Nothing is patched at import time.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ... import lora
from ...lora import quantized


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if dev != "meta" and torch.is_autocast_enabled(dev):  # meta (phitune plan's QLoRA) has no autocast: it raises
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _dropout_mask(x: torch.Tensor, p: float):
    """Bernoulli(1-p) keep mask as bool (1 byte per element, not 4), or None when there is no dropout."""
    if p <= 0:
        return None
    if x.device.type == "cpu":
        return keep_mask_cpu(x.shape, p)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def keep_mask_cpu(shape, p: float) -> torch.Tensor:
    """Bernoulli(1-p) bool mask from the default CPU generator, about 1.7x faster than ``bernoulli_`` there.

    The CPU generator is serial and costs about the same per draw whatever the dtype, and ``bernoulli_`` takes one
    draw per element plus a float conversion. Here each 64-bit draw (63 random bits) gives two elements: its two 32-bit
    halves, each cut to 31 uniform bits and kept when >= round(p * 2^31). The keep probability is 1 - p to within
    2^-32 (torch's own CPU bernoulli_ compares a 24-bit float), and ``torch.manual_seed`` reproduces it.
    """
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_()  # uniform in [0, 2^63)
    halves = words.view(torch.int32)[:n].view(shape)
    return halves.bitwise_and_(0x7FFFFFFF) >= round(p * 2**31)


def _masked(x: torch.Tensor, mask) -> torch.Tensor:
    """x with dropped elements zeroed (dropout's 1/(1-p) is left to the caller's scaling). One pass: ``where`` reads the
    bool mask as is, where ``x * mask`` would first convert it to x's dtype."""
    return x if mask is None else torch.where(mask, x, 0)


def _input_grad(g, W, gbr, A, mask, s: float) -> torch.Tensor:
    """g W + s·drop'(gbr A): the gradient of x Wᵀ + s·(drop(x) Aᵀ) Bᵀ with respect to x, given gbr = g B."""
    gx = torch.mm(g, W)
    if mask is None:
        return gx.addmm_(gbr, A, alpha=s)
    return gx.add_(_masked(torch.mm(gbr, A), mask), alpha=s)


class LoRALinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ for 2-D x in the compute dtype; W frozen or not, A/B any float dtype."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scaling: float, p: float):
        cdt = x.dtype
        Wc = W.to(cdt)
        bc = None if bias is None else bias.to(cdt)
        Ac, Bc = A.to(cdt), B.to(cdt)
        mask = _dropout_mask(x, p)
        xd = _masked(x, mask)  # dropout's 1/(1-p) is folded into s below: one pass, not two
        s = scaling / (1.0 - p) if mask is not None else scaling
        y = F.linear(x, Wc, bc)
        xa = torch.mm(xd, Ac.t())  # (N, r)
        y.addmm_(xa, Bc.t(), alpha=s)
        ctx.save_for_backward(Wc, Ac, Bc, xd, xa, mask)
        ctx.scaling = s
        ctx.dtypes = (W.dtype, None if bias is None else bias.dtype, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        Wc, Ac, Bc, xd, xa, mask = ctx.saved_tensors
        s = ctx.scaling  # includes dropout's 1/(1-p)
        g = g.to(xd.dtype)
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        gx = gW = gb_ = gA = gB = None
        gbr = torch.mm(g, Bc)  # (N, r)
        if need_x:
            gx = _input_grad(g, Wc, gbr, Ac, mask, s)
        if need_A:
            gA = torch.mm(gbr.t(), xd).mul_(s).to(ctx.dtypes[2])
        if need_B:
            gB = torch.mm(g.t(), xa).mul_(s).to(ctx.dtypes[3])
        if need_W:  # a trainable base weight (rare with LoRA): needs x itself, which only p == 0 keeps
            if mask is not None:
                raise RuntimeError("fused LoRA: a trainable base weight with lora_dropout > 0 is not supported")
            gW = torch.mm(g.t(), xd).to(ctx.dtypes[0])
        if need_b:
            gb_ = g.sum(0).to(ctx.dtypes[1])
        return gx, gW, gb_, gA, gB, None, None


class LoRABranchFn(torch.autograd.Function):
    """s·(drop(x) Aᵀ) Bᵀ alone, for a base whose matmul has its own autograd (QLoRA's 4-bit base: bitsandbytes'
    matmul_4bit keeps no input for a frozen weight). Saves drop(x) in the compute dtype, the (N, r) product and a
    1-byte mask; the module path instead kept dropout's output, its float32 copy and autocast's bf16 copy of that."""

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, p: float):
        cdt = x.dtype
        Ac, Bc = A.to(cdt), B.to(cdt)
        mask = _dropout_mask(x, p)
        xd = _masked(x, mask)
        s = scaling / (1.0 - p) if mask is not None else scaling  # dropout's 1/(1-p) folded in
        xa = torch.mm(xd, Ac.t())  # (N, r)
        y = torch.mm(xa, Bc.t()).mul_(s)
        ctx.save_for_backward(Ac, Bc, xd, xa, mask)
        ctx.scaling = s
        ctx.dtypes = (A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        Ac, Bc, xd, xa, mask = ctx.saved_tensors
        s = ctx.scaling
        g = g.to(xd.dtype)
        gx = gA = gB = None
        gbr = torch.mm(g, Bc)  # (N, r)
        if ctx.needs_input_grad[0]:
            gx = _masked(torch.mm(gbr, Ac), mask).mul_(s)
        if ctx.needs_input_grad[1]:
            gA = torch.mm(gbr.t(), xd).mul_(s).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            gB = torch.mm(g.t(), xa).mul_(s).to(ctx.dtypes[1])
        return gx, gA, gB, None, None


class SwiGLUDownFn(torch.autograd.Function):
    """y = down(silu(gate)·up) (+ down's LoRA) from gu = [gate | up]; saves gu and a bool mask, recomputes the rest."""

    @staticmethod
    def forward(ctx, gu, W, bias, A, B, scaling: float, p: float):
        cdt = gu.dtype
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate).mul_(up)
        Wc = W.to(cdt)
        bc = None if bias is None else bias.to(cdt)
        Ac, Bc = A.to(cdt), B.to(cdt)
        mask = _dropout_mask(h, p)
        s = scaling / (1.0 - p) if mask is not None else scaling  # dropout's 1/(1-p) folded in, as in LoRALinearFn
        y = F.linear(h, Wc, bc)
        xa = torch.mm(_masked(h, mask), Ac.t())
        y.addmm_(xa, Bc.t(), alpha=s)
        ctx.save_for_backward(gu, Wc, Ac, Bc, xa, mask)
        ctx.scaling = s
        ctx.dtypes = (None if bias is None else bias.dtype, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        gu, Wc, Ac, Bc, xa, mask = ctx.saved_tensors
        need_gu, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        if need_W:
            raise RuntimeError("fused SwiGLU MLP: a trainable down_proj base weight is not supported")
        g = g.to(gu.dtype)
        ggu, gA, gB = _swiglu_down_grads(g, gu, Wc, Ac, Bc, xa, mask, ctx.scaling, need_gu, need_A, need_B)
        gb_ = g.sum(0).to(ctx.dtypes[0]) if need_b else None
        gA = None if gA is None else gA.to(ctx.dtypes[1])
        gB = None if gB is None else gB.to(ctx.dtypes[2])
        return ggu, None, gb_, gA, gB, None, None


class SwiGLUDown4bitFn(torch.autograd.Function):
    """SwiGLUDownFn for a 4-bit (QLoRA) down_proj: bitsandbytes' matmul in forward, and in backward the weight
    dequantized again (as bitsandbytes' own MatMul4Bit does) instead of a saved 16-bit copy. ``layer`` is the
    lora.quantized layer (its frozen base and bias are not inputs of the function)."""

    @staticmethod
    def forward(ctx, gu, layer, A, B, scaling: float, p: float):
        cdt = gu.dtype
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate).mul_(up)
        Ac, Bc = A.to(cdt), B.to(cdt)
        mask = _dropout_mask(h, p)
        s = scaling / (1.0 - p) if mask is not None else scaling
        y = layer.base_forward(h)
        xa = torch.mm(_masked(h, mask), Ac.t())
        y = y.addmm_(xa, Bc.t(), alpha=s)
        ctx.save_for_backward(gu, Ac, Bc, xa, mask)
        ctx.layer, ctx.scaling, ctx.dtypes = layer, s, (A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        gu, Ac, Bc, xa, mask = ctx.saved_tensors
        need_gu, _, need_A, need_B = ctx.needs_input_grad[:4]
        g = g.to(gu.dtype)
        Wc = quantized.dequantize_weight(ctx.layer).to(gu.dtype) if need_gu else None
        ggu, gA, gB = _swiglu_down_grads(g, gu, Wc, Ac, Bc, xa, mask, ctx.scaling, need_gu, need_A, need_B)
        gA = None if gA is None else gA.to(ctx.dtypes[0])
        gB = None if gB is None else gB.to(ctx.dtypes[1])
        return ggu, None, gA, gB, None, None


def _swiglu_down_grads(g, gu, Wc, Ac, Bc, xa, mask, s: float, need_gu: bool, need_A: bool, need_B: bool):
    """(grad of gu, grad of A, grad of B) of y = down(silu(gate)·up) + s·(drop(h) Aᵀ) Bᵀ, recomputing h from gu."""
    gate, up = gu.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    gA = gB = ggu = None
    gbr = torch.mm(g, Bc)
    if need_A:
        hd = _masked(silu * up, mask)
        gA = torch.mm(gbr.t(), hd).mul_(s)
        del hd
    if need_B:
        gB = torch.mm(g.t(), xa).mul_(s)
    if need_gu:
        gh = _input_grad(g, Wc, gbr, Ac, mask, s)
        ggu = torch.empty_like(gu)
        g_gate, g_up = ggu.chunk(2, dim=-1)
        torch.mul(gh, silu, out=g_up)
        # d silu(x)/dx = sig(x) * (1 + x * (1 - sig(x)))
        dsilu = (1.0 - sig).mul_(gate).add_(1.0).mul_(sig)
        torch.mul(gh.mul_(up), dsilu, out=g_gate)
    return ggu, gA, gB


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


# --- module forwards (installed by changing an instance's class) ------------------------------------------------------


def _as_2d(x):
    return x.reshape(-1, x.shape[-1])


def _dropout_p(layer) -> float:
    drop = layer.lora_dropout
    return float(drop.p) if isinstance(drop, torch.nn.Dropout) and layer.training else 0.0


def _fusable(layer) -> bool:
    return (layer._lora_active() and not layer.fan_in_fan_out
            and not getattr(layer.weight, "requires_grad", False))


def _lora_factors(layer):
    B = layer.expanded_B() if isinstance(layer, lora.MergedLinear) else layer.lora_B
    return layer.lora_A, B


def lora_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """The fused forward of a phitune LoRA layer (falls back to the layer's own forward when not fusable)."""
    if not _fusable(layer):
        return super(type(layer), layer).forward(x)
    cdt = _compute_dtype(x)
    A, B = _lora_factors(layer)
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFn.apply(_as_2d(x).to(cdt), layer.weight, layer.bias, A, B, layer.scaling, _dropout_p(layer))
    return y.view(*x.shape[:-1], y.shape[-1])


class FusedLoRALinear(lora.Linear):
    """lora.Linear whose forward is one autograd function (phitune.training.fast.fused.LoRALinearFn)."""

    def forward(self, x):
        return lora_linear(self, x)


class FusedLoRAMergedLinear(lora.MergedLinear):
    """lora.MergedLinear whose forward is one autograd function (phitune.training.fast.fused.LoRALinearFn)."""

    def forward(self, x):
        return lora_linear(self, x)


def lora_linear_4bit(layer, x: torch.Tensor) -> torch.Tensor:
    """The fused forward of a phitune LoRA layer on a 4-bit base: bitsandbytes' matmul, then LoRABranchFn."""
    if not _fusable(layer):
        return super(type(layer), layer).forward(x)
    result = layer.base_forward(x)
    cdt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
        branch = LoRABranchFn.apply(_as_2d(x).to(cdt), layer.lora_A, layer._lora_B_full(), layer.scaling,
                                    _dropout_p(layer))
    return result + branch.view(*x.shape[:-1], branch.shape[-1]).to(result.dtype)


class FusedLoRALinear4bit(quantized.Linear4bit):
    """quantized.Linear4bit whose LoRA branch is one autograd function (LoRABranchFn)."""

    def forward(self, x):
        return lora_linear_4bit(self, x)


class FusedLoRAMergedLinear4bit(quantized.MergedLinear4bit):
    """quantized.MergedLinear4bit whose LoRA branch is one autograd function (LoRABranchFn)."""

    def forward(self, x):
        return lora_linear_4bit(self, x)


def _is_lora(m) -> bool:
    return isinstance(m, (lora.Linear, lora.MergedLinear))


def swiglu_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP: gate_up (+LoRA) -> silu(gate)·up -> down (+LoRA), as two fused functions."""
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    gu = gate_up(x)
    four_bit = isinstance(down, quantized.Linear4bit)
    if not ((_is_lora(down) or four_bit) and _fusable(down)):
        gate, up = gu.chunk(2, dim=-1)
        return down(up * F.silu(gate))
    cdt = _compute_dtype(gu)
    with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
        if four_bit:
            y = SwiGLUDown4bitFn.apply(_as_2d(gu).to(cdt), down, down.lora_A, down._lora_B_full(), down.scaling,
                                       _dropout_p(down))
        else:
            A, B = _lora_factors(down)
            y = SwiGLUDownFn.apply(_as_2d(gu).to(cdt), down.weight, down.bias, A, B, down.scaling,
                                   _dropout_p(down))
    return y.view(*x.shape[:-1], y.shape[-1])


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = norm.eps
    return RMSNormFn.apply(x, norm.weight, eps)


def liger_rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Liger's Triton RMSNorm (same math, casting_mode "llama"); phitune's own off CUDA."""
    if not x.is_cuda:
        return rms_norm(norm, x)
    from liger_kernel.transformers.functional import liger_rms_norm as kernel

    eps = getattr(norm, "variance_epsilon", None)
    return kernel(x, norm.weight, norm.eps if eps is None else eps, offset=0.0, casting_mode="llama", in_place=False)


def liger_available() -> bool:
    try:
        from liger_kernel.transformers.functional import liger_rms_norm  # noqa: F401
    except Exception:  # ImportError, or triton failing to load without a GPU
        return False
    return True


def use_liger(model) -> int:
    """Switch the fused RMSNorm modules to a subclass that calls Liger's Triton kernel; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).forward is _norm_forward:
            module.__class__ = _fused_subclass(type(module)._phitune_original_class, _liger_norm_forward, "liger")
            n += 1
    return n


# Norm classes known to compute weight * (x / rms(x)) exactly as RMSNormFn does (not Gemma's (1 + weight)).
_RMSNORM_NAMES = ("Phi3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# MLP classes computing down(act(gate) * up) from a fused gate_up_proj with gate first (modeling_phi3.py).
_FUSED_GATE_UP_MLPS = ("Phi3MLP",)

_subclasses: dict[type, type] = {}


def _fused_subclass(cls: type, forward, tag: str) -> type:
    """A subclass of ``cls`` with ``forward`` replaced (cached per class), remembered for ``uninstall``."""
    sub = _subclasses.get((cls, tag))
    if sub is None:
        sub = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_phitune_original_class": cls,
                                                     "__module__": __name__})
        _subclasses[(cls, tag)] = sub
    return sub


def _mlp_forward(self, x):
    return swiglu_mlp(self, x)


def _norm_forward(self, x):
    return rms_norm(self, x)


def _liger_norm_forward(self, x):
    return liger_rms_norm(self, x)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Phi-3 attention with QKVRopeFn; anything unusual (a cache, eager attention, dropout) takes the original."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    impl = self.config._attn_implementation
    dropout = self.attention_dropout if self.training else 0.0
    if cache is not None or position_embeddings is None or dropout or impl not in ALL_ATTENTION_FUNCTIONS:
        original = type(self)._phitune_original_class.forward
        return original(self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                        **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    cos, sin = position_embeddings
    qkv = self.qkv_proj(hidden_states)
    q, k, v = QKVRopeFn.apply(qkv, cos, sin, self.config.num_attention_heads, self.num_key_value_heads, self.head_dim)
    out, weights = ALL_ATTENTION_FUNCTIONS[impl](self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                                                 sliding_window=getattr(self.config, "sliding_window", None),
                                                 **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1)
    return self.o_proj(out), weights


def _rope_attention(module) -> bool:
    cfg = getattr(module, "config", None)
    return (hasattr(module, "qkv_proj") and hasattr(module, "o_proj") and cfg is not None
            and getattr(module, "head_dim", None) and getattr(module, "num_key_value_heads", None))


# Attention classes whose forward is qkv_proj -> split q, k, v -> RoPE (rotate_half, partial rotary) -> kernel
# -> o_proj.
_QKV_ROPE_ATTENTIONS = ("Phi3Attention",)


def install(model, *, lora_layers: bool = True, mlp: bool = True, norms: bool = True,
            attention: bool = True) -> dict[str, int]:
    """Switch matching module instances of ``model`` to their fused subclasses; returns counts per kind."""
    counts = {"lora_linear": 0, "lora_linear_4bit": 0, "swiglu_mlp": 0, "rms_norm": 0, "qkv_rope": 0}
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_phitune_original_class", None) is not None:
            continue
        if lora_layers and cls is lora.Linear:
            module.__class__ = FusedLoRALinear
            counts["lora_linear"] += 1
        elif lora_layers and cls is lora.MergedLinear:
            module.__class__ = FusedLoRAMergedLinear
            counts["lora_linear"] += 1
        elif lora_layers and cls in (quantized.Linear4bit, quantized.MergedLinear4bit):
            module.__class__ = FusedLoRALinear4bit if cls is quantized.Linear4bit else FusedLoRAMergedLinear4bit
            counts["lora_linear_4bit"] += 1
        elif mlp and cls.__name__ in _FUSED_GATE_UP_MLPS and _silu_mlp(module):
            module.__class__ = _fused_subclass(cls, _mlp_forward, "mlp")
            counts["swiglu_mlp"] += 1
        elif attention and cls.__name__ in _QKV_ROPE_ATTENTIONS and _rope_attention(module):
            module.__class__ = _fused_subclass(cls, _attention_forward, "attention")
            counts["qkv_rope"] += 1
        elif norms and cls.__name__ in _RMSNORM_NAMES and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.__class__ = _fused_subclass(cls, _norm_forward, "norm")
            counts["rms_norm"] += 1
    return counts


FusedLoRALinear._phitune_original_class = lora.Linear
FusedLoRAMergedLinear._phitune_original_class = lora.MergedLinear
FusedLoRALinear4bit._phitune_original_class = quantized.Linear4bit
FusedLoRAMergedLinear4bit._phitune_original_class = quantized.MergedLinear4bit


def _silu_mlp(module) -> bool:
    act = getattr(module, "activation_fn", None)
    return (isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")) \
        and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")


def uninstall(model) -> int:
    """Restore the original classes of every module ``install`` switched; returns how many."""
    n = 0
    for module in model.modules():
        original = getattr(type(module), "_phitune_original_class", None)
        if original is not None:
            module.__class__ = original
            n += 1
    return n
