"""phitune's training fast path: what ``phitune.training.loss.apply_fast_path`` turns on, and why.

Pieces (each keeps the plain path's loss and LoRA gradients within the dtype's tolerance; all on by default, and
``Pieces`` turns one off for the benchmarks' ablations):
  cross_entropy.py  lm_head + cross-entropy in chunks, gradients formed per chunk, labelled positions only
                    (inside ``forward_loss``; ``Pieces.loss``)
  fused.py          single autograd functions: LoRA linear (``Pieces.lora``), SwiGLU + down_proj with its LoRA
                    (``Pieces.mlp``), RMSNorm and Phi-3's residual adds fused into it (``Pieces.norm``), Phi-3's
                    qkv split + RoPE (``Pieces.rope``);
                    the functions themselves in lora_autograd.py, norm_rope.py, fused_4bit.py (4-bit base)
  attention.py      packed samples marked by position_ids alone (no dense 4-D mask is built); on CUDA in half
  varlen.py         precision, attention over packed samples with PyTorch's FlashAttention varlen (``Pieces.attention``)
  (optional)        ``use_liger_kernel``: Liger's Triton RMSNorm (CUDA, liger-kernel installed);
                    ``torch_compile``: torch.compile of each decoder layer
``training_config.fast_path: off`` turns everything off (the plain path: ``model(...).logits``, dense masks, the
modules as they were).

What was turned on is returned as a ``FastPath`` value that ``forward_loss`` and the batch maker take; nothing is
stored on the model. The fused pieces work by switching the class of module instances to a phitune subclass with
the same parameters (``fused.install``); ``remove`` switches them back before a model is handed to the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError
from . import attention, fused
from .cross_entropy import decoder_of

# The training_config keys apply() reads; a mapping given instead of a TrainingConfig may hold only these.
_KEYS = ("fast_path", "torch_compile", "use_liger_kernel")


@dataclass(frozen=True)
class Pieces:
    """Which parts of the fast path ``apply`` may turn on (all by default; the benchmarks turn one off at a time)."""

    loss: bool = True
    lora: bool = True
    mlp: bool = True
    norm: bool = True
    rope: bool = True
    attention: bool = True


@dataclass(frozen=True)
class FastPath:
    """What ``apply`` turned on for one model; ``forward_loss`` and ``train.batch_maker`` read it.

    ``fused_loss``: the loss goes through lm_head in chunks (no full logits). ``position_masks``: packed samples are
    marked by position_ids alone where the attention kernel honours them, so no dense (B, 1, T, T) mask is built.
    The defaults are what a model that never went through ``apply`` gets."""

    fused_loss: bool = True
    position_masks: bool = True
    notes: tuple[str, ...] = ()
    attn_before: str | None = None  # the attention implementation ``apply`` replaced, restored by ``remove``


PLAIN = FastPath(fused_loss=False, position_masks=False)


def _settings(training_config) -> tuple[str, bool, bool]:
    """(fast_path, torch_compile, use_liger_kernel) of a TrainingConfig, a mapping of those keys, or None."""
    if training_config is None:
        return "auto", False, False
    if isinstance(training_config, dict):
        unknown = sorted(set(training_config) - set(_KEYS))
        if unknown:
            raise ConfigError(f"apply_fast_path: unknown key(s) {unknown}; it reads the training_config keys "
                              f"{', '.join(_KEYS)}. To turn single pieces off, pass "
                              "pieces=phitune.training.fast.Pieces(...)")
        get = training_config.get
    else:
        def get(key, default=None):
            return getattr(training_config, key, default)
    mode = get("fast_path", "auto")
    mode = "off" if mode in (False, "off", "none") else "auto"
    return mode, bool(get("torch_compile", False)), bool(get("use_liger_kernel", False))


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply(model, training_config=None, pieces: Pieces | None = None) -> FastPath:
    """Turn on what helps ``model`` on its device and return what was turned on (see ``apply_fast_path``)."""
    mode, compile_layers_, liger = _settings(training_config)
    pieces = pieces or Pieces()
    notes: list[str] = []
    if mode == "off":
        if liger:
            notes.append("liger: skipped (fast_path is off)")
        if compile_layers_:  # independent of the fast path
            notes.append(f"torch.compile: {compile_layers(model)} decoder layers")
        return FastPath(fused_loss=False, position_masks=False, notes=tuple(notes))
    device = _device_of(model)
    if pieces.loss:
        notes.append("loss: chunked lm_head cross-entropy over labelled positions only (no full logits)")

    counts = fused.install(model, lora_layers=pieces.lora, mlp=pieces.mlp, norms=pieces.norm,
                           attention=pieces.rope)
    if any(counts.values()):
        notes.append("fused autograd functions: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))

    if liger:
        if device.type == "cuda" and fused.liger_available():
            n = fused.use_liger(model)
            notes.append(f"liger: Triton RMSNorm in {n} norms")
        else:
            notes.append("liger: skipped (needs CUDA and the liger-kernel package); phitune's own fused norms used")

    before = attention.implementation(model)
    wanted = attention.choose(model, device) if pieces.attention else None
    # Only replace the default kernel: an explicit eager/flash choice is the user's.
    switched = bool(wanted) and before == "sdpa" and attention.switch(model, wanted)
    if switched:
        notes.append(f"attention: {wanted} over packed samples (boundaries from position_ids, no dense mask)")
    elif pieces.attention:
        notes.append("attention: packed samples marked by position_ids where the kernel honours them (no dense mask)")

    if compile_layers_:
        notes.append(f"torch.compile: {compile_layers(model)} decoder layers")
    return FastPath(fused_loss=pieces.loss, position_masks=pieces.attention, notes=tuple(notes),
                    attn_before=before if switched else None)


def remove(model, fast: FastPath | None = None) -> int:
    """Undo ``apply`` on ``model`` (original module classes, the attention implementation it replaced); returns how
    many modules were switched back. Compiled layers stay compiled (same parameters and results)."""
    n = fused.uninstall(model)
    if fast is not None and fast.attn_before is not None:
        attention.switch(model, fast.attn_before)
    return n


def decoder_layers(model) -> list:
    """The repeated blocks of a Hugging Face decoder (``model.model.layers`` for Phi-3), or []."""
    body = decoder_of(model) or model
    layers = getattr(body, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (nn.Module.compile): same parameters and names, fused kernels.

    Per layer rather than the whole model so the graph is small, compiled once and reused by every layer, and the
    loss's data-dependent sizes stay outside it.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)
