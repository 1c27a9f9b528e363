"""The run configuration: one YAML file (or Python dicts) with four sections.

    model:            ModelConfig     which base model and tokenizer, dtype, attention implementation
    data:             DataConfig      (phitune.data) chat data sources, template rendering, max_seq_length, packing
    training_config:  TrainingConfig  transformers TrainingArguments key names (the cookbook's legacy keys accepted)
    peft_config:      LoraConfig      (phitune.adapt) PEFT LoraConfig key names

``load_config(path_or_dict, overrides=["training_config.learning_rate=1e-4"]) -> RunConfig`` checks every key and
type before any slow work starts. Errors name the key and, for a YAML file, the file and line.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from .._typed import field, from_dict, suggest
from ..adapt.config import LoraConfig, parse_lora_config
from ..data.config import DataConfig
from ..errors import ConfigError

SECTIONS = ("model", "data", "training_config", "peft_config")


def _notes():
    # Not a config key: one-line notes about accepted keys that have no effect (printed when training starts).
    return dataclasses.field(default_factory=list, init=False, repr=False, compare=False)


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
                          f"compute_dtype: bfloat16}}, got {data!r}")
    data = dict(data)
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in data:
            raise ConfigError(f"model.quantization.{key}: not a key of this section; set model.load_in_4bit: true one "
                              "level up (phitune quantizes to 4-bit only)")
    for old, new in _BNB_ALIASES.items():
        if old in data:
            if new in data:
                raise ConfigError(f"model.quantization: both '{old}' and '{new}' are set; keep '{new}'")
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
    notes: list = _notes()

    def __post_init__(self):
        self.name_or_path = shipped_model(self.name_or_path)
        self.tokenizer = shipped_model(self.tokenizer)
        if self.model_max_length is not None and self.model_max_length < 1:
            raise ConfigError(f"model.model_max_length must be >= 1, got {self.model_max_length}")
        self.quantization = build_quantization_config(self.quantization)
        self.notes.extend(filter(None, [quantization_note(self.load_in_4bit, self.quantization)]))


# Models that ship inside phitune, by the name a config can give them
SHIPPED_MODELS = {"phitune:demo": Path(__file__).resolve().parent.parent / "embedded" / "assets" / "model"}


def shipped_model(name):
    """The folder of a shipped model (``phitune:demo``: the demo's tiny Phi-3); any other name unchanged."""
    if isinstance(name, str) and name.startswith("phitune:"):
        if name not in SHIPPED_MODELS:
            raise ConfigError(f"model.name_or_path: {name!r} is not a model shipped with phitune"
                              f"{suggest(name, SHIPPED_MODELS)}; shipped: {', '.join(SHIPPED_MODELS)}")
        return str(SHIPPED_MODELS[name])
    return name


_MODEL_ALIASES = {"torch_dtype": "dtype", "model_name_or_path": "name_or_path", "pretrained_model_name_or_path":
                  "name_or_path", "tokenizer_name_or_path": "tokenizer"}
_MODEL_INERT = {
    "use_cache": "has no effect: training always runs with use_cache=False (chat turns the cache back on)",
}


# --- training_config --------------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """The ``training_config:`` section: transformers TrainingArguments names (one process, or many under torchrun)."""

    output_dir: str = field("phitune-output", doc="run folder: adapter, tokenizer, config, metrics, checkpoints/")
    overwrite_output_dir: bool = field(
        False, doc="start over in an output_dir that holds an earlier run (else refuse unless resuming)")
    per_device_train_batch_size: int = field(8, doc="micro-batch size (sequences, or packed rows)")
    per_device_eval_batch_size: int = field(8, doc="evaluation batch size")
    gradient_accumulation_steps: int = field(1, doc="micro-batches per optimizer step")
    num_train_epochs: float = field(3.0, doc="passes over the training data (fractions allowed); max_steps wins")
    max_steps: int = field(-1, doc="optimizer steps to run; -1: from num_train_epochs")
    learning_rate: float = field(2e-4, doc="peak learning rate (LoRA-typical; full fine-tuning uses ~5e-5)")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        "linear", doc="decay after warmup: linear or cosine to 0, or constant")
    warmup_steps: float = field(0, doc="linear warmup steps (a value < 1 is a fraction of all steps)")
    warmup_ratio: float = field(0.0, doc="warmup as a fraction of all steps (used when warmup_steps is 0)")
    optim: Literal["adamw_torch", "adamw_torch_fused"] = field(
        "adamw_torch", doc="AdamW; the fused kernel is used on CUDA either way")
    weight_decay: float = field(0.0, doc="AdamW decoupled weight decay")
    adam_beta1: float = field(0.9, doc="AdamW beta1")
    adam_beta2: float = field(0.999, doc="AdamW beta2")
    adam_epsilon: float = field(1e-8, doc="AdamW epsilon")
    max_grad_norm: float = field(1.0, doc="clip the gradient norm to this (0: no clipping)")
    seed: int = field(42, doc="seed of LoRA init and dropout (data.seed orders the batches)")
    bf16: bool = field(False, doc="bfloat16 autocast (mixed precision) for forward passes; on a CPU without bfloat16 "
                       "matrix hardware (AVX2 only) it is skipped with a warning: it would run ~100x slower there")
    fp16: bool = field(False, doc="float16 autocast with loss scaling (CUDA only)")
    tf32: bool | None = field(None, doc="allow TF32 matmuls on Ampere+ GPUs (None: PyTorch's default)")
    gradient_checkpointing: bool = field(False, doc="recompute activations in backward to save memory")
    gradient_checkpointing_kwargs: dict | None = field(
        None, doc="options of gradient checkpointing; default {use_reentrant: false}")
    logging_strategy: Literal["steps", "epoch", "no"] = field("steps", doc="when to log train metrics")
    logging_steps: int = field(10, doc="log the train loss every this many optimizer steps")
    logging_first_step: bool = field(False, doc="also log the first step")
    log_level: Literal["passive", "debug", "info", "warning", "error", "critical"] = field(
        "passive", doc="verbosity of phitune's messages (passive: info)")
    disable_tqdm: bool = field(False, doc="no progress bar")
    eval_strategy: Literal["no", "steps", "epoch"] = field(
        "no", doc="evaluate during training; the final evaluation runs whenever there is eval data")
    eval_steps: int | None = field(None, doc="evaluate every this many steps (eval_strategy: steps); default: "
                                                "logging_steps")
    eval_on_start: bool = field(False, doc="evaluate once before the first step")
    eval_generate: int = field(0, doc="at each evaluation also generate (greedy, up to 256 tokens) the answers to the "
                                      "first N eval conversations and log them with their scores (metrics.jsonl, "
                                      "the eval report)")
    save_strategy: Literal["no", "steps", "epoch"] = field("steps", doc="when to write checkpoints")
    save_steps: int = field(500, doc="write a checkpoint every this many optimizer steps")
    save_total_limit: int | None = field(None, doc="keep at most this many checkpoints (the newest always kept)")
    resume_from_checkpoint: str | bool | None = field(
        None, doc="auto: continue from the latest checkpoint if any; true: it must exist; or a checkpoint folder")
    report_to: str | list = field("none", doc="none, all, or any of tensorboard, wandb, mlflow")
    run_name: str | None = field(None, doc="run name for wandb/mlflow; default: the output_dir's name")
    use_cpu: bool = field(False, doc="train on the CPU even when a GPU is available")
    torch_compile: bool = field(False, doc="torch.compile each decoder layer (parameter names unchanged)")
    use_liger_kernel: bool = field(False, doc="accepted; phitune.training.fast's own fused kernels are used instead")
    fast_path: Literal["auto", "off"] = field("auto", doc="phitune.training.fast speed-ups (chunked loss, fused LoRA "
                                                          "kernels, packed attention); off: plain transformers path")
    ddp_backend: str | None = field(None, doc="torch.distributed backend under torchrun: nccl (default on CUDA), "
                                              "gloo (default on CPU) or mpi")
    ddp_timeout: int = field(1800, doc="seconds a process waits for the others in a collective before failing")
    ddp_find_unused_parameters: bool | None = field(
        None, doc="accepted; phitune all-reduces the trainable gradients itself, so unused ones never stall a step")
    fsdp: str | list | bool | None = field(
        None, doc="shard the frozen base across processes (FSDP2): full_shard, shard_grad_op, offload, auto_wrap")
    fsdp_config: dict | None = field(
        None, doc="FSDP options: transformer_layer_cls_to_wrap, reshard_after_forward, offload_params, "
                  "activation_checkpointing")
    notes: list = _notes()

    def __post_init__(self):
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training_config.{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_generate < 0:
            raise ConfigError(f"training_config.eval_generate must be >= 0 (0: off), got {self.eval_generate}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ConfigError(f"training_config.eval_steps must be >= 1, got {self.eval_steps}")
        if self.learning_rate <= 0:
            raise ConfigError(f"training_config.learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"training_config.max_steps must be -1 (use num_train_epochs) or >= 1, "
                              f"got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"training_config.num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ConfigError("training_config.warmup_steps must be >= 0 and warmup_ratio in [0, 1], got "
                              f"{self.warmup_steps} and {self.warmup_ratio}")
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ConfigError(f"training_config.warmup_steps: a whole number of steps, or a fraction < 1, "
                              f"got {self.warmup_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"training_config.save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        if self.bf16 and self.fp16:
            raise ConfigError("training_config: bf16 and fp16 are both true; choose one")
        if self.max_grad_norm < 0:
            raise ConfigError(f"training_config.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"training_config.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"training_config.adam_epsilon must be > 0 (e.g. 1e-8), got {self.adam_epsilon}")
        if self.weight_decay < 0:
            raise ConfigError(f"training_config.weight_decay must be >= 0, got {self.weight_decay}")
        self.report_to = _report_to(self.report_to)
        if self.ddp_backend is not None and self.ddp_backend not in DDP_BACKENDS:
            raise ConfigError(f"training_config.ddp_backend: unknown backend '{self.ddp_backend}'"
                              f"{suggest(self.ddp_backend, DDP_BACKENDS)}; use one of {', '.join(DDP_BACKENDS)} "
                              "(or leave it unset: nccl on CUDA, gloo on CPU)")
        if self.ddp_timeout < 1:
            raise ConfigError(f"training_config.ddp_timeout must be >= 1 second, got {self.ddp_timeout}")
        self.fsdp = _fsdp_options(self.fsdp)
        self.fsdp_config, fsdp_notes = _fsdp_config(self.fsdp_config, self.fsdp)
        self.notes.extend(fsdp_notes)
        if self.fsdp_config.get("activation_checkpointing"):
            self.gradient_checkpointing = True
        if isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint.lower() in ("", "none",
                                                                                                    "false"):
            self.resume_from_checkpoint = None

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps``."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else self.warmup_ratio
        return int(-(-ratio * total_steps // 1))  # ceil, as transformers does for warmup_ratio


REPORT_BACKENDS = ("tensorboard", "wandb", "mlflow")
DDP_BACKENDS = ("nccl", "gloo", "mpi")
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
# fsdp_config keys phitune reads (TrainingArguments' names, with or without their "fsdp_" prefix), and the
# FSDP1/accelerate knobs that FSDP2 has no use for (accepted with a note).
FSDP_CONFIG_KEYS = ("transformer_layer_cls_to_wrap", "reshard_after_forward", "offload_params",
                    "activation_checkpointing", "version")
_FSDP_CONFIG_INERT = ("min_num_params", "backward_prefetch", "forward_prefetch", "limit_all_gathers",
                      "use_orig_params", "sync_module_states", "cpu_ram_efficient_loading", "state_dict_type",
                      "auto_wrap_policy", "sharding_strategy", "xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt")


def _fsdp_options(value) -> list[str]:
    """``fsdp`` as a list of options: TrainingArguments takes a space-separated string, a list, or a bool."""
    if value in (None, False, "", []):
        return []
    if value is True:
        return ["full_shard"]
    names = value.split() if isinstance(value, str) else [str(v) for v in value]
    names = [n.lower() for n in names]
    for n in names:
        if n == "hybrid_shard" or n == "hybrid_shard_zero2":
            raise ConfigError(f"training_config.fsdp: {n} (shard within a node, replicate across nodes) is not "
                              "supported; use full_shard, which shards across every process of every node")
        if n not in FSDP_OPTIONS:
            raise ConfigError(f"training_config.fsdp: unknown option '{n}'{suggest(n, FSDP_OPTIONS)}; use any of "
                              f"{', '.join(FSDP_OPTIONS)} (e.g. fsdp: full_shard), or leave it unset for DDP")
    if "full_shard" in names and "shard_grad_op" in names:
        raise ConfigError("training_config.fsdp: full_shard and shard_grad_op are both set; choose one")
    if not {"full_shard", "shard_grad_op"} & set(names):
        names.insert(0, "full_shard")  # "offload" or "auto_wrap" alone: TrainingArguments shards fully too
    return names


def _fsdp_config(value, fsdp: list[str]) -> tuple[dict, list[str]]:
    """``fsdp_config`` with its keys checked ("fsdp_" prefixes dropped) and the notes for inert keys."""
    if value is None:
        return {}, []
    out, notes = {}, []
    for key, v in dict(value).items():
        name = key[len("fsdp_"):] if key.startswith("fsdp_") else key
        if name in _FSDP_CONFIG_INERT:
            notes.append(f"training_config.fsdp_config.{key}: has no effect with FSDP2 (fully_shard)")
        elif name not in FSDP_CONFIG_KEYS:
            raise ConfigError(f"training_config.fsdp_config: unknown key '{key}'"
                              f"{suggest(name, FSDP_CONFIG_KEYS + _FSDP_CONFIG_INERT)}; "
                              f"phitune reads {', '.join(FSDP_CONFIG_KEYS)}")
        else:
            out[name] = v
    if out.get("version", 2) not in (2, "2"):
        raise ConfigError(f"training_config.fsdp_config.version: {out['version']!r}; phitune uses FSDP2 "
                          "(torch.distributed.fsdp.fully_shard) only; set version: 2 or remove the key")
    layer_cls = out.get("transformer_layer_cls_to_wrap")
    if isinstance(layer_cls, str):
        out["transformer_layer_cls_to_wrap"] = [c.strip() for c in layer_cls.split(",") if c.strip()]
    if out and not fsdp:
        notes.append("training_config.fsdp_config: has no effect without training_config.fsdp (e.g. full_shard)")
    return out, notes


def _report_to(value) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    names = [str(n).lower() for n in names]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return ["all"]
    for n in names:
        if n not in REPORT_BACKENDS:
            raise ConfigError(f"training_config.report_to: unknown backend '{n}'{suggest(n, REPORT_BACKENDS)}; "
                              f"use none, all, or any of {', '.join(REPORT_BACKENDS)}")
    return names


_TRAINING_ALIASES = {
    "evaluation_strategy": "eval_strategy",  # renamed in transformers 4.46
    "activation_checkpointing": "gradient_checkpointing",  # transformers 5's new names
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}
_TRAINING_INERT = {
    "do_train": "has no effect: phitune.finetune always trains",
    "do_eval": "has no effect: evaluation runs at the end whenever there is eval data (eval_strategy: during "
               "training)",
    "do_predict": "has no effect: use `phitune eval` or `phitune chat` on the output folder",
    "remove_unused_columns": "has no effect: phitune.data builds the model inputs itself",
    "use_cache": "has no effect: training always runs with use_cache=False",
    "push_to_hub": "has no effect: phitune does not upload; the output folder is ready for `hf upload`",
}


_NO_LITERAL = object()  # a default that is not a plain literal: never equal to a config value


@functools.lru_cache(maxsize=1)
def training_arguments_defaults() -> dict[str, Any]:
    """{field: default} of transformers' TrainingArguments, read from its source file without importing it:
    importing transformers.training_args imports peft and bitsandbytes (9 s and a bitsandbytes kernel warning on
    the console, for a config whose only problem is a typo)."""
    spec = importlib.util.find_spec("transformers")
    path = Path(spec.origin).parent / "training_args.py" if spec and spec.origin else None
    if path is None or not path.is_file():  # pragma: no cover - transformers is a dependency
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"), None)
    out: dict[str, Any] = {}
    for node in cls.body if cls is not None else []:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        default = node.value
        if isinstance(default, ast.Call) and getattr(default.func, "id", "") == "field":
            default = next((k.value for k in default.keywords if k.arg == "default"), None)
        try:
            out[node.target.id] = ast.literal_eval(default) if default is not None else _NO_LITERAL
        except ValueError:
            out[node.target.id] = _NO_LITERAL
    return out


def _training_key_note(key: str, value: Any) -> str | None:
    """A note for a real TrainingArguments key phitune does not implement, if its value asks for nothing;
    a ConfigError if it asks for a behaviour phitune would silently skip. None for keys TrainingArguments lacks."""
    defaults = training_arguments_defaults()
    if key not in defaults:
        return None
    default = defaults[key]
    if value == default or value in (None, False, [], {}, "", "no", "none"):
        return f"training_config.{key}: has no effect here (a TrainingArguments option phitune does not implement)"
    fix = f" or set it to {default!r}" if default is not _NO_LITERAL else ""
    raise ConfigError(
        f"training_config.{key}: {value!r} asks for a TrainingArguments feature phitune does not implement "
        f"(its own training loop has no such option); remove the key{fix}"
    )


# --- the whole run ----------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The four sections of a run. ``data`` is a phitune.data.DataConfig, ``peft_config`` a phitune.adapt.LoraConfig."""

    model: ModelConfig
    data: Any
    training_config: TrainingConfig
    peft_config: Any
    source: str | None = dataclasses.field(default=None, compare=False)  # the YAML file, for messages

    @property
    def notes(self) -> list[str]:
        """One line per accepted key that has no effect, from every section."""
        out: list[str] = []
        for name in SECTIONS:
            out.extend(getattr(getattr(self, name), "notes", []) or [])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (every default filled in), as written to phitune_config.yaml."""
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _section_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init or f.name == "notes":
                continue
            out[f.name] = _plain(getattr(obj, f.name))
        return out
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    return _plain(obj)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return _section_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # e.g. a datasets.Dataset passed as data.train: named, not serialised


def _remap(section: str, data: Mapping, aliases: Mapping[str, str], inert: Mapping[str, str]):
    """Apply renamed keys and drop inert ones; returns (dict, notes)."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in data.items():
        if key in aliases:
            new = aliases[key]
            if new in data:
                raise ConfigError(f"{section}: both '{key}' and '{new}' are set; '{key}' is the old name of "
                                  f"'{new}', keep one")
            out[new] = value
        elif key in inert:
            notes.append(f"{section}.{key}: {inert[key]}")
        else:
            out[key] = value
    return out, notes


def build_model_config(data: Any) -> ModelConfig:
    if isinstance(data, ModelConfig):
        return data
    if isinstance(data, (str, Path)):
        data = {"name_or_path": str(data)}
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"model: expected a Hub id, a folder, or a mapping of keys, got {type(data).__name__}")
    data, notes = _remap("model", data, _MODEL_ALIASES, _MODEL_INERT)
    if "dtype" in data and data["dtype"] in ("bf16", "fp16", "fp32", "float", "half"):
        data["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(data["dtype"], "float32")
    cfg = from_dict(ModelConfig, data, "model")
    if not cfg.name_or_path:
        raise ConfigError("model.name_or_path is required: a Hugging Face Hub id (e.g. "
                          "microsoft/Phi-3-mini-4k-instruct) or a local model folder")
    cfg.notes.extend(notes)
    return cfg


def build_training_config(data: Any) -> TrainingConfig:
    if isinstance(data, TrainingConfig):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"training_config: expected a mapping of keys to values, got {type(data).__name__}")
    data, notes = _remap("training_config", data, _TRAINING_ALIASES, _TRAINING_INERT)
    known = {f.name for f in dataclasses.fields(TrainingConfig) if f.init}
    kept = {}
    for key, value in data.items():
        note = None if key in known else _training_key_note(key, value)
        if note:
            notes.append(note)
        else:
            kept[key] = value
    cfg = from_dict(TrainingConfig, kept, "training_config")
    cfg.notes.extend(notes)
    return cfg


def build_run_config(sections: Mapping[str, Any], source: str | None = None) -> RunConfig:
    """A RunConfig from a dict with the four sections (each a dict, a section object, or a shorthand)."""
    for key in sections:
        if key not in SECTIONS:
            raise ConfigError(f"unknown config section '{key}'{suggest(key, SECTIONS)}; the sections are "
                              f"{', '.join(SECTIONS)}")
    model = build_model_config(sections.get("model"))
    training = build_training_config(sections.get("training_config"))
    data = _build_data_config(sections.get("data"))
    peft = parse_lora_config(sections.get("peft_config"), "peft_config")
    return RunConfig(model=model, data=data, training_config=training, peft_config=peft, source=source)


def _build_data_config(value) -> DataConfig:
    if isinstance(value, DataConfig):
        return value
    if value is None:
        raise ConfigError("data: the section is required (at least data.train: a file, folder or Hub dataset)")
    return DataConfig.from_any(value)


# --- YAML, overrides --------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; everyone writes ``1e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """(data, {dotted key path: line}) of a YAML config file; YAML errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = _yaml_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc}"
                          f"{' ' + exc.context if exc.context else ''}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with sections {', '.join(SECTIONS)}, "
                          f"got {type(data).__name__}")
    return data, _key_lines(node)


def _key_lines(node, prefix: tuple = ()) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = prefix + (str(k.value),)
            out[".".join(path)] = k.start_mark.line + 1
            out.update(_key_lines(v, path))
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as a YAML scalar/flow value) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. training_config.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}': empty key")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"override '{item}': unknown section '{parts[0]}'{suggest(parts[0], SECTIONS)}; "
                              f"the sections are {', '.join(SECTIONS)}")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({exc})") from None
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if isinstance(child, (str, Path)) and i == 0 and p == "model":
                child = {"name_or_path": str(child)}
            elif isinstance(child, (str, Path)) and i == 0 and p == "data":
                child = {"train": str(child)}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is {child!r}, not a mapping")
            node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(source: str | Path | Mapping[str, Any] | RunConfig, overrides: Sequence[str] | None = None
                ) -> RunConfig:
    """Load and check a run config from a YAML file or a dict of sections; ``overrides``: ``["a.b=c", ...]``."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        source = source.to_dict()
    lines: dict[str, int] = {}
    name = None
    if isinstance(source, (str, Path)):
        name = str(source)
        data, lines = read_yaml(source)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise ConfigError(f"load_config: expected a YAML path or a dict of sections, got {type(source).__name__}")
    data = apply_overrides(data, overrides or [])
    given = {item.split("=", 1)[0].strip(): item for item in overrides or []}
    try:
        return build_run_config(data, source=name)
    except ConfigError as exc:
        item = _overridden(str(exc), given)
        if item is not None:  # the value came from the command line: say so, not a line of the file
            raise ConfigError(f"--set {item}: {exc}") from None
        if name is None:
            raise
        raise ConfigError(_with_line(str(exc), name, lines)) from None


def _overridden(message: str, given: Mapping[str, str]) -> str | None:
    """The ``--set`` item whose key the error ``message`` names, if any."""
    for key in _named_keys(message):
        for dotted, item in given.items():
            if dotted == key or "." in key and dotted.startswith(key + "."):
                return item
    return None


def _named_keys(message: str) -> list[str]:
    """The dotted config keys an error message names (``section.key ...`` or ``section: unknown key 'k'``), most
    specific first."""
    m = re.match(r"[A-Za-z_]\w*(?:\.\w+)*", message)
    head = m.group(0) if m else ""
    out = []
    m = re.search(r"unknown key '([^']+)'", message)
    if m:
        out.append(f"{head}.{m.group(1)}")
    m2 = re.search(r"unknown config section '([^']+)'", message)
    if m2:
        out.append(m2.group(1))
    return out + [head]


def _with_line(message: str, path: str, lines: Mapping[str, int]) -> str:
    """Prefix ``message`` with ``path:line`` of the key it names (``section.key: ...`` or ``unknown key 'k'``)."""
    head = message.split(":", 1)[0].strip()
    for c in _named_keys(message) + [head.split(".")[0]]:
        if c in lines:
            return f"{path}:{lines[c]}: {message}"
    return f"{path}: {message}"


RUN_STATUS_PREFIX = "# phitune run: "


def save_config(config: RunConfig, path: str | Path, status: str | None = None) -> None:
    """Write the resolved config (every default filled in) as YAML; ``status`` (e.g. "incomplete") goes into a
    first comment line, which run_status reads back."""
    head = f"{RUN_STATUS_PREFIX}{status}\n" if status else ""
    Path(path).write_text(head + config.to_yaml(), encoding="utf-8")


def run_status(path: str | Path) -> str | None:
    """The status save_config wrote into a config file ("incomplete", "complete"), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    return first[len(RUN_STATUS_PREFIX):].split()[0] if first.startswith(RUN_STATUS_PREFIX) else None


REQUIRED = "(required)"  # the default config_fields reports for a key without one


def config_sections() -> list[tuple[str, type]]:
    """(section name, its dataclass) of a run config, in the order of the YAML file."""
    return [("model", ModelConfig), ("data", DataConfig), ("training_config", TrainingConfig),
            ("peft_config", LoraConfig)]


def config_fields(cls) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of every key of a section class: the one list behind --help-config and the README's
    config reference (and the test that keeps them in sync)."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "notes":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        rows.append((f.name, default, f.metadata.get("doc", "")))
    return rows
