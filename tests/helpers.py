"""Helpers the tests share (fixtures are in conftest.py): a tiny Phi-3 model folder, tiny chat data, a tiny run
config, a run folder as `phitune train` leaves it, a non-zero adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "glass", "mouse", "candle", "forest", "rocket"]


def write_run_folder(root: Path, tok, model, chats: list, *, eval_split: int, max_seq_length: int):
    """A run folder as `phitune train` leaves it (config, tokenizer, generation config with every end-of-turn id)
    around ``model`` (saved as the base in root/base) and ``chats`` (root/chats.jsonl); the adapter is the caller's.
    Returns (run, base, data, config, end-of-turn ids)."""
    from phitune.config import load_config

    base, data, run = root / "base", root / "chats.jsonl", root / "out"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    config = load_config({
        "model": {"name_or_path": str(base)},
        "data": {"train": str(data), "eval_split": eval_split, "max_seq_length": max_seq_length,
                 "cache_dir": str(root / "cache")},
        "training_config": {"output_dir": str(run), "per_device_eval_batch_size": 2},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    })
    run.mkdir()
    (run / "phitune_config.yaml").write_text(config.to_yaml())
    tok.save_pretrained(run)
    eot = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": eot, "pad_token_id": tok.pad_token_id}))
    return run, base, data, config, eot


def save_nonzero_adapter(model, run: Path, base: Path, peft_config: dict, std: float) -> None:
    """Add LoRA to ``model`` with lora_B drawn from N(0, std) (a fresh adapter is zero, so merged == base would
    prove nothing) and save it into the run folder ``run``."""
    from phitune.adapt import add_lora, save_adapter

    add_lora(model, peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    save_adapter(model, run, base_model_name_or_path=str(base))


def make_tiny_model_dir(folder: Path) -> Path:
    """A 2-layer Phi-3 (hidden 64) with a Phi-3-style tokenizer, saved as safetensors."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.models.tokenizer import build_phi3_style_tokenizer

    tok = build_phi3_style_tokenizer(vocab_size=400)
    cfg = Phi3Config(vocab_size=len(tok) + 5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def make_chat_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    """Conversations asking to spell a word backwards (short, learnable)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            msgs = [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_config(model_dir, chat_files, out, cache_dir=None, **training) -> dict:
    """A run config dict: the tiny model, the tiny data, a few CPU steps."""
    train, eval_ = chat_files
    tc = {"output_dir": str(out), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
          "max_steps": 6, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 1000, "disable_tqdm": True,
          "use_cpu": True, "seed": 0}
    tc.update(training)
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train), "eval": str(eval_), "max_seq_length": 64, "packing": False,
                 "cache": False},
        "training_config": tc,
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }


def losses(out: Path) -> list[tuple[int, float]]:
    """(step, train loss) records of a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


ARITHMETIC_CHATS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"},
     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    for a in range(3) for b in range(4)
]


def tiny_phi3(tokenizer):
    """A 2-layer Phi-3 (hidden 32) sized to ``tokenizer``, seeded."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg)


# The Phi-3 cookbook's configs (shared/specs/phi3.md), as users paste them.
COOKBOOK_TRAINING_CONFIG = {
    "bf16": True,
    "do_eval": False,
    "learning_rate": 5.0e-06,
    "log_level": "info",
    "logging_steps": 20,
    "logging_strategy": "steps",
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,
    "max_steps": -1,
    "output_dir": "./checkpoint_dir",
    "overwrite_output_dir": True,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "remove_unused_columns": True,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.2,
}
COOKBOOK_PEFT_CONFIG = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}


def shared_tokenizers() -> Path | None:
    """The real tokenizer files of ../shared/tokenizers (its README: what, from where, facts measured with them), or
    None where this checkout has no such folder. $PHITUNE_SHARED_TOKENIZERS names another place."""
    import os

    env = os.environ.get("PHITUNE_SHARED_TOKENIZERS")
    candidates = [Path(env)] if env else []
    # a main checkout sits next to shared/; a worktree one level further down (wt/NAME)
    candidates += [ROOT.parent / "shared" / "tokenizers", ROOT.parents[1] / "shared" / "tokenizers"]
    return next((c for c in candidates if (c / "phi-3-mini" / "tokenizer.json").is_file()), None)


# --- chat families: tiny tokenizers with each family's real special tokens and published chat template ------------

# Written from each family's tokenizer_config.json on the Hub (microsoft/phi-4, Qwen/Qwen2-0.5B-Instruct,
# meta-llama/Meta-Llama-3-8B-Instruct, mistralai/Mistral-7B-Instruct-v0.2, google/gemma-2b-it).
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# family -> special tokens (in id order), their roles, the template, the end of an assistant turn as training must
# see it (the end-of-turn token, then what the template closes the conversation with), the model architecture
CHAT_FAMILIES = {
    "phi3": dict(special=None, roles={}, template=None, turn_end="<|end|><|endoftext|>", arch="phi3"),
    "phi4": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"],
                 roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), template=PHI4_TEMPLATE,
                 turn_end="<|im_end|>", arch="phi3"),
    "chatml": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), template=QWEN2_TEMPLATE,
                   turn_end="<|im_end|>", arch="qwen2"),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
                   roles=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), template=LLAMA3_TEMPLATE,
                   turn_end="<|eot_id|>", arch="llama"),
    "mistral": dict(special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    roles=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"), template=MISTRAL_TEMPLATE,
                    turn_end="</s>", arch="llama"),
    "gemma": dict(special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                  roles=dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"),
                  template=GEMMA_TEMPLATE, turn_end="<end_of_turn>", arch="llama"),
}


def family_tokenizer(family: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in a second on phitune's default corpus, with ``family``'s special tokens
    (first ids, in the family's order) and published chat template; Phi-3's is phitune's own builder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from phitune.models.tokenizer import build_phi3_style_tokenizer, default_corpus

    spec = CHAT_FAMILIES[family]
    if spec["special"] is None:
        return build_phi3_style_tokenizer(vocab_size=vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(default_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, clean_up_tokenization_spaces=False,
                                   **spec["roles"])
    fast.chat_template = spec["template"]
    return fast


def family_model(family: str, tokenizer, seed: int = 0):
    """A 2-layer, hidden-64 random model of the family's architecture, from the zoo (tests/zoo.py) at the
    tokenizer's vocabulary, MHA, rope_theta 10,000 (Gemma's template on a Llama body: phitune's GGUF writer has no
    Gemma architecture, and the chat template is what is under test). Initialised with std 0.2, not 0.02: the frozen
    lm_head's rows then have norm 0.2 x 8 = 1.6 against a normalised hidden state of norm 8, so LoRA can reach logits
    of about 13 and memorise answers with a clear margin (at 0.02 the logits cap near 1.3 and the loss stalls
    above 4)."""
    from zoo import build

    zoo_name = {"phi3": "phi3-mini", "qwen2": "qwen2", "llama": "llama"}[CHAT_FAMILIES[family]["arch"]]
    return build(zoo_name, seed, norm_noise=0.0, vocab_size=len(tokenizer), num_key_value_heads=4,
                 max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2, use_cache=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)


def tiny_lora_module():
    """A one-layer module (Linear 4 -> 4) with a rank-2 adapter: the smallest thing checkpoints and optimizers save."""
    from phitune.adapt import add_lora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    model = Tiny()
    add_lora(model, {"r": 2, "lora_alpha": 4, "target_modules": ["proj"]})
    return model


class FixedMask:
    """Replaces the fast path's LoRA dropout mask generator with a pattern fixed by the input's shape, so dropout paths
    can be compared with each other and grad-checked (pytest's ``monkeypatch`` undoes it)."""

    def __init__(self, monkeypatch):
        from phitune.training.fast import lora_autograd

        monkeypatch.setattr(lora_autograd, "_dropout_mask", self)  # the 4-bit base's functions draw theirs there too

    def __call__(self, x, p):
        if p <= 0:
            return None
        g = torch.Generator().manual_seed(x.shape[-1])
        return (torch.rand(x.shape, generator=g) >= p).to(x.device)


def child_json(command: list[str], env: dict | None = None, timeout: int = 600):
    """Run ``command`` (a child Python process: a fake CUDA device, a real Triton compile), fail with the end of its
    stderr when it fails, and return the JSON of its last stdout line."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compiled_for_sm90(script: str):
    """``script`` (Python source) run where Triton compiles for real (no interpreter): its JSON report. Triton
    compiles for an H100 without one; skipped where Triton has no NVIDIA backend."""
    import pytest

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return child_json([sys.executable, "-c", script], env=env, timeout=300)
