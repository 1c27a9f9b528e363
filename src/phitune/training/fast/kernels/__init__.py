"""Triton kernels of the fast path, each behind a ``torch.library`` custom op.

Why custom ops: on a GPU every elementwise op of the plain autograd graph is its own kernel reading and writing HBM
(``phitune plan`` puts RMSNorm, SwiGLU, RoPE and the dropout masks at about a third of a Phi-3-mini step). A custom op
is one kernel, and it stays one op everywhere torch looks at it: its registered fake implementation gives shapes to
FakeTensorMode, so ``phitune plan`` records it as a single op whose bytes are its inputs and outputs (what the fused
kernel moves), and its FLOP formula (``register_flops``) goes into torch's flop registry through the public API.

Which implementation runs: the Triton kernel on CUDA tensors when Triton is importable (every Linux CUDA build of
torch ships it); otherwise, and always on the CPU, the plain torch reference next to it, which is also what the
tests check each kernel against (on a CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
``PHITUNE_TRITON=0`` turns the kernels off (the references run on CUDA too), for A/B runs and bug reports.

Layout: one module per op (its custom ops, reference, fake implementation, FLOP formula and autograd-free
launchers); the Triton source in a sibling ``*_triton.py`` imported only when a kernel is launched, so importing
phitune never imports Triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

_forced = False


@functools.cache
def triton_available() -> bool:
    """Triton can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on ``t`` runs its Triton kernel: a CUDA tensor with Triton present, unless ``PHITUNE_TRITON=0``;
    or any tensor inside ``force_triton()`` (the tests, on a CPU through Triton's interpreter)."""
    return _kernels_on() and (_forced or t.device.type == "cuda")


def _kernels_on() -> bool:
    return triton_available() and os.environ.get("PHITUNE_TRITON", "1") != "0"


@contextlib.contextmanager
def force_triton():
    """Run the Triton kernels on any device inside this block. For tests: with ``TRITON_INTERPRET=1`` set before the
    kernel modules are first imported, Triton interprets its kernels on CPU tensors."""
    global _forced
    before, _forced = _forced, True
    try:
        yield
    finally:
        _forced = before


def register_flops(op, formula):
    """Give ``op`` (a custom op's OpOverloadPacket, ``torch.ops.phitune.NAME``) a FLOP formula in torch's flop
    registry, so ``phitune plan`` (and torch's FlopCounterMode) count it. ``formula`` is called as torch calls its own:
    with the shapes of the op's tensor arguments in their places (other arguments as they are) and ``out_shape``."""
    register_flop_formula(op)(formula)
    return formula


def new_seed() -> int:
    """A seed for a kernel's in-kernel random numbers (dropout: ``dropout_triton.keep_mask``), drawn from torch's
    default CPU generator so that ``torch.manual_seed`` reproduces a run. Kernels that regenerate a mask in backward
    keep this int instead of the mask."""
    return int(torch.randint(2**31 - 1, (1,), device="cpu").item())


def dropout_seed(t: torch.Tensor, p: float) -> int | None:
    """The seed from which the kernels draw (and draw again in backward) a dropout mask over ``t``, or None where the
    caller saves a bool mask instead (no dropout, the CPU, CUDA without Triton). The one rule for every dropout of
    the fast path (LoRA inputs, SwiGLU's h): the mask is ``dropout.philox_keep_mask(seed, shape, p)``.

    phitune plan's simulated GPU counts as a GPU: fake CUDA tensors, and meta ones (its 4-bit base stands on meta for
    CUDA). Nothing is computed there, so the seed is 0 and none is drawn: drawing one would read a number
    (``.item()``) inside FakeTensorMode, and would move the CPU generator a real run moves at the same place anyway."""
    if p <= 0:
        return None
    meta = t.device.type == "meta"
    if not (use_triton(t) or (meta and _kernels_on())):
        return None
    return 0 if meta or is_fake(t) else new_seed()
