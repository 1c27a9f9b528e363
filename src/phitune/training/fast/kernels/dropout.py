"""LoRA dropout without stored masks: the keep mask is a function of (seed, element index), drawn inside the kernel
in forward and drawn again in backward, so autograd keeps one int instead of a 1-byte mask per adapted input
(``phitune plan``, Phi-3-mini at batch 4: the qkv, o and gate_up masks are 2.25 GiB of the step's 34.15 GiB peak;
down_proj's belong to the SwiGLU function).

The mask: element ``i`` of a contiguous tensor is kept when ``u >= p``, where ``u`` is component ``i % 4`` of
Triton's Philox ``randint4x(seed, i // 4)`` turned into a float in [0, 1) as ``tl.rand`` does. One Philox call gives
four elements (as curand's ``uniform4`` does for torch's own dropout): ten rounds per element would make the kernel
integer-bound on an H100 (an estimate from instruction counts, not measured: about 45 integer instructions per
element, some 3x the time of its 4-6 bytes of memory traffic).
``philox_keep_mask`` is the same function written in torch (int64 arithmetic), the reference the kernels are
tested against, bit for bit.

Ops (the forward and the backward of one dropout, no autograd inside):
  lora_dropout(x, seed, p)                            x with dropped elements zeroed (1/(1-p) is left to the caller)
  lora_dropout_backward(gbr, A, base, seed, p, scale) base + scale·drop(gbr A) (base may be None): the LoRA
                                                      branch's input gradient, its K=r product taken per tile in
                                                      the kernel (the (N, in) product is never written), added to
                                                      the base's in the same pass
The fast path calls them only where ``use_triton`` holds (CUDA); on the CPU it keeps its saved bool mask
(``lora_autograd.keep_mask_cpu``), which is cheaper there than drawing the mask twice.
"""

import math

import torch

from . import register_flops, use_triton

# Triton's Philox-4x32 constants (triton/language/random.py) and tl.rand's int -> [0, 1) scale.
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
_U32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10

# FLOPs per element, floating point only (Philox is integer work, as in torch's own bernoulli, which torch's flop
# registry counts as 0): forward int->float, scale, compare, select; backward those plus scale·t and + base (one
# fewer without a base), and the 2r of the K=r product t = gbr A on top.
FWD_FLOPS_PER_ELEMENT = 4
BWD_FLOPS_PER_ELEMENT = 6


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a·b for uint32 values held in int64 (the product needs 64 unsigned bits)."""
    lo16, hi16 = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * lo16, a * hi16  # each < 2^48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = ((p_hi & 0xFFFF) << 16) + p_lo
    return high, low & _U32


def philox_randint4x(seed: int, counters: torch.Tensor) -> list[torch.Tensor]:
    """Triton's ``tl.randint4x(seed, counters)`` for int64 counters < 2^32: four uint32 words each (in int64)."""
    c0, c1 = counters & _U32, counters >> 32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _U32, (k1 + _KEY_B) & _U32
    return [c0, c1, c2, c3]


def philox_keep_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The kernels' keep mask for a contiguous tensor of ``shape``, in torch: element i kept when component i % 4 of
    ``randint4x(seed, i // 4)``, as ``tl.rand`` maps it to [0, 1), is >= p."""
    n = math.prod(shape)
    counters = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    words = torch.stack(philox_randint4x(seed, counters), dim=1).reshape(-1)[:n]
    signed = torch.where(words >= 2**31, words - 2**32, words)  # the uint32 bits read as int32
    uniform = torch.where(signed < 0, -signed - 1, signed).to(torch.float32) * _UNIFORM_SCALE
    return (uniform >= p).view(shape)


def _triton():
    # Imported on first launch only: importing phitune must never import Triton.
    from . import dropout_triton

    return dropout_triton


@torch.library.custom_op("phitune::lora_dropout", mutates_args=())
def lora_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x with the elements the (seed, index) mask drops set to 0; the 1/(1-p) is left to the caller's scaling."""
    x = x.contiguous()
    if use_triton(x):
        return _triton().dropout_forward(x, seed, p)
    return torch.where(philox_keep_mask(seed, x.shape, p, x.device), x, 0)


@lora_dropout.register_fake
def _lora_dropout_fake(x, seed, p):
    return x.new_empty(x.shape)


@torch.library.custom_op("phitune::lora_dropout_backward", mutates_args=())
def lora_dropout_backward(gbr: torch.Tensor, A: torch.Tensor, base: torch.Tensor | None, seed: int, p: float,
                          scale: float) -> torch.Tensor:
    """base + scale·drop(gbr A) with the mask ``lora_dropout(·, seed, p)`` drew (scale·drop(gbr A) when base is
    None): the gradient of x Wᵀ + s·(drop(x) Aᵀ) Bᵀ with respect to x, given gbr = g B (N, r), A (r, in) and
    base = g W (N, in); all in one dtype."""
    gbr, A = gbr.contiguous(), A.contiguous()
    base = None if base is None else base.contiguous()
    if use_triton(gbr):
        return _triton().dropout_backward(gbr, A, base, seed, p, scale)
    t = torch.mm(gbr, A)
    dropped = torch.where(philox_keep_mask(seed, t.shape, p, t.device), t, 0)
    return dropped.mul_(scale) if base is None else base.add(dropped, alpha=scale)


@lora_dropout_backward.register_fake
def _lora_dropout_backward_fake(gbr, A, base, seed, p, scale):
    return gbr.new_empty((gbr.shape[0], A.shape[1]))


def _dropout_flops(x_shape, seed, p, out_shape=None, **kwargs) -> int:
    return FWD_FLOPS_PER_ELEMENT * math.prod(x_shape)


def _dropout_backward_flops(gbr_shape, a_shape, base_shape, seed, p, scale, out_shape=None, **kwargs) -> int:
    rank = a_shape[0]
    return (2 * rank + BWD_FLOPS_PER_ELEMENT - (base_shape is None)) * gbr_shape[0] * a_shape[1]


register_flops(torch.ops.phitune.lora_dropout, _dropout_flops)
register_flops(torch.ops.phitune.lora_dropout_backward, _dropout_backward_flops)
