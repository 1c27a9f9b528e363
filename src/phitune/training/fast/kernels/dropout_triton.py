"""Triton kernels of ``kernels/dropout.py``: LoRA dropout forward, and its backward fused with the base's input
gradient, each one pass over memory with the keep mask drawn in registers (see dropout.py for the mask's rule).
Imported only when a kernel is launched."""

import torch
import triton
import triton.language as tl

# 2048 elements per program and 8 warps: 8 elements per thread (one 16-byte load of bf16, two of float32) and two
# Philox calls per thread; a Phi-3-mini qkv input at batch 4 (8192 x 3072) is ~12k programs, many waves over an
# H100/H200's 132 SMs. A choice from common elementwise kernels, not tuned: no GPU was available to time it.
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def keep_mask(seed, start, p, BLOCK: tl.constexpr):
    """Keep mask of the BLOCK elements from ``start`` (a multiple of 4): element start + 4q + c is kept when component
    c of ``randint4x(seed, start // 4 + q)``, mapped to [0, 1) as ``tl.rand`` does, is >= p. For any kernel that
    drops the same way (dropout.philox_keep_mask is its torch twin)."""
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    # join(join(r0, r2), join(r1, r3)) is [q, i, o] -> component 2i + o: flattened, element 4q + c holds rc.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    return tl.uint_to_uniform_float(words) >= p


@triton.jit
def keep_mask_rows(seed, first, p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``keep_mask`` for a (ROWS, COLS) tile of a contiguous tensor: row j covers the COLS elements from ``first[j]``
    (an int64 column of multiples of 4, COLS a multiple of 4), four elements per Philox call as ``keep_mask``."""
    r0, r1, r2, r3 = tl.randint4x(seed, first // 4 + tl.arange(0, COLS // 4)[None, :])
    # as keep_mask: [row, q, i, o] holds component 2i + o of counter q, so element 4q + c of the row holds rc
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [ROWS, COLS])
    return tl.uint_to_uniform_float(words) >= p


@triton.jit
def keep_mask_at(seed, index, p):
    """The same mask at any int64 element indices (a tile whose rows do not start at multiples of 4): one Philox call
    per element, four times ``keep_mask``'s integer work, of which one component is used."""
    r0, r1, r2, r3 = tl.randint4x(seed, index // 4)
    component = index % 4
    words = tl.where(component == 0, r0, tl.where(component == 1, r1, tl.where(component == 2, r2, r3)))
    return tl.uint_to_uniform_float(words) >= p


@triton.jit
def _dropout_fwd(x_ptr, out_ptr, n, seed, p, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    keep = keep_mask(seed, start, p, BLOCK)
    tl.store(out_ptr + offs, tl.where(keep, x, 0).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dropout_bwd(t_ptr, base_ptr, out_ptr, n, seed, p, scale, HAS_BASE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    t = tl.load(t_ptr + offs, mask=inside, other=0)
    if UPCAST:  # 16-bit inputs: arithmetic in float32, rounded once on the store (as torch's opmath does)
        t = t.to(tl.float32)
    keep = keep_mask(seed, start, p, BLOCK)
    g = tl.where(keep, t * scale, 0)
    if HAS_BASE:
        base = tl.load(base_ptr + offs, mask=inside, other=0)
        if UPCAST:
            base = base.to(tl.float32)
        g = g + base
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=inside)


def dropout_forward(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``phitune::lora_dropout`` on a contiguous ``x``."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _dropout_fwd[(triton.cdiv(n, BLOCK),)](x, out, n, seed, p, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def dropout_backward(t: torch.Tensor, base: torch.Tensor | None, seed: int, p: float, scale: float) -> torch.Tensor:
    """``phitune::lora_dropout_backward`` on contiguous ``t`` and ``base`` (same shape and dtype, or base None)."""
    if base is not None and (base.shape != t.shape or base.dtype != t.dtype):
        raise ValueError(f"lora_dropout_backward: base {tuple(base.shape)} {base.dtype} does not match t "
                         f"{tuple(t.shape)} {t.dtype}")
    out = torch.empty_like(t)
    n = t.numel()
    if n:
        _dropout_bwd[(triton.cdiv(n, BLOCK),)](t, t if base is None else base, out, n, seed, p, scale,
                                               HAS_BASE=base is not None, UPCAST=t.element_size() < 4,
                                               BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
