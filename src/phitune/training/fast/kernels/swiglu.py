"""SwiGLU of the fused MLP (``h = silu(gate)·up`` from gu = [gate | up]) as one kernel per direction.

Ops (``torch.ops.phitune``):
  swiglu(gu) -> h
  swiglu_dropout(gu, p, seed) -> (h, drop(h))           drop(h): h where ``keep``, else 0 (1/(1-p) left to the
                                                         caller's LoRA scaling, as lora_autograd does)
  swiglu_lora_forward(gu, A, p, seed) -> (h, xa)     xa = drop(h) Aᵀ (N, r), the LoRA branch's K=r product of
                                                         down_proj; p = 0: no dropout. On a GPU drop(h) is never
                                                         written: each tile of it is the operand of the product
                                                         (``phitune plan``, Phi-3-mini batch 4: swiglu_dropout's
                                                         second (N, I) output and the mm reading it back)
  swiglu_backward(gu, gh, gbr, A, s, p, seed, want_h) -> (grad of gu, drop(h) or h)
      gh is the down_proj input gradient g W (with the LoRA term already added when there is no dropout); gbr = g B
      (N, r) and A (r, I) the factors of the LoRA term t = gbr A that dropout masks (both None without dropout):
      the gradient reaching h is gh + s·keep·t, t formed per tile in the kernel (never written to memory). The second
      output is recomputed h (masked when p > 0) for grad_A, written by the same pass that reads gu anyway (one
      (N, I) write instead of a second read of the (N, 2I) gu); an empty tensor when ``want_h`` is False.

The keep mask is never stored on a GPU: it is the fast path's one dropout rule (``dropout.philox_keep_mask`` over h,
seed from ``kernels.dropout_seed``), drawn again in backward from the same seed; the torch reference draws the same
mask bit for bit. On Phi-3-mini at batch 4 x 2048 that is 64 MiB of saved bool mask per layer (2 GiB in 32 layers).

The torch references are the plain arithmetic of the fast path before these ops (same ops, same dtypes); they run on
the CPU, and on CUDA when Triton is off. The Triton kernels (swiglu_triton.py) compute in float32 and round once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kernels_on, register_flops, use_triton
from .dropout import philox_keep_mask

# FLOPs per element of h, counted as the kernels do them: sigmoid = exp, add, divide (3) + silu's multiply + up's
# multiply; dropout adds a select. Backward: sigmoid (3), silu, g_up, 1-sig, ·gate, +1, ·sig, ·up, ·gh, h (9);
# dropout and the LoRA term add s·t, its select and the add (3), and the 2r of t = gbr A.
_FWD_FLOPS, _FWD_DROP_FLOPS, _BWD_FLOPS, _BWD_T_FLOPS = 5, 1, 12, 3


# --- torch references (the CPU path, and CUDA without Triton) ------------------------------------------------------


def swiglu_reference(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up in gu's dtype, as torch computes it elementwise."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def swiglu_backward_reference(gu, gh, t, s: float, keep, want_h: bool):
    """(grad of gu, h masked by ``keep``) of h = silu(gate)·up, given the gradient gh + s·keep·t reaching h.

    ``keep`` None: no dropout (t, if any, is added unmasked)."""
    gate, up = gu.chunk(2, dim=-1)
    if t is not None:
        gh = gh.add(t if keep is None else torch.where(keep, t, 0), alpha=s)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    h = _empty(gu)
    if want_h:
        h = silu * up
        if keep is not None:
            h = torch.where(keep, h, 0)
    ggu = torch.empty_like(gu)
    g_gate, g_up = ggu.chunk(2, dim=-1)
    torch.mul(gh, silu, out=g_up)
    # d silu(x)/dx = sig(x) * (1 + x * (1 - sig(x)))
    dsilu = (1.0 - sig).mul_(gate).add_(1.0).mul_(sig)
    torch.mul(gh, up, out=g_gate).mul_(dsilu)
    return ggu, h


def _empty(gu):
    return gu.new_empty(0)


def _h_shape(gu):
    return (*gu.shape[:-1], gu.shape[-1] // 2)


# --- the custom ops ------------------------------------------------------------------------------------------------


@torch.library.custom_op("phitune::swiglu", mutates_args=())
def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """h = silu(gate)·up from gu = [gate | up] (last dimension 2I), in gu's dtype."""
    if use_triton(gu):
        from . import swiglu_triton

        return swiglu_triton.forward(gu, 0.0, 0)[0]
    return swiglu_reference(gu)


@torch.library.custom_op("phitune::swiglu_dropout", mutates_args=())
def swiglu_dropout(gu: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, drop(h)) with drop's keep mask drawn from ``seed`` (see the module docstring); 0 < p < 1."""
    if use_triton(gu):
        from . import swiglu_triton

        return swiglu_triton.forward(gu, p, seed)
    h = swiglu_reference(gu)
    return h, torch.where(philox_keep_mask(seed, h.shape, p, h.device), h, 0)


@torch.library.custom_op("phitune::swiglu_lora_forward", mutates_args=())
def swiglu_lora_forward(gu: torch.Tensor, A: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, drop(h) Aᵀ) with A (r, I) in gu's dtype and drop's keep mask drawn from ``seed``; p = 0: no dropout."""
    if use_triton(gu):
        from . import swiglu_triton

        return swiglu_triton.lora_forward(gu, A, p, seed)
    return swiglu_lora_forward_reference(gu, A, p, seed)


def swiglu_lora_forward_reference(gu, A, p: float, seed: int):
    """swiglu_lora_forward in torch: h, its seeded dropout, and the K=r matmul, each its own op."""
    h = swiglu_reference(gu)
    hd = torch.where(philox_keep_mask(seed, h.shape, p, h.device), h, 0) if p > 0 else h
    return h, torch.matmul(hd, A.t())


def lora_forward_fused(gu: torch.Tensor) -> bool:
    """Whether SwiGLU + down_proj's LoRA forward takes swiglu_lora_forward: where the kernels run (CUDA), and on
    phitune plan's meta tensors standing for CUDA (QLoRA's simulation), as ``dropout_seed`` counts them. Elsewhere
    (the CPU) h, drop(h) and the product stay separate ops, as fast there as the reference's."""
    return use_triton(gu) or (gu.device.type == "meta" and _kernels_on())


@torch.library.custom_op("phitune::swiglu_backward", mutates_args=())
def swiglu_backward(gu: torch.Tensor, gh: torch.Tensor, gbr: torch.Tensor | None, A: torch.Tensor | None, s: float,
                    p: float, seed: int, want_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of gu, h or drop(h)) given gh and the LoRA term's factors gbr, A (see the module docstring); p = 0: no
    dropout. gu, gh (2-D), gbr and A in one dtype."""
    if use_triton(gu):
        from . import swiglu_triton

        return swiglu_triton.backward(gu, gh, gbr, A, s, p, seed, want_h)
    keep = philox_keep_mask(seed, gh.shape, p, gh.device) if p > 0 else None
    t = None if gbr is None else torch.mm(gbr, A)
    return swiglu_backward_reference(gu, gh, t, s, keep, want_h)


@swiglu.register_fake
def _(gu):
    return gu.new_empty(_h_shape(gu))


@swiglu_dropout.register_fake
def _(gu, p, seed):
    return gu.new_empty(_h_shape(gu)), gu.new_empty(_h_shape(gu))


@swiglu_lora_forward.register_fake
def _(gu, A, p, seed):
    return gu.new_empty(_h_shape(gu)), gu.new_empty((*gu.shape[:-1], A.shape[0]))


@swiglu_backward.register_fake
def _(gu, gh, gbr, A, s, p, seed, want_h):
    return torch.empty_like(gu), gu.new_empty(_h_shape(gu)) if want_h else _empty(gu)


def _h_elements(gu_shape) -> int:
    n = 1
    for d in gu_shape:
        n *= d
    return n // 2


register_flops(torch.ops.phitune.swiglu, lambda gu, *_, out_shape=None, **__: _FWD_FLOPS * _h_elements(gu))
register_flops(torch.ops.phitune.swiglu_dropout,
               lambda gu, *_, out_shape=None, **__: (_FWD_FLOPS + _FWD_DROP_FLOPS) * _h_elements(gu))
# swiglu_lora_forward: swiglu's (and dropout's select when p > 0), then r multiply-adds per element of h for xa
register_flops(torch.ops.phitune.swiglu_lora_forward,
               lambda gu, A, p, *_, out_shape=None, **__:
               (_FWD_FLOPS + (_FWD_DROP_FLOPS if p > 0 else 0) + 2 * A[0]) * _h_elements(gu))
register_flops(torch.ops.phitune.swiglu_backward,
               lambda gu, gh, gbr, A, *_, out_shape=None, **__:
               (_BWD_FLOPS + (_BWD_T_FLOPS + 2 * A[0] if gbr is not None else 0)) * _h_elements(gu))

