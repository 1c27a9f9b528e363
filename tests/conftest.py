"""Fixtures shared by the whole suite: Phi-3-style tokenizers, a tiny Phi-3 model folder, tiny chat data, a run
folder on a tiny Phi-3. Plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the fast path's Triton kernels run through Triton's interpreter (tests/training/fast/kernels/). Triton
# reads this when it decorates a function, its own tl.sum & co. included, and anything that imports
# torch.utils.flop_counter imports Triton: so here, before any test module imports phitune.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import (ARITHMETIC_CHATS, make_chat_data, make_tiny_model_dir, save_nonzero_adapter, tiny_phi3,
                     write_run_folder)


@pytest.fixture(scope="session")
def tok():
    """The Phi-3-style tokenizer at its default vocabulary (phitune.models.tokenizer)."""
    from phitune.models.tokenizer import build_phi3_style_tokenizer

    return build_phi3_style_tokenizer()


@pytest.fixture(scope="session")
def small_tok():
    """The Phi-3-style tokenizer with a 300-token vocabulary, for the smallest models."""
    from phitune.models.tokenizer import build_phi3_style_tokenizer

    return build_phi3_style_tokenizer(vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chat-data")
    return make_chat_data(d / "train.jsonl", 32, seed=0), make_chat_data(d / "eval.jsonl", 8, seed=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `phitune train` leaves it, on a tiny Phi-3 with a non-zero adapter (arithmetic chats)."""
    from phitune.models.tokenizer import build_phi3_style_tokenizer

    root = tmp_path_factory.mktemp("run")
    tok = build_phi3_style_tokenizer(vocab_size=300)
    model = tiny_phi3(tok)
    run, base, data, _, _ = write_run_folder(root, tok, model, ARITHMETIC_CHATS, eval_split=4, max_seq_length=64)
    save_nonzero_adapter(model, run, base, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, std=0.5)
    model.eval()
    return {"run": run, "base": base, "model": model, "tokenizer": tok, "data": data, "root": root}
