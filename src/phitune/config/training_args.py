"""The ``training_config:`` section: transformers TrainingArguments key names (and the cookbook's legacy keys), read
and checked without importing transformers' TrainingArguments."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping


from .._typed import field, from_dict, notes_field, remap_keys, suggest
from ..errors import ConfigError


# --- training_config --------------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """The ``training_config:`` section: transformers TrainingArguments names (one process, or many under torchrun)."""

    output_dir: str = field("phitune-output", doc="run folder: adapter, tokenizer, config, metrics, checkpoints/")
    overwrite_output_dir: bool = field(
        False, doc="start over in an output_dir that holds an earlier run (else refuse unless resuming)")
    per_device_train_batch_size: int | Literal["auto"] = field(
        8, doc="micro-batch size (sequences, or packed rows); auto: the largest that fits this GPU, predicted by "
               "phitune plan before any weight loads")
    per_device_eval_batch_size: int = field(8, doc="evaluation batch size")
    gradient_accumulation_steps: int = field(1, doc="micro-batches per optimizer step")
    auto_batch_target: int | None = field(
        None, doc="with per_device_train_batch_size: auto, the rows per optimizer step per device to keep "
                  "(gradient_accumulation_steps becomes this / the chosen micro-batch); default: the largest "
                  "micro-batch that fits x gradient_accumulation_steps")
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
    bf16: bool = field(False, doc="bfloat16 autocast (mixed precision) for forward passes; with model.dtype auto the "
                       "frozen base is then held in bfloat16 on a GPU or a CPU with bfloat16 matrix hardware (LoRA "
                       "and optimizer state stay float32); on a CPU without that hardware (AVX2 only) it is skipped "
                       "with a warning: it would run ~100x slower there")
    fp16: bool = field(False, doc="float16 autocast with loss scaling (CUDA only)")
    tf32: bool | None = field(None, doc="allow TF32 matmuls on Ampere+ GPUs (None: PyTorch's default)")
    gradient_checkpointing: bool | Literal["auto"] = field(
        False, doc="recompute activations in backward to save memory; auto (with per_device_train_batch_size: "
                   "auto): only when the effective batch does not fit without it")
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
                                      "first N eval conversations (preference runs: eval pairs, the chosen reply as "
                                      "reference) and log them with their scores (metrics.jsonl, the eval report)")
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
                  "activation_checkpointing, cpu_ram_efficient_loading (default true: rank 0 alone reads the "
                  "weights, the others receive their shards)")
    method: Literal["sft", "dpo", "orpo"] = field(
        "sft", doc="sft: supervised fine-tuning on chats; dpo or orpo: preference tuning on chosen/rejected pairs "
                   "(the reference policy of dpo is the model with its adapters off)")
    beta: float = field(0.1, doc="dpo/orpo: DPO's beta (how far the policy may move from the reference; for ipo its "
                                 "tau), or ORPO's lambda (weight of the odds-ratio term)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = field(
        "sigmoid", doc="dpo: sigmoid (DPO), ipo (IPO, log-ratios averaged per token) or hinge (SLiC)")
    label_smoothing: float = field(0.0, doc="dpo with loss_type sigmoid: probability that a pair's preference is "
                                            "flipped (conservative DPO), in [0, 0.5)")
    precompute_ref_log_probs: bool = field(
        False, doc="dpo: compute the reference log-probs of every pair once before training (kept in checkpoints) "
                   "instead of one adapters-off forward per micro-batch")
    max_prompt_length: int | None = field(
        None, doc="dpo/orpo: cut each pair's prompt to its last N tokens (the BOS and the assistant header stay); "
                  "null: only data.max_seq_length limits it")
    rpo_alpha: float | None = field(None, doc="dpo: weight of an added NLL loss on the chosen answers (RPO); null: "
                                              "none")
    notes: list = notes_field()

    def __post_init__(self):
        self._check_auto_batch()
        _check_method_keys(self)
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps"):
            if getattr(self, key) != "auto" and getattr(self, key) < 1:
                raise ConfigError(f"training_config.{key} must be >= 1, got {getattr(self, key)}",
                                  key=f"training_config.{key}")
        if self.eval_generate < 0:
            raise ConfigError(f"training_config.eval_generate must be >= 0 (0: off), got {self.eval_generate}",
                              key="training_config.eval_generate")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ConfigError(f"training_config.eval_steps must be >= 1, got {self.eval_steps}",
                              key="training_config.eval_steps")
        if self.learning_rate <= 0:
            raise ConfigError(f"training_config.learning_rate must be > 0, got {self.learning_rate}",
                              key="training_config.learning_rate")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"training_config.max_steps must be -1 (use num_train_epochs) or >= 1, "
                              f"got {self.max_steps}", key="training_config.max_steps")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"training_config.num_train_epochs must be > 0, got {self.num_train_epochs}",
                              key="training_config.num_train_epochs")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ConfigError("training_config.warmup_steps must be >= 0 and warmup_ratio in [0, 1], got "
                              f"{self.warmup_steps} and {self.warmup_ratio}",
                              key=f"training_config.{'warmup_steps' if self.warmup_steps < 0 else 'warmup_ratio'}")
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ConfigError(f"training_config.warmup_steps: a whole number of steps, or a fraction < 1, "
                              f"got {self.warmup_steps}", key="training_config.warmup_steps")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"training_config.save_total_limit must be >= 1 or null, got {self.save_total_limit}",
                              key="training_config.save_total_limit")
        if self.bf16 and self.fp16:
            raise ConfigError("training_config: bf16 and fp16 are both true; choose one",
                              key="training_config.fp16")
        if self.max_grad_norm < 0:
            raise ConfigError(f"training_config.max_grad_norm must be >= 0, got {self.max_grad_norm}",
                              key="training_config.max_grad_norm")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"training_config.{key} must be in [0, 1), got {getattr(self, key)}",
                                  key=f"training_config.{key}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"training_config.adam_epsilon must be > 0 (e.g. 1e-8), got {self.adam_epsilon}",
                              key="training_config.adam_epsilon")
        if self.weight_decay < 0:
            raise ConfigError(f"training_config.weight_decay must be >= 0, got {self.weight_decay}",
                              key="training_config.weight_decay")
        self.report_to = _report_to(self.report_to)
        if self.ddp_backend is not None and self.ddp_backend not in DDP_BACKENDS:
            raise ConfigError(f"training_config.ddp_backend: unknown backend '{self.ddp_backend}'"
                              f"{suggest(self.ddp_backend, DDP_BACKENDS)}; use one of {', '.join(DDP_BACKENDS)} "
                              "(or leave it unset: nccl on CUDA, gloo on CPU)", key="training_config.ddp_backend")
        if self.ddp_timeout < 1:
            raise ConfigError(f"training_config.ddp_timeout must be >= 1 second, got {self.ddp_timeout}",
                              key="training_config.ddp_timeout")
        self.fsdp = _fsdp_options(self.fsdp)
        self.fsdp_config, fsdp_notes = _fsdp_config(self.fsdp_config, self.fsdp)
        self.notes.extend(fsdp_notes)
        if self.fsdp_config.get("activation_checkpointing"):
            self.gradient_checkpointing = True
        if isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint.lower() in ("", "none",
                                                                                                    "false"):
            self.resume_from_checkpoint = None

    def _check_auto_batch(self) -> None:
        auto = self.per_device_train_batch_size == "auto"
        if self.gradient_checkpointing == "auto" and not auto:
            raise ConfigError("training_config.gradient_checkpointing: auto chooses together with "
                              "per_device_train_batch_size: auto; set the batch size to auto, or "
                              "gradient_checkpointing to true or false", key="training_config.gradient_checkpointing")
        if self.auto_batch_target is not None and not auto:
            raise ConfigError("training_config.auto_batch_target: only used with per_device_train_batch_size: "
                              "auto; remove it or set the batch size to auto",
                              key="training_config.auto_batch_target")
        if self.auto_batch_target is not None and self.auto_batch_target < 1:
            raise ConfigError(f"training_config.auto_batch_target must be >= 1, got {self.auto_batch_target}",
                              key="training_config.auto_batch_target")

    @property
    def batch_is_auto(self) -> bool:
        """Whether the micro-batch (and maybe checkpointing) is still to be chosen for the GPU (phitune.plan.auto)."""
        return self.per_device_train_batch_size == "auto"

    def keys_not_read(self) -> set[str]:
        """The preference keys this run's method does not read: left out of the resolved config written with the
        run, so it loads back (they are refused by name when given)."""
        return {k for k, methods in METHOD_KEYS.items() if self.method not in methods}

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps``."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else self.warmup_ratio
        return int(-(-ratio * total_steps // 1))  # ceil, as transformers does for warmup_ratio


# The preference keys and the methods that read them: a key given for another method is refused by name.
METHOD_KEYS = {"beta": ("dpo", "orpo"), "loss_type": ("dpo",), "label_smoothing": ("dpo",),
               "precompute_ref_log_probs": ("dpo",), "max_prompt_length": ("dpo", "orpo"), "rpo_alpha": ("dpo",)}


def _check_method_keys(tc: TrainingConfig, given=None) -> None:
    """Refuse a preference key of another method (``given``: the keys the user wrote; None: the non-default ones)
    and values out of range."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig) if f.name in METHOD_KEYS}
    for key, methods in METHOD_KEYS.items():
        set_ = key in given if given is not None else getattr(tc, key) != defaults[key]
        if set_ and tc.method not in methods:
            raise ConfigError(f"training_config.{key}: a key of method {' and '.join(methods)}, but method is "
                              f"{tc.method!r}; remove {key}, or set training_config.method: {methods[0]}",
                              key=f"training_config.{key}")
    if tc.beta <= 0:
        raise ConfigError(f"training_config.beta must be > 0 (e.g. 0.1), got {tc.beta}", key="training_config.beta")
    if not 0 <= tc.label_smoothing < 0.5:
        raise ConfigError(f"training_config.label_smoothing must be in [0, 0.5), got {tc.label_smoothing}",
                          key="training_config.label_smoothing")
    if tc.label_smoothing and tc.loss_type != "sigmoid":
        raise ConfigError(f"training_config.label_smoothing: only loss_type sigmoid reads it (got loss_type "
                          f"{tc.loss_type!r}); remove label_smoothing or set loss_type: sigmoid",
                          key="training_config.label_smoothing")
    if tc.max_prompt_length is not None and tc.max_prompt_length < 2:
        raise ConfigError(f"training_config.max_prompt_length must be >= 2 or null, got {tc.max_prompt_length}",
                          key="training_config.max_prompt_length")
    if tc.rpo_alpha is not None and tc.rpo_alpha < 0:
        raise ConfigError(f"training_config.rpo_alpha must be >= 0 or null, got {tc.rpo_alpha}",
                          key="training_config.rpo_alpha")


REPORT_BACKENDS = ("tensorboard", "wandb", "mlflow")
DDP_BACKENDS = ("nccl", "gloo", "mpi")
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
# fsdp_config keys phitune reads (TrainingArguments' names, with or without their "fsdp_" prefix), and the
# FSDP1/accelerate knobs that FSDP2 has no use for (accepted with a note).
FSDP_CONFIG_KEYS = ("transformer_layer_cls_to_wrap", "reshard_after_forward", "offload_params",
                    "activation_checkpointing", "cpu_ram_efficient_loading", "version")
_FSDP_CONFIG_INERT = ("min_num_params", "backward_prefetch", "forward_prefetch", "limit_all_gathers",
                      "use_orig_params", "sync_module_states", "state_dict_type",
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
                              "supported; use full_shard, which shards across every process of every node",
                              key="training_config.fsdp")
        if n not in FSDP_OPTIONS:
            raise ConfigError(f"training_config.fsdp: unknown option '{n}'{suggest(n, FSDP_OPTIONS)}; use any of "
                              f"{', '.join(FSDP_OPTIONS)} (e.g. fsdp: full_shard), or leave it unset for DDP",
                              key="training_config.fsdp")
    if "full_shard" in names and "shard_grad_op" in names:
        raise ConfigError("training_config.fsdp: full_shard and shard_grad_op are both set; choose one",
                          key="training_config.fsdp")
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
                              f"phitune reads {', '.join(FSDP_CONFIG_KEYS)}", key=f"training_config.fsdp_config.{key}")
        else:
            out[name] = v
    if out.get("version", 2) not in (2, "2"):
        raise ConfigError(f"training_config.fsdp_config.version: {out['version']!r}; phitune uses FSDP2 "
                          "(torch.distributed.fsdp.fully_shard) only; set version: 2 or remove the key",
                          key="training_config.fsdp_config.version")
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
                              f"use none, all, or any of {', '.join(REPORT_BACKENDS)}", key="training_config.report_to")
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
        f"(its own training loop has no such option); remove the key{fix}",
        key=f"training_config.{key}",
    )


def build_training_config(data: Any) -> TrainingConfig:
    if isinstance(data, TrainingConfig):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"training_config: expected a mapping of keys to values, got {type(data).__name__}",
                          key="training_config")
    data, notes = remap_keys("training_config", data, _TRAINING_ALIASES, _TRAINING_INERT)
    known = {f.name for f in dataclasses.fields(TrainingConfig) if f.init}
    kept = {}
    for key, value in data.items():
        note = None if key in known else _training_key_note(key, value)
        if note:
            notes.append(note)
        else:
            kept[key] = value
    cfg = from_dict(TrainingConfig, kept, "training_config")
    _check_method_keys(cfg, given=kept)
    cfg.notes.extend(notes)
    return cfg
