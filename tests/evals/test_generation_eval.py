"""phitune.evals (generation.py, prompts.py, scores.py) and the loop they share (phitune.generation.loop):
batched generation, scores, prompts from prepared data, base vs tuned, the eval command.

A hand-built run folder (tiny random Phi-3 + Phi-3-style tokenizer + a random non-zero adapter), as in test_run.py.
"""

from __future__ import annotations

import json

import pytest
from helpers import save_nonzero_adapter, write_run_folder
import torch

from phitune.errors import ConfigError, DataError
from phitune.evals.prompts import Prompt, generation_samples, prompts_from_samples
from phitune.evals.scores import exact_match, load_metric, rouge_l, score_answer, token_f1
from phitune.generation.generate import build_prompt_ids
from phitune.generation.loop import generate_batch
from phitune.lora import disable_adapters

SYSTEM = {"role": "system", "content": "Answer in words."}
CHATS = [
    [SYSTEM, {"role": "user", "content": f"What is {a} plus {b}?"},
     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    for a in range(3) for b in range(4)
] + [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "And 2 plus 2?"}, {"role": "assistant", "content": "Four, I think."}],
]


def _tiny_model(tokenizer, seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Phi3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok(small_tok):
    return small_tok


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):

    root = tmp_path_factory.mktemp("run")
    model = _tiny_model(tok)
    run, base, data, config, eot = write_run_folder(root, tok, model, CHATS, eval_split=5, max_seq_length=96)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 10, "epoch": 0.5, "loss": 3.0}, {"step": 20, "epoch": 1.0, "loss": 2.0},
        {"step": 20, "epoch": 1.0, "eval_loss": 2.5})))
    save_nonzero_adapter(model, run, base, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, std=0.5)
    return {"run": run, "base": base, "model": model, "data": data, "root": root, "config": config, "stops": eot}


def _prompts(tok):
    texts = ["What is 1 plus 2?", "Hi", "Tell me a long story about seven numbers and their friends, please.",
             "And 2 plus 2?", "Why?", "What is 0 plus 3? Answer in words, not digits.", "ok", "Count to three."]
    return [build_prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]


# --- the base model inside the tuned one ----------------------------------------------------------------------------


def test_disable_adapters_gives_the_base_models_logits_exactly(tok, run_dir):
    from phitune.training.loss import apply_fast_path

    base = _tiny_model(tok)  # the same seed: the weights the adapter was added to
    tuned = run_dir["model"]
    ids = torch.tensor([_prompts(tok)[2]])
    with torch.no_grad():
        want_base, want_tuned = base(ids).logits, tuned(ids).logits
        assert not torch.equal(want_base, want_tuned)
        with disable_adapters(tuned):
            assert torch.equal(tuned(ids).logits, want_base)
        assert torch.equal(tuned(ids).logits, want_tuned)
    # The training model's fused fast path takes the switch too.
    import copy

    fast = copy.deepcopy(tuned)
    apply_fast_path(fast, {"fast_path": "auto"})
    with torch.no_grad(), disable_adapters(fast):
        torch.testing.assert_close(fast(ids).logits, want_base, rtol=0, atol=1e-5)


# --- scores -------------------------------------------------------------------------------------------------------


def test_exact_match_normalises_whitespace_and_case_only():
    assert exact_match("  The cat\n sat. ", "the CAT sat.") == 1.0
    assert exact_match("the cat sat", "the cat sat.") == 0.0


def test_token_f1_and_rouge_l_known_values():
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # LCS of "a b c d" and "a c b d" is 3 tokens: P = R = 3/4
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    # non-ASCII words count (rouge-score's default tokenizer keeps [a-z0-9] only)
    assert rouge_l("Größe über alles", "größe über alles") == 1.0
    assert rouge_l("Größe", "Gewicht") == 0.0


def test_custom_metric_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text("def length_ratio(prediction, reference):\n"
                                           "    return len(prediction) / max(len(reference), 1)\n"
                                           "def bad(prediction, reference):\n    return 'high'\n"
                                           "rouge_l = bad\n")
    name, fn = load_metric(f"{tmp_path / 'my_scores.py'}:length_ratio")
    assert name == "length_ratio" and fn("ab", "abcd") == 0.5
    monkeypatch.chdir(tmp_path)
    assert load_metric("my_scores:length_ratio")[1]("a", "a") == 1.0
    assert score_answer("a", "ab", [("length_ratio", fn)])["length_ratio"] == 0.5
    with pytest.raises(ConfigError, match="must return a finite number"):
        score_answer("a", "b", [load_metric("my_scores:bad")])
    for spec, message in (("my_scores", "module:function"), ("no_such_module_x:f", "cannot import"),
                          ("my_scores:nope", "no function 'nope'"), ("my_scores:rouge_l", "built-in")):
        with pytest.raises(ConfigError, match=message):
            load_metric(spec)


# --- prompts from the prepared data --------------------------------------------------------------------------------


def _prepared(tok, tmp_path, **data):
    from phitune.data import DataConfig, prepare_data

    cfg = DataConfig(**{"train": [{"messages": m} for m in CHATS], "max_seq_length": 96, "cache": False, **data})
    return cfg, prepare_data(cfg, tok)


def test_prompt_is_the_conversation_before_its_last_answer_as_training_rendered_it(tok, tmp_path, run_dir):
    cfg, prepared = _prepared(tok, tmp_path)
    prompts, skipped = prompts_from_samples(prepared.train, tok, stop_ids=run_dir["stops"])
    assert skipped.total == 0 and len(prompts) == len(CHATS)
    for p, chat in zip(prompts, CHATS):
        assert p.ids == build_prompt_ids(tok, chat[:-1])  # every turn before the last answer, assistant header last
        assert p.reference == chat[-1]["content"]
        assert p.ids == list(prepared.train[p.index]["input_ids"][:len(p.ids)])  # the very tokens training saw
    assert "<|assistant|>" in prompts[-1].text and "Hello." in prompts[-1].text  # multi-turn: earlier answer kept


def test_train_on_all_is_prepared_again_with_the_last_answer_marked(tok, tmp_path, run_dir):
    cfg, prepared = _prepared(tok, tmp_path, train_on="all")
    samples = generation_samples(prepared, cfg, tok, "train")
    prompts, _ = prompts_from_samples(samples, tok, stop_ids=run_dir["stops"])
    assert [p.reference for p in prompts] == [c[-1]["content"] for c in CHATS]


def test_cut_answers_and_prompts_beyond_the_context_are_skipped_and_counted(tok, tmp_path, run_dir):
    # A chat that cannot keep its last question, the assistant header and its whole answer within
    # data.max_seq_length is dropped, and counted, when the data is prepared (phitune.data's truncation rule), so
    # every prompt that reaches generation carries its whole reference answer.
    for max_seq_length in range(8, 96):
        try:
            cfg, prepared = _prepared(tok, tmp_path, max_seq_length=max_seq_length)
        except DataError:
            continue  # not one chat fits yet
        if prepared.stats["train"].get("dropped"):
            break
    dropped = sum(prepared.stats["train"]["dropped"].values())
    assert dropped > 0 and len(prepared.train) + dropped == len(CHATS)
    prompts, skipped = prompts_from_samples(prepared.train, tok, stop_ids=run_dir["stops"])
    assert prompts and skipped.total == 0  # no cut answer left to skip
    assert all(p.reference in {c[-1]["content"] for c in CHATS} for p in prompts)  # each a whole answer
    cfg, prepared = _prepared(tok, tmp_path)
    shortest = min(len(build_prompt_ids(tok, c[:-1])) for c in CHATS)
    prompts, skipped = prompts_from_samples(prepared.train, tok, stop_ids=run_dir["stops"], context=shortest)
    assert len(prompts) + skipped.total == len(CHATS) and skipped.total > 0
    assert f"longer than the model's context of {shortest} tokens" in str(skipped)


def test_plain_text_data_has_no_answer_to_compare(tok, tmp_path):
    cfg, prepared = _prepared(tok, tmp_path, train=[{"text": "just prose"}] * 3)
    with pytest.raises(DataError, match="no assistant turn to compare"):
        generation_samples(prepared, cfg, tok, "train")


# --- phitune.evaluate(..., generate=True) ---------------------------------------------------------------------------


@pytest.mark.slow  # 9 CPU seconds (2 threads, measured for issue 21; slow = over ~5)
def test_evaluate_generate_compare_base_writes_report_and_samples(run_dir, tok):
    from phitune.models.loading import load_model_and_tokenizer
    from phitune.evals.report import read_summary
    from phitune.evals.evaluate import evaluate

    m = evaluate(run_dir["run"], generate=True, compare_base=True, max_new_tokens=12, verbose=False)
    report = run_dir["run"] / "eval" / "report.html"
    assert m["report"] == str(report) and report.is_file()
    rows = [json.loads(line) for line in (run_dir["run"] / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == m["gen_samples"] == 5 and m["gen_skipped"] == 0
    # The means are the means of the per-sample scores, for each model.
    for key in ("exact_match", "token_f1", "rouge_l", "answer_tokens", "stopped"):
        assert m[f"gen_{key}"] == pytest.approx(sum(float(r["tuned"][key]) for r in rows) / 5)
        assert m[f"base_gen_{key}"] == pytest.approx(sum(float(r["base"][key]) for r in rows) / 5)
    assert m["gen_tuned_better"] + m["gen_tuned_worse"] + m["gen_tuned_same"] == 5
    # "base" is the base model: a fresh copy without the adapter gives the same greedy answers.
    base, _ = load_model_and_tokenizer({"name_or_path": str(run_dir["base"])}, device="cpu")
    for r in rows:
        prompt = Prompt(r["index"], tok(r["prompt"], add_special_tokens=False)["input_ids"], r["reference"])
        want = generate_batch(base, [[tok.bos_token_id] + prompt.ids], stop_ids=run_dir["stops"],
                              pad_id=tok.pad_token_id, max_new_tokens=12)[0]
        assert r["base"]["answer"] == tok.decode(want.ids, skip_special_tokens=True).strip()
    assert m["base_eval_loss"] != m["eval_loss"]
    summary = read_summary(report.read_text())
    assert summary["tuned"]["eval_loss"] == pytest.approx(m["eval_loss"])


def test_evaluate_generate_on_given_data_with_a_custom_metric(run_dir, tmp_path):
    from phitune.evals.evaluate import evaluate

    (tmp_path / "m.py").write_text("def has_digit(prediction, reference):\n"
                                   "    return float(any(c.isdigit() for c in prediction))\n")
    m = evaluate(run_dir["run"], data=str(run_dir["data"]), generate=True, max_samples=3, max_new_tokens=6,
                 metric=f"{tmp_path / 'm.py'}:has_digit", verbose=False)
    assert m["gen_samples"] == 3 and "gen_has_digit" in m and "base_gen_exact_match" not in m


def test_ctrl_c_writes_the_samples_done_so_far(run_dir):
    from phitune.evals.evaluate import evaluate

    calls = []

    def interrupt_on_third(prediction, reference):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        evaluate(run_dir["run"], generate=True, batch_size=1, max_new_tokens=4, metric=interrupt_on_third,
                 verbose=False)
    rows = (run_dir["run"] / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert "Interrupted: 2 of 5" in (run_dir["run"] / "eval" / "report.html").read_text()


def test_generation_options_are_checked_before_loading(run_dir, tmp_path):
    import shutil

    from phitune.evals.evaluate import evaluate

    with pytest.raises(ConfigError, match="add --generate"):
        evaluate(run_dir["run"], compare_base=True)
    with pytest.raises(ConfigError, match="--metric"):
        evaluate(run_dir["run"], generate=True, metric="nowhere_module_q:f")
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    text = (run / "phitune_config.yaml").read_text()
    (run / "phitune_config.yaml").write_text(text.replace("eval_split: 5", "eval_split: null"))
    with pytest.raises(ConfigError, match="--data"):
        evaluate(run, generate=True)
    (run / "phitune_config.yaml").write_text(text.replace("modules_to_save: null", "modules_to_save: [lm_head]"))
    with pytest.raises(ConfigError, match="modules_to_save"):
        evaluate(run, generate=True, compare_base=True)


def test_cli_eval_generate(run_dir, capsys):
    from phitune import cli

    code = cli.main(["eval", str(run_dir["run"]), "--generate", "--compare-base", "--max-samples", "2",
                     "--max-new-tokens", "4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gen_samples"] == 2 and "base_gen_rouge_l" in out
    assert cli.main(["eval", str(run_dir["run"]), "--compare-base"]) == 2
    assert "add --generate" in capsys.readouterr().err


@pytest.mark.slow  # 37 CPU seconds (2 threads, measured for issue 21; slow = over ~5)
def test_eval_generate_logs_answers_at_every_evaluation_and_training_goes_on(run_dir, tmp_path):
    from phitune.training.train import finetune

    result = finetune(model={"name_or_path": str(run_dir["base"])},
                      data={"train": str(run_dir["data"]), "eval_split": 3, "max_seq_length": 96, "cache": False},
                      training_config={"output_dir": str(tmp_path / "out"), "max_steps": 3, "eval_strategy": "steps",
                                       "eval_steps": 1, "eval_generate": 2, "per_device_train_batch_size": 2,
                                       "logging_steps": 1, "disable_tqdm": True, "save_strategy": "no"},
                      peft_config={"r": 2, "target_modules": ["qkv_proj"]})
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "generations" in r]
    assert [r["step"] for r in probes] == [1, 2, 3]
    assert all(len(r["generations"]) == 2 and 0 <= r["gen_rouge_l"] <= 1 for r in probes)
    assert [p["index"] for p in probes[0]["generation_prompts"]] == [g["index"] for g in probes[-1]["generations"]]
    assert result.metrics["train_steps"] == 3 and "eval_loss" in result.metrics
