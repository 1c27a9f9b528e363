"""The run configuration: one YAML file (or Python dicts) with four sections.

    model:            ModelConfig     which base model and tokenizer, dtype, attention implementation
    data:             DataConfig      (phitune.data) chat data sources, template rendering, max_seq_length, packing
    training_config:  TrainingConfig  transformers TrainingArguments key names (the cookbook's legacy keys accepted)
    peft_config:      LoraConfig      (phitune.adapt) PEFT LoraConfig key names

``load_config(path_or_dict, overrides=["training_config.learning_rate=1e-4"]) -> RunConfig`` checks every key and
type before any slow work starts. Errors name the key and, for a YAML file, the file and line.
"""

from .loading import RUN_STATUS_PREFIX, apply_overrides, load_config, read_yaml, run_status, save_config
from .model import (SHIPPED_MODELS, ModelConfig, QuantizationConfig, build_model_config, build_quantization_config,
                    quantization_note, shipped_model)
from .reference import REQUIRED, config_fields, config_sections
from .run import SECTIONS, RunConfig, build_run_config
from .training_args import (DDP_BACKENDS, FSDP_CONFIG_KEYS, FSDP_OPTIONS, REPORT_BACKENDS, TrainingConfig,
                            build_training_config, training_arguments_defaults)
from ..adapt.config import LoraConfig, parse_lora_config
from ..data.config import DataConfig

__all__ = ["DDP_BACKENDS", "FSDP_CONFIG_KEYS", "FSDP_OPTIONS", "REPORT_BACKENDS", "REQUIRED", "RUN_STATUS_PREFIX",
           "SECTIONS", "SHIPPED_MODELS", "DataConfig", "LoraConfig", "ModelConfig", "QuantizationConfig", "RunConfig",
           "TrainingConfig", "apply_overrides", "build_model_config", "build_quantization_config", "build_run_config",
           "build_training_config", "config_fields", "config_sections", "load_config", "parse_lora_config",
           "quantization_note", "read_yaml", "run_status", "save_config", "shipped_model",
           "training_arguments_defaults"]
