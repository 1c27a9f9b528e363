"""The PEFT adapter format: adapter_config.json + adapter_model.safetensors, as peft writes and reads them.

Conversion is two pure functions over state dicts (:func:`adapter_state_dict`, :func:`load_adapter_state_dict`);
per-slice adapters on a fused module are written as ONE LoRA on that module (concatenated A, block-structured B,
rank r*n), with rank_pattern/alpha_pattern entries so peft computes the same scaling.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import lora
from ..errors import AdapterError, ConfigError
from ..runs.atomic import atomic_file, write_text
from .config import LoraConfig, parse_lora_config
from .inject import (
    PEFT_PREFIX, LoraReport, adapter_state_dict, add_lora, lora_modules, lora_report, lora_state, set_trainable,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


_SUFFIX = re.compile(r"\.(lora_[AB]\.weight|lora_embedding_[AB]|base_layer\.(weight|bias)|[^.]+)$")


def _normalise_key(key: str) -> str:
    # Older peft versions kept the adapter name and the modules_to_save wrapper in the saved keys.
    key = re.sub(r"\.modules_to_save(\.default)?\.", ".", key)
    return re.sub(r"\.(lora_A|lora_B)\.default\.", r".\1.", key)


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "the adapter") -> None:
    """Copy PEFT-named tensors into the model's LoRA layers, strictly (every tensor used, every shape equal)."""
    state = lora_state(model)
    expected = adapter_state_dict(model)
    given = {_normalise_key(k): v for k, v in tensors.items()}
    module_of = lambda k: _SUFFIX.sub("", k.removeprefix(PEFT_PREFIX))  # noqa: E731
    tensor_of = lambda k: _SUFFIX.search(k).group(0)[1:]  # noqa: E731
    for key in given:
        if key not in expected:
            raise AdapterError(f"{source}: has weights for '{module_of(key)}' ({key}), which this model has no "
                               f"LoRA/saved module for; adapted here: "
                               f"{', '.join(sorted({module_of(k) for k in expected}))}")
    for key in expected:
        if key not in given and key.endswith(".base_layer.weight"):  # peft's save_embedding_layers=False
            continue
        if key not in given:
            raise AdapterError(f"{source}: no weights for module '{module_of(key)}' ({key} is missing); "
                               "the adapter does not fit this model or its adapter_config.json")
        want, got = tuple(expected[key].shape), tuple(given[key].shape)
        if want != got:
            rank = " (a different LoRA rank)" if ".lora_" in key and (want[0] != got[0] or want[-1] != got[-1]) else ""
            raise AdapterError(f"{source}: module '{module_of(key)}': {tensor_of(key)} has "
                               f"shape {got} in the adapter but {want} in the model{rank}")
    lora_layers = dict(lora_modules(model))
    params = dict(model.named_parameters())
    for key, value in given.items():
        name = key[len(PEFT_PREFIX):]
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and owner.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            mod_name, which = owner.rsplit(".", 1)
            m = lora_layers[mod_name]
            if which == "lora_B" and mod_name in state.slices:
                value = _compact_b(value, mod_name, m, state.slices[mod_name][0], source)
            getattr(m, which).copy_(value)
        elif leaf in ("lora_embedding_A", "lora_embedding_B"):
            getattr(lora_layers[owner], "lora_" + leaf[-1]).copy_(value)
        else:
            params[name.replace(".base_layer.", ".")].copy_(value)


def _compact_b(full: torch.Tensor, name: str, m: lora.MergedLinear, enabled, source) -> torch.Tensor:
    try:
        return m.compact_B(full)
    except ValueError:
        raise AdapterError(f"{source}: module '{name}': lora_B is not block-structured per slice "
                           f"({', '.join(enabled)}), so it cannot load into per-slice LoRA layers; "
                           "load it onto a fresh model instead") from None


def _adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json: peft's keys, with the adapted modules named exactly and per-module r/alpha spelt out."""
    state = lora_state(model)
    cfg = state.config
    effective = {}
    for name, m in lora_modules(model):
        n = len(state.slices[name][0]) if name in state.slices else 1
        # A fused module with n per-slice adapters of rank r is one LoRA of rank r*n; peft's scaling alpha/(r*n)
        # (alpha/sqrt(r*n) with rsLoRA) equals ours when alpha is scaled by n (sqrt(n)).
        effective[name] = (m.r * n, m.lora_alpha * (math.sqrt(n) if cfg.use_rslora else n))
    # The most common (r, alpha) becomes the global pair, so the usual configs need no patterns at all (some
    # loaders, e.g. older vLLM, read only r and lora_alpha); the rest are exact per-module entries.
    counts = Counter(effective.values())
    r, alpha = max(counts, key=lambda ra: (counts[ra], ra == (cfg.r, cfg.lora_alpha)))
    ranks = {name: ra[0] for name, ra in effective.items() if ra[0] != r}
    alphas = {name: ra[1] for name, ra in effective.items() if ra[1] != alpha}
    return {
        "peft_type": "LORA", "task_type": cfg.task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha,
        "lora_dropout": cfg.lora_dropout, "bias": cfg.bias, "target_modules": sorted(n for n, _ in lora_modules(model)),
        "exclude_modules": None, "modules_to_save": list(state.modules_to_save) or None, "rank_pattern": ranks,
        "alpha_pattern": alphas, "use_rslora": cfg.use_rslora, "init_lora_weights": cfg.init_lora_weights,
        "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None, "use_dora": False,
        "lora_bias": False,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) to ``directory``; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    # Clone: safetensors refuses tensors sharing storage (tied weights) and non-contiguous views.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    # Each file is replaced atomically; the weights first, so an adapter_config.json never names weights not yet
    # written. (Checkpoints write the pair into a staging folder, which makes the pair itself atomic.)
    with atomic_file(directory / WEIGHTS_NAME, "the adapter weights") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(directory / CONFIG_NAME, json.dumps(_adapter_config(model, base_model_name_or_path), indent=2) + "\n",
               "the adapter config")
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """The config and tensors of a PEFT adapter folder (safetensors, or a legacy .bin read with weights_only)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        cfg = parse_lora_config(data, section=str(config_path))
    except ConfigError as e:
        raise AdapterError(str(e)) from None
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        path = directory / WEIGHTS_NAME
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: a damaged or cut-off file
            raise AdapterError(f"{path}: not a readable safetensors file ({e}); it is damaged or was cut off. "
                               "Fix: use another checkpoint of the run (RUN/checkpoints/checkpoint-N), or train "
                               "again") from None
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        path = directory / LEGACY_WEIGHTS_NAME
        try:  # weights_only: a pickle may run code; only plain tensors are accepted
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{path}: not a plain tensor file ({type(e).__name__}: {e}); "
                               "phitune never unpickles code") from None
    else:
        raise AdapterError(f"{directory}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) next to {CONFIG_NAME}")
    return cfg, tensors, path


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = False,
                 lora_dtype: torch.dtype | None = None) -> LoraReport:
    """Load a PEFT adapter folder (phitune's or peft's) onto ``model``, strictly; frozen unless ``trainable``.

    A model without LoRA gets the layers the folder's adapter_config.json describes; a model that already has
    phitune LoRA layers (e.g. from add_lora with the run's config, to resume training) keeps them.
    """
    cfg, tensors, path = read_adapter(directory)
    if not lora_modules(model):
        try:
            add_lora(model, cfg, lora_dtype=lora_dtype)
        except ConfigError as e:
            raise AdapterError(f"{Path(directory) / CONFIG_NAME}: does not fit this model: {e}") from None
    load_adapter_state_dict(model, tensors, source=str(path))
    set_trainable(model, trainable)
    return lora_report(model)
