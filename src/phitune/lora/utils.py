"""loralib's two helpers: freeze all but LoRA (and optionally biases), and the LoRA-only state dict; plus
``disable_adapters``, the base model inside the adapted one."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .layers import LoRALayer

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "disable_adapters"]

_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias):
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of 'none', 'all', 'lora_only', got {bias!r}")


def _lora_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def _lora_param_names(name: str, layer: nn.Module):
    prefix = f"{name}." if name else ""
    return [prefix + n for n, _ in layer.named_parameters(recurse=False) if n.startswith("lora_")]


def _is_bias(name: str) -> bool:
    # The parameter's own name, not its module path: 'flora_head.weight' is no LoRA, 'bias_proj.weight' no bias.
    return "bias" in name.rsplit(".", 1)[-1]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except the LoRA ones (and biases: 'all' every bias, 'lora_only' LoRA layers' biases).

    LoRA parameters are found by layer type (``lora_*`` parameters of LoRA layers) and set trainable.
    """
    _check_bias(bias)
    selected = _selected_names(model, bias)
    named = list(model.named_parameters(remove_duplicate=False))
    keep = {id(p) for name, p in named if name in selected}
    for _, p in named:  # by identity, so a parameter shared under two names gets one answer
        p.requires_grad = id(p) in keep


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA parameters of ``model.state_dict()`` (sharing storage), plus biases as in mark_only_lora_as_trainable.

    Only parameters are returned, never buffers.
    """
    _check_bias(bias)
    keep = _selected_names(model, bias)
    return {k: v for k, v in model.state_dict().items() if k in keep}


def bias_names(model: nn.Module, bias: str) -> set[str]:
    """Names of the biases that train (and are saved) under ``bias``: none; 'all' every parameter whose own name
    says bias; 'lora_only' the biases of LoRA layers. The one rule for loralib's helpers and for LoRA on HF models
    (phitune.adapt), as peft applies it too."""
    _check_bias(bias)
    if bias == "all":
        return {n for n, _ in model.named_parameters(remove_duplicate=False) if _is_bias(n)}
    if bias == "lora_only":
        return {f"{name}.bias" if name else "bias" for name, layer in _lora_layers(model)
                if getattr(layer, "bias", None) is not None}
    return set()


def _selected_names(model: nn.Module, bias: str) -> set[str]:
    """Parameter names that train (and are saved) under ``bias``: LoRA parameters plus the chosen biases."""
    names = bias_names(model, bias)
    for name, layer in _lora_layers(model):
        names.update(_lora_param_names(name, layer))
    return names


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block: every LoRA layer computes its base layer alone.

    No second copy of the model: merged layers are unmerged (their exact pre-merge weight comes back) and re-merged
    on exit; ``eval()`` inside the block does not merge. Nests, and restores each layer's own state on exit, also
    after an exception::

        with disable_adapters(model):
            base_logits = model(ids).logits
    """
    layers = [m for _, m in _lora_layers(model)]
    saved = [(m, m.__dict__.get("adapter_disabled"), m.merged) for m in layers]
    try:
        for m in layers:
            m.unmerge()
            m.adapter_disabled = True
        yield model
    finally:
        for m, flag, merged in saved:
            if flag is None:
                m.__dict__.pop("adapter_disabled", None)  # back to the class default
            else:
                m.adapter_disabled = flag
            if merged:
                m.merge()
