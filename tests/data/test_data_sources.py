"""phitune.data sources, formats and validation: every source kind, every format, every bad-input rule."""

import json

import pytest

from phitune.data import DataConfig, prepare_data
from phitune.errors import ConfigError, DataError
from phitune.models.tokenizer import build_phi3_style_tokenizer

MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def prep(tok, tmp_path, train, **kw):
    return prepare_data(DataConfig(train=train, cache_dir=str(tmp_path / "cache"), max_seq_length=128, **kw), tok)


def reference(tok, tmp_path):
    return prep(tok, tmp_path, [{"messages": MSGS}]).train[0]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


# -- sources -----------------------------------------------------------------------------------------------------
def test_every_local_source_gives_the_same_tokens(tok, tmp_path):
    import datasets
    import pandas as pd

    ref = reference(tok, tmp_path)
    recs = [{"messages": MSGS}] * 2
    flat = [{"prompt": "Hi", "completion": "Hello!"}] * 2
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pd.DataFrame(flat).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(flat).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "disk"))
    sources = [write_jsonl(tmp_path / "a.jsonl", recs), str(tmp_path / "a.json"), str(tmp_path / "a.csv"),
               str(tmp_path / "a.parquet"), str(tmp_path / "disk"), recs, datasets.Dataset.from_list(recs),
               datasets.DatasetDict({"train": datasets.Dataset.from_list(flat)})]
    for src in sources:
        p = prep(tok, tmp_path, src)
        assert len(p.train) == 2 and p.train[1] == ref, src


def test_hub_dataset_offline_is_a_clear_error(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"could not load Hub dataset 'someone/no-such-chats'.*save_to_disk"):
        prep(tok, tmp_path, "someone/no-such-chats")


def test_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        prep(tok, tmp_path, str(tmp_path / "nope.jsonl"))


# -- formats -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rec,fmt", [
    ({"messages": MSGS}, "messages"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}, "conversations"),
    ({"instruction": "Hi", "input": "", "output": "Hello!"}, "alpaca"),
    ({"prompt": "Hi", "completion": "Hello!"}, "prompt_completion"),
    ({"prompt": [MSGS[0]], "completion": [MSGS[1]]}, "prompt_completion"),
])
def test_formats_detected_and_identical(tok, tmp_path, rec, fmt):
    p = prep(tok, tmp_path, [rec])
    assert p.stats["train"]["format"] == fmt
    assert p.train[0] == reference(tok, tmp_path)


def test_alpaca_input_and_system_and_custom_columns(tok, tmp_path):
    p = prep(tok, tmp_path, [{"instruction": "Add", "input": "1 2", "output": "3", "system": "Math."}])
    assert tok.decode(p.train[0]["input_ids"]) == ("<s><|system|>Math.<|end|><|user|>Add\n\n1 2<|end|>"
                                                   "<|assistant|>3<|end|><|endoftext|>")
    chat = [{"speaker": "user", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"}]
    p = prep(tok, tmp_path, [{"dialog": chat}], format="messages",
             columns={"messages": "dialog", "role": "speaker", "content": "text"}, role_map={"bot": "assistant"})
    assert p.train[0] == reference(tok, tmp_path)


def test_text_format_trains_everything(tok, tmp_path):
    s = prep(tok, tmp_path, [{"text": "Hello world"}]).train[0]
    assert s["input_ids"] == [tok.bos_token_id] + tok("Hello world", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert s["labels"] == [-100] + s["input_ids"][1:]


def test_config_rejects_unknown_keys_and_values():
    from phitune._typed import from_dict

    with pytest.raises(ConfigError, match="did you mean 'max_seq_length'"):
        from_dict(DataConfig, {"train": "x.jsonl", "max_seq_len": 10}, "data")
    with pytest.raises(ConfigError, match="train_on"):
        from_dict(DataConfig, {"train_on": "assistants"}, "data")
    with pytest.raises(ConfigError, match="did you mean 'messages'"):
        DataConfig(columns={"mesages": "x"})
    with pytest.raises(ConfigError, match="either eval"):
        DataConfig(train="a", eval="b", eval_split=0.1)
    assert DataConfig.from_any("x.jsonl").train == "x.jsonl"


# -- validation --------------------------------------------------------------------------------------------------
BAD = [
    ({"messages": [{"role": "bot", "content": "x"}, MSGS[1]]}, "unknown role", "data.role_map"),
    ({"messages": [MSGS[0], {"role": "assistant", "content": ""}]}, "empty content", "message 1"),
    ({"messages": [MSGS[0], {"role": "assistant", "content": 3}]}, "non-string content", "message 1"),
    ({"messages": [MSGS[0]]}, "no assistant turn", "train_on: all"),
    ({"messages": []}, "empty conversation", "remove the record"),
    ({"messages": "nope"}, "invalid JSON", "list of"),
    ({"messages": [MSGS[0], {"role": "assistant"}]}, "bad message", "message 1"),
    ({"chat": MSGS}, "missing field", "'messages'"),
    ([1, 2], "not an object", "object"),
]


@pytest.mark.parametrize("bad,reason,fix", BAD, ids=[b[1] for b in BAD])
def test_each_validation_rule_names_file_line_problem_fix(tok, tmp_path, bad, reason, fix):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSGS}, bad, {"messages": MSGS}])
    with pytest.raises(DataError) as e:
        prep(tok, tmp_path, f)
    msg = str(e.value)
    assert f"d.jsonl:2: {reason}" in msg and "Fix:" in msg and fix in msg, msg
    assert "1 bad record(s) of 3" in msg


def test_alternation_checked_when_the_template_requires_it(tok, tmp_path):
    t = build_phi3_style_tokenizer()
    t.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                       "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] + ': ' + m['content'] + "
                       "'<|end|>' }}{% endfor %}{{ eos_token }}")
    chat = [MSGS[0], MSGS[0], MSGS[1]]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSGS}, {"messages": chat}])
    with pytest.raises(DataError, match=r"d.jsonl:2: roles do not alternate: message 1 is 'user'"):
        prep(t, tmp_path, f)
    assert len(prep(tok, tmp_path, f).train) == 2  # Phi-3's template accepts it


def test_skip_mode_reports_counts_by_reason(tok, tmp_path):
    recs = [{"messages": MSGS}] * 3 + [b for b, _, _ in BAD[:4]] + [{"messages": [{"role": "bot", "content": "x"}]}]
    p = prep(tok, tmp_path, write_jsonl(tmp_path / "d.jsonl", recs), on_bad_record="skip")
    st = p.stats["train"]
    assert len(p.train) == 3 and st["bad_records"] == 5 and st["records"] == 8
    assert st["bad_by_reason"] == {"unknown role": 2, "empty content": 1, "non-string content": 1,
                                   "no assistant turn": 1}
    assert st["bad_examples"][0].startswith(str(tmp_path / "d.jsonl").split("/")[-1]) or "d.jsonl:4" in \
        st["bad_examples"][0]


def test_error_summary_shows_first_n_and_total(tok, tmp_path):
    recs = [{"messages": [MSGS[0]]}] * 30 + [{"messages": MSGS}]
    with pytest.raises(DataError) as e:
        prep(tok, tmp_path, write_jsonl(tmp_path / "d.jsonl", recs), max_errors_shown=5)
    msg = str(e.value)
    assert "30 bad record(s) of 31 (first 5 shown)" in msg and "... and 25 more" in msg
    assert "d.jsonl:5:" in msg and "d.jsonl:6:" not in msg and "no assistant turn: 30" in msg


def test_truncated_final_json_line(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": MSGS}) + "\n" + json.dumps({"messages": MSGS})[:25])
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON: .*last line looks cut off.*truncated"):
        prep(tok, tmp_path, str(f))


def test_invalid_json_in_the_middle(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": MSGS}) + "\n{'messages': 1}\n" + json.dumps({"messages": MSGS}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON: .*column 2"):
        prep(tok, tmp_path, str(f))


def test_non_utf8_byte(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(json.dumps({"messages": MSGS}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8: byte 0xe9 at column 14.*iconv"):
        prep(tok, tmp_path, str(f))
    c = tmp_path / "d.csv"
    c.write_bytes(b"prompt,completion\nHi,Hello!\ncaf\xe9,x\n")
    with pytest.raises(DataError, match=r"d.csv:3: not UTF-8"):
        prep(tok, tmp_path, str(c))


def test_empty_file(tok, tmp_path):
    for name in ("e.jsonl", "e.csv", "e.json"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=rf"{name}: the file is empty"):
            prep(tok, tmp_path, str(tmp_path / name))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl: no records"):
        prep(tok, tmp_path, str(tmp_path / "blank.jsonl"))


def test_csv_with_a_missing_column(tok, tmp_path):
    c = tmp_path / "d.csv"
    c.write_text("prompt,answer\nHi,Hello!\n")
    with pytest.raises(DataError) as e:
        prep(tok, tmp_path, str(c), format="prompt_completion")
    msg = str(e.value)
    assert "d.csv:2: missing field: no 'completion' field" in msg and "data.columns" in msg
    assert len(prep(tok, tmp_path, str(c), columns={"completion": "answer"}).train) == 1
    with pytest.raises(DataError, match=r"d.csv:2: cannot detect the record format from its keys"):
        prep(tok, tmp_path, str(c))
