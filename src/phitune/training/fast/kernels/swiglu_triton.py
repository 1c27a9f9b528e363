"""Triton kernels of swiglu.py's ops: one pass over gu per direction, float32 inside, outputs in gu's dtype.

Launch: one program per tile of ROWS x COLS elements of h (1024 in all: COLS = 1024 columns for the zoo's
intermediate widths, several rows per program for narrow ones), row tiles on grid axis 0 (no 65535 limit there).
4 warps: 8 elements per thread, 16-byte loads of bfloat16; Phi-3-mini's I = 8192 is 8 programs per row. Chosen from
the H100/H200's memory system, not timed: no GPU was at hand when these were written. swiglu_lora_forward's
kernel instead gives each program whole rows (it sums over them into xa): see _L_ROWS.

Dropout: the fast path's one mask rule (dropout.py): element row·I + col of h is kept by component (row·I + col) % 4
of Philox ``randint4x(seed, (row·I + col) // 4)``, the same expression in forward and backward, so the mask is drawn
again instead of being saved. When I is a multiple of 4 (every width of the zoo) each tile row starts at a multiple
of 4 and takes one Philox call per 4 elements; otherwise one call per element (both through dropout_triton's
``keep_mask_tile``), the same mask at four times the integer work.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dropout_triton import INTERPRETED, keep_mask_tile

_TILE, _WARPS = 1024, 4
# Backward with the LoRA term: (16, 128) tiles (2048 elements, 16 per thread), for tl.dot's 16-row minimum; the
# (r, 128) tile of A is shared by every row tile and stays in L2. Not timed: no GPU at hand.
_T_ROWS, _T_COLS = 16, 128
# Forward with the LoRA product (swiglu_lora_forward): one program per 16 rows (tl.dot's minimum), walking h's row
# in 256-column tiles; Phi-3-mini at batch 4 (8192 x 8192) is 512 programs of 32 tiles, about 4 per SM of an H100's
# 132, each holding a (16, 16) float32 accumulator. 4 warps: 8 elements of each (16, 256) tile per thread
# (16-byte bf16 loads); A's (256, r) tile is read by every program and stays in L2. Not timed: no GPU at hand.
# Larger ranks narrow the tile (COLS·R <= 4096: A's tile at most 8 KiB in bf16), so that the loop's pipelined
# tiles fit an SM's shared memory at any r (at r = 128, 256 columns would be 64 KiB of A per stage).
_L_ROWS, _L_COLS, _L_A_TILE = 16, 256, 4096


@triton.jit
def _tile(n_rows, n_cols, ROWS: tl.constexpr, COLS: tl.constexpr):
    """This program's (rows as a column, columns as a row, in-bounds mask); rows int64 for the linear index."""
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * COLS + tl.arange(0, COLS))[None, :]
    return row, cols, (row < n_rows) & (cols < n_cols)


@triton.jit
def _swiglu_forward(gu_ptr, h_ptr, hd_ptr, n_rows, n_cols, gu_row_stride, p, seed, DROP: tl.constexpr,
                    ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    row, cols, inside = _tile(n_rows, n_cols, ROWS, COLS)
    gate = tl.load(gu_ptr + row * gu_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * gu_row_stride + n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    h = (gate * sig * up).to(h_ptr.dtype.element_ty)
    index = row * n_cols + cols
    tl.store(h_ptr + index, h, mask=inside)
    if DROP:
        keep = keep_mask_tile(seed, row, n_cols, tl.program_id(1) * COLS, index, p, ALIGNED, ROWS, COLS)
        tl.store(hd_ptr + index, tl.where(keep, h, 0.0), mask=inside)


@triton.jit
def _swiglu_backward(gu_ptr, gh_ptr, gbr_ptr, a_ptr, ggu_ptr, h_ptr, n_rows, n_cols, gu_row_stride, rank, s, p, seed,
                     HAS_T: tl.constexpr, DROP: tl.constexpr, WANT_H: tl.constexpr, ALIGNED: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    row, cols, inside = _tile(n_rows, n_cols, ROWS, COLS)
    index = row * n_cols + cols
    gate = tl.load(gu_ptr + row * gu_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * gu_row_stride + n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    gh = tl.load(gh_ptr + index, mask=inside, other=0.0).to(tl.float32)
    if DROP:
        keep = keep_mask_tile(seed, row, n_cols, tl.program_id(1) * COLS, index, p, ALIGNED, ROWS, COLS)
    if HAS_T:  # t = gbr A for this tile: (ROWS, R) @ (R, COLS), rank zero-padded to R (>= 16, as tl.dot needs)
        k = tl.arange(0, R)
        gbr = tl.load(gbr_ptr + row * rank + k[None, :], mask=(row < n_rows) & (k[None, :] < rank), other=0)
        a = tl.load(a_ptr + k[:, None] * n_cols + cols, mask=(k[:, None] < rank) & (cols < n_cols), other=0)
        if UPCAST_DOT:
            gbr, a = gbr.to(tl.float32), a.to(tl.float32)
        t = tl.dot(gbr, a, input_precision="ieee")
        if DROP:
            t = tl.where(keep, t, 0.0)
        gh += s * t
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    out = ggu_ptr.dtype.element_ty
    tl.store(ggu_ptr + row * 2 * n_cols + cols, (gh * up * sig * (1.0 + gate * (1.0 - sig))).to(out), mask=inside)
    tl.store(ggu_ptr + row * 2 * n_cols + n_cols + cols, (gh * silu).to(out), mask=inside)
    if WANT_H:
        h = (silu * up).to(h_ptr.dtype.element_ty)
        if DROP:
            h = tl.where(keep, h, 0.0)
        tl.store(h_ptr + index, h, mask=inside)


@triton.jit
def _swiglu_lora_forward(gu_ptr, a_ptr, h_ptr, xa_ptr, n_rows, n_cols, gu_row_stride, rank, p, seed,
                         DROP: tl.constexpr, ALIGNED: tl.constexpr, UPCAST_DOT: tl.constexpr, R: tl.constexpr,
                         ROWS: tl.constexpr, COLS: tl.constexpr):
    """ROWS rows of h (written) and of xa = drop(h) Aᵀ (rank zero-padded to R): drop(h) exists only per tile, in
    registers, as the tl.dot operand; the product accumulates in float32 over the row's column tiles."""
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    k = tl.arange(0, R)
    acc = tl.zeros((ROWS, R), dtype=tl.float32)
    for start in range(0, n_cols, COLS):
        cols = (start + tl.arange(0, COLS))[None, :]
        inside = (row < n_rows) & (cols < n_cols)
        gate = tl.load(gu_ptr + row * gu_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_row_stride + n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        h = (gate * (1.0 / (1.0 + tl.exp(-gate))) * up).to(h_ptr.dtype.element_ty)
        index = row * n_cols + cols
        tl.store(h_ptr + index, h, mask=inside)
        if DROP:  # the one mask rule (dropout.py)
            keep = keep_mask_tile(seed, row, n_cols, start, index, p, ALIGNED, ROWS, COLS)
            h = tl.where(keep, h, 0.0)
        col = (start + tl.arange(0, COLS))[:, None]  # A's (COLS, R) tile, Aᵀ by the addressing: A is (rank, n_cols)
        a = tl.load(a_ptr + k[None, :] * n_cols + col, mask=(k[None, :] < rank) & (col < n_cols), other=0)
        if UPCAST_DOT:
            h, a = h.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(h, a, acc, input_precision="ieee")
    tl.store(xa_ptr + row * rank + k[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=(row < n_rows) & (k[None, :] < rank))


def _rows(gu: torch.Tensor) -> torch.Tensor:
    gu = gu.reshape(-1, gu.shape[-1])
    return gu if gu.stride(-1) == 1 else gu.contiguous()


def _grid(rows: int, n_cols: int):
    cols = min(_TILE, triton.next_power_of_2(n_cols))
    tile_rows = _TILE // cols
    return ((triton.cdiv(rows, tile_rows), triton.cdiv(n_cols, cols)),
            {"ALIGNED": n_cols % 4 == 0, "ROWS": tile_rows, "COLS": cols})


def _on(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(gu: torch.Tensor, p: float, seed: int):
    """(h, drop(h)) for p > 0, else (h, an empty tensor)."""
    g2 = _rows(gu)
    n_cols = g2.shape[1] // 2
    h_shape = (*gu.shape[:-1], n_cols)
    h = gu.new_empty(h_shape)
    hd = gu.new_empty(h_shape) if p > 0 else gu.new_empty(0)
    grid, tile = _grid(g2.shape[0], n_cols)
    with _on(gu):
        _swiglu_forward[grid](g2, h, hd, g2.shape[0], n_cols, g2.stride(0), float(p), int(seed), DROP=p > 0, **tile,
                              num_warps=_WARPS)
    return h, hd


def lora_forward(gu: torch.Tensor, A: torch.Tensor, p: float, seed: int):
    """(h, drop(h) Aᵀ) (dropout off when p == 0): see swiglu.swiglu_lora_forward."""
    g2 = _rows(gu)
    n_rows, n_cols = g2.shape[0], g2.shape[1] // 2
    A = A.contiguous()
    rank = A.shape[0]
    h = gu.new_empty((*gu.shape[:-1], n_cols))
    xa = gu.new_empty((*gu.shape[:-1], rank))
    if n_rows:
        padded = max(16, triton.next_power_of_2(rank))
        cols = max(16, min(_L_COLS, _L_A_TILE // padded, triton.next_power_of_2(n_cols)))
        with _on(gu):
            _swiglu_lora_forward[(triton.cdiv(n_rows, _L_ROWS),)](
                g2, A, h, xa, n_rows, n_cols, g2.stride(0), rank, float(p), int(seed), DROP=p > 0,
                ALIGNED=n_cols % 4 == 0, UPCAST_DOT=INTERPRETED, R=padded, ROWS=_L_ROWS, COLS=cols,
                num_warps=_WARPS)
    return h, xa


def backward(gu, gh, gbr, A, s: float, p: float, seed: int, want_h: bool):
    """(grad of gu, h or drop(h) or an empty tensor): see swiglu.swiglu_backward."""
    g2 = _rows(gu)
    n_cols = g2.shape[1] // 2
    gh = gh.contiguous()
    has_t = gbr is not None
    gbr, A = (gbr.contiguous(), A.contiguous()) if has_t else (gh, gh)  # placeholder pointers when HAS_T is off
    rank = A.shape[0] if has_t else 0
    ggu = gu.new_empty((*gu.shape[:-1], 2 * n_cols))
    h = gu.new_empty((*gu.shape[:-1], n_cols)) if want_h else gu.new_empty(0)
    if has_t:
        cols = max(16, min(_T_COLS, triton.next_power_of_2(n_cols)))
        rows = _T_ROWS * _T_COLS // cols
        grid = (triton.cdiv(g2.shape[0], rows), triton.cdiv(n_cols, cols))
        tile = {"ALIGNED": n_cols % 4 == 0, "ROWS": rows, "COLS": cols}
    else:
        grid, tile = _grid(g2.shape[0], n_cols)
    with _on(gu):
        _swiglu_backward[grid](g2, gh, gbr, A, ggu, h if want_h else ggu, g2.shape[0], n_cols, g2.stride(0), rank,
                               float(s), float(p), int(seed), HAS_T=has_t, DROP=p > 0, WANT_H=want_h,
                               UPCAST_DOT=INTERPRETED, R=max(16, triton.next_power_of_2(rank)), **tile,
                               num_warps=_WARPS)
    return ggu, h

