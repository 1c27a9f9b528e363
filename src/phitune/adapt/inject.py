"""Injection: one walk over the model that replaces the targeted modules with phitune.lora layers; and merging.

Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. A target named ``q_proj`` (a config written for
Llama) puts a MergedLinear on that slice of the fused layer, so the config trains exactly the slices it names.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .. import lora
from .._typed import suggest
from ..lora.utils import bias_names
from ..lora import quantized as qlora
from ..lora.quantized import is_4bit_linear, is_8bit_linear, keep_float_4bit_path
from ..errors import AdapterError, ConfigError
from .config import LoraConfig, parse_lora_config

# Slices of Phi-3's fused projections, in output order (modeling_phi3.py splits qkv as q, k, v and gate_up as gate, up).
# The key prefix of every tensor in a PEFT adapter file (peft wraps the model as base_model.model).
PEFT_PREFIX = "base_model.model."
FUSED_SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


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
            raise ConfigError(f"peft_config.modules_to_save: {wanted!r} matches no module"
                              f"{suggest(wanted, [n.rsplit('.', 1)[-1] for n in modules])}")
    in_keep = lambda n: any(n == k or n.startswith(k + ".") for k in keep)  # noqa: E731
    all_linear = isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"
    head = _output_head_name(model)
    targets_spec = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)

    def wanted(name: str) -> bool:
        return (_name_matches(targets_spec, name)
                and not (cfg.exclude_modules and _name_matches(cfg.exclude_modules, name))
                and _layer_index_ok(cfg, name))

    def make(name: str, **kw) -> _Target:
        return _Target(name, _pattern_value(cfg.rank_pattern, name, cfg.r),
                       _pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha), **kw)

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
                raise ConfigError(f"peft_config.target_modules: {enabled[0]!r} is a slice of {name!r}, "
                                  f"but the slice sizes implied by model.config do not add up to its "
                                  f"{module.out_features} outputs")
            per = [make(s) for s in enabled]
            if len({(t.r, t.lora_alpha) for t in per}) > 1:
                raise ConfigError(f"rank_pattern/alpha_pattern give different r or lora_alpha to the slices of "
                                  f"{name!r} ({', '.join(f'{t.name}: r={t.r}, alpha={t.lora_alpha}' for t in per)}); "
                                  "they share one layer")
            found.append(_Target(name, per[0].r, per[0].lora_alpha, slices=[s.rsplit('.', 1)[-1] for s in enabled],
                                 splits=splits))
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
        msg += (f" ({target!r} is a slice of Phi-3's fused {fused!r}, "
                f"and this model has neither {target!r} nor {fused!r})")
    else:
        msg += suggest(target, leaves) if isinstance(target, str) else ""
    example = next((n for n in linear_names if "." in n), "")
    return (msg + f". Linear layers in this model: {', '.join(leaves) or 'none'}"
            + (f" (e.g. {example!r})" if example else "")
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
class LoraState:
    """What a model remembers about its LoRA: the one attribute phitune sets on a model (``model._phitune_lora``, as
    peft keeps ``peft_config`` on its models), written by ``add_lora`` and read only through ``lora_state``, so it
    follows the model through deepcopy and pickling."""

    config: LoraConfig
    slices: dict[str, tuple[list[str], list[int]]]  # fused module name -> (enabled slice names, all slice sizes)
    modules_to_save: list[str]


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every phitune LoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)]


LORA_LAYERS = (lora.Linear, lora.MergedLinear, lora.Embedding, qlora.Linear4bit)


def add_lora(model: nn.Module, peft_config: Mapping[str, Any] | LoraConfig, *,
             lora_dtype: torch.dtype | None = None) -> LoraReport:
    """Replace the targeted modules of ``model`` in place with phitune.lora layers and freeze everything else.

    ``lora_dtype`` keeps lora_A/lora_B in another dtype than the base weights (e.g. float32 on a bf16 model).
    """
    cfg = parse_lora_config(peft_config)
    cfg.check_targets()
    if lora_modules(model):
        raise AdapterError("the model already has LoRA layers; call merge_lora(model) first "
                           "or start from a fresh model")
    targets, keep = _select_targets(model, cfg)
    _check_quantized_targets(model, targets, keep)
    if cfg.fan_in_fan_out:
        warnings.warn("peft_config.fan_in_fan_out=True has no meaning for nn.Linear weights (out, in); "
                      "ignored, as peft does")
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
            cls = qlora.MergedLinear4bit if is_4bit_linear(base) else lora.MergedLinear
            new = cls.from_linear(base, enable_lora=enable, out_splits=t.splits, **kw)
            slices[t.name] = (t.slices, t.splits)
        else:  # 4-bit bases (QLoRA) keep their quantized weight; the LoRA factors default to float32
            new = (qlora.Linear4bit if is_4bit_linear(base) else lora.Linear).from_linear(base, **kw)
        _init_lora(new, cfg.init_lora_weights)
        model.set_submodule(t.name, new)
    keep_float_4bit_path(model)  # the 4-bit layers left without LoRA compute like those with it (lora.quantized)
    _untie(model, keep)
    model._phitune_lora = LoraState(cfg, slices, keep)
    set_trainable(model, True)
    return lora_report(model)


def _check_quantized_targets(model: nn.Module, targets: list[_Target], keep: list[str]) -> None:
    for t in targets:
        if is_8bit_linear(model.get_submodule(t.name)):
            raise ConfigError(f"peft_config.target_modules: '{t.name}' is a bitsandbytes 8-bit layer; "
                              "phitune trains LoRA on 16/32-bit or 4-bit bases only "
                              "(set model.load_in_4bit: true for QLoRA)")
    for name in keep:
        if any(is_4bit_linear(m) or is_8bit_linear(m) for m in model.get_submodule(name).modules()):
            raise ConfigError(f"peft_config.modules_to_save: '{name}' holds quantized weights, which cannot be trained "
                              "in full; target it with LoRA instead, or load the base without load_in_4bit")


def _wrap_embedding(base: nn.Embedding, r, lora_alpha, use_rslora, lora_dtype, merge_weights) -> lora.Embedding:
    # phitune.lora has no Embedding.from_embedding yet: build on the meta device (no vocab-sized allocation), then
    # share the base weight and create the factors with loralib's init (A zero, B normal).
    new = lora.Embedding(base.num_embeddings, base.embedding_dim, r=r, lora_alpha=lora_alpha,
                         merge_weights=merge_weights, use_rslora=use_rslora, lora_dtype=lora_dtype,
                         padding_idx=base.padding_idx, max_norm=base.max_norm,
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


@torch.no_grad()
def redraw_lora(model: nn.Module) -> None:
    """Draw every LoRA factor's start again from the current RNG, as :func:`add_lora` draws it and in its order
    (the layer's own init, then ``init_lora_weights``): after the same seed, the values add_lora gives. For factors
    add_lora created on the meta device (an empty model that receives its weights, phitune.training.distributed)."""
    mode = lora_state(model).config.init_lora_weights
    for _, layer in lora_modules(model):
        if isinstance(layer, lora.Embedding):  # as _wrap_embedding: A zero, B normal
            nn.init.zeros_(layer.lora_A)
            layer.lora_B.normal_()
        else:
            layer._reset_lora()
        _init_lora(layer, mode)


def _untie(model: nn.Module, keep: list[str]) -> None:
    # peft trains a copy of each modules_to_save module, so a tied partner (embed_tokens <-> lm_head) stays unchanged.
    outside = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
               if not any(n.startswith(k + ".") for k in keep)}
    for name in keep:
        module = model.get_submodule(name)
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) in outside:
                setattr(module, pname, nn.Parameter(p.detach().clone()))
                if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                    model.config.tie_word_embeddings = False


def set_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze ``model``; with ``trainable``, unfreeze its LoRA factors, modules_to_save and the config's biases."""
    state: LoraState = model._phitune_lora
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for _, m in lora_modules(model):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    for name in state.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    biases = bias_names(model, state.config.bias)
    for n, p in model.named_parameters(remove_duplicate=False):
        if n in biases:
            p.requires_grad_(True)


def lora_report(model: nn.Module) -> LoraReport:
    """The :class:`LoraReport` of a model carrying LoRA layers."""
    state = lora_state(model)
    names = [f"{n}[{','.join(state.slices[n][0])}]" if n in state.slices else n for n, _ in lora_modules(model)]
    params = list(model.parameters())
    return LoraReport(names, list(state.modules_to_save), sum(p.numel() for p in params if p.requires_grad),
                      sum(_param_count(p) for p in params),
                      sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values()))


def _param_count(p: torch.Tensor) -> int:
    # A bitsandbytes Params4bit packs two 4-bit values per byte of its storage dtype.
    return p.numel() * p.element_size() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def lora_state(model: nn.Module) -> LoraState:
    """The LoRA config, fused-slice layout and modules_to_save that ``add_lora`` recorded on ``model``."""
    state = getattr(model, "_phitune_lora", None)
    if state is None or not lora_modules(model):
        raise AdapterError("the model has no phitune LoRA layers; "
                           "call add_lora(model, peft_config) or load_adapter first")
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (what :func:`save_adapter` writes); detached, not copied."""
    state = lora_state(model)
    out: dict[str, torch.Tensor] = {}
    lora_layers = dict(lora_modules(model))
    for name, m in lora_layers.items():
        key = PEFT_PREFIX + name
        if isinstance(m, lora.Embedding):
            out[key + ".lora_embedding_A"], out[key + ".lora_embedding_B"] = m.lora_A.detach(), m.lora_B.detach()
            # peft saves a targeted embedding's base weight too (save_embedding_layers="auto"), for resized vocabularies
            out[key + ".base_layer.weight"] = m.weight.detach()
        elif name in state.slices:
            out[key + ".lora_A.weight"] = m.lora_A.detach()
            out[key + ".lora_B.weight"] = m.expanded_B().detach()
        else:
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = m.lora_A.detach(), m.lora_B.detach()
    biases = bias_names(model, state.config.bias)
    for n, p in model.named_parameters():
        owner, _, leaf = n.rpartition(".")
        if n not in biases or any(owner == k or owner.startswith(k + ".") for k in state.modules_to_save):
            continue
        if owner in lora_layers:  # peft keeps the wrapped layer's parameters under base_layer
            out[f"{PEFT_PREFIX}{owner}.base_layer.{leaf}"] = p.detach()
        else:
            out[PEFT_PREFIX + n] = p.detach()
    for name in state.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach()
    return out


def clear_lora_state(model: nn.Module) -> None:
    """Forget what ``add_lora`` recorded (after a merge leaves plain layers)."""
    if hasattr(model, "_phitune_lora"):
        del model._phitune_lora
