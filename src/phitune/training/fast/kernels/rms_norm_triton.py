"""The Triton kernels of ``rms_norm.py``: one program normalizes ``ROWS`` rows, each held whole in registers.

Forward reads x and w once and writes y and rstd; backward reads g, x, w and rstd once and writes gx. Every
rounding step of the references is repeated in the same order (``x · rstd`` to x's dtype, ``g · w`` to their promoted
dtype), so the kernels differ from them only in the order of the two row sums. With ``HAS_RESIDUAL`` (the
``add_rms_norm`` ops) forward also reads the residual and writes ``s = x + residual`` (rounded to s's dtype before it
is normalized, as the plain add is), and backward reads the gradient already at s and adds it to the norm's own,
rounded to s's dtype first, as autograd's sum of the two is.

Block sizes (chosen for an H100/H200, not timed: no GPU was available when they were written): a row of up to 8192
elements is one block of the next power of two; narrow rows are batched so that a program handles ~2048 elements
(one row of Phi-3-mini's 3072 per program, 8 rows of a 256-wide model), and the warp count grows with the block
(up to 16 warps) so that each thread holds 8 values of each operand (16 at the widest row, 8192), enough for 16-byte
vector loads of bfloat16 without spilling registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_ELEMENTS_PER_PROGRAM = 2048


@triton.jit
def _forward_kernel(X, R, W, S, Y, RSTD, n_rows, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = (x + tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + offsets, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / n_cols + eps)
    xhat = (x * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (w[None, :] * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(G, GS, X, W, RSTD, GX, n_rows, n_cols,
                     HAS_RESIDUAL: tl.constexpr, PRODUCT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    gw = (g * w[None, :]).to(PRODUCT).to(tl.float32)
    xhat = x * rstd[:, None]
    dot = tl.sum(gw * xhat, axis=1) / n_cols
    gx = ((gw - xhat * dot[:, None]) * rstd[:, None]).to(GX.dtype.element_ty)
    if HAS_RESIDUAL:
        gx = (gx.to(tl.float32) + tl.load(GS + offsets, mask=mask, other=0.0).to(tl.float32)).to(GX.dtype.element_ty)
    tl.store(GX + offsets, gx, mask=mask)


def _launch_shape(n_rows: int, n_cols: int) -> tuple[tuple[int], int, int, int]:
    block = triton.next_power_of_2(n_cols)
    rows = max(1, min(_ELEMENTS_PER_PROGRAM // block, triton.next_power_of_2(n_rows)))
    warps = max(1, min(16, rows * block // 256))
    return (triton.cdiv(n_rows, rows),), block, rows, warps


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(y, rstd)`` as ``rms_norm_reference`` returns them."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    grid, block, rows, warps = _launch_shape(n_rows, n_cols)
    # S is X itself when there is no residual: the kernel reads its dtype, never writes it
    _forward_kernel[grid](x2, x2, weight.contiguous(), x2, y, rstd, n_rows, n_cols, eps,
                          HAS_RESIDUAL=False, BLOCK=block, ROWS=rows, num_warps=warps)
    return y, rstd


def rms_norm_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: the input gradient as ``rms_norm_backward_reference`` returns it."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    product = _TL_DTYPES[torch.promote_types(g.dtype, weight.dtype)]
    grid, block, rows, warps = _launch_shape(n_rows, n_cols)
    g2 = g.reshape(-1, n_cols).contiguous()
    _backward_kernel[grid](g2, g2, x2, weight.contiguous(), rstd.contiguous(), gx, n_rows, n_cols,
                           HAS_RESIDUAL=False, PRODUCT=product, BLOCK=block, ROWS=rows, num_warps=warps)
    return gx


def add_rms_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel with a residual: ``(s, y, rstd)`` as ``add_rms_norm_reference`` returns them."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = torch.empty(x.shape, dtype=torch.promote_types(s.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    grid, block, rows, warps = _launch_shape(n_rows, n_cols)
    _forward_kernel[grid](x2, residual.reshape(-1, n_cols).contiguous(), weight.contiguous(), s, y, rstd,
                          n_rows, n_cols, eps, HAS_RESIDUAL=True, BLOCK=block, ROWS=rows, num_warps=warps)
    return s, y, rstd


def add_rms_norm_backward(g: torch.Tensor, g_s: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel with the gradient at s: as ``add_rms_norm_backward_reference`` returns it."""
    n_cols = s.shape[-1]
    s2 = s.reshape(-1, n_cols).contiguous()
    n_rows = s2.shape[0]
    gx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    product = _TL_DTYPES[torch.promote_types(g.dtype, weight.dtype)]
    grid, block, rows, warps = _launch_shape(n_rows, n_cols)
    _backward_kernel[grid](g.reshape(-1, n_cols).contiguous(), g_s.reshape(-1, n_cols).contiguous(), s2,
                           weight.contiguous(), rstd.contiguous(), gx, n_rows, n_cols,
                           HAS_RESIDUAL=True, PRODUCT=product, BLOCK=block, ROWS=rows, num_warps=warps)
    return gx
