"""phitune: LoRA fine-tuning of Phi-3 and other Hugging Face causal LMs.

Public API (imported lazily so ``import phitune`` stays fast)::

    import phitune
    report = phitune.add_lora(model, {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    phitune.save_adapter(model, "out/adapter")
    result = phitune.finetune(model="microsoft/Phi-3-mini-4k-instruct", data="chats.jsonl",
                              training_config={...}, peft_config={...})
"""

from __future__ import annotations

import importlib

from ._lazy import exports

__version__ = "0.1.0"

_EXPORTS = {
    # adapt/: LoRA on Hugging Face models, PEFT format
    "add_lora": "adapt",
    "save_adapter": "adapt",
    "load_adapter": "adapt",
    "merge_lora": "adapt",
    "merge_lora_checked": "adapt",
    "adapter_state_dict": "adapt",
    "LoraConfig": "adapt",
    "LoraReport": "adapt",
    # data/: chat data pipeline
    "preview": "training.preview",
    "preview_records": "training.preview",
    "DataConfig": "data",
    "prepare_data": "data",
    "preview_text": "data",
    "format_stats": "data",
    "build_phi3_style_tokenizer": "models.tokenizer",
    # training/train.py: the training story
    "finetune": "training.train",
    "FinetuneResult": "training.train",
    "load_config": "config",
    "RunConfig": "config",
    "evaluate": "evals.evaluate",
    "chat": "generation.chat",
    "merge": "runs.merge",
    "export": "exports",
    "ExportResult": "exports",
    "demo": "embedded.demo",
    # plan/: peak GPU memory and step time, predicted on a fake GPU
    "plan": "plan",
    # errors
    "PhituneError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "AdapterError": "errors",
    "CheckpointError": "errors",
}

__all__ = sorted(_EXPORTS) + ["lora", "__version__"]


_exported = exports(__name__, _EXPORTS)


def __getattr__(name: str):
    if name == "lora":
        return importlib.import_module(".lora", __name__)
    return _exported(name)


def __dir__():
    return __all__
