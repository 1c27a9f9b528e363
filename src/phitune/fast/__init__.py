"""phitune's training fast path: what ``phitune.loss.apply_fast_path`` turns on, and why.

Pieces (each keeps the plain path's loss and LoRA gradients within the dtype's tolerance; each has a switch, read
from the training config as an attribute or dict key; all default on):
  cross_entropy.py  lm_head + cross-entropy in chunks, gradients formed per chunk, labelled positions only
                    (inside ``forward_loss``; ``fast_loss``)
  fused.py          single autograd functions: LoRA linear (``fast_lora``), SwiGLU + down_proj with its LoRA
                    (``fast_mlp``), RMSNorm (``fast_norm``), Phi-3's qkv split + RoPE (``fast_rope``)
  attention.py      dense 4-D packed masks dropped when position_ids say the same; on CUDA in half precision,
  varlen.py         attention over packed samples with PyTorch's FlashAttention varlen (``fast_attention``)
  (optional)        ``use_liger_kernel``: Liger's Triton RMSNorm (CUDA, liger-kernel installed);
                    ``torch_compile``: torch.compile of each decoder layer
``fast_path: off`` turns everything off (the plain path: ``model(...).logits`` and the modules as they were).
"""

from __future__ import annotations

import torch


def _get(config, key, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply(model, training_config=None) -> list[str]:
    """Turn on what helps ``model`` on its device; return one note per piece enabled (see ``apply_fast_path``).

    Reads ``fast_path`` ("auto" or "off"; default auto) from ``training_config`` when present.
    """
    from . import attention, fused

    notes: list[str] = []
    mode = _get(training_config, "fast_path", "auto")
    if mode in (False, "off", "none"):
        model._phitune_drop_dense_mask = False
        model._phitune_fused_loss = False
        if _get(training_config, "use_liger_kernel", False):
            notes.append("liger: skipped (fast_path is off)")
        if _get(training_config, "torch_compile", False):  # independent of the fast path
            notes.append(f"torch.compile: {compile_layers(model)} decoder layers")
        return notes
    device = _device_of(model)
    model._phitune_fused_loss = bool(_get(training_config, "fast_loss", True))
    if model._phitune_fused_loss:
        notes.append("loss: chunked lm_head cross-entropy over labelled positions only (no full logits)")

    counts = fused.install(model, lora_layers=_get(training_config, "fast_lora", True),
                           mlp=_get(training_config, "fast_mlp", True), norms=_get(training_config, "fast_norm", True),
                           attention=_get(training_config, "fast_rope", True))
    if any(counts.values()):
        notes.append("fused autograd functions: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))

    if _get(training_config, "use_liger_kernel", False):
        if device.type == "cuda" and fused.liger_available():
            n = fused.use_liger(model)
            notes.append(f"liger: Triton RMSNorm in {n} norms")
        else:
            notes.append("liger: skipped (needs CUDA and the liger-kernel package); phitune's own fused norms used")

    wanted = attention.choose(model, device) if _get(training_config, "fast_attention", True) else None
    # Only replace the default kernel: an explicit eager/flash choice is the user's.
    if wanted and attention.implementation(model) == "sdpa" and attention.switch(model, wanted):
        notes.append(f"attention: {wanted} over packed samples (boundaries from position_ids, no dense mask)")
    else:
        notes.append("attention: dense 4-D packed masks replaced by position_ids where equivalent")

    if _get(training_config, "torch_compile", False):
        n = compile_layers(model)
        notes.append(f"torch.compile: {n} decoder layers")
    return notes


def decoder_layers(model) -> list:
    """The repeated blocks of a Hugging Face decoder (``model.model.layers`` for Phi-3), or []."""
    from .cross_entropy import decoder_of

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
