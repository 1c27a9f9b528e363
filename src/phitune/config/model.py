"""The ``model:`` section: which base model and tokenizer, dtype, attention, 4-bit quantization (QLoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping


from .._typed import field, from_dict, notes_field, remap_keys, suggest
from ..errors import ConfigError


# --- model ------------------------------------------------------------------------------------------------------------


# --- model.quantization (QLoRA) --------------------------------------------------------------------------------------


@dataclass
class QuantizationConfig:
    """``model.quantization``: how the base is quantized when ``model.load_in_4bit`` is true (QLoRA)."""

    type: Literal["nf4", "fp4"] = field("nf4", doc="4-bit data type: nf4 (QLoRA's NormalFloat) or fp4")
    double_quant: bool = field(True, doc="quantize the quantization constants too (about 0.4 bits/param saved)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        "auto", doc="dtype of the 4-bit matmuls; auto: model.dtype as resolved (bfloat16 on a bf16 GPU, else float32)")


# transformers' BitsAndBytesConfig names, accepted in ``model.quantization`` for configs copied from the cookbook.
_BNB_ALIASES = {"bnb_4bit_quant_type": "type", "bnb_4bit_use_double_quant": "double_quant",
                "bnb_4bit_compute_dtype": "compute_dtype"}


def build_quantization_config(data: Any) -> QuantizationConfig:
    """A QuantizationConfig from a dict (YAML, bnb's own key names accepted) or a QuantizationConfig."""
    if isinstance(data, QuantizationConfig):
        return data
    if data is None:
        return QuantizationConfig()
    if not isinstance(data, Mapping):
        raise ConfigError("model.quantization: expected a mapping like {type: nf4, double_quant: true, "
                          f"compute_dtype: bfloat16}}, got {data!r}", key="model.quantization")
    data = dict(data)
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in data:
            raise ConfigError(f"model.quantization.{key}: not a key of this section; set model.load_in_4bit: true one "
                              "level up (phitune quantizes to 4-bit only)", key=f"model.quantization.{key}")
    for old, new in _BNB_ALIASES.items():
        if old in data:
            if new in data:
                raise ConfigError(f"model.quantization: both '{old}' and '{new}' are set; keep '{new}'",
                                  key=f"model.quantization.{old}")
            data[new] = data.pop(old)
    if isinstance(data.get("compute_dtype"), str) or hasattr(data.get("compute_dtype"), "is_floating_point"):
        data["compute_dtype"] = str(data["compute_dtype"]).replace("torch.", "")
    return from_dict(QuantizationConfig, data, "model.quantization")


def quantization_note(load_in_4bit: bool, quantization: QuantizationConfig) -> str | None:
    """A note when ``model.quantization`` is changed but 4-bit loading is off (it would have no effect)."""
    if not load_in_4bit and quantization != QuantizationConfig():
        return "model.quantization: has no effect without model.load_in_4bit: true"
    return None


@dataclass
class ModelConfig:
    """The ``model:`` section. A bare string (``model: microsoft/Phi-3-mini-4k-instruct``) sets ``name_or_path``."""

    name_or_path: str | None = field(None, doc="Hugging Face Hub id or local folder of the base model (required)")
    tokenizer: str | None = field(None, doc="Hub id or folder of the tokenizer; default: the model's")
    revision: str | None = field(None, doc="Hub branch, tag or commit of the model (and tokenizer)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        "auto", doc="dtype of the base weights; auto: bfloat16 on a CUDA GPU that supports it, else float32")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = field(
        "auto", doc="attention kernel; auto: flash_attention_2 when installed on a supporting GPU, else sdpa")
    trust_remote_code: bool = field(False, doc="run the model repo's own Python code (Phi-3 needs none); warns")
    model_max_length: int | None = field(None, doc="tokenizer's model_max_length; default: the tokenizer's")
    load_in_4bit: bool = field(
        False, doc="QLoRA: quantize the base to 4-bit with bitsandbytes (pip install phitune[qlora])")
    quantization: QuantizationConfig | dict = field(
        default_factory=QuantizationConfig, doc="4-bit settings: type (nf4|fp4), double_quant, compute_dtype")
    notes: list = notes_field()

    def __post_init__(self):
        self.name_or_path = shipped_model(self.name_or_path)
        self.tokenizer = shipped_model(self.tokenizer)
        if self.model_max_length is not None and self.model_max_length < 1:
            raise ConfigError(f"model.model_max_length must be >= 1, got {self.model_max_length}",
                              key="model.model_max_length")
        self.quantization = build_quantization_config(self.quantization)
        self.notes.extend(filter(None, [quantization_note(self.load_in_4bit, self.quantization)]))


# Models that ship inside phitune, by the name a config can give them
SHIPPED_MODELS = {"phitune:demo": Path(__file__).resolve().parent.parent / "embedded" / "assets" / "model"}


def shipped_model(name):
    """The folder of a shipped model (``phitune:demo``: the demo's tiny Phi-3); any other name unchanged."""
    if isinstance(name, str) and name.startswith("phitune:"):
        if name not in SHIPPED_MODELS:
            raise ConfigError(f"model.name_or_path: {name!r} is not a model shipped with phitune"
                              f"{suggest(name, SHIPPED_MODELS)}; shipped: {', '.join(SHIPPED_MODELS)}",
                              key="model.name_or_path")
        return str(SHIPPED_MODELS[name])
    return name


_MODEL_ALIASES = {"torch_dtype": "dtype", "model_name_or_path": "name_or_path", "pretrained_model_name_or_path":
                  "name_or_path", "tokenizer_name_or_path": "tokenizer"}
_MODEL_INERT = {
    "use_cache": "has no effect: training always runs with use_cache=False (chat turns the cache back on)",
}


def build_model_config(data: Any) -> ModelConfig:
    if isinstance(data, ModelConfig):
        return data
    if isinstance(data, (str, Path)):
        data = {"name_or_path": str(data)}
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"model: expected a Hub id, a folder, or a mapping of keys, got {type(data).__name__}",
                          key="model")
    data, notes = remap_keys("model", data, _MODEL_ALIASES, _MODEL_INERT)
    if "dtype" in data and data["dtype"] in ("bf16", "fp16", "fp32", "float", "half"):
        data["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(data["dtype"], "float32")
    cfg = from_dict(ModelConfig, data, "model")
    if not cfg.name_or_path:
        raise ConfigError("model.name_or_path is required: a Hugging Face Hub id (e.g. "
                          "microsoft/Phi-3-mini-4k-instruct) or a local model folder", key="model.name_or_path")
    cfg.notes.extend(notes)
    return cfg
