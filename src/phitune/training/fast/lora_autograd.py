"""The LoRA autograd functions of the fast path: LoRA linear, the LoRA branch alone, SwiGLU + down_proj with its
LoRA, and the helpers they share (dropout, compute dtype, layer checks).

Dropout: where the Triton kernels run (CUDA), LoRA linear and the LoRA branch keep only a seed and draw the mask
again in backward (kernels/dropout.py: no stored mask, and grad_x's add fused into the same pass); elsewhere (the
CPU) a 1-byte bool mask is saved, cheaper there than drawing twice.

Why one function per block, and what each saves: see ``fused.py``'s docstring. Arithmetic runs in the compute dtype
(the autocast dtype when autocast is on, else the input's); LoRA weights kept in float32 are cast to it once per
call, and their gradients are returned in float32.
"""

from __future__ import annotations

import math

import torch

from ... import lora
from .kernels import dropout as kernel_dropout
from .kernels import swiglu as kernel_swiglu
from .kernels import dropout_seed


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


def _draw_dropout(x: torch.Tensor, p: float):
    """(mask, seed) of one call's LoRA dropout: both None when p == 0; a seed where the Triton kernels run (nothing
    saved but the int, the mask drawn again in backward); else a saved bool mask."""
    seed = dropout_seed(x, p)  # the one rule, SwiGLU's too; meta (phitune plan's QLoRA) counts as CUDA there
    return (None, seed) if seed is not None else (_dropout_mask(x, p), None)


def _dropped(x: torch.Tensor, mask, seed, p: float) -> torch.Tensor:
    """x with the elements that ``mask``, or the kernels' mask of ``seed``, drops zeroed."""
    if seed is not None:
        return kernel_dropout.lora_dropout(x, seed, p)
    return _masked(x, mask)


def _lora_then_base(x, W, bias, xa, B, s: float) -> torch.Tensor:
    """x Wᵀ + bias + s·xa Bᵀ, the small K=r product written first and the frozen matmul accumulating onto it.

    On a GPU cuBLAS reads that (N, out) partial result in the big GEMM's epilogue, under its compute, where adding
    the LoRA term after the GEMM is a separate memory-bound read and write of (N, out) (``phitune plan``, Phi-3-mini
    at batch 4: 7.9 ms of such addmm_ in a 240 ms step, predicted). ``out=`` keeps one (N, out) buffer, not two."""
    if bias is None:
        y = torch.mm(xa, B.t())
        return torch.addmm(y, x, W.t(), beta=s, out=y)
    y = torch.addmm(bias, xa, B.t(), alpha=s)
    return torch.addmm(y, x, W.t(), out=y)


def _input_grad(g, W, gbr, A, mask, s: float, seed=None, p: float = 0.0) -> torch.Tensor:
    """g W + s·drop'(gbr A): the gradient of x Wᵀ + s·(drop(x) Aᵀ) Bᵀ with respect to x, given gbr = g B."""
    if seed is not None:  # one kernel: g W + s·drop(gbr A), gbr A per tile, the mask drawn again from the seed
        return kernel_dropout.lora_dropout_backward(gbr, A, torch.mm(g, W), seed, p, s)
    t = _masked(torch.mm(gbr, A), mask)  # first, and g W accumulated onto it as in _lora_then_base
    return torch.addmm(t, g, W, beta=s, out=t)


class LoRALinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ for 2-D x in the compute dtype; W frozen or not, A/B any float dtype.

    ``input_saved``: x is kept alive anyway (o_proj's input is the varlen attention output, which attention saves for
    its backward); with the seeded dropout this saves x instead of drop(x) and draws drop(x) again in backward for
    grad_A (``phitune plan``, Phi-3-mini batch 4: 1.5 GiB less for about 0.8 ms more, predicted). Elsewhere saving
    x would cost the same memory as drop(x) and one more pass."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scaling: float, p: float, input_saved: bool = False):
        cdt = x.dtype
        Wc = W.to(cdt)
        bc = None if bias is None else bias.to(cdt)
        Ac, Bc = A.to(cdt), B.to(cdt)
        mask, seed = _draw_dropout(x, p)
        xd = _dropped(x, mask, seed, p)  # dropout's 1/(1-p) is folded into s below: one pass, not two
        s = scaling / (1.0 - p) if mask is not None or seed is not None else scaling
        xa = torch.mm(xd, Ac.t())  # (N, r)
        y = _lora_then_base(x, Wc, bc, xa, Bc, s)
        ctx.redraw = seed is not None and input_saved
        ctx.save_for_backward(Wc, Ac, Bc, x if ctx.redraw else xd, xa, mask)
        ctx.scaling, ctx.seed, ctx.p = s, seed, p
        ctx.dtypes = (W.dtype, None if bias is None else bias.dtype, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        Wc, Ac, Bc, xd, xa, mask = ctx.saved_tensors
        s, seed = ctx.scaling, ctx.seed  # s includes dropout's 1/(1-p)
        g = g.to(xd.dtype)
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        gx = gW = gb_ = gA = gB = None
        gbr = torch.mm(g, Bc)  # (N, r)
        if need_x:
            gx = _input_grad(g, Wc, gbr, Ac, mask, s, seed, ctx.p)
        if need_A:
            if ctx.redraw:  # x was saved: drop(x) again, the mask drawn from the same seed
                xd = kernel_dropout.lora_dropout(xd, seed, ctx.p)
            gA = torch.mm(gbr.t(), xd).mul_(s).to(ctx.dtypes[2])
        if need_B:
            gB = torch.mm(g.t(), xa).mul_(s).to(ctx.dtypes[3])
        if need_W:  # a trainable base weight (rare with LoRA): needs x itself, which only p == 0 keeps
            if mask is not None or seed is not None:
                raise RuntimeError("fused LoRA: a trainable base weight with lora_dropout > 0 is not supported")
            gW = torch.mm(g.t(), xd).to(ctx.dtypes[0])
        if need_b:
            gb_ = g.sum(0).to(ctx.dtypes[1])
        return gx, gW, gb_, gA, gB, None, None, None


class LoRABranchFn(torch.autograd.Function):
    """s·(drop(x) Aᵀ) Bᵀ alone, for a base whose matmul has its own autograd (QLoRA's 4-bit base: bitsandbytes'
    matmul_4bit keeps no input for a frozen weight). Saves drop(x) in the compute dtype (x with ``input_saved``, as
    LoRALinearFn), the (N, r) product and a 1-byte mask (a seed on CUDA); the module path instead kept dropout's
    output, its float32 copy and autocast's bf16 copy of that."""

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, p: float, input_saved: bool = False):
        cdt = x.dtype
        Ac, Bc = A.to(cdt), B.to(cdt)
        mask, seed = _draw_dropout(x, p)
        xd = _dropped(x, mask, seed, p)
        s = scaling / (1.0 - p) if mask is not None or seed is not None else scaling  # 1/(1-p) folded in
        xa = torch.mm(xd, Ac.t())  # (N, r)
        y = torch.mm(xa, Bc.t()).mul_(s)
        ctx.redraw = seed is not None and input_saved  # as in LoRALinearFn
        ctx.save_for_backward(Ac, Bc, x if ctx.redraw else xd, xa, mask)
        ctx.scaling, ctx.seed, ctx.p = s, seed, p
        ctx.dtypes = (A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        Ac, Bc, xd, xa, mask = ctx.saved_tensors
        s, seed = ctx.scaling, ctx.seed
        g = g.to(xd.dtype)
        gx = gA = gB = None
        gbr = torch.mm(g, Bc)  # (N, r)
        if ctx.needs_input_grad[0]:
            if seed is not None:
                gx = kernel_dropout.lora_dropout_backward(gbr, Ac, None, seed, ctx.p, s)
            else:
                gx = _masked(torch.mm(gbr, Ac), mask).mul_(s)
        if ctx.needs_input_grad[1]:
            if ctx.redraw:
                xd = kernel_dropout.lora_dropout(xd, seed, ctx.p)
            gA = torch.mm(gbr.t(), xd).mul_(s).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            gB = torch.mm(g.t(), xa).mul_(s).to(ctx.dtypes[1])
        return gx, gA, gB, None, None, None


class SwiGLUDownFn(torch.autograd.Function):
    """y = down(silu(gate)·up) (+ down's LoRA) from gu = [gate | up]; saves gu and the dropout mask (a bool tensor, or
    on a GPU only the seed its kernel draws it from), and recomputes the rest (kernels/swiglu.py's ops)."""

    @staticmethod
    def forward(ctx, gu, W, bias, A, B, scaling: float, p: float):
        cdt = gu.dtype
        Wc = W.to(cdt)
        bc = None if bias is None else bias.to(cdt)
        Ac, Bc = A.to(cdt), B.to(cdt)
        h, xa, mask, seed = swiglu_lora(gu, Ac, p)
        s = scaling / (1.0 - p) if p > 0 else scaling  # dropout's 1/(1-p) folded in, as in LoRALinearFn
        y = _lora_then_base(h, Wc, bc, xa, Bc, s)
        del h
        ctx.save_for_backward(gu, Wc, Ac, Bc, xa, mask)
        ctx.scaling, ctx.p, ctx.seed = s, p, seed
        ctx.dtypes = (None if bias is None else bias.dtype, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        gu, Wc, Ac, Bc, xa, mask = ctx.saved_tensors
        need_gu, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        if need_W:
            raise RuntimeError("fused SwiGLU MLP: a trainable down_proj base weight is not supported")
        g = g.to(gu.dtype)
        ggu, gA, gB = _swiglu_down_grads(g, gu, Wc, Ac, Bc, xa, mask, ctx.scaling, need_gu, need_A, need_B,
                                         ctx.p, ctx.seed)
        gb_ = g.sum(0).to(ctx.dtypes[0]) if need_b else None
        gA = None if gA is None else gA.to(ctx.dtypes[1])
        gB = None if gB is None else gB.to(ctx.dtypes[2])
        return ggu, None, gb_, gA, gB, None, None


def swiglu_lora(gu: torch.Tensor, Ac: torch.Tensor, p: float):
    """(h, xa = drop(h) Acᵀ, bool mask or None, kernel seed or None) for h = silu(gate)·up and down_proj's LoRA
    product. On a GPU one op (swiglu_lora_forward) that draws the mask from a seed (kept instead of it) and never
    writes drop(h) (``phitune plan``, Phi-3-mini batch 4: a 231.8 ms step becomes 229.7 ms, predicted); elsewhere h,
    a saved bool mask and a matmul, as LoRALinearFn's."""
    seed = dropout_seed(gu, p)
    if kernel_swiglu.lora_forward_fused(gu):
        h, xa = torch.ops.phitune.swiglu_lora_forward(gu, Ac, p, 0 if seed is None else seed)
        return h, xa, None, seed
    h = torch.ops.phitune.swiglu(gu)
    mask = _dropout_mask(h, p)
    return h, torch.mm(_masked(h, mask), Ac.t()), mask, None


def _swiglu_down_grads(g, gu, Wc, Ac, Bc, xa, mask, s: float, need_gu: bool, need_A: bool, need_B: bool,
                       p: float = 0.0, seed: int | None = None):
    """(grad of gu, grad of A, grad of B) of y = down(silu(gate)·up) + s·(drop(h) Aᵀ) Bᵀ, recomputing h from gu.

    Dropout's mask is ``mask`` (bool) or, with ``seed``, drawn again by the backward kernel, which also writes the
    drop(h) that grad_A needs while it reads gu anyway (one (N, I) write instead of a second read of (N, 2I) gu)."""
    gA = gB = ggu = hd = None
    gbr = torch.mm(g, Bc)
    if need_B:
        gB = torch.mm(g.t(), xa).mul_(s)
    if need_gu:
        if seed is None:  # the LoRA term is masked here (or added by the matmul): the kernel sees one gradient
            gh, factors, p_kernel = _input_grad(g, Wc, gbr, Ac, mask, s), (None, None), 0.0
        else:  # the kernel forms gbr A per tile and masks it
            gh, factors, p_kernel = torch.mm(g, Wc), (gbr, Ac), p
        ggu, hd = torch.ops.phitune.swiglu_backward(gu, gh, *factors, s, p_kernel, seed or 0, need_A)
        del gh
        if need_A:
            hd = _masked(hd, mask)
    elif need_A:
        hd = _swiglu_dropped_again(gu, mask, p, seed)
    if need_A:
        gA = torch.mm(gbr.t(), hd).mul_(s)
    return ggu, gA, gB


def _swiglu_dropped_again(gu, mask, p: float, seed: int | None):
    """drop(h) as forward made it, for grad_A when gu needs no gradient (a frozen gate_up with a frozen input)."""
    if seed is None:
        return _masked(torch.ops.phitune.swiglu(gu), mask)
    return torch.ops.phitune.swiglu_dropout(gu, p, seed)[1]


# --- layer checks shared by the module forwards ------------------------------------------------------------------


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

