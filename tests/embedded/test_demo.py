"""The embedded demo: its shipped assets, its config, and a shortened run through the real training path.

The full demo (about a minute of CPU time) checks the claim the demo prints:
the base model fails the held-out questions and the fine-tuned one passes them.
"""

from __future__ import annotations

import io
import json
import os
import re

from helpers import ROOT

import pytest

from phitune.embedded import demo as demo_mod
from phitune.embedded.demo import (CONFIG_FILE, EVAL_FILE, HELD_OUT_FILE, MODEL_DIR, TRAIN_FILE, demo, held_out_records,
                          prose_recall, read_held_out)
from phitune.generation.generate import build_prompt_ids
from phitune.models.tokenizer import CHAT_SPECIAL_TOKENS, PHI3_CHAT_TEMPLATE

REPO = str(ROOT)


@pytest.fixture(scope="module")
def base():
    from phitune.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer({"name_or_path": str(MODEL_DIR)}, device="cpu")


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_model_is_a_small_phi3():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["architectures"] == ["Phi3ForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 10 * 2**20  # "a few MB"
    assert not list(MODEL_DIR.glob("*.bin"))  # safetensors only


def test_tokenizer_has_phi3_special_tokens_and_template(base):
    model, tok = base
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in CHAT_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(CHAT_SPECIAL_TOKENS)))  # Phi-3's order
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "<|endoftext|>", "<unk>")
    assert tok.chat_template == PHI3_CHAT_TEMPLATE
    assert len(tok) <= model.get_input_embeddings().weight.shape[0]
    msgs = [{"role": "user", "content": "Where does Tiltou Nerdale live?"}]
    text = tok.decode(build_prompt_ids(tok, msgs))
    assert text == "<s><|user|>Where does Tiltou Nerdale live?<|end|><|assistant|>"  # chat tokens absorb the "\n"


def test_data_goes_through_the_pipeline(base):
    from phitune.data import DataConfig, prepare_data

    _, tok = base
    prepared = prepare_data(DataConfig(train=str(TRAIN_FILE), eval=str(EVAL_FILE), max_seq_length=256, cache=False,
                                       cache_dir=None), tok)
    assert len(prepared.train) == len(_jsonl(TRAIN_FILE)) >= 300
    assert len(prepared.eval) == len(_jsonl(EVAL_FILE))
    assert prepared.stats["train"]["bad_records"] == 0 and prepared.stats["train"]["truncated"] == 0
    end = tok.convert_tokens_to_ids("<|end|>")
    sample = prepared.train[0]
    trained = [i for i, lab in zip(sample["input_ids"], sample["labels"]) if lab != -100]
    assert end in trained  # every answer is trained to end its turn


def test_data_variety_and_no_leak():
    train = _jsonl(TRAIN_FILE)
    assert any(r["messages"][0]["role"] == "system" for r in train)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in train)
    held = read_held_out(HELD_OUT_FILE)
    assert len(held) >= 50
    train_text = TRAIN_FILE.read_text()
    # held-out people never appear in the training conversations (only in pretraining prose)
    assert not [q["person"] for q in held if q["person"] in train_text]
    assert all(q["answer"] == q["prefix"] + q["completion"] for q in held)


def test_base_model_knows_facts_but_fails_the_questions(base):
    import dataclasses

    from phitune.config import load_config
    from phitune.data import prepare_data
    from phitune.evals.generation import evaluate_samples_by_generation
    from phitune.generation.generate import GenerationSettings
    from phitune.generation.stops import stop_token_ids

    model, tok = base
    questions = read_held_out(HELD_OUT_FILE)[:16]
    cfg = load_config(CONFIG_FILE, [f"model.name_or_path={MODEL_DIR}", f"data.train={TRAIN_FILE}",
                                    f"data.eval={EVAL_FILE}"])
    data = dataclasses.replace(cfg.data, train=held_out_records(questions), eval=None)
    result = evaluate_samples_by_generation(model, tok, prepare_data(data, tok).train,
                                            stop_ids=stop_token_ids(tok, model=model), progress=False,
                                            settings=GenerationSettings(max_new_tokens=20, greedy=True))
    assert result.summary["samples"] == 16 and result.summary["tuned"]["exact_match"] == 0.0  # the model given
    assert [s["reference"] for s in result.samples] == [q["answer"] for q in questions]
    assert prose_recall(model, tok, questions) >= 0.9  # pretraining stored the facts


def test_examples_demo_yaml_loads_and_is_the_shipped_one():
    from phitune.config import load_config

    example = os.path.join(REPO, "examples", "demo.yaml")
    with open(example, encoding="utf-8") as f:
        assert f.read() == CONFIG_FILE.read_text(encoding="utf-8")
    cfg = load_config(example)
    assert cfg.peft_config.target_modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
    assert os.path.normpath(os.path.join(REPO, cfg.model.name_or_path)) == str(MODEL_DIR)
    assert os.path.normpath(os.path.join(REPO, cfg.data.train)) == str(TRAIN_FILE)
    assert cfg.training_config.use_cpu


def test_short_demo_run_writes_a_run_folder(tmp_path):
    out = io.StringIO()
    result = demo(tmp_path / "run", max_steps=2, max_questions=4, show=2, out=out,
                  overrides=["training_config.eval_generate=2"])
    text = out.getvalue()
    assert "exact match on 4 held-out questions" in text and "base model" in text
    assert result.before == 0.0 and result.n_questions == 4
    run = result.output_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", "generation_config.json",
                 "phitune_config.yaml", "demo_answers.json", "tokenizer_config.json"):
        assert (run / name).is_file(), name
    gen = json.loads((run / "generation_config.json").read_text())
    assert result.answers and json.loads((run / "demo_answers.json").read_text())["exact_match_before"] == 0.0
    end = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    end_id = next(t["id"] for t in end["added_tokens"] if t["content"] == "<|end|>")
    assert end_id in gen["eos_token_id"]
    assert (run / "data_cache").is_dir()  # phitune.data's scratch space stays inside the run folder
    # The held-out answers went through phitune.evals.generation: report and samples, base (LoRA off) and tuned side
    # by side.
    report = (run / "eval" / "report.html").read_text()
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert result.report == run / "eval" / "report.html" and len(samples) == 4
    assert [s["base"]["answer"] for s in samples] == [r["base"] for r in result.answers]
    # training_config.eval_generate: answers to 2 fixed eval prompts logged at the evaluation, shown in the report
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "generations" in r]
    assert logged and len(logged[-1]["generations"]) == 2 and "gen_exact_match" in logged[-1]
    assert len(logged[0]["generation_prompts"]) == 2
    assert "Answers during training" in report


def test_missing_assets_are_a_clear_error(monkeypatch, tmp_path):
    from phitune.errors import PhituneError

    monkeypatch.setattr(demo_mod, "MODEL_DIR", tmp_path / "nope")
    with pytest.raises(PhituneError, match="demo assets are missing"):
        demo(tmp_path / "run")


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """The full demo, run once for the slow tests below (about 30 s on 2 idle CPU cores)."""
    out = io.StringIO()
    result = demo(tmp_path_factory.mktemp("demo") / "run", out=out)
    return result, out.getvalue()


@pytest.mark.slow
def test_full_demo_shows_learning(full_demo):
    result, text = full_demo
    assert result.before == 0.0
    assert result.after >= 0.95, result.answers[:5]
    assert result.peak_rss_mb < 2048
    # Issue 28: the tuned model is sure where it is right, so sampling (as a chat user might) answers cleanly too.
    assert result.after_sampled >= 0.9 and result.ended_sampled >= 0.95, (result.after_sampled, result.ended_sampled)
    assert f"{result.after_sampled:.0%} sampled" in text
    from phitune.evals.report import read_summary

    sampled = read_summary(result.report.read_text(encoding="utf-8"))["sampled"]
    assert (sampled["seeds"], sampled["temperature"], sampled["top_p"]) == (5, 0.7, 0.9)
    assert sampled["exact_match"] == result.after_sampled and len(sampled["per_seed"]) == 5
    assert "id='sampled'" in result.report.read_text(encoding="utf-8")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
# The demo's answers: "The home of X is in Y.", "The job of X is Y.", "The favourite colour of X is Y."
_ANSWER = re.compile(r"The (home of [A-Z][a-z]+ [A-Z][a-z]+ is in [A-Z][a-z]+( Bay| Point)?|job of [A-Z][a-z]+ "
                     r"[A-Z][a-z]+ is [a-z]+|favourite colour of [A-Z][a-z]+ [A-Z][a-z]+ is [a-z]+)\.")


class _Terminal:
    """A command on a pseudo-terminal, read up to a marker as a user would watch it (ANSI codes removed)."""

    def __init__(self, argv, timeout=60.0):
        import subprocess

        self.fd, child = os.openpty()
        self.timeout = timeout
        env = dict(os.environ, TERM="dumb", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        self.seen = ""

    def read_until(self, marker: str) -> str:
        import select
        import time

        deadline = time.monotonic() + self.timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {marker!r} after {self.timeout:.0f} s; the terminal shows:\n{self.seen}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the command ended before {marker!r}; the terminal shows:\n{self.seen}")
            self.seen += _ANSI.sub("", chunk.decode("utf-8", "replace").replace("\r", ""))
        text, _, self.seen = self.seen.partition(marker)
        return text

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def ask(self, question: str) -> str:
        """Type a question; the answer as shown, checked to end at its end-of-turn token: nothing after it."""
        self.type(question)
        shown = self.read_until("\nyou> ")
        assert shown.startswith(question + "\nassistant> "), shown
        answer, *after = shown[len(question + "\nassistant> "):].split("\n")
        assert not "".join(after).strip(), f"text after the answer {answer!r}: {after}"
        return answer

    def close(self) -> int:
        code = self.proc.wait(timeout=self.timeout)
        os.close(self.fd)
        return code


@pytest.mark.slow
def test_chat_in_a_terminal_after_the_demo_answers_and_ends_each_turn(full_demo):
    # Issue 28, as a user meets it: `phitune chat RUN` after `phitune demo`, typed into a terminal.
    import sys

    result, _ = full_demo
    asked = [(q["messages"][-1]["content"], row) for q, row in zip(read_held_out(HELD_OUT_FILE), result.answers)
             if len(q["messages"]) == 1 and row["tuned_ok"]][:2]
    (first, first_row), (second, second_row) = asked
    term = _Terminal([sys.executable, "-m", "phitune", "chat", str(result.output_dir), "--max-new-tokens", "48"])
    banner = term.read_until("\nyou> ")
    assert "decoding: greedy, as" in banner and "generation_config.json says" in banner  # the run's file: no sampling
    # A one-turn chat is the prompt the demo scored: the same greedy answer, then the turn ends.
    assert term.ask(first) == first_row["tuned"] == first_row["expected"]
    assert _ANSWER.fullmatch(term.ask(second)), "second answer, with the first turn as context"
    term.type("/reset")
    assert "(conversation cleared)" in term.read_until("\nyou> ")
    assert term.ask(second) == second_row["tuned"]  # no context left: the demo's one-turn prompt again
    term.type("/exit")
    assert term.close() == 0

    # Sampled at the settings the demo reports (the command line overrides the run's file): clean answers too.
    term = _Terminal([sys.executable, "-m", "phitune", "chat", str(result.output_dir), "--temperature", "0.7",
                      "--top-p", "0.9", "--seed", "0", "--max-new-tokens", "48"])
    assert "decoding: sampling (temperature 0.7, top-p 0.9, top-k 50), as you asked" in term.read_until("\nyou> ")
    for question in (first, second):
        assert _ANSWER.fullmatch(term.ask(question))
    term.type("/exit")
    assert term.close() == 0


@pytest.mark.slow
def test_preference_demo_runs_sft_merge_dpo_and_reports_before_and_after(tmp_path):
    """The path of `phitune demo --preference`, shortened (2 SFT steps, 2 DPO steps, 4 held-out pairs): the numbers
    of a full run are not asserted here, only that every stage runs and reports them."""
    from phitune.embedded.preference_demo import exclaimed, held_out_pairs, preference_demo

    assert exclaimed("The home of Taimfel Bilby is in Brindle.") == "The home of Taimfel Bilby is in Brindle!"
    printed = io.StringIO()
    result = preference_demo(tmp_path / "demo", sft_steps=2, max_steps=2, max_pairs=4, out=printed)
    assert (tmp_path / "demo" / "sft-merged" / "model.safetensors").is_file()
    assert result.n_pairs == 4 and 0 <= result.preference_accuracy_after <= 1 and result.report.is_file()
    text = printed.getvalue()
    assert "preference accuracy (chosen more likely than rejected)" in text and "exact match" in text
    saved = json.loads((result.output_dir / "demo_preference.json").read_text())
    assert saved["held_out_pairs"] == 4 and saved["preference_accuracy_after"] == result.preference_accuracy_after
    pairs = held_out_pairs([{"messages": [{"role": "user", "content": "q"}], "answer": "The job of X is tailor."}])
    assert pairs == [{"prompt": [{"role": "user", "content": "q"}], "chosen": "The job of X is tailor!",
                      "rejected": "The job of X is tailor."}]


@pytest.mark.slow
def test_full_preference_demo_learns_the_rule_and_still_answers(tmp_path):
    """`phitune demo --preference` at its defaults (about 30 s): the held-out pairs' preference flips to the chosen
    side, and greedy answers follow the rule with the right fact (measured 100 % and 88 % on the AVX-512 machine;
    without rpo_alpha the answers collapsed while preference accuracy still reached 100 %)."""
    from phitune.embedded.preference_demo import preference_demo

    result = preference_demo(tmp_path / "demo", out=io.StringIO())
    assert result.preference_accuracy_before <= 0.1 and result.preference_accuracy_after >= 0.9
    assert result.exact_match_before == 0.0 and result.exact_match_after >= 0.7, result.exact_match_after
