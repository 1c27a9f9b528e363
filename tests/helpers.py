"""Helpers the tests share (fixtures are in conftest.py): a tiny Phi-3 model folder, tiny chat data, a tiny run
config, a run folder as `phitune train` leaves it, a non-zero adapter.
"""

from __future__ import annotations

import json
import random
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
