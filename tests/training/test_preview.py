"""`phitune preview CONFIG --json`: one JSON object per sample (input_ids, labels, source file:line) on stdout, the
tokens training uses, diffable against any other tool (issue 22 item 4); the same records from Python."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

import phitune

CHATS = [
    [{"role": "user", "content": "Reverse: apple"}, {"role": "assistant", "content": "elppa"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: river"},
     {"role": "assistant", "content": "revir"}, {"role": "user", "content": "And stone?"},
     {"role": "assistant", "content": "enots"}],
    [{"role": "user", "content": "Reverse: cloud"}, {"role": "assistant", "content": "duolc"}],
    [{"role": "user", "content": "Reverse: tiger"}, {"role": "assistant", "content": "regit"}],
]


def _config(tmp_path, model_dir) -> tuple:
    """A config whose train file has a blank line and a bad record between conversations (skipped), so a sample's
    line is not its index; eval is a file of its own. Returns (config path, train path, eval path)."""
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    lines = [json.dumps({"messages": CHATS[0]}), "", json.dumps({"messages": CHATS[1]}),
             json.dumps({"messages": [{"role": "user"}]}),
             json.dumps({"messages": CHATS[2]})]
    train.write_text("\n".join(lines) + "\n")
    eval_.write_text(json.dumps({"messages": CHATS[3]}) + "\n")
    cfg = {"model": {"name_or_path": str(model_dir)},
           "data": {"train": str(train), "eval": str(eval_), "max_seq_length": 128, "on_bad_record": "skip",
                    "cache_dir": str(tmp_path / "cache")},
           "training_config": {"output_dir": str(tmp_path / "out")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, train, eval_


def _expected(model_dir, messages) -> tuple[list[int], list[int]]:
    """Another tool's view of a conversation: `tokenizers` on the model's tokenizer.json over the rendered chat
    (one BOS in front, as phitune trains), and the trained span of each assistant turn found by rendering the chat
    up to it (what a turn-by-turn masker does): from the end of the prompt before it to where the rendering that
    ends with it stops agreeing with the whole chat (a partial chat ends with eos, the whole one goes on)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(msgs, prompt=False):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return [tok.bos_token_id] + raw.encode(text, add_special_tokens=False).ids

    ids = encode(messages)
    labels = [-100] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(encode(messages[:k], prompt=True))
            upto = encode(messages[:k + 1])
            end = next((j for j, (a, b) in enumerate(zip(upto, ids)) if a != b), min(len(upto), len(ids)))
            labels[start:end] = ids[start:end]
    return ids, labels


@pytest.mark.slow  # a phitune process of its own: about 10 s on 2 busy cores, most of it importing torch
def test_preview_json_prints_each_samples_ids_labels_and_file_line_through_the_cli(tiny_model_dir, tmp_path):
    config, train, eval_ = _config(tmp_path, tiny_model_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PHITUNE_DATA_WORKERS": "0"}
    r = subprocess.run([sys.executable, "-m", "phitune", "preview", str(config), "--json"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]  # stdout holds JSON lines only
    assert "train: 4 records" in r.stderr and "1 bad record(s) skipped" in r.stderr  # the statistics go to stderr
    assert [(x["split"], x["index"], x["source"]) for x in records] == [
        ("train", 0, f"{train}:1"), ("train", 1, f"{train}:3"), ("train", 2, f"{train}:5"), ("eval", 0, f"{eval_}:1")]
    for record, messages in zip(records, [CHATS[0], CHATS[1], CHATS[2], CHATS[3]]):
        assert (record["input_ids"], record["labels"]) == _expected(tiny_model_dir, messages), record["source"]

    out = io.StringIO()
    phitune.preview(str(config), n=1, json=True, output=out)  # the Python API: the same lines, n of them per split
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [records[0], records[3]]


def test_preview_records_are_the_samples_training_uses(tiny_model_dir, tmp_path):
    from phitune.config import load_config
    from phitune.data import prepare_data
    from phitune.models.loading import load_tokenizer

    config, _, _ = _config(tmp_path, tiny_model_dir)
    records = list(phitune.preview_records(str(config)))
    run_config = load_config(str(config))
    prepared = prepare_data(run_config.data, load_tokenizer(run_config.model))
    assert prepared.stats["cache"]["hit"]  # the same cache entry preview_records made
    want = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in [*prepared.train, *prepared.eval]]
    assert [{"input_ids": x["input_ids"], "labels": x["labels"]} for x in records] == want


def test_each_samples_source_is_its_own_record_with_eval_split_and_worker_processes(tok, tmp_path, monkeypatch):
    """Records routed to eval by data.eval_split and tokenized in two worker processes still carry their own line."""
    from phitune.data import DataConfig, prepare_data, sample_records

    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "glass", "mouse", "candle"]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Reverse: {w}"},
                                                     {"role": "assistant", "content": w[::-1]}]}) + "\n"
                            for w in words))
    monkeypatch.setenv("PHITUNE_DATA_WORKERS", "2")
    prepared = prepare_data(DataConfig(train=str(data), eval_split=4, cache=False), tok)
    records = list(sample_records(prepared))
    assert [r["split"] for r in records] == ["train"] * 6 + ["eval"] * 4
    lines = [int(r["source"].rsplit(":", 1)[1]) for r in records]
    assert sorted(lines) == list(range(1, 11))
    for record, line in zip(records, lines):
        assert f"Reverse: {words[line - 1]}" in tok.decode(record["input_ids"])
