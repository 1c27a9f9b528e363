"""Preference pairs: the three record forms, validation with file:line, SFT's rendering, truncation, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phitune.data import collate, prepare_data
from phitune.data.labels import IGNORE_INDEX
from phitune.data.preference import pair_plan, prepare_preference_data
from phitune.data.preview import format_stats, preview_text
from phitune.errors import DataError

USER = {"role": "user", "content": "Reverse: apple"}
GOOD, BAD = {"role": "assistant", "content": "elppa"}, {"role": "assistant", "content": "apple"}


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _prepare(tmp_path, records, tok, **data):
    path = _write(tmp_path / "pairs.jsonl", records)
    return prepare_preference_data({"train": str(path), "max_seq_length": 64, "cache_dir": str(tmp_path / "c"),
                                    **data.pop("data", {})}, tok, **data)


def _samples(prepared):
    return [tuple(np.asarray(a).tolist() for a in prepared.train.arrays(i)) for i in range(len(prepared.train))]


def test_the_three_record_forms_of_one_pair_give_the_same_tokens(tmp_path, small_tok):
    forms = [{"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]},
             {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
             {"chosen": [USER, GOOD], "rejected": [USER, BAD]}]
    got = [_samples(_prepare(tmp_path / str(k), [rec], small_tok)) for k, rec in enumerate(forms)]
    assert got[0] == got[1] == got[2] and len(got[0]) == 2


def test_each_side_is_rendered_exactly_as_sft_renders_the_conversation(tmp_path, small_tok):
    system = {"role": "system", "content": "Be brief."}
    history = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, USER]
    prepared = _prepare(tmp_path, [{"prompt": history, "chosen": [GOOD], "rejected": [BAD]}], small_tok)
    for k, reply in enumerate((GOOD, BAD)):
        chats = _write(tmp_path / f"chat{k}.jsonl", [{"messages": history + [reply]}])
        sft = prepare_data({"train": str(chats), "max_seq_length": 64, "train_on": "last_assistant",
                            "cache_dir": str(tmp_path / "c")}, small_tok)
        ids, labels = prepared.train.arrays(k)
        sft_ids, sft_labels = sft.train.arrays(0)
        assert ids.tolist() == sft_ids.tolist() and labels.tolist() == sft_labels.tolist()
        assert ids.tolist().count(small_tok.bos_token_id) == 1
        trained = ids[labels != IGNORE_INDEX].tolist()  # the reply, its <|end|> and the final eos; nothing else
        end = small_tok.convert_tokens_to_ids("<|end|>")
        assert small_tok.decode(trained[:-2]) == reply["content"] and trained[-2:] == [end, small_tok.eos_token_id]


@pytest.mark.parametrize("record, reason", [
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "Reverse: pear"}, BAD]}, "prompts differ"),
    ({"prompt": "x", "chosen": "y"}, "not a pair"),
    ({"prompt": [USER], "chosen": [GOOD, USER], "rejected": [BAD]}, "not one reply"),
    ({"prompt": "x", "chosen": "", "rejected": "z"}, "empty content"),
    ({"prompt": [USER, GOOD], "chosen": "y", "rejected": "z"}, "prompt ends with the assistant"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "y", "rejected": "z"}, "unknown role"),
])
def test_a_bad_pair_is_an_error_naming_its_file_and_line(tmp_path, small_tok, record, reason):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: {reason}"):
        _prepare(tmp_path, [good, record, good], small_tok)


def test_bad_pairs_are_skipped_and_counted_with_on_bad_record_skip(tmp_path, small_tok):
    bad = {"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}
    prepared = _prepare(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, bad], small_tok,
                        data={"on_bad_record": "skip"})
    s = prepared.stats["train"]
    assert (s["pairs"], s["bad_records"], s["bad_by_reason"]) == (1, 1, {"prompts differ": 1})


def test_the_prompt_is_cut_from_the_left_to_max_prompt_length_keeping_bos_and_header(tmp_path, small_tok):
    long_user = {"role": "user", "content": "Reverse the word that ends this long request: apple"}
    full = _prepare(tmp_path / "a", [{"prompt": [long_user], "chosen": [GOOD], "rejected": [BAD]}], small_tok)
    cut = _prepare(tmp_path / "b", [{"prompt": [long_user], "chosen": [GOOD], "rejected": [BAD]}], small_tok,
                   max_prompt_length=12)
    for k in (0, 1):
        (ids, labels), (cids, clabels) = full.train.arrays(k), cut.train.arrays(k)
        prompt = int(np.argmax(labels != IGNORE_INDEX))
        cprompt = int(np.argmax(clabels != IGNORE_INDEX))
        assert cprompt == 12 and cids[0] == small_tok.bos_token_id
        assert cids[1:].tolist() == ids[1 + prompt - 12:].tolist()  # the end of the prompt and the whole reply
    s = cut.stats["train"]
    assert (s["truncated"], s["prompt_tokens_cut"], s["answer_tokens_cut"]) == (1, prompt - 12, 0)


def test_a_pair_that_fits_only_without_its_assistant_header_is_dropped_and_counted(tmp_path, small_tok):
    long = {"role": "assistant", "content": "elppa " * 30}  # the reply alone is longer than max_seq_length
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    prepared = _prepare(tmp_path, [good, {"prompt": [USER], "chosen": [long], "rejected": [BAD]}], small_tok)
    s = prepared.stats["train"]
    assert (s["pairs"], s["dropped"], s["over_max_seq_length"]) == (1, {"lost_assistant_header": 1}, 1)
    assert s["dropped_examples"][0].startswith(str(tmp_path / "pairs.jsonl") + ":2")
    assert "1 of 2 pairs dropped" in format_stats(prepared.stats)


def test_truncation_error_lists_the_pairs_that_are_too_long(tmp_path, small_tok):
    long = {"role": "assistant", "content": "elppa " * 30}
    with pytest.raises(DataError, match=r"1 pair\(s\) longer than data.max_seq_length=64:\n  .*pairs.jsonl:1"):
        _prepare(tmp_path, [{"prompt": [USER], "chosen": [long], "rejected": [BAD]}], small_tok,
                 data={"truncation": "error"})


def test_pair_plan_keeps_both_sides_of_a_pair_in_one_micro_batch(tmp_path, small_tok):
    records = [{"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w} for w in ("apple", "tiger", "stone",
                                                                                        "piano", "lemon")]
    prepared = _prepare(tmp_path, records, small_tok)
    plan = pair_plan(prepared.train, 2, seed=3, epoch=1)
    assert plan == pair_plan(prepared.train, 2, seed=3, epoch=1) != pair_plan(prepared.train, 2, seed=3, epoch=2)
    rows = [r[0] for entry in plan for r in entry]
    assert sorted(rows) == list(range(10)) and [len(e) for e in plan] == [4, 4, 2]
    for entry in plan:
        assert all(entry[j + 1][0] == entry[j][0] + 1 and entry[j][0] % 2 == 0 for j in range(0, len(entry), 2))
    batch = collate(prepared.train, plan[0], 64, packing=False)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].dim() == 2


def test_eval_split_routes_whole_pairs(tmp_path, small_tok):
    records = [{"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w} for w in ("apple", "tiger", "stone",
                                                                                        "piano", "lemon")]
    prepared = _prepare(tmp_path, records, small_tok, data={"eval_split": 2})
    assert (prepared.stats["train"]["pairs"], prepared.stats["eval"]["pairs"]) == (3, 2)
    assert len(prepared.eval) == 4


def test_preview_shows_a_pair_with_the_trained_tokens_of_both_sides(tmp_path, small_tok):
    prepared = _prepare(tmp_path, [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}], small_tok)
    text = preview_text(prepared, small_tok, n=1, color=False)
    assert "=== train pair 0, chosen" in text and "=== train pair 0, rejected" in text
    assert "[[elppa<|end|><|endoftext|>]]" in text and "[[apple<|end|><|endoftext|>]]" in text
