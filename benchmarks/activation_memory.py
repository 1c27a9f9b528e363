"""Memory kept for backward, without a GPU: the bytes of every tensor autograd saves during one forward pass, for
the peer's LoRA step (HF Phi-3 + peft, bf16 autocast as the Trainer's bf16=True, loss from full logits) and for
phitune's fast path (bf16 base, float32 adapters, chunked loss), at the Phi-3-mini width.

With gradient checkpointing, the count is derived: each layer keeps its input (bf16 hidden states), plus one
layer's full set while it is recomputed. Saved tensors are counted through torch.autograd.graph.saved_tensors_hooks,
once per storage (views of one buffer
count once); the model's parameters are not counted (they are the weights). The model is built with 1 and 2 decoder
layers, each at --tokens and half as many: "per layer" is the difference between the layer counts and "head"
(embedding, final norm, lm_head and loss) the rest, and each is fitted as fixed bytes (e.g. casts of LoRA weights)
plus bytes per token, then extended to the issue's batch x 2048 tokens (the attention kernels used here keep no
T x T matrix, so saved bytes are linear in tokens) and to 32 layers. Transient memory inside backward (the largest
single layer's gradient temporaries) and allocator slack are not in this count; weights are listed beside it.

Counting happens on the CPU in bf16 with sdpa (its flash kernel saves output + logsumexp, as the CUDA one does), so
it estimates what a GPU run keeps; the GPU's own peak is what benchmarks/gpu_run.sh measures.

  python benchmarks/activation_memory.py                      # batch 4 and 8 x 2048, Phi-3-mini width
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GIB = 2**30


# --smoke's model width (a tiny Phi-3), in place of Phi-3-mini's 3072 / 8192 / 32064
SMOKE_WIDTH = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 256, "num_attention_heads": 4,
               "num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def build(kind: str, layers: int, tokens: int, width: dict | None = None):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(num_hidden_layers=layers, use_cache=False, **(width or {}))  # default: Phi-3-mini width
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    if kind == "peer":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora, bias="none", target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(input_ids=ids, labels=ids).loss
    else:
        from phitune.adapt import add_lora
        from phitune.training.loss import apply_fast_path, forward_loss

        add_lora(model, {**lora, "target_modules": "all-linear"}, lora_dtype=torch.float32)
        fast = apply_fast_path(model, {"fast_path": "auto"})
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(tokens)[None]}

        def forward():
            out = forward_loss(model, batch, fast=fast)
            return out.loss_sum / out.n_tokens
    model.train()
    return model, forward


def saved_bytes(kind: str, layers: int, tokens: int, width: dict | None = None) -> int:
    model, forward = build(kind, layers, tokens, width)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64,
                   help="tokens of the larger counted forward pass (kept small: on an AVX2 CPU the bf16 "
                        "lm_head gradient matmul takes about a second per token)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", default="4,8")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the full model (Phi-3-mini: 32)")
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = p.parse_args(argv)
    if a.smoke:  # explicit arguments still win; a tiny width instead of Phi-3-mini's
        p.set_defaults(tokens=16, seq=64, batches="1", layers=2)
        a = p.parse_args(argv)
    from transformers import Phi3Config

    width = SMOKE_WIDTH if a.smoke else None
    cfg = Phi3Config(**(width or {}))
    H, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, a.layers  # F: the MLP's intermediate width
    weights = (2 * V * H + L * (H * 3 * H + H * H + H * 2 * F + F * H + 2 * H) + H) * 2  # bf16
    lora = L * 16 * ((H + 3 * H) + (H + H) + (H + 2 * F) + (F + H)) * 4  # float32 A and B
    t1, t2 = a.tokens // 2, a.tokens
    for kind in ("peer", "phitune"):
        s = {(n, t): saved_bytes(kind, n, t, width) for n in (1, 2) for t in (t1, t2)}

        def fit(f):  # bytes = fixed + per_token * tokens, from the two token counts
            per_token = (f(t2) - f(t1)) / (t2 - t1)
            return f(t1) - per_token * t1, per_token

        layer = fit(lambda t: s[2, t] - s[1, t])  # one decoder layer
        head = fit(lambda t: 2 * s[1, t] - s[2, t])  # embedding, final norm, lm_head, loss
        for b in (int(x) for x in a.batches.split(",")):
            n = b * a.seq
            per_layer, rest = layer[0] + layer[1] * n, head[0] + head[1] * n
            # with gradient checkpointing each layer keeps only its input (bf16 hidden states); the layer being
            # recomputed holds its full set again, and the head's tensors are outside the checkpoints
            for ckpt, kept in ((False, per_layer * L), (True, H * 2 * n * L + per_layer)):
                act = kept + rest
                row = {"run": kind, "gradient_checkpointing": ckpt, "batch": b, "seq": a.seq,
                       "saved_per_layer_gib": round(per_layer / GIB, 3), "saved_head_gib": round(rest / GIB, 3),
                       "saved_total_gib": round(act / GIB, 2), "weights_gib": round(weights / GIB, 2),
                       "lora_weights_grads_adam_gib": round(4 * lora / GIB, 2),
                       "weights_plus_saved_gib": round((weights + 4 * lora + act) / GIB, 2)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
