"""phitune.data: exact token ids and loss masks with the Phi-3-style tokenizer; truncation; cache; preview."""

import json

import numpy as np
import pytest

from phitune.data import DataConfig, format_stats, prepare_data, preview_text
from phitune.errors import DataError
from phitune.models.tokenizer import build_phi3_style_tokenizer

CHAT = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How are you?"},
    {"role": "user", "content": "Fine, thanks"},
    {"role": "assistant", "content": "Good to hear."},
]


def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def ids_of(tok, *names):
    return tok.convert_tokens_to_ids(list(names))


def prep(tok, tmp_path, train, **kw):
    kw.setdefault("max_seq_length", 256)
    return prepare_data(DataConfig(train=train, cache_dir=str(tmp_path / "cache"), **kw), tok)


def expected(tok, chat, trained_roles):
    """Ids and labels built piece by piece: <s>, then per message role token + content + <|end|>, then eos."""
    bos, sys_, user, asst, end, eos = ids_of(tok, "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                             "<|endoftext|>")
    role_tok = {"system": sys_, "user": user, "assistant": asst}
    ids, lab = [bos], [-100]
    for k, m in enumerate(chat):
        body = enc(tok, m["content"]) + [end]
        ids += [role_tok[m["role"]]] + body
        lab += [-100] + (body if k in trained_roles else [-100] * len(body))
    ids.append(eos)
    lab.append(eos if len(chat) - 1 in trained_roles else -100)
    return ids, lab


def test_multi_turn_with_system_exact_ids(tok, tmp_path):
    p = prep(tok, tmp_path, [{"messages": CHAT}])
    s = p.train[0]
    want_ids, want_labels = expected(tok, CHAT, {2, 4})
    assert s["input_ids"] == want_ids
    assert s["labels"] == want_labels
    # the same ids the tokenizer's own template gives (plus the one BOS)
    assert s["input_ids"][1:] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    end, eos = ids_of(tok, "<|end|>", "<|endoftext|>")
    trained = [i for i, label in zip(s["input_ids"], s["labels"]) if label != -100]
    assert trained.count(end) == 2 and trained[-1] == eos  # every assistant <|end|> and the final eos
    assert s["input_ids"].count(tok.bos_token_id) == 1 and s["input_ids"][0] == tok.bos_token_id


def test_train_on_modes(tok, tmp_path):
    last = prep(tok, tmp_path, [{"messages": CHAT}], train_on="last_assistant").train[0]
    assert last["labels"] == expected(tok, CHAT, {4})[1]
    every = prep(tok, tmp_path, [{"messages": CHAT}], train_on="all").train[0]
    assert every["labels"] == [-100] + every["input_ids"][1:]


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_exactly_one_bos_whatever_the_tokenizer_or_template_does(tmp_path, add_bos_token):
    t = build_phi3_style_tokenizer(add_bos_token=add_bos_token)
    t.chat_template = "{{ bos_token }}{{ bos_token }}" + t.chat_template  # a template that writes BOS itself, twice
    s = prep(t, tmp_path, [{"messages": CHAT}]).train[0]
    assert s["input_ids"][0] == t.bos_token_id and s["input_ids"].count(t.bos_token_id) == 1
    s2 = prep(t, tmp_path, [{"messages": CHAT}], add_bos=False).train[0]
    assert s2["input_ids"][0] != t.bos_token_id or s2["input_ids"][1] == t.bos_token_id


def test_content_that_looks_like_markup_is_not_trusted(tok, tmp_path):
    # an assistant reply containing the text of another turn's markers: the mask comes from the template structure
    chat = [{"role": "user", "content": "Say <|assistant|> please"}, {"role": "assistant", "content": "ok <|user|>"}]
    s = prep(tok, tmp_path, [{"messages": chat}]).train[0]
    ids, labels = np.array(s["input_ids"]), np.array(s["labels"])
    user_tok, asst_tok = ids_of(tok, "<|user|>", "<|assistant|>")
    first_asst = int(np.flatnonzero(ids == asst_tok)[1])  # the template's <|assistant|> (the 1st is in the user text)
    assert (labels[: first_asst + 1] == -100).all() and (labels[first_asst + 1:] != -100).all()


def test_truncation_drops_oldest_turns_first(tok, tmp_path):
    long_chat = [{"role": "system", "content": "S."}]
    for k in range(6):
        long_chat += [{"role": "user", "content": f"question {k} " * 6}, {"role": "assistant", "content": f"a{k}."}]
    full = len(prep(tok, tmp_path, [{"messages": long_chat}], max_seq_length=1024).train[0]["input_ids"])
    p = prep(tok, tmp_path, [{"messages": long_chat}], max_seq_length=full // 2)
    s = p.train[0]
    assert len(s["input_ids"]) <= full // 2
    st = p.stats["train"]
    assert st["truncated"] == 1 and st["turns_dropped"] >= 2 and st["answer_truncated"] == 0
    sys_tok = ids_of(tok, "<|system|>")[0]
    assert s["input_ids"][1] == sys_tok  # system prompt kept
    assert s["labels"][-1] == tok.eos_token_id  # the last answer and eos survive
    text = tok.decode(s["input_ids"])
    assert "a5." in text and "question 0" not in text


def test_a_sample_that_would_lose_its_question_is_dropped_and_counted(tok, tmp_path):
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]
    p = prep(tok, tmp_path, [{"messages": CHAT}, {"messages": long_answer}], max_seq_length=32)
    st = p.stats["train"]
    assert len(p.train) == 1 and st["samples"] == 1
    assert st["dropped"] == {"lost_assistant_header": 1} and st["over_max_seq_length"] == 2  # CHAT: turns dropped
    assert st["truncated"] == 1 and st["truncated_parts"]["older turns"] == 1
    assert st["dropped_examples"][0].startswith("data.train item 1 (")
    assert st["fit_max_seq_length"]["100%"] == len(expected(tok, long_answer, {1})[0])


def test_too_long_text_is_cut_at_the_end_and_counted(tok, tmp_path):
    p = prep(tok, tmp_path, [{"text": "word " * 200}], max_seq_length=32)
    assert len(p.train[0]["input_ids"]) == 32 and p.stats["train"]["answer_truncated"] == 1
    assert p.stats["train"]["truncated_parts"]["answer"] == 1 and p.stats["train"]["tag_tokens_cut"] == 1  # eos


def test_samples_without_supervised_tokens_are_dropped_and_counted(tok, tmp_path):
    chat = [{"role": "user", "content": "q " * 100}, {"role": "assistant", "content": "yes"}]
    p = prep(tok, tmp_path, [{"messages": CHAT}, {"messages": chat}], max_seq_length=64, train_on="all")
    assert len(p.train) == 2  # train_on all keeps something
    with pytest.raises(DataError, match=r"no sample is left to train on \(truncation would cut off the assistant "
                       r"header.*: 1\). .*max_seq_length \(51 fits every sample\)"):
        prep(tok, tmp_path, [{"messages": CHAT}], max_seq_length=8)


def test_cache_is_reused_without_retokenizing(tok, tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(3)) + "\n")
    p1 = prep(tok, tmp_path, str(f))
    assert p1.stats["cache"]["hit"] is False
    from phitune.data import render

    def boom(*a, **k):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(render.Renderer, "encode_chunk", boom)
    p2 = prep(tok, tmp_path, str(f))
    assert p2.stats["cache"]["hit"] is True and p2.train[2] == p1.train[2]
    with pytest.raises(AssertionError, match="re-tokenized"):  # another option -> another key
        prep(tok, tmp_path, str(f), train_on="all")
    import os
    import time

    time.sleep(0.01)
    f.write_text(f.read_text() + json.dumps({"messages": CHAT}) + "\n")
    os.utime(f)
    with pytest.raises(AssertionError, match="re-tokenized"):  # the file changed
        prep(tok, tmp_path, str(f))


def test_a_failed_cache_write_leaves_no_folder_and_a_full_disk_says_which_key_to_change(tok, tmp_path, monkeypatch):
    import errno

    from phitune.data import prepare
    from phitune.errors import StorageError

    with pytest.raises(DataError, match="no sample is left to train on"):
        prep(tok, tmp_path, [{"messages": CHAT}], max_seq_length=8)
    assert list((tmp_path / "cache").iterdir()) == []  # neither a cache folder nor its staging sibling

    def full_disk(stats, cfg):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare, "_check_truncation", full_disk)
    with pytest.raises(StorageError, match=r"cannot write the data cache: the disk is full.*Fix: free space or set "
                                           r"data.cache_dir elsewhere"):
        prep(tok, tmp_path, [{"messages": CHAT}])
    assert list((tmp_path / "cache").iterdir()) == []


def test_eval_split_is_deterministic(tok, tmp_path):
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    a = prep(tok, tmp_path / "a", recs, eval_split=0.25)
    b = prep(tok, tmp_path / "b", recs, eval_split=0.25)
    assert len(a.eval) == 5 and len(a.train) == 15
    assert [a.eval[i] for i in range(5)] == [b.eval[i] for i in range(5)]
    c = prep(tok, tmp_path / "c", recs, eval_split=3, seed=1)
    assert len(c.eval) == 3
    e = prep(tok, tmp_path / "e", recs, eval=recs[:2])
    assert len(e.eval) == 2 and len(e.train) == 20


def test_no_chat_template_is_a_clear_error(tok, tmp_path):
    t = build_phi3_style_tokenizer()
    t.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        prep(t, tmp_path, [{"messages": CHAT}])
    p = prep(t, tmp_path, [{"text": "just some text"}])  # text needs no template
    s = p.train[0]
    assert s["input_ids"][0] == t.bos_token_id and s["input_ids"][-1] == t.eos_token_id
    assert s["labels"][1:] == s["input_ids"][1:]
    p = prep(t, tmp_path, [{"messages": CHAT}], chat_template="phi3")
    assert p.train[0]["input_ids"] == expected(tok, CHAT, {2, 4})[0]


def test_preview_and_stats(tok, tmp_path):
    p = prep(tok, tmp_path, [{"messages": CHAT}] * 3)
    plain = preview_text(p, tok, n=2, color=False)
    assert "[[Hi! How are you?<|end|>]]" in plain and "[[Good to hear.<|end|><|endoftext|>]]" in plain
    assert plain.count("=== train sample") == 2
    colored = preview_text(p, tok, n=1, color=True)
    assert "\x1b[" in colored and "[[" not in colored
    text = format_stats(p.stats)
    for word in ("3 records", "supervised tokens", "p50", "truncated: 0", "dropped", "packing"):
        assert word in text


def test_cache_false_leaves_no_folder_behind(tmp_path):
    # The uncached samples live in a temporary folder while the process reads them; it is removed at exit.
    import subprocess
    import sys

    code = (
        "from phitune.data import DataConfig, prepare_data\n"
        "from phitune.models.tokenizer import build_phi3_style_tokenizer\n"
        "tok = build_phi3_style_tokenizer(vocab_size=300)\n"
        "conv = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]\n"
        f"p = prepare_data(DataConfig(train=[{{'messages': conv}}], cache=False, cache_dir={str(tmp_path)!r}), tok)\n"
        "assert len(p.train) == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert list(tmp_path.iterdir()) == []
