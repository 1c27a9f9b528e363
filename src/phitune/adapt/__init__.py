"""LoRA on Hugging Face models, saved and loaded in the PEFT adapter format.

    report = add_lora(model, {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    ...train...
    save_adapter(model, "out")          # adapter_config.json + adapter_model.safetensors, loads in peft
    merge_lora(model).save_pretrained("merged")

config.py: LoraConfig (peft's keys); inject.py: add_lora (target matching, Phi-3 fused slices), adapter_state_dict
(the adapter in PEFT key naming); merge.py: merge_lora, merge_lora_checked, merge_checked (4-bit bases in 16/32-bit);
peft_format.py: load_adapter_state_dict (pure key conversion), save_adapter, load_adapter.
"""

from .._lazy import exports

# Imported on first use (PEP 562), so ``phitune.adapt.config`` is a leaf that phitune.config can import without
# loading the LoRA machinery (torch).
_EXPORTS = {
    "LoraConfig": "config", "parse_lora_config": "config",
    "FUSED_SLICES": "inject", "PEFT_PREFIX": "inject", "LoraReport": "inject", "adapter_state_dict": "inject",
    "add_lora": "inject", "lora_report": "inject", "redraw_lora": "inject",
    "merge_checked": "merge", "merge_lora": "merge", "merge_lora_checked": "merge",
    "CONFIG_NAME": "peft_format", "LEGACY_WEIGHTS_NAME": "peft_format", "WEIGHTS_NAME": "peft_format",
    "load_adapter": "peft_format", "load_adapter_state_dict": "peft_format", "read_adapter": "peft_format",
    "save_adapter": "peft_format",
}
__all__ = sorted(_EXPORTS)


__getattr__ = exports(__name__, _EXPORTS)
