"""LoRA on Hugging Face models, saved and loaded in the PEFT adapter format.

    report = add_lora(model, {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    ...train...
    save_adapter(model, "out")          # adapter_config.json + adapter_model.safetensors, loads in peft
    merge_lora(model).save_pretrained("merged")

Injection is one walk over the model (:func:`_select_targets`) that replaces what matches with
:mod:`phitune.lora` layers. Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; a target named
``q_proj`` (a Llama config) puts a MergedLinear on that slice of the fused layer, and the PEFT file stores it as one
LoRA on the fused module (concatenated A, block-structured B), which peft and vLLM load unchanged.
The PEFT layout is handled by two pure functions over state dicts: :func:`adapter_state_dict` and
:func:`load_adapter_state_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from . import lora
from ._typed import field, from_dict, suggest
from .errors import AdapterError, ConfigError

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
INIT_MODES = (True, False, "gaussian")
# Slices of Phi-3's fused projections, in output order (modeling_phi3.py splits qkv as q, k, v and gate_up as gate, up).
FUSED_SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclasses.dataclass
class LoraConfig:
    """The ``peft_config`` section: peft's ``LoraConfig`` keys that phitune implements (same names and defaults)."""

    r: int = field(8, doc="LoRA rank (a positive int)")
    lora_alpha: float = field(8, doc="scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora)")
    lora_dropout: float = field(0.0, doc="dropout on the LoRA branch input, in [0, 1)")
    bias: Literal["none", "all", "lora_only"] = field("none", doc="which biases train: none, all, or those of LoRA layers")
    task_type: str | None = field(None, doc="peft task type, written to adapter_config.json (e.g. CAUSAL_LM)")
    target_modules: list[str] | str | None = field(
        None, doc="'all-linear', module names (suffix match; q_proj etc. also pick Phi-3 fused slices) or a regex")
    exclude_modules: list[str] | str | None = field(None, doc="names (suffix match) or a regex never adapted")
    modules_to_save: list[str] | None = field(None, doc="modules trained in full and saved with the adapter")
    rank_pattern: dict[str, int] = field(default_factory=dict, doc="{name or regex: r} overriding r per module")
    alpha_pattern: dict[str, float] = field(default_factory=dict, doc="{name or regex: alpha} per module")
    use_rslora: bool = field(False, doc="rank-stabilised scaling lora_alpha / sqrt(r) (arXiv:2312.03732)")
    init_lora_weights: bool | str = field(True, doc="True: kaiming A, zero B; 'gaussian': A ~ N(0, 1/r); False: random B")
    fan_in_fan_out: bool = field(False, doc="for (in, out) weights (GPT-2 Conv1D); ignored on nn.Linear, as in peft")
    layers_to_transform: list[int] | int | None = field(None, doc="only adapt these layer indices")
    layers_pattern: list[str] | str | None = field(None, doc="name of the layer list (e.g. 'layers') for layers_to_transform")

    def __post_init__(self):
        def bad(key, msg):
            raise ConfigError(f"peft_config.{key}: {msg}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            bad("r", f"must be a positive int (e.g. 16), got {self.r!r}")
        for key, value in [("lora_alpha", self.lora_alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                bad(key, f"must be a number (e.g. 32), got {value!r} ({type(value).__name__})")
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"rank_pattern[{k!r}]", f"must be a positive int, got {v!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            bad("bias", f"must be 'none', 'all' or 'lora_only', got {self.bias!r}{suggest(self.bias, ['none', 'all', 'lora_only'])}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            bad("task_type", f"{self.task_type!r} is not a peft task type{suggest(self.task_type, TASK_TYPES)}; use one of {', '.join(TASK_TYPES)}")
        if not any(self.init_lora_weights is m or self.init_lora_weights == m and isinstance(m, str) for m in INIT_MODES):
            bad("init_lora_weights", f"phitune supports True, False and 'gaussian', got {self.init_lora_weights!r}"
                " (peft's data-driven inits such as pissa/loftq/eva are not implemented)")
        if self.target_modules is None:
            bad("target_modules", "not set; use 'all-linear' (the Phi-3 cookbook's choice) or names like ['qkv_proj', 'o_proj']")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            bad("target_modules", "is empty; name at least one module or use 'all-linear'")
        if isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear":
            _compile(self.target_modules, "target_modules")
        if isinstance(self.exclude_modules, str):
            _compile(self.exclude_modules, "exclude_modules")
        if self.layers_to_transform is not None and not isinstance(self.target_modules, (list, tuple)):
            bad("layers_to_transform", "only works with target_modules as a list of names (as in peft)")


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"peft_config.{key}: {pattern!r} is not a valid regular expression ({e})") from None


# peft keys phitune accepts only at their default (they name features phitune does not implement).
_PEFT_ONLY = {"use_dora": False, "lora_bias": False, "use_qalora": False, "layer_replication": None,
              "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
              "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
              "target_parameters": None, "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None,
              "velora_config": None, "monteclora_config": None, "kasa_config": None, "qalora_group_size": 16,
              "ensure_weight_tying": False, "runtime_config": {}}
# Bookkeeping peft writes to adapter_config.json; no effect on the adapter itself.
_PEFT_BOOKKEEPING = ("peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")


def parse_lora_config(peft_config: Mapping[str, Any] | LoraConfig | None, section: str = "peft_config") -> LoraConfig:
    """A validated :class:`LoraConfig` from a dict (YAML, or peft's adapter_config.json) or a LoraConfig."""
    if isinstance(peft_config, LoraConfig):
        return peft_config
    if hasattr(peft_config, "to_dict") and not isinstance(peft_config, Mapping):  # a peft.LoraConfig
        peft_config = peft_config.to_dict()
    data = dict(peft_config or {})
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(data.get(key), (set, frozenset)):  # peft.LoraConfig keeps name lists as sets
            data[key] = sorted(data[key])
    if "task_type" in data and data["task_type"] is not None:
        data["task_type"] = str(getattr(data["task_type"], "value", data["task_type"]))
    if str(getattr(data.get("peft_type"), "value", data.get("peft_type") or "LORA")).upper() != "LORA":
        raise ConfigError(f"{section}.peft_type: {data['peft_type']!r} is not LoRA; phitune only handles LoRA adapters")
    for key in _PEFT_BOOKKEEPING:
        data.pop(key, None)
    for key, default in _PEFT_ONLY.items():
        if key in data:
            value = data.pop(key)
            inert = value == default or not value or (isinstance(value, Mapping) and not any(value.values()))
            if not inert:
                raise ConfigError(f"{section}.{key}={value!r}: phitune does not implement this peft option; remove the key")
    return from_dict(LoraConfig, data, section)


# ----------------------------------------------------------------------------------------------------------------- #
# Choosing the modules


@dataclasses.dataclass
class _Target:
    name: str  # module path, e.g. model.layers.0.self_attn.qkv_proj
    r: int
    lora_alpha: float
    slices: list[str] | None = None  # enabled slice names of a fused module (None: the whole module)
    splits: list[int] | None = None  # output sizes of all slices of the fused module


def _name_matches(targets: list[str] | str, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(patterns: Mapping[str, Any], name: str, default):
    # peft's rule: the first key k such that name matches (.*\.)?(k)$.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index_ok(cfg: LoraConfig, name: str) -> bool:
    if cfg.layers_to_transform is None:
        return True
    patterns = [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else (cfg.layers_pattern or [])
    regexes = [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]
    for rx in regexes:
        m = re.match(rx, name)
        if m:
            wanted = cfg.layers_to_transform
            return int(m.group(1)) in (wanted if isinstance(wanted, list) else [wanted])
    return False


def _fused_splits(model: nn.Module, leaf: str, module: nn.Linear) -> list[int] | None:
    """Output sizes of the slices of a fused projection, from the model config; None if they don't fit."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if leaf == "qkv_proj":
        heads = getattr(cfg, "num_attention_heads", None)
        if not heads:
            return None
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        splits = [heads * hd, kv * hd, kv * hd]
    else:
        inter = getattr(cfg, "intermediate_size", None)
        if not inter:
            return None
        splits = [inter, inter]
    return splits if sum(splits) == module.out_features else None


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _select_targets(model: nn.Module, cfg: LoraConfig) -> tuple[list[_Target], list[str]]:
    """The modules to adapt and the modules_to_save names; raises before touching the model."""
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    keep = [n for n in modules if n and cfg.modules_to_save and _name_matches(cfg.modules_to_save, n)]
    for wanted in cfg.modules_to_save or []:
        if not any(_name_matches([wanted], n) for n in keep):
            raise ConfigError(f"peft_config.modules_to_save: {wanted!r} matches no module{suggest(wanted, [n.rsplit('.', 1)[-1] for n in modules])}")
    in_keep = lambda n: any(n == k or n.startswith(k + ".") for k in keep)  # noqa: E731
    all_linear = isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"
    head = _output_head_name(model)
    targets_spec = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)

    def wanted(name: str) -> bool:
        return (_name_matches(targets_spec, name) and not (cfg.exclude_modules and _name_matches(cfg.exclude_modules, name))
                and _layer_index_ok(cfg, name))

    def make(name: str, **kw) -> _Target:
        return _Target(name, _pattern_value(cfg.rank_pattern, name, cfg.r), _pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha), **kw)

    found: list[_Target] = []
    used: set[str] = set()  # names (real or slice) that matched, to find list entries that matched nothing
    for name, module in modules.items():
        if not name or in_keep(name):
            continue
        if all_linear:
            if isinstance(module, nn.Linear) and name != head:
                found.append(make(name))
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)) and wanted(name):
            found.append(make(name))
            used.add(name)
            continue
        parent, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Linear) and leaf in FUSED_SLICES:
            slice_names = [f"{parent}.{s}" if parent else s for s in FUSED_SLICES[leaf]]
            enabled = [s for s in slice_names if wanted(s)]
            if not enabled:
                continue
            splits = _fused_splits(model, leaf, module)
            if splits is None:
                raise ConfigError(f"peft_config.target_modules: {enabled[0]!r} is a slice of {name!r}, but the slice sizes "
                                  f"implied by model.config do not add up to its {module.out_features} outputs")
            per = [make(s) for s in enabled]
            if len({(t.r, t.lora_alpha) for t in per}) > 1:
                raise ConfigError(f"rank_pattern/alpha_pattern give different r or lora_alpha to the slices of {name!r} "
                                  f"({', '.join(f'{t.name}: r={t.r}, alpha={t.lora_alpha}' for t in per)}); they share one layer")
            found.append(_Target(name, per[0].r, per[0].lora_alpha, slices=[s.rsplit('.', 1)[-1] for s in enabled], splits=splits))
            used.update(enabled)

    if isinstance(targets_spec, list):
        for t in targets_spec:
            if not any(n == t or n.endswith("." + t) for n in used):
                raise ConfigError(_no_match_message(t, modules, linear_names))
    if not found:
        raise ConfigError(_no_match_message(cfg.target_modules, modules, linear_names))
    return found, keep


def _no_match_message(target, modules: dict[str, nn.Module], linear_names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    msg = f"peft_config.target_modules: {target!r} matches no nn.Linear or nn.Embedding module"
    fused = next((f for f, parts in FUSED_SLICES.items() if target in parts), None) if isinstance(target, str) else None
    if fused and not any(n.endswith("." + fused) or n == fused for n in linear_names):
        msg += f" ({target!r} is a slice of Phi-3's fused {fused!r}, and this model has neither {target!r} nor {fused!r})"
    else:
        msg += suggest(target, leaves) if isinstance(target, str) else ""
    example = next((n for n in linear_names if "." in n), "")
    return (msg + f". Linear layers in this model: {', '.join(leaves) or 'none'}" + (f" (e.g. {example!r})" if example else "")
            + "; use one of these names, a regex, or 'all-linear'")


# ----------------------------------------------------------------------------------------------------------------- #
# Injection


@dataclasses.dataclass
class LoraReport:
    """What :func:`add_lora` / :func:`load_adapter` adapted."""

    modules: list[str]  # adapted module names; fused slices as 'x.qkv_proj[q_proj,v_proj]'
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    adapter_bytes: int  # size of adapter_model.safetensors' tensors

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    @property
    def adapter_mb(self) -> float:
        return self.adapter_bytes / 1e6

    def __str__(self) -> str:
        extra = f" + {len(self.modules_to_save)} saved in full" if self.modules_to_save else ""
        share = 100 * self.trainable_params / max(self.total_params, 1)
        return (f"LoRA on {self.num_modules} modules{extra}: {self.trainable_params:,} trainable of "
                f"{self.total_params:,} parameters ({share:.2f}%), adapter {self.adapter_mb:.1f} MB")


@dataclasses.dataclass
class _State:
    """What the model remembers about its LoRA (stored as ``model._phitune_lora``)."""

    config: LoraConfig
    slices: dict[str, tuple[list[str], list[int]]]  # fused module name -> (enabled slice names, all slice sizes)
    modules_to_save: list[str]


def _lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (lora.Linear, lora.MergedLinear, lora.Embedding))]


def add_lora(model: nn.Module, peft_config: Mapping[str, Any] | LoraConfig, *, lora_dtype: torch.dtype | None = None) -> LoraReport:
    """Replace the targeted modules of ``model`` in place with phitune.lora layers and freeze everything else.

    ``lora_dtype`` keeps lora_A/lora_B in another dtype than the base weights (e.g. float32 on a bf16 model).
    """
    cfg = parse_lora_config(peft_config)
    if _lora_modules(model):
        raise AdapterError("the model already has LoRA layers; call merge_lora(model) first or start from a fresh model")
    targets, keep = _select_targets(model, cfg)
    if cfg.fan_in_fan_out:
        warnings.warn("peft_config.fan_in_fan_out=True has no meaning for nn.Linear weights (out, in); ignored, as peft does")
    slices = {}
    for t in targets:
        base = model.get_submodule(t.name)
        kw = dict(r=t.r, lora_alpha=t.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                  lora_dtype=lora_dtype, merge_weights=False)
        if isinstance(base, nn.Embedding):
            kw.pop("lora_dropout")
            new = _wrap_embedding(base, **kw)
        elif t.slices:
            enable = [s in t.slices for s in FUSED_SLICES[t.name.rsplit(".", 1)[-1]]]
            new = lora.MergedLinear.from_linear(base, enable_lora=enable, out_splits=t.splits, **kw)
            slices[t.name] = (t.slices, t.splits)
        else:
            new = lora.Linear.from_linear(base, **kw)
        _init_lora(new, cfg.init_lora_weights)
        model.set_submodule(t.name, new)
    _untie(model, keep)
    model._phitune_lora = _State(cfg, slices, keep)
    _set_trainable(model, True)
    return lora_report(model)


def _wrap_embedding(base: nn.Embedding, r, lora_alpha, use_rslora, lora_dtype, merge_weights) -> lora.Embedding:
    # phitune.lora has no Embedding.from_embedding yet: build on the meta device (no vocab-sized allocation), then
    # share the base weight and create the factors with loralib's init (A zero, B normal).
    new = lora.Embedding(base.num_embeddings, base.embedding_dim, r=r, lora_alpha=lora_alpha, merge_weights=merge_weights,
                         use_rslora=use_rslora, lora_dtype=lora_dtype, padding_idx=base.padding_idx, max_norm=base.max_norm,
                         norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
                         device="meta")
    new.weight = base.weight
    w = base.weight
    new.lora_A = nn.Parameter(torch.zeros(r, base.num_embeddings, dtype=lora_dtype or w.dtype, device=w.device))
    new.lora_B = nn.Parameter(torch.randn(base.embedding_dim, r, dtype=lora_dtype or w.dtype, device=w.device))
    new.train(base.training)
    return new


@torch.no_grad()
def _init_lora(layer: nn.Module, mode) -> None:
    if mode is True:  # the layers' own init: kaiming-uniform A, zero B (loralib = peft's default)
        return
    if isinstance(layer, lora.Embedding):  # peft: zero A / normal B for True and gaussian; randn both for False
        if mode is False:
            nn.init.normal_(layer.lora_A), nn.init.normal_(layer.lora_B)
    elif mode == "gaussian":
        nn.init.normal_(layer.lora_A, std=1 / layer.r)
    else:  # False: nn.Linear's default init for both, so B is nonzero (peft's "for debugging" mode)
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))


def _untie(model: nn.Module, keep: list[str]) -> None:
    # peft trains a copy of each modules_to_save module, so a tied partner (embed_tokens <-> lm_head) stays unchanged.
    outside = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if not any(n.startswith(k + ".") for k in keep)}
    for name in keep:
        module = model.get_submodule(name)
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) in outside:
                setattr(module, pname, nn.Parameter(p.detach().clone()))
                if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                    model.config.tie_word_embeddings = False


def _set_trainable(model: nn.Module, trainable: bool) -> None:
    state: _State = model._phitune_lora
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    lora_names = dict(_lora_modules(model))
    for name, m in lora_names.items():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
        if state.config.bias == "lora_only" and getattr(m, "bias", None) is not None:
            m.bias.requires_grad_(True)
    for name in state.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    if state.config.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)


def lora_report(model: nn.Module) -> LoraReport:
    """The :class:`LoraReport` of a model carrying LoRA layers."""
    state = _state(model)
    names = [f"{n}[{','.join(state.slices[n][0])}]" if n in state.slices else n for n, _ in _lora_modules(model)]
    params = list(model.parameters())
    return LoraReport(names, list(state.modules_to_save), sum(p.numel() for p in params if p.requires_grad),
                      sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values()))


def _state(model: nn.Module) -> _State:
    state = getattr(model, "_phitune_lora", None)
    if state is None or not _lora_modules(model):
        raise AdapterError("the model has no phitune LoRA layers; call add_lora(model, peft_config) or load_adapter first")
    return state


# ----------------------------------------------------------------------------------------------------------------- #
# PEFT layout: pure conversion between the model and PEFT-named tensors


def _expand_b(module: lora.MergedLinear, enabled: list[str], splits: list[int], fused_leaf: str) -> torch.Tensor:
    """The compact per-slice lora_B (rows of the enabled slices, r columns each) as one fused LoRA's B (out, r*n)."""
    r, names = module.r, FUSED_SLICES[fused_leaf]
    B = module.lora_B.detach()
    full = B.new_zeros(sum(splits), r * len(enabled))
    row, k = 0, 0
    for s_name, size, start in zip(names, splits, _offsets(splits)):
        if s_name in enabled:
            full[start:start + size, k * r:(k + 1) * r] = B[row:row + size]
            row, k = row + size, k + 1
    return full


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (what :func:`save_adapter` writes); detached, not copied."""
    state = _state(model)
    out: dict[str, torch.Tensor] = {}
    lora_layers = dict(_lora_modules(model))
    for name, m in lora_layers.items():
        key = PEFT_PREFIX + name
        if isinstance(m, lora.Embedding):
            out[key + ".lora_embedding_A"], out[key + ".lora_embedding_B"] = m.lora_A.detach(), m.lora_B.detach()
            # peft saves a targeted embedding's base weight too (save_embedding_layers="auto"), for resized vocabularies
            out[key + ".base_layer.weight"] = m.weight.detach()
        elif name in state.slices:
            out[key + ".lora_A.weight"] = m.lora_A.detach()
            out[key + ".lora_B.weight"] = _expand_b(m, *state.slices[name], name.rsplit(".", 1)[-1])
        else:
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = m.lora_A.detach(), m.lora_B.detach()
    if state.config.bias != "none":
        for n, p in model.named_parameters():
            owner, _, leaf = n.rpartition(".")
            if leaf != "bias" or any(owner == k or owner.startswith(k + ".") for k in state.modules_to_save):
                continue
            if owner in lora_layers:  # peft keeps the wrapped layer's parameters under base_layer
                out[f"{PEFT_PREFIX}{owner}.base_layer.bias"] = p.detach()
            elif state.config.bias == "all":
                out[PEFT_PREFIX + n] = p.detach()
    for name in state.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach()
    return out


_SUFFIX = re.compile(r"\.(lora_[AB]\.weight|lora_embedding_[AB]|base_layer\.(weight|bias)|[^.]+)$")


def _normalise_key(key: str) -> str:
    # Older peft versions kept the adapter name and the modules_to_save wrapper in the saved keys.
    key = re.sub(r"\.modules_to_save(\.default)?\.", ".", key)
    return re.sub(r"\.(lora_A|lora_B)\.default\.", r".\1.", key)


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "the adapter") -> None:
    """Copy PEFT-named tensors into the model's LoRA layers, strictly (every tensor used, every shape equal)."""
    state = _state(model)
    expected = adapter_state_dict(model)
    given = {_normalise_key(k): v for k, v in tensors.items()}
    module_of = lambda k: _SUFFIX.sub("", k.removeprefix(PEFT_PREFIX))  # noqa: E731
    tensor_of = lambda k: _SUFFIX.search(k).group(0)[1:]  # noqa: E731
    for key in given:
        if key not in expected:
            raise AdapterError(f"{source}: has weights for '{module_of(key)}' ({key}), which this model has no "
                               f"LoRA/saved module for; adapted here: {', '.join(sorted({module_of(k) for k in expected}))}")
    for key in expected:
        if key not in given and key.endswith(".base_layer.weight"):  # peft's save_embedding_layers=False
            continue
        if key not in given:
            raise AdapterError(f"{source}: no weights for module '{module_of(key)}' ({key} is missing); the adapter does "
                               "not fit this model or its adapter_config.json")
        want, got = tuple(expected[key].shape), tuple(given[key].shape)
        if want != got:
            rank = " (a different LoRA rank)" if ".lora_" in key and (want[0] != got[0] or want[-1] != got[-1]) else ""
            raise AdapterError(f"{source}: module '{module_of(key)}': {tensor_of(key)} has "
                               f"shape {got} in the adapter but {want} in the model{rank}")
    lora_layers = dict(_lora_modules(model))
    params = dict(model.named_parameters())
    for key, value in given.items():
        name = key[len(PEFT_PREFIX):]
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and owner.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            mod_name, which = owner.rsplit(".", 1)
            m = lora_layers[mod_name]
            if which == "lora_B" and mod_name in state.slices:
                value = _compact_b(value, mod_name, m, *state.slices[mod_name], source)
            getattr(m, which).copy_(value)
        elif leaf in ("lora_embedding_A", "lora_embedding_B"):
            getattr(lora_layers[owner], "lora_" + leaf[-1]).copy_(value)
        else:
            params[name.replace(".base_layer.", ".")].copy_(value)


def _compact_b(full: torch.Tensor, name: str, m: lora.MergedLinear, enabled, splits, source) -> torch.Tensor:
    names, r = FUSED_SLICES[name.rsplit(".", 1)[-1]], m.r
    blocks, check = [], full.clone()
    k = 0
    for s_name, size, start in zip(names, splits, _offsets(splits)):
        if s_name in enabled:
            blocks.append(full[start:start + size, k * r:(k + 1) * r])
            check[start:start + size, k * r:(k + 1) * r] = 0
            k += 1
    if check.abs().max() > 0:
        raise AdapterError(f"{source}: module '{name}': lora_B is not block-structured per slice ({', '.join(enabled)}), "
                           "so it cannot load into per-slice LoRA layers; load it onto a fresh model instead")
    return torch.cat(blocks)


def _adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json: peft's keys, with the adapted modules named exactly and per-module r/alpha spelt out."""
    state = _state(model)
    cfg = state.config
    ranks, alphas = {}, {}
    for name, m in _lora_modules(model):
        n = len(state.slices[name][0]) if name in state.slices else 1
        # A fused module with n per-slice adapters of rank r is one LoRA of rank r*n; peft's scaling alpha/(r*n)
        # (alpha/sqrt(r*n) with rsLoRA) equals ours when alpha is scaled by n (sqrt(n)).
        r, alpha = m.r * n, m.lora_alpha * (math.sqrt(n) if cfg.use_rslora else n)
        if r != cfg.r:
            ranks[name] = r
        if alpha != cfg.lora_alpha:
            alphas[name] = alpha
    return {
        "peft_type": "LORA", "task_type": cfg.task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "bias": cfg.bias, "target_modules": sorted(n for n, _ in _lora_modules(model)),
        "exclude_modules": None, "modules_to_save": list(state.modules_to_save) or None, "rank_pattern": ranks,
        "alpha_pattern": alphas, "use_rslora": cfg.use_rslora, "init_lora_weights": cfg.init_lora_weights,
        "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None, "use_dora": False, "lora_bias": False,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) to ``directory``; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    # Clone: safetensors refuses tensors sharing storage (tied weights) and non-contiguous views.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    for name, write in [(WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(_adapter_config(model, base_model_name_or_path), indent=2) + "\n"))]:
        tmp = directory / (name + ".tmp")
        write(str(tmp))
        os.replace(tmp, directory / name)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """The config and tensors of a PEFT adapter folder (safetensors, or a legacy .bin read with weights_only)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        cfg = parse_lora_config(data, section=str(config_path))
    except ConfigError as e:
        raise AdapterError(str(e)) from None
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        path = directory / WEIGHTS_NAME
        tensors = load_file(str(path))
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        path = directory / LEGACY_WEIGHTS_NAME
        try:  # weights_only: a pickle may run code; only plain tensors are accepted
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{path}: not a plain tensor file ({type(e).__name__}: {e}); phitune never unpickles code") from None
    else:
        raise AdapterError(f"{directory}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) next to {CONFIG_NAME}")
    return cfg, tensors, path


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = False,
                 lora_dtype: torch.dtype | None = None) -> LoraReport:
    """Load a PEFT adapter folder (phitune's or peft's) onto ``model``, strictly; frozen unless ``trainable``.

    A model without LoRA gets the layers the folder's adapter_config.json describes; a model that already has
    phitune LoRA layers (e.g. from add_lora with the run's config, to resume training) keeps them.
    """
    cfg, tensors, path = read_adapter(directory)
    if not _lora_modules(model):
        try:
            add_lora(model, cfg, lora_dtype=lora_dtype)
        except ConfigError as e:
            raise AdapterError(f"{Path(directory) / CONFIG_NAME}: does not fit this model: {e}") from None
    load_adapter_state_dict(model, tensors, source=str(path))
    _set_trainable(model, trainable)
    return lora_report(model)


# ----------------------------------------------------------------------------------------------------------------- #
# Merging


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (float32 math, one cast) and leave plain nn.Linear / nn.Embedding.

    Safe to call on a model that is already merged or has no LoRA (no-op). Returns the same model object.
    """
    for name, m in _lora_modules(model):
        if m.merged:
            m.unmerge()  # restores the base weight bit-exactly, then fold again in float32 below
        weight = nn.Parameter((m.weight.float() + m.delta_weight()).to(m.weight.dtype), requires_grad=m.weight.requires_grad)
        if isinstance(m, lora.Embedding):
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
                                 norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                                 device="meta")
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            if m.bias is not None:
                plain.bias = m.bias
        plain.weight = weight
        model.set_submodule(name, plain)
    if hasattr(model, "_phitune_lora"):
        del model._phitune_lora
    return model


@torch.no_grad()
def merge_lora_checked(model: nn.Module, input_ids: torch.Tensor) -> tuple[nn.Module, float]:
    """:func:`merge_lora`, plus the max absolute logit difference before vs after on ``input_ids``."""
    was_training = model.training
    model.eval()
    before = model(input_ids=input_ids).logits.float()
    merge_lora(model)
    diff = (model(input_ids=input_ids).logits.float() - before).abs().max().item()
    model.train(was_training)
    return model, diff
