"""LoRA on Hugging Face models, saved and loaded in the PEFT adapter format.

    report = add_lora(model, {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    ...train...
    save_adapter(model, "out")          # adapter_config.json + adapter_model.safetensors, loads in peft
    merge_lora(model).save_pretrained("merged")

config.py: LoraConfig (peft's keys); inject.py: add_lora (target matching, Phi-3 fused slices), adapter_state_dict
(the adapter in PEFT key naming); merge.py: merge_lora, merge_lora_checked, merge_checked (4-bit bases in 16/32-bit);
peft_format.py: load_adapter_state_dict (pure key conversion), save_adapter, load_adapter.
"""

from .config import LoraConfig, parse_lora_config
from .inject import FUSED_SLICES, PEFT_PREFIX, LoraReport, adapter_state_dict, add_lora, lora_report
from .merge import merge_checked, merge_lora, merge_lora_checked
from .peft_format import (
    CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter, load_adapter_state_dict, read_adapter, save_adapter,
)

__all__ = ["LoraConfig", "LoraReport", "add_lora", "adapter_state_dict", "load_adapter", "load_adapter_state_dict",
           "lora_report", "merge_checked", "merge_lora", "merge_lora_checked", "parse_lora_config", "read_adapter",
           "save_adapter",
           "FUSED_SLICES", "PEFT_PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME"]
