"""The qkv split + rotary embedding as two custom ops: ``phitune::qkv_rope`` and ``phitune::qkv_rope_backward``.

Forward: the fused (B, T, (Hq + 2·Hkv)·D) projection -> q, k, v of shape (B, H, T, D), q and k rotated on their first
cos.shape[-1] features (partial rotary: Phi-4-mini) and copied beyond, v copied. Backward: the transpose, writing
one (B, T, F) gradient. On a GPU each direction is one Triton kernel (``rope_triton.py``); the plain path did a
multiply and an addcmul per half, a copy per unrotated tail and a copy for v: 11.5 ms of a Phi-3-mini step at batch
4 x 2048 predicted by ``phitune plan`` for an H200, against 4.6 ms for the two ops (each moves only its inputs and
outputs; ``benchmarks/gpu_predicted.py --settings blocks_b4``).

Layout: q, k and v are (B, H, T, D) views of (B, T, H, D)-contiguous tensors, the order qkv already has. Writing
them in that order is sequential for both sides, and the variable-length attention (``varlen.py``), which wants
(B·T, H, D), then reshapes them without a copy (it cloned all three before: 2.3 ms predicted per step).

Dtypes (as the unfused code): q and k in the promoted dtype of qkv and cos, v and the gradient in qkv's dtype.
"""

from __future__ import annotations

import torch

from . import register_flops, use_triton


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


def qkv_views(t, n_q: int, n_kv: int, head_dim: int):
    """q, k, v as (B, H, T, D) views of a (B, T, (Hq + 2·Hkv)·D) tensor."""
    B, T, _ = t.shape
    D = head_dim
    q = t[..., : n_q * D].view(B, T, n_q, D).transpose(1, 2)
    k = t[..., n_q * D: (n_q + n_kv) * D].view(B, T, n_kv, D).transpose(1, 2)
    v = t[..., (n_q + n_kv) * D:].view(B, T, n_kv, D).transpose(1, 2)
    return q, k, v


def empty_heads(B: int, heads: int, T: int, D: int, dtype, device) -> torch.Tensor:
    """A (B, heads, T, D) tensor laid out as (B, T, heads, D) (see the module docstring)."""
    return torch.empty(B, T, heads, D, dtype=dtype, device=device).transpose(1, 2)


def _outputs(qkv, cos, n_q: int, n_kv: int, head_dim: int):
    B, T, _ = qkv.shape
    dtype = torch.result_type(qkv, cos)
    return (empty_heads(B, n_q, T, head_dim, dtype, qkv.device), empty_heads(B, n_kv, T, head_dim, dtype, qkv.device),
            empty_heads(B, n_kv, T, head_dim, qkv.dtype, qkv.device))


def _check(qkv, cos, sin, n_q: int, n_kv: int, head_dim: int):
    # the kernel trusts these shapes (an unchecked cos shorter than qkv would be read out of bounds)
    B, T, F = qkv.shape
    R = cos.shape[-1]
    if (F != (n_q + 2 * n_kv) * head_dim or R % 2 or R > head_dim or sin.shape != cos.shape or cos.dim() != 3
            or cos.shape[1] != T or cos.shape[0] not in (1, B)):
        raise ValueError(f"qkv_rope: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not "
                         f"fit n_q={n_q}, n_kv={n_kv}, head_dim={head_dim}: qkv (B, T, (n_q + 2 n_kv) head_dim), "
                         f"cos and sin (B or 1, T, an even rotary width <= head_dim)")


def _check_grads(gq, gk, gv, cos, n_q: int, n_kv: int, head_dim: int):
    B, _, T, _ = gv.shape
    want = [(B, n_q, T, head_dim), (B, n_kv, T, head_dim), (B, n_kv, T, head_dim)]
    if [tuple(t.shape) for t in (gq, gk, gv)] != want or cos.shape[1] != T or cos.shape[0] not in (1, B):
        raise ValueError(f"qkv_rope_backward: gradients {[tuple(t.shape) for t in (gq, gk, gv)]} and cos "
                         f"{tuple(cos.shape)} do not fit n_q={n_q}, n_kv={n_kv}, head_dim={head_dim}: want {want}")


def qkv_rope_reference(qkv, cos, sin, n_q: int, n_kv: int, head_dim: int):
    """The plain torch forward (the CPU's, and what the kernel is checked against)."""
    q, k, v = _outputs(qkv, cos, n_q, n_kv, head_dim)
    c, s = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    views = qkv_views(qkv, n_q, n_kv, head_dim)
    _rope_into(q, views[0], c, s)
    _rope_into(k, views[1], c, s)
    v.copy_(views[2])
    return q, k, v


def qkv_rope_backward_reference(gq, gk, gv, cos, sin, n_q: int, n_kv: int, head_dim: int):
    """The plain torch backward: one (B, T, F) gradient in gv's dtype (qkv's)."""
    B, _, T, _ = gv.shape
    dtype = gv.dtype
    promoted = torch.result_type(gv, cos)
    c, s = cos.unsqueeze(1).to(promoted), sin.unsqueeze(1).to(promoted)
    g = torch.empty(B, T, (n_q + 2 * n_kv) * head_dim, dtype=dtype, device=gv.device)
    views = qkv_views(g, n_q, n_kv, head_dim)
    for view, grad in zip(views[:2], (gq, gk)):
        _rope_back_into(view, grad.to(dtype) if grad.dtype != c.dtype else grad, c, s)
    views[2].copy_(gv)
    return g


@torch.library.custom_op("phitune::qkv_rope", mutates_args=())
def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused (B, T, (n_q + 2 n_kv)·head_dim) projection into rotated q, k and v, each (B, H, T, D)."""
    _check(qkv, cos, sin, n_q, n_kv, head_dim)
    if use_triton(qkv):
        # Imported here, not at the top: importing phitune must not import Triton (see kernels/__init__.py).
        from . import rope_triton

        return rope_triton.qkv_rope(qkv, cos, sin, n_q, n_kv, head_dim, _outputs(qkv, cos, n_q, n_kv, head_dim))
    return qkv_rope_reference(qkv, cos, sin, n_q, n_kv, head_dim)


@qkv_rope.register_fake
def _(qkv, cos, sin, n_q, n_kv, head_dim):
    _check(qkv, cos, sin, n_q, n_kv, head_dim)
    return _outputs(qkv, cos, n_q, n_kv, head_dim)


@torch.library.custom_op("phitune::qkv_rope_backward", mutates_args=())
def qkv_rope_backward(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      n_q: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """The gradient of ``qkv_rope``'s input from those of q, k and v: one (B, T, F) tensor in gv's dtype."""
    _check_grads(gq, gk, gv, cos, n_q, n_kv, head_dim)
    if use_triton(gv):
        from . import rope_triton

        return rope_triton.qkv_rope_backward(gq, gk, gv, cos, sin, n_q, n_kv, head_dim)
    return qkv_rope_backward_reference(gq, gk, gv, cos, sin, n_q, n_kv, head_dim)


@qkv_rope_backward.register_fake
def _(gq, gk, gv, cos, sin, n_q, n_kv, head_dim):
    _check_grads(gq, gk, gv, cos, n_q, n_kv, head_dim)
    B, _, T, _ = gv.shape
    return gv.new_empty(B, T, (n_q + 2 * n_kv) * head_dim)


def _rotated_elements(rows: int, n_q: int, n_kv: int, rotary: int) -> int:
    return rows * (n_q + n_kv) * rotary


def _qkv_rope_flops(qkv_shape, cos_shape, sin_shape, n_q, n_kv, head_dim, out_shape=None, **kwargs) -> int:
    """Two multiplies and an add per rotated element of q and k; v and the unrotated tails are copies."""
    return 3 * _rotated_elements(qkv_shape[0] * qkv_shape[1], n_q, n_kv, cos_shape[-1])


def _qkv_rope_backward_flops(gq_shape, gk_shape, gv_shape, cos_shape, sin_shape, n_q, n_kv, head_dim,
                             out_shape=None, **kwargs) -> int:
    """The same three FLOPs per rotated element as forward."""
    return 3 * _rotated_elements(gv_shape[0] * gv_shape[2], n_q, n_kv, cos_shape[-1])


register_flops(torch.ops.phitune.qkv_rope, _qkv_rope_flops)
register_flops(torch.ops.phitune.qkv_rope_backward, _qkv_rope_backward_flops)
