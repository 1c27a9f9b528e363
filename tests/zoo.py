"""The model zoo the tests run phitune on: one tiny random model per architecture family phitune supports.

Each entry keeps what makes its family different from Phi-3-mini (the thing a fast path or an adapter could get
wrong), at hidden 64, 2 layers, head_dim 16, vocabulary 128, so a forward and backward take milliseconds:

  phi3-mini       Phi-3-mini: MHA, fused qkv_proj and gate_up_proj
  phi3-medium     Phi-3-medium: GQA (4 query heads, 2 kv heads); a sliding window (2047 in the real 4k model)
  phi3-longrope   Phi-3-*-128k: rope type longrope with short and long factors; samples longer than
                  original_max_position_embeddings (16 here) switch to the long factors and attention scaling
  phi4-mini       Phi-4-mini: partial_rotary_factor 0.75 (12 of 16 head dims rotated), tied embeddings, GQA
  llama           Llama: separate q/k/v and gate/up projections, rope_theta 500000 (Llama 3)
  qwen2           Qwen2: biases on q/k/v, GQA
  mistral         Mistral: GQA and a sliding window (8 here) shorter than the test samples
  gemma           Gemma: (1 + w) RMSNorm, GeGLU MLP (tanh GELU), embeddings scaled by sqrt(hidden), MQA, tied

Use ``build(name)`` (a seeded model, sdpa attention, in train mode like phitune's training), or ``config(name)`` for
the configuration alone. Importable from any test as ``from zoo import ZOO, build`` (tests/ is on sys.path, as for
helpers.py).
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
# Shared shape: 64 = 4 heads x 16 dims; pad/bos/eos are the first ids so test data can draw from [3, VOCAB).
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
# longrope: one factor per rotated frequency (head_dim / 2 = 8), long ones larger, as in Phi-3-mini-128k.
_SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8]
_LONG = [1.0, 1.3, 1.8, 2.5, 3.5, 5.0, 7.0, 10.0]
LONGROPE_ORIGINAL = 16  # original_max_position_embeddings of phi3-longrope: longer samples use the long factors

# name -> (config class, model class, config arguments beyond _COMMON)
ZOO: dict[str, tuple[str, str, dict]] = {
    "phi3-mini": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4)),
    "phi3-medium": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, sliding_window=12)),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=4, original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_scaling={"type": "longrope", "short_factor": _SHORT, "long_factor": _LONG})),  # as config.json has it
    "phi4-mini": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, partial_rotary_factor=0.75,
                                                        tie_word_embeddings=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4,
                                                      rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 500000.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16,
                                                      hidden_act="gelu_pytorch_tanh")),
}


def config(name: str, **overrides):
    """The transformers config of zoo entry ``name`` (``overrides`` replace any argument)."""
    config_cls, _, extra = ZOO[name]
    return getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})


def build(name: str, seed: int = 0, *, norm_noise: float = 0.1, attn_implementation: str = "sdpa", **overrides):
    """A seeded random model of zoo entry ``name``. ``norm_noise``: the norm weights get N(0, norm_noise) added to
    their initial value (ones, or zeros for Gemma's 1 + w), so code that mixes up the two norm forms, or drops the
    weight, changes the numbers."""
    _, model_cls, _ = ZOO[name]
    cfg = config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation=attn_implementation)
    if norm_noise:
        with torch.no_grad():
            for module_name, module in model.named_modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.add_(torch.randn_like(module.weight), alpha=norm_noise)
    return model.train()
