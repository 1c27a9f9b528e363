"""Tokenization exactly as the model's own tokenizer.json defines it (issue 22 item 2), on Phi-3-mini's real files:
the same ids as ``tokenizers.Tokenizer.from_file`` whatever class transformers picks for the folder, with and without
a config.json beside it, in the loader, a reopened run folder and the data pipeline."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from helpers import shared_tokenizers

from phitune.config import build_model_config, load_config
from phitune.data import prepare_data
from phitune.models.loading import load_tokenizer
from phitune.runs.folder import load_run_tokenizer

SHARED = shared_tokenizers()
pytestmark = pytest.mark.skipif(SHARED is None, reason="../shared/tokenizers is not here (set "
                                "PHITUNE_SHARED_TOKENIZERS to its path)")

CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": " Hello world"}],
    [{"role": "user", "content": "Name  two   colours.\n- one"}, {"role": "assistant", "content": "Red and blue."},
     {"role": "user", "content": "Äpfel? 🦙 3333"}, {"role": "assistant", "content": "\tNein.\n\n"}],
]


def _phi3_folder(tmp_path, config_json: bool):
    """Phi-3-mini's tokenizer files in a folder of their own, with or without a model config.json (the layout of a
    real model folder or Hub snapshot: AutoTokenizer then picks another class)."""
    folder = tmp_path / ("model" if config_json else "tokenizer-only")
    shutil.copytree(SHARED / "phi-3-mini", folder)
    if config_json:
        from transformers import Phi3Config

        Phi3Config().save_pretrained(folder)
    return folder


def _shipped(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("config_json", [False, True], ids=["tokenizer-only", "with-config.json"])
def test_a_phi3_folder_encodes_chats_spaces_and_special_tokens_as_its_tokenizer_json(config_json, tmp_path, caplog):
    folder = _phi3_folder(tmp_path, config_json)
    shipped = _shipped(folder)
    with caplog.at_level(logging.INFO, logger="phitune"):
        tok = load_tokenizer(build_model_config(str(folder)))
    assert f"tokenizer {folder}: TokenizersBackend" in caplog.text  # the class used is logged
    # Microsoft's expected ids (../shared/tokenizers/README.md): "▁Hello" after a chat token, "▁" before " Hello"
    assert tok("<|user|>\nHello", add_special_tokens=False)["input_ids"] == [32010, 15043]
    assert tok(" Hello world", add_special_tokens=False)["input_ids"] == [29871, 15043, 3186]
    for messages in CHATS:
        for prompt in (False, True):
            text = tok.apply_chat_template(messages[:-1] if prompt else messages, tokenize=False,
                                           add_generation_prompt=prompt)
            assert tok(text, add_special_tokens=False)["input_ids"] == shipped.encode(text,
                                                                                      add_special_tokens=False).ids
    added = shipped.get_added_tokens_decoder()
    assert len(added) == 14
    for i, token in added.items():
        assert tok(token.content, add_special_tokens=False)["input_ids"] == [i], token.content
        assert tok.convert_ids_to_tokens(i) == token.content


@pytest.mark.parametrize("config_json", [False, True], ids=["tokenizer-only", "with-config.json"])
def test_llama_cpps_46_phi3_reference_texts_all_tokenize_as_in_its_out_file(config_json, tmp_path):
    ref = SHARED / "llama.cpp-phi-3" / "ggml-vocab-phi-3.gguf"
    texts = ref.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(i) for i in line.split()] for line in ref.with_suffix(".gguf.out").read_text().split("\n")[:-1]]
    assert len(texts) == len(want) == 46
    tok = load_tokenizer(build_model_config(str(_phi3_folder(tmp_path, config_json))))
    got = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert [i for i, (g, w) in enumerate(zip(got, want)) if g != w] == []


def _write_chats(path, chats) -> None:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats), encoding="utf-8")


def test_a_run_folder_holding_phi3_files_reopens_with_the_tokenizer_json_ids(tmp_path):
    run = _phi3_folder(tmp_path, config_json=False)
    _write_chats(tmp_path / "chats.jsonl", CHATS)
    config = load_config({"model": {"name_or_path": str(run)}, "data": {"train": str(tmp_path / "chats.jsonl")},
                          "training_config": {"output_dir": str(run)}})
    (run / "phitune_config.yaml").write_text(config.to_yaml())
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # opening the folder needs them; not read here
        (run / name).write_text("{}")
    tok = load_run_tokenizer(run)
    assert tok("<|assistant|>\nHello", add_special_tokens=False)["input_ids"] == [32001, 15043]


def test_training_data_is_tokenized_as_tokenizer_json_and_old_caches_are_not_reused(tmp_path):
    """The samples phitune trains on are tokenizer.json's ids of the rendered chat (after one BOS); data cached by the
    old LlamaTokenizer route (the same files, the same data) has another key and is not read back."""
    from transformers import AutoTokenizer

    folder = _phi3_folder(tmp_path, config_json=False)
    _write_chats(tmp_path / "chats.jsonl", CHATS)
    data = {"train": str(tmp_path / "chats.jsonl"), "max_seq_length": 256, "cache_dir": str(tmp_path / "cache")}

    old = AutoTokenizer.from_pretrained(folder)  # what phitune loaded before: the rebuilt LlamaTokenizer
    assert type(old).__name__ == "LlamaTokenizer"
    before = prepare_data(data, old)
    assert not before.stats["cache"]["hit"] and prepare_data(data, old).stats["cache"]["hit"]  # the cache works

    tok = load_tokenizer(build_model_config(str(folder)))
    after = prepare_data(data, tok)
    assert not after.stats["cache"]["hit"] and after.stats["cache"]["key"] != before.stats["cache"]["key"]
    shipped = _shipped(folder)
    for i, messages in enumerate(CHATS):
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = after.train[i]["input_ids"]
        assert ids == [tok.bos_token_id] + shipped.encode(text, add_special_tokens=False).ids
        assert ids != before.train[i]["input_ids"]  # the old cache held other ids: reusing it would be wrong
