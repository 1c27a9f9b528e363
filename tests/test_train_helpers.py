"""Shared pieces of the training tests: a tiny Phi-3 model folder, tiny chat data, a tiny run config.

Other test modules import the fixtures from here (``from test_train_helpers import tiny_model_dir, ...``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chat-data")
    return make_chat_data(d / "train.jsonl", 32, seed=0), make_chat_data(d / "eval.jsonl", 8, seed=1)


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


def test_tiny_model_loads(tiny_model_dir):
    from phitune.config import ModelConfig
    from phitune.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)), device="cpu")
    assert model.config.use_cache is False
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert model.dtype == torch.float32
