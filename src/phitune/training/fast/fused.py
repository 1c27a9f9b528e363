"""Fused autograd functions for the LoRA blocks of Phi-3-style decoders, and the instance swaps that use them.

Why: LoRA adds about 1% of the FLOPs, yet a module-by-module autograd graph (base matmul, dropout, two skinny
matmuls, a scaling multiply, an add; SwiGLU as chunk/SiLU/multiply) costs 35-42% of the step on an H200 and about
40% of a CPU step outside the matmuls (the transformers Trainer + peft peer measured side by side; a torch.profiler
run of the peer on the `small` shape, benchmarks/step_profile.py). These functions do the same arithmetic with fewer
passes over memory and save only what backward needs:

  lora_linear   y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ. Saves drop(x) and the (N, r) product. Forward and grad_x write
                the skinny LoRA product first and let the frozen matmul accumulate onto it (read in cuBLAS's
                epilogue on a GPU: no separate (N, out) pass); grad_A, grad_B are skinny matmuls. Dropout's mask:
                1-byte bools on the CPU; on CUDA only a seed, the mask drawn again inside Triton kernels
                (kernels/dropout.py), and o_proj after varlen attention saves x (kept by attention anyway)
                instead of drop(x). On a 4-bit (QLoRA) base the base matmul stays bitsandbytes' and only the
                LoRA branch is one function.
  swiglu_down   y = down(silu(gate)·up) with down's LoRA, from the gate_up output. Saves gate_up and the dropout
                mask (1 byte per element; on a GPU only the seed its kernel draws it from); silu(gate)·up is
                recomputed in backward instead of being stored, each direction one op (kernels/swiglu.py); on a
                GPU the forward op also forms down's LoRA product drop(h) Aᵀ, so drop(h) is never written.
  rms_norm      Phi-3/Llama RMSNorm with a hand-written backward: saves x and one float per row. On CUDA each
                direction is one Triton kernel (kernels/rms_norm.py).
  qkv_rope      split of the fused qkv projection + rotary embedding, straight into (B, H, T, D) tensors; backward
                writes one gradient tensor (no zero-filled slice gradients, no rotate_half copies). Saves cos, sin.
                One custom op per direction (kernels/rope.py; one Triton kernel each on a GPU).
  decoder layer Phi-3's residual add after attention fused with post_attention_layernorm (AddRMSNormFn), and
                input_layernorm summing the residual's gradient in its own backward (ResidualRMSNormFn): one op
                per direction each, no separate residual add or gradient sum. The add after the MLP stays a plain
                add: fusing it with the next layer's input norm would pass the normed tensor between layers.

Arithmetic runs in the compute dtype (the autocast dtype when autocast is on, else the input's); LoRA weights kept
in float32 are cast to it once per call (r x in elements), and their gradients are returned in float32.

How they are used: ``install(model)`` changes the class of matching module instances to a phitune subclass of the
same class (``lora.Linear`` -> ``FusedLoRALinear``, ``Phi3MLP`` -> a fused subclass, ``Phi3RMSNorm`` and
``Phi3DecoderLayer`` -> likewise).
Parameters, buffers, names and ``isinstance`` checks stay exactly as they were, so adapters save, merge and load as
before; ``uninstall(model)`` restores the original classes. Nothing is patched at import time.

Where: the autograd functions live in lora_autograd.py (LoRA linear, LoRA branch, SwiGLU + down), norm_rope.py
(RMSNorm, qkv + RoPE) and fused_4bit.py (a 4-bit base); this file holds the module forwards that call them and
``install``/``uninstall``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ... import lora
from ...lora import quantized
from .fused_4bit import FusedLoRALinear4bit, FusedLoRAMergedLinear4bit, SwiGLUDown4bitFn
from .lora_autograd import LoRALinearFn, SwiGLUDownFn, _as_2d, _compute_dtype, _dropout_p, _fusable, _lora_factors
from . import varlen
from .norm_rope import AddRMSNormFn, QKVRopeFn, ResidualRMSNormFn, RMSNormFn


# --- module forwards (installed by changing an instance's class) ------------------------------------------------------


def lora_linear(layer, x: torch.Tensor, input_saved: bool = False) -> torch.Tensor:
    """The fused forward of a phitune LoRA layer (falls back to the layer's own forward when not fusable).
    ``input_saved``: x is saved for backward by the op that made it (see LoRALinearFn)."""
    if not _fusable(layer):
        return super(type(layer), layer).forward(x)
    cdt = _compute_dtype(x)
    A, B = _lora_factors(layer)
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFn.apply(_as_2d(x).to(cdt), layer.weight, layer.bias, A, B, layer.scaling, _dropout_p(layer),
                               input_saved and x.dtype == cdt)
    return y.view(*x.shape[:-1], y.shape[-1])


class FusedLoRALinear(lora.Linear):
    """lora.Linear whose forward is one autograd function (phitune.training.fast.fused.LoRALinearFn)."""

    def forward(self, x, input_saved: bool = False):
        return lora_linear(self, x, input_saved)


class FusedLoRAMergedLinear(lora.MergedLinear):
    """lora.MergedLinear whose forward is one autograd function (phitune.training.fast.fused.LoRALinearFn)."""

    def forward(self, x, input_saved: bool = False):
        return lora_linear(self, x, input_saved)


def _is_lora(m) -> bool:
    return isinstance(m, (lora.Linear, lora.MergedLinear))


def swiglu_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP: gate_up (+LoRA) -> silu(gate)·up -> down (+LoRA), as two fused functions."""
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    gu = gate_up(x)
    four_bit = isinstance(down, quantized.Linear4bit)
    if not ((_is_lora(down) or four_bit) and _fusable(down)):
        gate, up = gu.chunk(2, dim=-1)
        return down(up * F.silu(gate))
    cdt = _compute_dtype(gu)
    with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
        if four_bit:
            y = SwiGLUDown4bitFn.apply(_as_2d(gu).to(cdt), down, down.lora_A, down._lora_B_full(), down.scaling,
                                       _dropout_p(down))
        else:
            A, B = _lora_factors(down)
            y = SwiGLUDownFn.apply(_as_2d(gu).to(cdt), down.weight, down.bias, A, B, down.scaling,
                                   _dropout_p(down))
    return y.view(*x.shape[:-1], y.shape[-1])


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(x, norm.weight, _norm_eps(norm))


def liger_rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Liger's Triton RMSNorm (same math, casting_mode "llama"); phitune's own off CUDA."""
    if not x.is_cuda:
        return rms_norm(norm, x)
    from liger_kernel.transformers.functional import liger_rms_norm as kernel

    eps = getattr(norm, "variance_epsilon", None)
    return kernel(x, norm.weight, norm.eps if eps is None else eps, offset=0.0, casting_mode="llama", in_place=False)


def liger_available() -> bool:
    try:
        from liger_kernel.transformers.functional import liger_rms_norm  # noqa: F401
    except Exception:  # ImportError, or triton failing to load without a GPU
        return False
    return True


def use_liger(model) -> int:
    """Switch the fused RMSNorm modules to a subclass that calls Liger's Triton kernel; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).forward is _norm_forward:
            module.__class__ = _fused_subclass(type(module)._phitune_original_class, _liger_norm_forward, "liger")
            n += 1
    return n


# Norm classes known to compute weight * (x / rms(x)) exactly as RMSNormFn does (not Gemma's (1 + weight)).
_RMSNORM_NAMES = ("Phi3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# MLP classes computing down(act(gate) * up) from a fused gate_up_proj with gate first (modeling_phi3.py).
_FUSED_GATE_UP_MLPS = ("Phi3MLP",)

_subclasses: dict[type, type] = {}


def _fused_subclass(cls: type, forward, tag: str) -> type:
    """A subclass of ``cls`` with ``forward`` replaced (cached per class), remembered for ``uninstall``."""
    sub = _subclasses.get((cls, tag))
    if sub is None:
        sub = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_phitune_original_class": cls,
                                                     "__module__": __name__})
        _subclasses[(cls, tag)] = sub
    return sub


def _mlp_forward(self, x):
    return swiglu_mlp(self, x)


def _norm_forward(self, x):
    return rms_norm(self, x)


def _liger_norm_forward(self, x):
    return liger_rms_norm(self, x)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Phi-3 attention with QKVRopeFn; anything unusual (a cache, eager attention, dropout) takes the original."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    impl = self.config._attn_implementation
    dropout = self.attention_dropout if self.training else 0.0
    if cache is not None or position_embeddings is None or dropout or impl not in ALL_ATTENTION_FUNCTIONS:
        original = type(self)._phitune_original_class.forward
        return original(self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                        **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    cos, sin = position_embeddings
    qkv = self.qkv_proj(hidden_states)
    q, k, v = QKVRopeFn.apply(qkv, cos, sin, self.config.num_attention_heads, self.num_key_value_heads, self.head_dim)
    out, weights = ALL_ATTENTION_FUNCTIONS[impl](self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                                                 sliding_window=getattr(self.config, "sliding_window", None),
                                                 **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1)
    if impl == varlen.NAME and type(self.o_proj) in (FusedLoRALinear, FusedLoRAMergedLinear, FusedLoRALinear4bit,
                                                     FusedLoRAMergedLinear4bit):
        # varlen attention saves its output for backward and ``out`` is a view of it: o_proj can save it too
        return self.o_proj(out, input_saved=True), weights
    return self.o_proj(out), weights


def _norm_eps(norm) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return norm.eps if eps is None else eps


def _plain_norm(norm) -> bool:
    """``norm`` computes RMSNormFn's arithmetic (a known RMSNorm class, its fused subclass; not Liger's)."""
    cls = type(norm)
    return (getattr(cls, "_phitune_original_class", cls).__name__ in _RMSNORM_NAMES and cls.forward in
            (_norm_forward, getattr(cls, "_phitune_original_class", cls).forward)
            and isinstance(getattr(norm, "weight", None), torch.Tensor))


def _decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                           position_embeddings=None, **kwargs):
    """Phi3DecoderLayer.forward with its norms fused to the residual stream (AddRMSNormFn, ResidualRMSNormFn);
    active residual dropout, a norm switched to another kernel or the deprecated ``past_key_values`` take the
    original."""
    dropout = self.training and (self.resid_attn_dropout.p or self.resid_mlp_dropout.p)
    if (dropout or "past_key_values" in kwargs or not _plain_norm(self.input_layernorm)
            or not _plain_norm(self.post_attention_layernorm)):
        original = type(self)._phitune_original_class.forward
        return original(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    norm = self.input_layernorm
    hidden_states, residual = ResidualRMSNormFn.apply(hidden_states, norm.weight, _norm_eps(norm))
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    residual, hidden_states = AddRMSNormFn.apply(hidden_states, residual, norm.weight, _norm_eps(norm))
    return residual + self.mlp(hidden_states)


# Decoder layers whose forward is exactly Phi3DecoderLayer's: norm -> attention -> residual add (after a dropout)
# -> norm -> MLP -> residual add (after a dropout). Matched by exact name: a layer FSDP2 has already sharded (its
# class is then FSDPPhi3DecoderLayer, fsdp.shard_model runs before the fast path) keeps its forward.
_RESIDUAL_NORM_LAYERS = ("Phi3DecoderLayer",)


def _residual_norm_layer(module) -> bool:
    parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    dropouts = [getattr(module, name, None) for name in ("resid_attn_dropout", "resid_mlp_dropout")]
    return (all(hasattr(module, name) for name in parts) and all(_plain_norm(getattr(module, name))
                                                                   for name in parts[::2])
            and all(type(d) is torch.nn.Dropout and d.p == 0 for d in dropouts))


def _rope_attention(module) -> bool:
    cfg = getattr(module, "config", None)
    return (hasattr(module, "qkv_proj") and hasattr(module, "o_proj") and cfg is not None
            and getattr(module, "head_dim", None) and getattr(module, "num_key_value_heads", None))


# Attention classes whose forward is qkv_proj -> split q, k, v -> RoPE (rotate_half, partial rotary) -> kernel
# -> o_proj.
_QKV_ROPE_ATTENTIONS = ("Phi3Attention",)


def install(model, *, lora_layers: bool = True, mlp: bool = True, norms: bool = True,
            attention: bool = True) -> dict[str, int]:
    """Switch matching module instances of ``model`` to their fused subclasses; returns counts per kind."""
    counts = {"lora_linear": 0, "lora_linear_4bit": 0, "swiglu_mlp": 0, "rms_norm": 0, "qkv_rope": 0,
              "add_rms_norm": 0}
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_phitune_original_class", None) is not None:
            continue
        if lora_layers and cls is lora.Linear:
            module.__class__ = FusedLoRALinear
            counts["lora_linear"] += 1
        elif lora_layers and cls is lora.MergedLinear:
            module.__class__ = FusedLoRAMergedLinear
            counts["lora_linear"] += 1
        elif lora_layers and cls in (quantized.Linear4bit, quantized.MergedLinear4bit):
            module.__class__ = FusedLoRALinear4bit if cls is quantized.Linear4bit else FusedLoRAMergedLinear4bit
            counts["lora_linear_4bit"] += 1
        elif mlp and cls.__name__ in _FUSED_GATE_UP_MLPS and _silu_mlp(module):
            module.__class__ = _fused_subclass(cls, _mlp_forward, "mlp")
            counts["swiglu_mlp"] += 1
        elif attention and cls.__name__ in _QKV_ROPE_ATTENTIONS and _rope_attention(module):
            module.__class__ = _fused_subclass(cls, _attention_forward, "attention")
            counts["qkv_rope"] += 1
        elif norms and cls.__name__ in _RESIDUAL_NORM_LAYERS and _residual_norm_layer(module):
            module.__class__ = _fused_subclass(cls, _decoder_layer_forward, "decoder_layer")
            counts["add_rms_norm"] += 1
        elif norms and cls.__name__ in _RMSNORM_NAMES and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.__class__ = _fused_subclass(cls, _norm_forward, "norm")
            counts["rms_norm"] += 1
    return counts


FusedLoRALinear._phitune_original_class = lora.Linear
FusedLoRAMergedLinear._phitune_original_class = lora.MergedLinear
FusedLoRALinear4bit._phitune_original_class = quantized.Linear4bit
FusedLoRAMergedLinear4bit._phitune_original_class = quantized.MergedLinear4bit


def _silu_mlp(module) -> bool:
    act = getattr(module, "activation_fn", None)
    return (isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")) \
        and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")


def uninstall(model) -> int:
    """Restore the original classes of every module ``install`` switched; returns how many."""
    n = 0
    for module in model.modules():
        original = getattr(type(module), "_phitune_original_class", None)
        if original is not None:
            module.__class__ = original
            n += 1
    return n
