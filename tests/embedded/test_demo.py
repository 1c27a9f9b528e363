"""The embedded demo: its shipped assets, its config, and a shortened run through the real training path.

The full demo (about a minute of CPU time) checks the claim the demo prints:
the base model fails the held-out questions and the fine-tuned one passes them.
"""

from __future__ import annotations

import io
import json
import os

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
    assert cfg.peft_config.target_modules == "all-linear"
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


@pytest.mark.slow
def test_full_demo_shows_learning(tmp_path):
    result = demo(tmp_path / "run", out=io.StringIO())
    assert result.before == 0.0
    assert result.after >= 0.8, result.answers[:5]
    assert result.peak_rss_mb < 2048


@pytest.mark.slow
def test_preference_demo_runs_sft_merge_dpo_and_reports_before_and_after(tmp_path):
    """The path of `phitune demo --preference`, shortened (2 SFT steps, 2 DPO steps, 4 held-out pairs): the numbers
    of a full run are not asserted here, only that every stage runs and reports them."""
    from phitune.embedded.preference_demo import held_out_pairs, preference_demo, short_answer

    assert short_answer("The home of Taimfel Bilby is in Brindle.") == "Brindle."
    printed = io.StringIO()
    result = preference_demo(tmp_path / "demo", sft_steps=2, max_steps=2, max_pairs=4, out=printed)
    assert (tmp_path / "demo" / "sft-merged" / "model.safetensors").is_file()
    assert result.n_pairs == 4 and 0 <= result.preference_accuracy_after <= 1 and result.report.is_file()
    text = printed.getvalue()
    assert "preference accuracy (chosen more likely than rejected)" in text and "exact match" in text
    saved = json.loads((result.output_dir / "demo_preference.json").read_text())
    assert saved["held_out_pairs"] == 4 and saved["preference_accuracy_after"] == result.preference_accuracy_after
    pairs = held_out_pairs([{"messages": [{"role": "user", "content": "q"}], "answer": "The job of X is tailor."}])
    assert pairs == [{"prompt": [{"role": "user", "content": "q"}], "chosen": "tailor.",
                      "rejected": "The job of X is tailor."}]
