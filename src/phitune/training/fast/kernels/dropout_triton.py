"""Triton kernels of ``kernels/dropout.py``: LoRA dropout forward, and its backward fused with the LoRA branch's
K=r product and the base's input gradient, each one pass over memory with the keep mask drawn in registers (see
dropout.py for the mask's rule; ``keep_mask*`` here draw it for the SwiGLU kernels too). Imported only when a kernel
is launched."""

import os

import torch
import triton
import triton.language as tl

# 2048 elements per program and 8 warps: 8 elements per thread (one 16-byte load of bf16, two of float32) and two
# Philox calls per thread; a Phi-3-mini qkv input at batch 4 (8192 x 3072) is ~12k programs, many waves over an
# H100/H200's 132 SMs. A choice from common elementwise kernels, not tuned: no GPU was available to time it.
BLOCK = 2048
NUM_WARPS = 8
# Backward: (32, 128) tiles of the (N, in) gradient, 4 warps: 32 elements per thread and a (32, 16) @ (16, 128)
# tensor-core product per tile (A's tile, r x 128, is shared by every row tile and stays in L2). Phi-3-mini's qkv
# input at batch 4 is 256 x 24 tiles. Not tuned either: no GPU to time it.
BWD_ROWS, BWD_COLS, BWD_NUM_WARPS = 32, 128, 4
# Triton's interpreter multiplies bfloat16 tl.dot operands wrongly (results off by ~1e10 in Triton 3.9): there the
# operands go to float32 first, which computes the same products (a bf16 x bf16 product is exact in float32, as in
# the tensor cores' float32 accumulation). Read when the kernels are decorated, as Triton reads it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def keep_mask_tile(seed, row, n_cols, start, index, p, ALIGNED: tl.constexpr, ROWS: tl.constexpr,
                   COLS: tl.constexpr):
    """The keep mask of a (ROWS, COLS) tile of a (rows, n_cols) tensor: ``row`` its rows as a column, ``start`` its
    first column, ``index`` its elements' linear indices. ALIGNED (n_cols % 4 == 0, start a multiple of 4): each tile
    row starts at a multiple of 4, four elements per Philox call (``keep_mask_rows``); else one call per element
    (``keep_mask_at``)."""
    if ALIGNED:
        keep = keep_mask_rows(seed, row * n_cols + start, p, ROWS, COLS)
    else:
        keep = keep_mask_at(seed, index, p)
    return keep


@triton.jit
def _dropout_fwd(x_ptr, out_ptr, n, seed, p, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    keep = keep_mask(seed, start, p, BLOCK)
    tl.store(out_ptr + offs, tl.where(keep, x, 0).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dropout_bwd(gbr_ptr, a_ptr, base_ptr, out_ptr, n_rows, n_cols, rank, seed, p, scale, HAS_BASE: tl.constexpr,
                 ALIGNED: tl.constexpr, UPCAST_DOT: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr):
    """One (BM, BN) tile of base + scale·drop(gbr A): t = gbr A from a (BM, R) and an (R, BN) tile (rank zero-padded
    to R, a power of two >= 16 as tl.dot needs), float32 accumulation, one rounding on the store."""
    row = (tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM))[:, None]
    cols = (tl.program_id(1) * BN + tl.arange(0, BN))[None, :]
    k = tl.arange(0, R)
    gbr = tl.load(gbr_ptr + row * rank + k[None, :], mask=(row < n_rows) & (k[None, :] < rank), other=0)
    a = tl.load(a_ptr + k[:, None] * n_cols + cols, mask=(k[:, None] < rank) & (cols < n_cols), other=0)
    if UPCAST_DOT:
        gbr, a = gbr.to(tl.float32), a.to(tl.float32)
    t = tl.dot(gbr, a, input_precision="ieee")  # "ieee": float32 inputs multiply in float32, not TF32
    keep = keep_mask_tile(seed, row, n_cols, tl.program_id(1) * BN, row * n_cols + cols, p, ALIGNED, BM, BN)
    g = tl.where(keep, t * scale, 0)
    inside = (row < n_rows) & (cols < n_cols)
    if HAS_BASE:
        g = g + tl.load(base_ptr + row * n_cols + cols, mask=inside, other=0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, g.to(out_ptr.dtype.element_ty), mask=inside)


def dropout_forward(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``phitune::lora_dropout`` on a contiguous ``x``."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _dropout_fwd[(triton.cdiv(n, BLOCK),)](x, out, n, seed, p, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def dropout_backward(gbr: torch.Tensor, A: torch.Tensor, base: torch.Tensor | None, seed: int, p: float,
                     scale: float) -> torch.Tensor:
    """``phitune::lora_dropout_backward`` on contiguous gbr (N, r), A (r, in) and base (N, in) or None, one dtype."""
    n_rows, rank = gbr.shape
    n_cols = A.shape[1]
    if A.shape[0] != rank or A.dtype != gbr.dtype or (
            base is not None and (base.shape != (n_rows, n_cols) or base.dtype != gbr.dtype)):
        raise ValueError(f"lora_dropout_backward: gbr {tuple(gbr.shape)} {gbr.dtype}, A {tuple(A.shape)} {A.dtype}, "
                         f"base {None if base is None else (tuple(base.shape), base.dtype)} do not fit "
                         "(N, r) @ (r, in) + (N, in) in one dtype")
    out = gbr.new_empty((n_rows, n_cols))
    if out.numel():
        grid = (triton.cdiv(n_rows, BWD_ROWS), triton.cdiv(n_cols, BWD_COLS))
        _dropout_bwd[grid](gbr, A, out if base is None else base, out, n_rows, n_cols, rank, seed, p, scale,
                           HAS_BASE=base is not None, ALIGNED=n_cols % 4 == 0, UPCAST_DOT=INTERPRETED,
                           R=max(16, triton.next_power_of_2(rank)), BM=BWD_ROWS, BN=BWD_COLS,
                           num_warps=BWD_NUM_WARPS)
    return out
