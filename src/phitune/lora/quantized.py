"""LoRA on a bitsandbytes 4-bit base (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

    y = x · dequant(W₄)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ

The base matmul is bitsandbytes' (``bnb.matmul_4bit``, in the base's compute dtype); the LoRA factors are kept in a
higher precision than the base (float32 unless ``lora_dtype`` says otherwise) and their branch runs in that dtype
(or the autocast dtype). Like ``lora.Linear.from_linear``, ``Linear4bit.from_linear(bnb_layer, r=...)`` wraps the
base's ``weight`` (a ``Params4bit`` with its quant state) and ``bias`` Parameters as they are, under the same names.
``MergedLinear4bit`` is the per-slice variant for fused projections (``enable_lora``/``out_splits``, same shapes and
group layout as ``lora.MergedLinear``).

``merge()`` refuses: rounding W + ΔW back to 4 bits would lose most of ΔW. ``to_dense(linear)`` moves the adapter
onto a 16/32-bit copy of the base (``dequantize_model`` below does that for a whole model), where it merges
as usual. Importing this module does not import bitsandbytes; running a forward does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import Linear, LoRALayer, MergedLinear, group_layout

log = logging.getLogger("phitune")

__all__ = ["Linear4bit", "MergedLinear4bit"]

MERGE_REFUSED = ("cannot merge LoRA into 4-bit weights: rounding W + ΔW back to 4 bits would lose most of ΔW. "
                 "Merge into a 16/32-bit base instead: phitune.merge(run_dir, out_dir) (or `phitune merge`) reloads "
                 "the "
                 "base dequantized from NF4 (or the original weights), or call "
                 "phitune.lora.quantized.dequantize_model(model, dtype) first and then merge_lora(model)")
INSTALL_HINT = "pip install phitune[qlora]"


def _check_base(base: nn.Module) -> None:
    if not is_4bit_linear(base):
        raise ValueError(f"from_linear needs a quantized bitsandbytes Linear4bit (weight a Params4bit with a quant "
                         f"state; call .to(device) on a fresh layer to quantize it), got {type(base).__name__}")


class Linear4bit(LoRALayer, nn.Module):
    """A rank-r adapter on a bitsandbytes 4-bit linear layer; build it with :meth:`from_linear`."""

    def __init__(self, *args, **kwargs):
        raise TypeError("build a 4-bit LoRA layer from a quantized base: Linear4bit.from_linear(bnb_linear4bit, r=...)")

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    fan_in_fan_out: bool = False, merge_weights: bool = False, *, use_rslora: bool = False,
                    lora_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Wrap a bitsandbytes Linear4bit's weight/bias (shared); lora_dtype None means float32."""
        self = cls._wrap(linear, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, use_rslora, lora_dtype)
        if r > 0:
            self._make_factors((r, self.in_features), (self.out_features, r))
        return self

    @classmethod
    def _wrap(cls, linear, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, use_rslora, lora_dtype):
        _check_base(linear)
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True: bitsandbytes 4-bit layers store nn.Linear weights (out, in)")
        if merge_weights:
            raise ValueError(f"merge_weights=True would merge on eval(); {MERGE_REFUSED}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, False, use_rslora=use_rslora,
                           lora_dtype=lora_dtype or torch.float32)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fan_in_fan_out = False
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.compute_dtype = getattr(linear, "compute_dtype", None)
        self.weight.requires_grad = False
        nn.Module.train(self, linear.training)
        return self

    def _make_factors(self, a_shape, b_shape) -> None:
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=self.lora_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=self.lora_dtype, device=device))
        Linear._reset_lora(self)  # kaiming-uniform A, zero B

    @property
    def quant_type(self) -> str:
        return getattr(self.weight, "quant_type", "nf4")

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 4-bit matmul alone, in the compute dtype (the input's when none was set), returned in x's dtype."""
        import bitsandbytes as bnb

        cdt = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(cdt)
        w = self.weight
        return bnb.matmul_4bit(x.to(cdt), w.t(), bias=bias, quant_state=w.quant_state).to(x.dtype)

    def _lora_B_full(self) -> torch.Tensor:
        return self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if not self._lora_active():
            return result
        A = self.lora_A
        h = F.linear(self.lora_dropout(x).to(A.dtype), A) * self.scaling  # scaling the (N, r) tensor is cheapest
        return result + F.linear(h, self._lora_B_full()).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW·scaling as a float32 (out, in) tensor (zeros where no adapter applies)."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        if self._has_lora():
            with torch.no_grad():
                for index, part in self._delta_parts(torch.float32):
                    delta[index] = part
        return delta

    def _delta_parts(self, dtype):
        yield (), (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def merge(self) -> None:
        raise RuntimeError(MERGE_REFUSED)

    def unmerge(self) -> None:
        """A no-op: a 4-bit layer is never merged."""

    def _dense_kwargs(self) -> dict:
        return dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=getattr(self.lora_dropout, "p", 0.0),
                    merge_weights=False, use_rslora=self.use_rslora, lora_dtype=self.lora_dtype)

    def _dense_cls(self):
        return Linear

    def to_dense(self, linear: nn.Linear) -> nn.Module:
        """The same adapter (shared lora_A/lora_B) on ``linear``, a 16/32-bit copy of this layer's base."""
        dense = self._dense_cls().from_linear(linear, **self._dense_kwargs())
        if self._has_lora():
            dense.lora_A, dense.lora_B = self.lora_A, self.lora_B
        return dense

    def extra_repr(self) -> str:
        cdt = str(self.compute_dtype).replace("torch.", "") if self.compute_dtype is not None else "input"
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, compute {cdt}")
        return f"{text}, r={self.r}, lora_alpha={self.lora_alpha}" if self.r > 0 else text


class MergedLinear4bit(Linear4bit):
    """A fused 4-bit projection (e.g. qkv) whose output groups each get an optional rank-r adapter.

    Same layout as :class:`phitune.lora.MergedLinear`: with n enabled groups ``lora_A`` is (r·n, in) and ``lora_B``
    is (sum of enabled sizes, r); the forward uses low-rank products only.
    """

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False, merge_weights: bool = False,
                    *, out_splits: Sequence[int] | None = None, use_rslora: bool = False,
                    lora_dtype: torch.dtype | None = None) -> "MergedLinear4bit":
        """Wrap a fused bitsandbytes Linear4bit's weight/bias (shared); lora_dtype None means float32."""
        sizes = MergedLinear._group_sizes(linear.out_features, enable_lora, out_splits)
        self = cls._wrap(linear, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, use_rslora, lora_dtype)
        self.enable_lora, self.out_splits = list(enable_lora), list(sizes)
        self._lora_groups = group_layout(sizes, enable_lora)
        if r > 0 and self._lora_groups:
            self._make_factors((r * len(self._lora_groups), self.in_features),
                               (sum(n for _, n in self._lora_groups), r))
        return self

    def _has_lora(self) -> bool:
        return self.r > 0 and bool(self._lora_groups)

    _group_factors = MergedLinear._group_factors
    _delta_parts = MergedLinear._delta_parts
    _lora_B_full = MergedLinear.expanded_B
    expanded_B = MergedLinear.expanded_B
    compact_B = MergedLinear.compact_B

    def _dense_kwargs(self) -> dict:
        return {**super()._dense_kwargs(), "enable_lora": self.enable_lora, "out_splits": self.out_splits}

    def _dense_cls(self):
        return MergedLinear


# --- bitsandbytes layers: detection, the float matmul path, dequantization ----------------------------------------


def require_bitsandbytes():
    """The bitsandbytes module, or a ConfigError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"model.load_in_4bit: true needs the bitsandbytes package, which is not installed ({exc}); "
                          f"install it with `{INSTALL_HINT}`, or set model.load_in_4bit: false") from None
    return bitsandbytes


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


def dequantize_weight(module):
    """The float weight (out, in) of a bitsandbytes Linear4bit or a phitune 4-bit LoRA layer, in the original dtype."""
    bnb = require_bitsandbytes()
    w = module.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


def dequantize_model(model, dtype=None):
    """Replace every 4-bit layer of ``model`` by a 16/32-bit one holding the dequantized weights, in place.

    bitsandbytes Linear4bit -> nn.Linear; phitune 4-bit LoRA layers -> lora.Linear / lora.MergedLinear with the same
    LoRA factors (merge_lora works on them). ``dtype``: of the new weights and of every other floating parameter
    (None: the model's non-quantized dtype). The model's quantization config is removed, so save_pretrained writes a
    plain model. Returns the model.
    """
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
        model.set_submodule(name, m.to_dense(plain) if isinstance(m, Linear4bit) else plain)
    factors = {id(p) for m in model.modules() if isinstance(m, LoRALayer)
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
