"""loralib-compatible LoRA layers: ``import phitune.lora as lora`` runs loralib's README unchanged.

Beyond loralib: explicit ``merge()``/``unmerge()``/``delta_weight()``, ``from_linear(...)`` wrappers,
``MergedLinear(out_splits=...)`` for unequal groups, ``use_rslora`` and ``lora_dtype`` on every layer,
``disable_adapters(model)`` (a context manager: the base model, no copy).
"""

from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .quantized import Linear4bit, MergedLinear4bit  # LoRA on a bitsandbytes 4-bit base (QLoRA); bnb imported lazily
from .utils import disable_adapters, lora_state_dict, mark_only_lora_as_trainable

__all__ = ["LoRALayer", "Linear", "Embedding", "MergedLinear", "Conv1d", "Conv2d", "Conv3d",
           "Linear4bit", "MergedLinear4bit", "mark_only_lora_as_trainable", "lora_state_dict", "disable_adapters"]
