"""QLoRA support: load the base in 4-bit (bitsandbytes NF4/FP4), prepare it for k-bit training, dequantize it.

    model:
      name_or_path: microsoft/Phi-3-mini-4k-instruct
      load_in_4bit: true
      quantization: {type: nf4, double_quant: true, compute_dtype: bfloat16}

bitsandbytes is an optional extra (``pip install phitune[qlora]``); nothing here imports it (or torch) until a 4-bit
model is asked for, so ``import phitune.config`` stays fast. The LoRA layers on a 4-bit base live in
``phitune.lora.quantized``; adapt routes bitsandbytes ``Linear4bit`` targets to them.

Merging never writes into 4-bit weights (re-quantizing W + ΔW would lose most of ΔW, which is far smaller than one
NF4 step): ``merge_checked`` dequantizes the NF4 base to 16/32-bit, or reloads the original weights, and merges there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, Mapping

from ._typed import field, from_dict
from .errors import AdapterError, ConfigError

log = logging.getLogger("phitune")

INSTALL_HINT = "pip install phitune[qlora]"


@dataclasses.dataclass
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
        raise ConfigError(f"model.quantization: expected a mapping like {{type: nf4, double_quant: true, compute_dtype: "
                          f"bfloat16}}, got {data!r}")
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


# --- loading ----------------------------------------------------------------------------------------------------------


def require_bitsandbytes():
    """The bitsandbytes module, or a ConfigError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"model.load_in_4bit: true needs the bitsandbytes package, which is not installed ({exc}); "
                          f"install it with `{INSTALL_HINT}`, or set model.load_in_4bit: false") from None
    return bitsandbytes


def compute_dtype(model_cfg, model_dtype):
    """The torch dtype of the 4-bit matmuls."""
    import torch

    name = model_cfg.quantization.compute_dtype
    return model_dtype if name == "auto" else getattr(torch, name)


def check_4bit_supported(model_cfg, device, model_dtype) -> None:
    """Refuse, before anything is loaded, the 4-bit combinations that cannot work."""
    import torch

    require_bitsandbytes()
    if device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(f"model.load_in_4bit: bitsandbytes 4-bit layers run on CUDA, XPU or the CPU, not on "
                          f"{device.type}; set training_config.use_cpu: true or model.load_in_4bit: false")
    cdt = compute_dtype(model_cfg, model_dtype)
    if cdt == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.quantization.compute_dtype: bfloat16 is not supported by this GPU (pre-Ampere); "
                          "use float16")


def bnb_config(model_cfg, model_dtype):
    """transformers' BitsAndBytesConfig for ``model_cfg`` (``model.load_in_4bit`` must be true)."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    q = model_cfg.quantization
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(model_cfg, model_dtype))


def load_kwargs(model_cfg, device, model_dtype) -> dict:
    """Extra ``from_pretrained`` keyword arguments for a 4-bit base (empty when ``load_in_4bit`` is false)."""
    if not getattr(model_cfg, "load_in_4bit", False):
        return {}
    check_4bit_supported(model_cfg, device, model_dtype)
    log.info("model: 4-bit %s base (double quant %s, compute %s)", model_cfg.quantization.type,
             model_cfg.quantization.double_quant, str(compute_dtype(model_cfg, model_dtype)).replace("torch.", ""))
    return {"quantization_config": bnb_config(model_cfg, model_dtype)}


def is_4bit_linear(module) -> bool:
    """True for a bitsandbytes Linear4bit (checked without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def is_8bit_linear(module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def is_quantized(model) -> bool:
    """True when any module of ``model`` holds bitsandbytes 4-bit weights (with or without LoRA on top)."""
    return any(is_4bit_linear(m) for m in model.modules())


# --- the 4-bit matmul path --------------------------------------------------------------------------------------------


def keep_float_4bit_path(model) -> int:
    """Keep every bitsandbytes Linear4bit of ``model`` on its dequantize-then-matmul path; returns how many.

    On CPUs with AVX512-BF16 (and AMX), bitsandbytes (0.50) runs a Linear4bit in eval mode without grad through a
    CPU inference kernel instead: it repacks the weight in place, rounds the input and the block scales (absmax) to
    bfloat16 and computes in bfloat16, whatever compute dtype was asked for. Measured on such a CPU against
    x @ dequant(W).T in float64 (64 -> 96 and 3072 -> 3072, NF4 and FP4): 5.8e-3 to 9.9e-3 max error there,
    5.7e-7 to 7.1e-7 on the dequantize path (phitune's own 4-bit LoRA layers always take it). The repacking also
    breaks training after an evaluation (the packed path has no autograd: "a view of a leaf Variable ... in-place
    operation", or no input gradient through layers without bias). So phitune turns it off on the models it adapts.
    ``support_avx512bf16_for_cpu`` is the per-layer switch bitsandbytes itself reads in ``Linear4bit.forward``.
    """
    count = 0
    for module in model.modules():
        if is_4bit_linear(module) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                log.warning("%s: bitsandbytes already repacked this 4-bit weight for its bfloat16 CPU kernel "
                            "(its block scales were rounded to bfloat16); reload the model for float32 accuracy",
                            type(module).__name__)
    return count


# --- k-bit training preparation ---------------------------------------------------------------------------------------


def prepare_kbit_training(model, *, gradient_checkpointing: bool = False,
                          gradient_checkpointing_kwargs: dict | None = None):
    """Make a 4-bit base ready for LoRA training; returns the model.

    - every base parameter is frozen (the 4-bit weights cannot train; LoRA adds its own trainable factors);
    - float16 parameters that stay unquantized (norms, embeddings, lm_head) are upcast to float32: fp16 overflows in
      RMSNorm and the loss. bfloat16 ones are kept: bf16 has fp32's range, and upcasting them would turn the whole
      residual stream into float32 (twice the activation memory) for no measured gain;
    - with gradient checkpointing (non-reentrant by default, as in train.py): reentrant checkpointing only
      backpropagates into a block whose input requires grad, and with every base weight frozen nothing does, so
      the embedding output is made to require grad;
    - use_cache off (a cache is useless in training and conflicts with checkpointing);
    - bitsandbytes' bfloat16 CPU inference kernel is kept off (:func:`keep_float_4bit_path`).
    """
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    keep_float_4bit_path(model)
    for module in model.modules():
        if is_4bit_linear(module):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dtype == torch.float16:
                p.data = p.data.float()
    if gradient_checkpointing:
        from .model import enable_checkpointing  # model.py imports this module

        enable_checkpointing(model, gradient_checkpointing_kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


# --- dequantizing and merging -----------------------------------------------------------------------------------------


def dequantize_weight(module):
    """The float weight (out, in) of a bitsandbytes Linear4bit or a phitune 4-bit LoRA layer, in the original dtype."""
    bnb = require_bitsandbytes()
    w = module.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


MERGE_4BIT_MESSAGE = ("cannot merge LoRA into 4-bit weights: rounding W + ΔW back to 4 bits would lose most of ΔW. "
                      "Merge into a 16/32-bit base instead: phitune.merge(run_dir, out_dir) (or `phitune merge`) reloads "
                      "the base dequantized from NF4 (or the original weights), or call "
                      "phitune.quant.dequantize_model(model, dtype) first and then merge_lora(model)")


def dequantize_model(model, dtype=None):
    """Replace every 4-bit layer of ``model`` by a 16/32-bit one holding the dequantized weights, in place.

    bitsandbytes Linear4bit -> nn.Linear; phitune 4-bit LoRA layers -> lora.Linear / lora.MergedLinear with the same
    LoRA factors (merge_lora works on them). ``dtype``: of the new weights and of every other floating parameter
    (None: the model's non-quantized dtype). The model's quantization config is removed, so save_pretrained writes a
    plain model. Returns the model.
    """
    import torch
    from torch import nn

    from . import lora
    from .lora import quantized

    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    for name, m in list(model.named_modules()):
        if not is_4bit_linear(m):
            continue
        weight = dequantize_weight(m).to(dtype)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if m.bias is not None:
            plain.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=m.bias.requires_grad)
        plain.train(m.training)
        model.set_submodule(name, m.to_dense(plain) if isinstance(m, quantized.Linear4bit) else plain)
    factors = {id(p) for m in model.modules() if isinstance(m, (lora.Linear, lora.MergedLinear, lora.Embedding))
               if "lora_A" in m._parameters for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():  # norms, embeddings, lm_head; LoRA factors keep their (higher) precision
        if p.dtype.is_floating_point and p.dtype != dtype and id(p) not in factors:
            p.data = p.data.to(dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    return model


def merge_checked(model, model_cfg, input_ids, *, dtype=None, dequantize: bool = True, device=None):
    """Merge a run's adapter model (``merge_lora_checked`` for a 16/32-bit base) and return
    ``(merged_model, max_abs_logit_diff)``, the difference measured against the adapter model as loaded.

    For a 4-bit base (``model_cfg.load_in_4bit``) the merge happens in ``dtype`` (a torch dtype or its name):
    ``dequantize=True`` dequantizes the NF4/FP4 weights, so the merged model computes what was trained;
    ``dequantize=False`` reloads the original full-precision weights from ``model_cfg.name_or_path`` (what most
    tools do; the difference then includes the quantization error the adapter was trained around).
    """
    import torch

    from .adapt import merge_lora, merge_lora_checked

    if not getattr(model_cfg, "load_in_4bit", False) and not is_quantized(model):
        return merge_lora_checked(model, input_ids)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(input_ids=input_ids).logits.float()
    if dequantize:
        merged = dequantize_model(model, dtype)
    else:
        merged = _reload_full_precision(model, model_cfg, dtype, device or input_ids.device)
        del model
    merge_lora(merged)
    merged.eval()
    with torch.no_grad():
        diff = (merged(input_ids=input_ids.to(next(merged.parameters()).device)).logits.float().to(before.device)
                - before).abs().max().item()
    merged.train(was_training)
    log.info("merged into a %s base (%s): max |logit difference| vs the adapter on the 4-bit base %.3g",
             str(next(merged.parameters()).dtype).replace("torch.", ""),
             "dequantized from 4-bit" if dequantize else "original weights", diff)
    return merged, diff


def _reload_full_precision(model, model_cfg, dtype, device):
    """The base reloaded without quantization, carrying ``model``'s LoRA layers and weights."""
    from .adapt import add_lora, adapter_state_dict, load_adapter_state_dict
    from .adapt.inject import lora_state
    from .model import load_model_and_tokenizer

    state = lora_state(model)
    tensors = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else model_cfg.dtype
    cfg = dataclasses.replace(model_cfg, load_in_4bit=False, dtype=dtype_name)
    full, _ = load_model_and_tokenizer(cfg, device=device)
    add_lora(full, state.config)
    load_adapter_state_dict(full, tensors, source="the 4-bit model's adapter")
    return full
