"""Triton kernels of swiglu.py's ops: one pass over gu per direction, float32 inside, outputs in gu's dtype.

Launch: one program per tile of ROWS x COLS elements of h (1024 in all: COLS = 1024 columns for the zoo's
intermediate widths, several rows per program for narrow ones), row tiles on grid axis 0 (no 65535 limit there).
4 warps: 8 elements per thread, 16-byte loads of bfloat16; Phi-3-mini's I = 8192 is 8 programs per row. Chosen from
the H100/H200's memory system, not timed: no GPU was at hand when these were written.

Dropout: the fast path's one mask rule (dropout.py): element row·I + col of h is kept by component (row·I + col) % 4
of Philox ``randint4x(seed, (row·I + col) // 4)``, the same expression in forward and backward, so the mask is drawn
again instead of being saved. When I is a multiple of 4 (every width of the zoo) each tile row starts at a multiple
of 4 and takes one Philox call per 4 elements (``keep_mask_rows``); otherwise one call per element
(``keep_mask_at``), the same mask at four times the integer work.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dropout_triton import keep_mask_at, keep_mask_rows

_TILE, _WARPS = 1024, 4


@triton.jit
def _keep(seed, row, n_cols, index, p, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """This tile's keep mask (see the module docstring); ALIGNED: n_cols % 4 == 0 (then COLS, a power of two >= 4,
    keeps each row's first column at a multiple of 4)."""
    if ALIGNED:
        keep = keep_mask_rows(seed, row * n_cols + tl.program_id(1) * COLS, p, ROWS, COLS)
    else:
        keep = keep_mask_at(seed, index, p)
    return keep


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
        keep = _keep(seed, row, n_cols, index, p, ALIGNED, ROWS, COLS)
        tl.store(hd_ptr + index, tl.where(keep, h, 0.0), mask=inside)


@triton.jit
def _swiglu_backward(gu_ptr, gh_ptr, t_ptr, ggu_ptr, h_ptr, n_rows, n_cols, gu_row_stride, s, p, seed,
                     HAS_T: tl.constexpr, DROP: tl.constexpr, WANT_H: tl.constexpr, ALIGNED: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr):
    row, cols, inside = _tile(n_rows, n_cols, ROWS, COLS)
    index = row * n_cols + cols
    gate = tl.load(gu_ptr + row * gu_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * gu_row_stride + n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    gh = tl.load(gh_ptr + index, mask=inside, other=0.0).to(tl.float32)
    if DROP:
        keep = _keep(seed, row, n_cols, index, p, ALIGNED, ROWS, COLS)
    if HAS_T:
        t = tl.load(t_ptr + index, mask=inside, other=0.0).to(tl.float32)
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


def backward(gu, gh, t, s: float, p: float, seed: int, want_h: bool):
    """(grad of gu, h or drop(h) or an empty tensor): see swiglu.swiglu_backward."""
    g2 = _rows(gu)
    n_cols = g2.shape[1] // 2
    gh = gh.contiguous()
    t_arg = gh if t is None else t.contiguous()  # a placeholder pointer when HAS_T is off
    ggu = gu.new_empty((*gu.shape[:-1], 2 * n_cols))
    h = gu.new_empty((*gu.shape[:-1], n_cols)) if want_h else gu.new_empty(0)
    grid, tile = _grid(g2.shape[0], n_cols)
    with _on(gu):
        _swiglu_backward[grid](g2, gh, t_arg, ggu, h if want_h else ggu, g2.shape[0], n_cols, g2.stride(0),
                               float(s), float(p), int(seed), HAS_T=t is not None, DROP=p > 0, WANT_H=want_h, **tile,
                               num_warps=_WARPS)
    return ggu, h

