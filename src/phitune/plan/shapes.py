"""The model's shape for a plan: its config.json only, never its weights.

From a local folder, else the Hugging Face cache (no download), else phitune's table of the Phi-3 / Phi-4 shapes
(offline), and the plan says which.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import ConfigError
from . import fakegpu

_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32064)
_MEDIUM = dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
               num_key_value_heads=10, vocab_size=32064)
# Phi3Config keys of the published config.json files (microsoft/... on the Hub).
BUILT_IN = {
    "microsoft/Phi-3-mini-4k-instruct": _MINI,
    "microsoft/Phi-3-mini-128k-instruct": {**_MINI, "max_position_embeddings": 131072},
    "microsoft/Phi-3.5-mini-instruct": {**_MINI, "max_position_embeddings": 131072},
    "microsoft/Phi-3-medium-4k-instruct": _MEDIUM,
    "microsoft/Phi-3-medium-128k-instruct": {**_MEDIUM, "max_position_embeddings": 131072},
    "microsoft/phi-4": {**_MEDIUM, "vocab_size": 100352, "max_position_embeddings": 16384},
    "microsoft/Phi-4-mini-instruct": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                          num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                                          partial_rotary_factor=0.75, tie_word_embeddings=True,
                                          max_position_embeddings=131072),
}


def model_shape(model_cfg: ModelConfig):
    """(transformers config, where it came from) for ``model.name_or_path``."""
    from transformers import AutoConfig, Phi3Config

    name = model_cfg.name_or_path
    if not name:
        raise ConfigError("model.name_or_path: required (a Hub id or a local folder with config.json)")
    try:
        config = AutoConfig.from_pretrained(name, revision=model_cfg.revision, local_files_only=True,
                                            trust_remote_code=model_cfg.trust_remote_code)
        return config, f"config.json of {name}"
    except (OSError, ValueError) as exc:
        if (Path(name) / "config.json").is_file():
            raise fakegpu.PlanUnsupported(
                f"model.name_or_path: {Path(name) / 'config.json'}: transformers cannot build this architecture "
                f"({exc}); phitune plan simulates the models transformers builds from a config.json") from None
        shape = next((v for k, v in BUILT_IN.items() if k.lower() == str(name).lower()), None)
        if shape is None:
            raise ConfigError(f"model.name_or_path: no config.json for '{name}' in a local folder or the Hugging "
                              f"Face cache ({exc}), and it is not in phitune's built-in table "
                              f"({', '.join(BUILT_IN)}). Give a local folder with its config.json, or download "
                              f"just that file: huggingface-cli download {name} config.json") from None
        return Phi3Config(**shape), "phitune's built-in table of Phi-3/Phi-4 shapes (no config.json found offline)"
