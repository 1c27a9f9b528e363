"""LoRA on a bitsandbytes 4-bit base (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

    y = x · dequant(W₄)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ

The base matmul is bitsandbytes' (``bnb.matmul_4bit``, in the base's compute dtype); the LoRA factors are kept in a
higher precision than the base (float32 unless ``lora_dtype`` says otherwise) and their branch runs in that dtype
(or the autocast dtype). Like ``lora.Linear.from_linear``, ``Linear4bit.from_linear(bnb_layer, r=...)`` wraps the
base's ``weight`` (a ``Params4bit`` with its quant state) and ``bias`` Parameters as they are, under the same names.
``MergedLinear4bit`` is the per-slice variant for fused projections (``enable_lora``/``out_splits``, same shapes and
group layout as ``lora.MergedLinear``).

``merge()`` refuses: rounding W + ΔW back to 4 bits would lose most of ΔW. ``to_dense(linear)`` moves the adapter
onto a 16/32-bit copy of the base (``phitune.quant.dequantize_model`` does that for a whole model), where it merges
as usual. Importing this module does not import bitsandbytes; running a forward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Linear, LoRALayer, MergedLinear

__all__ = ["Linear4bit", "MergedLinear4bit"]

MERGE_REFUSED = ("cannot merge LoRA into 4-bit weights (rounding W + ΔW back to 4 bits would lose most of ΔW); "
                 "merge into a 16/32-bit base: phitune.merge(run_dir, out_dir) or phitune.quant.dequantize_model(model) "
                 "then merge_lora(model)")


def _check_base(base: nn.Module) -> None:
    w = getattr(base, "weight", None)
    if type(w).__name__ != "Params4bit" or getattr(w, "quant_state", None) is None:
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
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self._lora_groups = [(s, n) for s, n, on in zip(starts, sizes, enable_lora) if on]
        if r > 0 and self._lora_groups:
            self._make_factors((r * len(self._lora_groups), self.in_features),
                               (sum(n for _, n in self._lora_groups), r))
        return self

    def _has_lora(self) -> bool:
        return self.r > 0 and bool(self._lora_groups)

    _group_factors = MergedLinear._group_factors
    _delta_parts = MergedLinear._delta_parts
    _lora_B_full = MergedLinear._expanded_B

    def _dense_kwargs(self) -> dict:
        return {**super()._dense_kwargs(), "enable_lora": self.enable_lora, "out_splits": self.out_splits}

    def _dense_cls(self):
        return MergedLinear
