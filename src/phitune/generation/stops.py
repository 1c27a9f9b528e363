"""The one rule for the ids generation stops on, used by chat, ``phitune eval --generate``, the training-time
``eval_generate`` probe, the generation config written into run folders, the demo and every export.

A turn ends on any of: the ids a generation config names (the run folder's ``generation_config.json`` or the
model's own ``generation_config``: an int or a list), the tokenizer's eos, the end-of-turn token of its chat
template (the turn-end rule, :func:`phitune.models.chat_template.turn_end`: ``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``, ...), and Phi-3's end-of-turn tokens where the vocabulary has them
(:func:`phitune.models.tokenizer.end_of_turn_ids`: ``<|end|>``, and ``<|assistant|>`` as Microsoft's
generation_config.json has it). Sorted and without repeats, so every consumer writes
the same list (Phi-3: 32000, 32001, 32007, as Microsoft's generation_config.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from ..models.chat_template import end_of_turn_id
from ..models.tokenizer import end_of_turn_ids

GENERATION_CONFIG = "generation_config.json"


def read_generation_config(folder: str | os.PathLike | None) -> dict:
    """``folder/generation_config.json`` as a dict (empty when there is none)."""
    if folder is None:
        return {}
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); delete it or fix it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}; delete it or fix it")
    return data


def configured_stop_ids(folder: str | os.PathLike | None) -> list[int] | int | None:
    """``eos_token_id`` of ``folder/generation_config.json`` (None when there is no such file)."""
    return read_generation_config(folder).get("eos_token_id")


def stop_token_ids(tokenizer, *, run_dir: str | os.PathLike | None = None, model=None) -> list[int]:
    """Every id that ends an assistant turn, sorted: those of ``run_dir``'s generation_config.json, of
    ``model.generation_config``, the tokenizer's eos and its end-of-turn tokens (the chat template's own first).
    A Phi-3 turn ends with ``<|end|>`` (32007), which is not the tokenizer's eos: a model that stops only on eos
    never stops."""
    configured: list = []
    for value in (configured_stop_ids(run_dir), getattr(getattr(model, "generation_config", None),
                                                        "eos_token_id", None)):
        configured += value if isinstance(value, (list, tuple)) else [value]
    configured.append(end_of_turn_id(tokenizer))
    return sorted(end_of_turn_ids(tokenizer, configured))


def generation_config_for(model, tokenizer):
    """The model's generation config, stopping on :func:`stop_token_ids`, padding with the tokenizer's pad: what
    ``phitune train`` saves into the run folder."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    gen = GenerationConfig.from_dict(gen.to_dict()) if gen is not None else GenerationConfig()
    gen.eos_token_id = stop_token_ids(tokenizer, model=model)
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen
