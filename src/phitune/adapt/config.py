"""The ``peft_config`` section: peft's LoraConfig keys, validated before any slow work."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, Mapping

from .._typed import field, from_dict, suggest
from ..errors import ConfigError

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
INIT_MODES = (True, False, "gaussian")


@dataclasses.dataclass
class LoraConfig:
    """The ``peft_config`` section: peft's ``LoraConfig`` keys that phitune implements (same names and defaults)."""

    r: int = field(8, doc="LoRA rank (a positive int)")
    lora_alpha: float = field(8, doc="scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora)")
    lora_dropout: float = field(0.0, doc="dropout on the LoRA branch input, in [0, 1)")
    bias: Literal["none", "all", "lora_only"] = field(
        "none", doc="which biases train: none, all, or those of LoRA layers")
    task_type: str | None = field(None, doc="peft task type, written to adapter_config.json (e.g. CAUSAL_LM)")
    target_modules: list[str] | str | None = field(
        None, doc="'all-linear', module names (suffix match; q_proj etc. also pick Phi-3 fused slices) or a regex")
    exclude_modules: list[str] | str | None = field(None, doc="names (suffix match) or a regex never adapted")
    modules_to_save: list[str] | None = field(None, doc="modules trained in full and saved with the adapter")
    rank_pattern: dict[str, int] = field(default_factory=dict, doc="{name or regex: r} overriding r per module")
    alpha_pattern: dict[str, float] = field(default_factory=dict, doc="{name or regex: alpha} per module")
    use_rslora: bool = field(False, doc="rank-stabilised scaling lora_alpha / sqrt(r) (arXiv:2312.03732)")
    init_lora_weights: bool | str = field(
        True, doc="True: kaiming A, zero B; 'gaussian': A ~ N(0, 1/r); False: random B")
    fan_in_fan_out: bool = field(False, doc="for (in, out) weights (GPT-2 Conv1D); ignored on nn.Linear, as in peft")
    layers_to_transform: list[int] | int | None = field(None, doc="only adapt these layer indices")
    layers_pattern: list[str] | str | None = field(
        None, doc="name of the layer list (e.g. 'layers') for layers_to_transform")

    def __post_init__(self):
        def bad(key, msg):
            raise ConfigError(f"peft_config.{key}: {msg}", key=f"peft_config.{key}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            bad("r", f"must be a positive int (e.g. 16), got {self.r!r}")
        for key, value in [("lora_alpha", self.lora_alpha),
                           *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                bad(key, f"must be a number (e.g. 32), got {value!r} ({type(value).__name__})")
            if not math.isfinite(value) or value <= 0:  # 0 makes every update zero: the run would train nothing
                bad(key, f"must be a finite number > 0 (scaling = lora_alpha / r; e.g. 2 * r), got {value!r}")
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"rank_pattern[{k!r}]", f"must be a positive int, got {v!r}")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0 <= self.lora_dropout < 1):
            bad("lora_dropout", f"must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            bad("bias", f"must be 'none', 'all' or 'lora_only', got {self.bias!r}"
                f"{suggest(self.bias, ['none', 'all', 'lora_only'])}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            bad("task_type", f"{self.task_type!r} is not a peft task type{suggest(self.task_type, TASK_TYPES)}; "
                f"use one of {', '.join(TASK_TYPES)}")
        if not any(self.init_lora_weights is m or self.init_lora_weights == m and isinstance(m, str)
                   for m in INIT_MODES):
            bad("init_lora_weights", f"phitune supports True, False and 'gaussian', got {self.init_lora_weights!r}"
                " (peft's data-driven inits such as pissa/loftq/eva are not implemented)")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            bad("target_modules", "is empty; name at least one module or use 'all-linear'")
        if isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear":
            _compile(self.target_modules, "target_modules")
        if isinstance(self.exclude_modules, str):
            _compile(self.exclude_modules, "exclude_modules")
        if self.layers_to_transform is not None and not isinstance(self.target_modules, (list, tuple)):
            bad("layers_to_transform", "only works with target_modules as a list of names (as in peft)")

    def check_targets(self) -> None:
        """target_modules must be set before LoRA is added (preview, which adds none, does without)."""
        if self.target_modules is None:
            raise ConfigError("peft_config.target_modules: not set; use 'all-linear' (the Phi-3 cookbook's choice) or "
                              "names like ['qkv_proj', 'o_proj']", key="peft_config.target_modules")


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"peft_config.{key}: {pattern!r} is not a valid regular expression ({e})",
                          key=f"peft_config.{key}") from None


# peft keys phitune accepts only at their default (they name features phitune does not implement).
_PEFT_ONLY = {"use_dora": False, "lora_bias": False, "use_qalora": False, "layer_replication": None,
              "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
              "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
              "target_parameters": None, "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None,
              "velora_config": None, "monteclora_config": None, "kasa_config": None, "qalora_group_size": 16,
              "ensure_weight_tying": False, "runtime_config": {}}
# Bookkeeping peft writes to adapter_config.json; no effect on the adapter itself.
_PEFT_BOOKKEEPING = ("peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
                     "auto_mapping")


def parse_lora_config(peft_config: Mapping[str, Any] | LoraConfig | None, section: str = "peft_config") -> LoraConfig:
    """A validated :class:`LoraConfig` from a dict (YAML, or peft's adapter_config.json) or a LoraConfig."""
    if isinstance(peft_config, LoraConfig):
        return peft_config
    if hasattr(peft_config, "to_dict") and not isinstance(peft_config, Mapping):  # a peft.LoraConfig
        peft_config = peft_config.to_dict()
    if peft_config is not None and not isinstance(peft_config, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys to values (r, lora_alpha, target_modules, ...), "
                          f"got {type(peft_config).__name__}", key=section)
    data = dict(peft_config or {})
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(data.get(key), (set, frozenset)):  # peft.LoraConfig keeps name lists as sets
            data[key] = sorted(data[key])
    if "task_type" in data and data["task_type"] is not None:
        data["task_type"] = str(getattr(data["task_type"], "value", data["task_type"]))
    if str(getattr(data.get("peft_type"), "value", data.get("peft_type") or "LORA")).upper() != "LORA":
        raise ConfigError(f"{section}.peft_type: {data['peft_type']!r} is not LoRA; phitune only handles LoRA adapters",
                          key=f"{section}.peft_type")
    for key in _PEFT_BOOKKEEPING:
        data.pop(key, None)
    for key, default in _PEFT_ONLY.items():
        if key in data:
            value = data.pop(key)
            inert = value == default or not value or (isinstance(value, Mapping) and not any(value.values()))
            if not inert:
                raise ConfigError(f"{section}.{key}={value!r}: phitune does not implement this peft option; "
                                  "remove the key", key=f"{section}.{key}")
    return from_dict(LoraConfig, data, section)
