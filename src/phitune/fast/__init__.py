"""phitune's training fast path: what ``phitune.loss.apply_fast_path`` turns on, and why.

Pieces (each keeps the plain path's loss and LoRA gradients within the dtype's tolerance, each can be turned off):
  cross_entropy  chunked lm_head + cross-entropy with gradients formed per chunk; only labelled positions
                 (always on inside ``forward_loss``; ``fused_loss=False`` turns it off)
  fused          LoRA linear, SwiGLU+down (with LoRA) and RMSNorm as single autograd functions (fused.py)
  attention      dense packed masks dropped when position_ids say the same; on CUDA flash-attention varlen or
                 flex attention for packed batches
See ``apply`` for the switches it reads from the training config.
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
        return notes
    device = _device_of(model)
    notes.append("loss: chunked lm_head cross-entropy over labelled positions only (no full logits)")

    counts = fused.install(model, lora_layers=_get(training_config, "fast_lora", True),
                           mlp=_get(training_config, "fast_mlp", True), norms=_get(training_config, "fast_norm", True))
    if any(counts.values()):
        notes.append("fused autograd functions: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))

    wanted = attention.choose(model, device)
    if wanted and attention.implementation(model) != wanted and attention.switch(model, wanted):
        notes.append(f"attention: {wanted} for packed batches (sample boundaries from position_ids)")
    notes.append("attention: dense 4-D packed masks replaced by position_ids where equivalent")
    return notes
