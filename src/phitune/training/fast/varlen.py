"""Padding-free attention over packed samples: one variable-length kernel call per layer, no (T, T) mask.

Registered with transformers' public ``AttentionInterface`` under ``NAME`` when ``apply_fast_path`` selects it (never
at import). ``forward_loss`` passes the sample boundaries as ``cu_seq_lens_q``/``max_length_q`` (transformers'
FlashAttentionKwargs, forwarded to every attention call), computed once per micro-batch from ``position_ids``.

Kernels: on CUDA ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's FlashAttention varlen, torch >= 2.9; no
flash-attn package needed); elsewhere causal sdpa per sample, which is exact and keeps this path testable on CPU.
``phitune.data.collate`` builds no dense mask for it (position_ids mark the samples).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "phitune_varlen"


def torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available(device: torch.device) -> bool:
    return device.type in ("cuda", "meta") and torch_varlen() is not None


def boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 of the flattened batch, longest sample) from positions restarting at each sample."""
    B, T = position_ids.shape
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    start = step != 1
    start[:, 0] = True
    starts = start.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _call_varlen(fn, q, k, v, cu, max_len, scale, window):
    params = inspect.signature(fn).parameters
    kw = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (window - 1, 0) if window else (-1, 0)
    elif window:
        raise NotImplementedError("torch varlen_attn without window_size: no sliding window")
    else:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _per_sample_sdpa(q, k, v, cu, scale, window):
    """Reference kernel: causal sdpa on each sample of the flattened (N, H, D) tensors."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        mask = None
        if window and e - s > window:
            i = torch.arange(e - s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention interface: (B, H, T, D) inputs -> ((B, T, H, D) output, None)."""
    if dropout:
        raise NotImplementedError(f"{NAME}: attention dropout is not supported (set attention_dropout=0)")
    B, H, T, D = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(T, device=query.device).expand(B, T)
        cu, max_len = boundaries(position_ids)
    # views, no copies, for q, k, v from kernels/rope.py (laid out (B, T, H, D)); the three clones a (B, H, T, D)
    # layout costs were about 2.3 ms of a predicted Phi-3-mini step at batch 4 x 2048 (H200)
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
    fn = torch_varlen() if query.device.type in ("cuda", "meta") else None  # meta: the plan's 4-bit stand-in
    if fn is not None:
        out = _call_varlen(fn, q, k, v, cu.to(query.device), int(max_len), scaling, sliding_window)
    else:
        out = _per_sample_sdpa(q, k, v, cu, scaling, sliding_window)
    return out.view(B, T, H, D), None


def register() -> None:
    """Make ``NAME`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
