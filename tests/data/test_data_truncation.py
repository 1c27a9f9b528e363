"""Truncation: linear in the conversation's length, the same result as dropping one round at a time, what was cut
reported by part, samples that would lose their question dropped and counted, data.truncation: drop | error."""

import time

import numpy as np
import pytest

from phitune.data import DataConfig, prepare_data
from phitune.data.prepare import fitting_length
from phitune.data.preview import data_warnings
from phitune.errors import DataError


def prep(tok, records, **kw):
    return prepare_data(DataConfig(train=records, cache=False, **kw), tok)


def chat(n_rounds, system=None, q="question {k} about the things we said", a="answer {k}."):
    msgs = [{"role": "system", "content": system}] if system else []
    for k in range(n_rounds):
        msgs += [{"role": "user", "content": q.format(k=k)}, {"role": "assistant", "content": a.format(k=k)}]
    return msgs


def n_tokens(tok, msgs):
    return 1 + len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])  # + the one BOS


def test_a_10000_turn_conversation_prepares_in_seconds(tok):
    # Before: every dropped round re-rendered the rest (1,600 turns took 239 s, 10,000 never finished).
    msgs = chat(5000)
    start = time.perf_counter()
    p = prep(tok, [{"messages": msgs}], max_seq_length=256)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{elapsed:.1f} s"
    st = p.stats["train"]
    kept = msgs[st["turns_dropped"]:]
    assert p.train[0]["input_ids"] == [tok.bos_token_id] + tok.apply_chat_template(kept, tokenize=True,
                                                                                      return_dict=True)["input_ids"]
    assert n_tokens(tok, kept) <= 256 < n_tokens(tok, msgs[st["turns_dropped"] - 2:])  # one more round: too long
    assert st["fit_max_seq_length"]["100%"] == n_tokens(tok, msgs)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_kept_turns_are_those_of_dropping_one_round_at_a_time(tok, system):
    convs = [chat(r, system=system, q="q{k} and then {k}{k}{k} more", a="a{k}") for r in range(1, 14)]
    L = 64
    p = prep(tok, [{"messages": m} for m in convs], max_seq_length=L)
    head = 1 if system else 0
    want = []
    for m in convs:  # the old way: drop the oldest round, render everything again, until it fits
        body = m[head:]
        while n_tokens(tok, m[:head] + body) > L:
            body = body[2:]
        want.append([tok.bos_token_id] + tok.apply_chat_template(m[:head] + body, tokenize=True,
                                                                 return_dict=True)["input_ids"])
    assert [p.train[i]["input_ids"] for i in range(len(p.train))] == want
    assert p.stats["train"]["truncated"] == sum(n_tokens(tok, m) > L for m in convs) > 5


def test_a_long_prompt_is_cut_from_the_left_and_the_parts_are_reported(tok):
    msgs = [{"role": "system", "content": "You are terse. " * 5},
            {"role": "user", "content": "a long question " * 10}, {"role": "assistant", "content": "Short."}]
    full = n_tokens(tok, msgs)
    system_turn = n_tokens(tok, msgs[:1]) - 2  # <|system|> ... <|end|> (without BOS and the template's eos)
    cut = system_turn + 1 + 5  # the system turn, <|user|> and 5 tokens of the question
    p = prep(tok, [{"messages": msgs}], max_seq_length=full - cut)
    ids = p.train[0]["input_ids"]
    st = p.stats["train"]
    assert len(ids) == full - cut and st["prompt_tokens_cut"] == cut and ids[0] == tok.bos_token_id
    assert st["truncated_parts"] == {"older turns": 0, "prompt": 1, "answer": 0, "role tags": 1}
    assert st["tag_tokens_cut"] == 3  # <|system|>, its <|end|>, <|user|>
    text = tok.decode(ids)
    assert "<|assistant|>" in text and "a long question" in text and "Short." in text and "terse" not in text


def test_samples_that_would_lose_the_user_turn_or_header_are_dropped_not_trained(tok):
    q = [{"role": "system", "content": "You are terse. " * 5}, {"role": "user", "content": "Why?"},
         {"role": "assistant", "content": "Because."}]
    full = n_tokens(tok, q)
    last_question_token = n_tokens(tok, q[:2]) - 3  # BOS ... "?" then <|end|> and the template's eos
    # max_seq_length that cuts up to and including "?" (the question is gone, its <|end|> would stay): dropped
    L = full - last_question_token
    tiny = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    p = prep(tok, [{"messages": q}, {"messages": tiny}], max_seq_length=L)
    st = p.stats["train"]
    assert st["dropped"] == {"lost_user_turn": 1} and st["samples"] == 1
    assert st["dropped_examples"] == [f"data.train item 0 ({full} tokens): truncation would cut off its last user turn"]
    # one token more keeps the "?": trained, with the header
    kept = prep(tok, [{"messages": q}], max_seq_length=L + 1).train[0]["input_ids"]
    assert tok.decode(kept[1:]).startswith("?<|end|><|assistant|>Because.")
    long_answer = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because. " * 10}]
    p = prep(tok, [{"messages": long_answer}, {"messages": chat(1)}], max_seq_length=n_tokens(tok, chat(1)))
    assert p.stats["train"]["dropped"] == {"lost_assistant_header": 1} and len(p.train) == 1


def test_truncation_error_lists_the_samples_and_the_lengths_that_fit(tok):
    recs = [{"messages": chat(1)}] * 38 + [{"messages": chat(3)}, {"messages": chat(8)}]
    long_ = n_tokens(tok, chat(8))
    with pytest.raises(DataError) as err:
        prep(tok, recs, max_seq_length=n_tokens(tok, chat(1)), truncation="error")
    msg = str(err.value)
    assert "data.train: 2 of 40 samples are longer than data.max_seq_length" in msg
    assert f"{n_tokens(tok, chat(1))} fits 95% of them, {long_} all" in msg
    assert "data.train item 38 (" in msg and "data.train item 39 (" in msg and "data.truncation" in msg


def test_truncation_drop_drops_and_counts(tok):
    recs = [{"messages": chat(1)}] * 3 + [{"messages": chat(8)}]
    p = prep(tok, recs, max_seq_length=n_tokens(tok, chat(1)), truncation="drop")
    st = p.stats["train"]
    assert len(p.train) == 3 and st["dropped"] == {"too_long": 1} and st["truncated"] == 0
    lines = data_warnings("train", st)
    assert lines[0].startswith("data.train: 1 of 4 samples dropped, not trained on (longer than max_seq_length: 1)")


def test_fitting_length_is_the_share_quantile_of_whole_samples():
    lengths = np.arange(1, 101)
    assert fitting_length(lengths, 0.95) == 95 and fitting_length(lengths, 1.0) == 100
    assert fitting_length(np.array([7]), 0.95) == 7 and fitting_length(np.zeros(0, np.int64), 0.95) == 0


def test_console_lines_say_what_was_truncated_and_skipped(tok):
    recs = [{"messages": chat(6)}, {"messages": chat(1)}, {"nonsense": 1}]
    p = prep(tok, recs, max_seq_length=n_tokens(tok, chat(2)), on_bad_record="skip")
    lines = data_warnings("train", p.stats["train"])
    assert lines[0] == "data.train: 1 bad record(s) skipped (missing field: 1)"
    assert any(line.startswith("data.train: 1 of 2 samples truncated to fit max_seq_length (samples that lost: "
                               "older turns 1)") for line in lines)


def test_cache_false_folder_of_a_killed_run_is_removed_by_the_next_one(tok, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp-{int(dead.stdout)}-abc"  # what a SIGKILLed run with data.cache: false leaves
    orphan.mkdir()
    (orphan / "stats.json").write_text("{}")
    mine = tmp_path / ".tmp-1-live"  # pid 1 is alive: never touched
    mine.mkdir()
    prepare_data(DataConfig(train=[{"messages": chat(1)}], cache=False, cache_dir=str(tmp_path)), tok)
    assert not orphan.exists() and mine.exists()
