"""The commands on a run folder (evaluate, chat, merge, preview) on a hand-built run folder: tiny random Phi-3 base +
Phi-3-style tokenizer + a random adapter.

The folder has what docs/architecture.md says `phitune train` writes (adapter, tokenizer, generation_config.json,
phitune_config.yaml), so these tests do not depend on training; tests/test_e2e.py covers the real thing.
"""

from __future__ import annotations

import io
import json

import pytest
from helpers import ARITHMETIC_CHATS as CHATS
import torch

from phitune.errors import ConfigError


def test_open_run_accepts_a_run_and_its_checkpoints(run_dir, tmp_path):
    from phitune.runs.folder import open_run

    r = open_run(run_dir["run"])
    assert r.root == r.adapter_dir == run_dir["run"]
    with pytest.raises(ConfigError, match="does not exist"):
        open_run(tmp_path / "missing")


def test_chat_prompt_is_the_adapter_models_greedy_answer(run_dir):
    from phitune.generation.generate import GenerationSettings, generate_reply
    from phitune.generation.stops import stop_token_ids
    from phitune.generation.chat import chat

    out = io.StringIO()
    answer = chat(run_dir["run"], prompt="What is 1 plus 2?", greedy=True, max_new_tokens=10, output=out)
    tok = run_dir["tokenizer"]
    expected = generate_reply(run_dir["model"], tok, [{"role": "user", "content": "What is 1 plus 2?"}],
                              GenerationSettings(greedy=True, max_new_tokens=10),
                              stop_ids=stop_token_ids(tok, run_dir=run_dir["run"]))
    assert answer == expected
    assert out.getvalue().strip() == answer  # streamed, then a newline


def test_chat_interactive_keeps_history_and_commands(run_dir):
    from phitune.generation.chat import chat

    lines = iter(["hello", "", "/reset", "/system Be brief.", "What is 2 plus 2?", "and 3?", "/exit"])
    prompts = []

    def fake_input(prompt):
        prompts.append(prompt)
        return next(lines)

    out = io.StringIO()
    convo = chat(run_dir["run"], greedy=True, max_new_tokens=4, input_fn=fake_input, output=out)
    assert [m["role"] for m in convo] == ["system", "user", "assistant", "user", "assistant"]
    assert convo[0]["content"] == "Be brief." and convo[1]["content"] == "What is 2 plus 2?"
    text = out.getvalue()
    assert "conversation cleared" in text and "/exit" in text
    assert len(prompts) == 7


def test_chat_ends_on_eof(run_dir):
    from phitune.generation.chat import chat

    def eof(prompt):
        raise EOFError

    assert chat(run_dir["run"], greedy=True, input_fn=eof, output=io.StringIO()) == []


def _run_with_generation_config(run_dir, tmp_path, **fields):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    path = run / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return run


def _reply(run_dir, run, prompt, settings):
    from phitune.generation.generate import generate_reply
    from phitune.generation.stops import stop_token_ids

    return generate_reply(run_dir["model"], run_dir["tokenizer"], [{"role": "user", "content": prompt}], settings,
                          stop_ids=stop_token_ids(run_dir["tokenizer"], run_dir=run))


def test_chat_decodes_as_the_runs_generation_config(run_dir, tmp_path):
    # Issue 28: the run's generation_config.json decides (greedy where it sets no sampling, as model.generate);
    # the arguments override it.
    from phitune.generation.chat import chat
    from phitune.generation.generate import GenerationSettings

    prompt = "What is 1 plus 2?"
    greedy = _reply(run_dir, run_dir["run"], prompt, GenerationSettings(greedy=True, max_new_tokens=12))
    assert chat(run_dir["run"], prompt=prompt, max_new_tokens=12, stream=False) == greedy  # the file sets no sampling

    run = _run_with_generation_config(run_dir, tmp_path, do_sample=True, temperature=1.5, top_k=20)
    sampled = GenerationSettings(temperature=1.5, top_p=1.0, top_k=20, seed=4, max_new_tokens=12)
    answer = chat(run, prompt=prompt, max_new_tokens=12, seed=4, stream=False)
    assert answer == _reply(run_dir, run, prompt, sampled) != greedy
    assert chat(run, prompt=prompt, max_new_tokens=12, greedy=True, stream=False) == greedy
    assert chat(run, prompt=prompt, max_new_tokens=12, temperature=0, stream=False) == greedy
    assert chat(run, prompt=prompt, max_new_tokens=12, seed=4, top_k=1, stream=False) == greedy  # top-1 sampling


def test_chat_banner_says_which_decoding_and_how_to_change_it(run_dir, tmp_path):
    from phitune.generation.chat import chat

    def eof(prompt):
        raise EOFError

    out = io.StringIO()
    chat(run_dir["run"], input_fn=eof, output=out)
    assert (f"decoding: greedy, as {run_dir['run'] / 'generation_config.json'} says (it sets no sampling); "
            "--temperature 0.7 --top-p 0.9 to sample instead") in out.getvalue()
    run = _run_with_generation_config(run_dir, tmp_path, do_sample=True, temperature=0.6, top_p=0.95)
    out = io.StringIO()
    chat(run, input_fn=eof, output=out)
    assert "decoding: sampling (temperature 0.6, top-p 0.95, top-k 50), as " in out.getvalue()
    assert "--greedy for deterministic answers" in out.getvalue()
    out = io.StringIO()
    chat(run, input_fn=eof, output=out, greedy=True)
    assert "decoding: greedy, as you asked (over the run's generation_config.json)" in out.getvalue()


def test_a_bad_generation_config_is_named_before_loading(run_dir, tmp_path):
    run = _run_with_generation_config(run_dir, tmp_path, do_sample=True, top_p=2)
    from phitune.generation.chat import chat

    with pytest.raises(ConfigError, match=r"generation_config.json \(top_p: 2\): top_p must be in"):
        chat(run, prompt="hi")


def test_chat_checks_settings_before_loading(run_dir):
    from phitune.generation.chat import chat

    with pytest.raises(ConfigError, match="max_new_tokens"):
        chat(run_dir["run"], prompt="hi", max_new_tokens=0)


def test_fit_context_drops_oldest_turns_keeps_system(run_dir):
    from phitune.generation.generate import build_prompt_ids
    from phitune.generation.chat import _fit_context

    tok = run_dir["tokenizer"]
    msgs = [{"role": "system", "content": "S"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question number {i} " * 3}, {"role": "assistant", "content": "ok"}]
    msgs.append({"role": "user", "content": "last"})
    budget = len(build_prompt_ids(tok, [msgs[0]] + msgs[-3:]))
    fitted = _fit_context(tok, msgs, budget)
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1]
    assert fitted[1]["role"] == "user" and len(fitted) < len(msgs)
    assert len(build_prompt_ids(tok, fitted)) <= budget


def test_merge_writes_a_plain_model_equal_to_the_adapter_model(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.runs.merge import merge

    out = merge(run_dir["run"], tmp_path / "merged", verbose=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
            "phitune_merge.json"} <= names
    assert not any(n.endswith(".bin") for n in names) and "adapter_config.json" not in names
    info = json.loads((out / "phitune_merge.json").read_text())
    assert info["max_abs_logit_diff_vs_adapter"] < 1e-4 and info["dtype"] == "float32"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, run_dir["model"](ids).logits, atol=1e-4, rtol=1e-4)
    assert set(merged.generation_config.eos_token_id) == set(
        json.loads((run_dir["run"] / "generation_config.json").read_text())["eos_token_id"])
    assert AutoTokenizer.from_pretrained(out).chat_template == run_dir["tokenizer"].chat_template


def test_merge_replaces_only_an_earlier_merge_and_only_when_forced(run_dir, tmp_path):
    from phitune.runs.merge import merge

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for force in (False, True):  # a folder merge did not write is never written into, --force or not
        with pytest.raises(ConfigError, match=r"merge --out: .*not empty and was not written by phitune.*--out DIR"):
            merge(run_dir["run"], mine, force=force)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    out = tmp_path / "m"
    merge(run_dir["run"], out, verbose=False)
    with pytest.raises(ConfigError, match=r"merge --out: .* holds an earlier phitune merge output; pass --force"):
        merge(run_dir["run"], out)
    merge(run_dir["run"], out, force=True, dtype="bfloat16", verbose=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="run folder itself"):
        merge(run_dir["run"], run_dir["run"], force=True)


def test_evaluate_on_given_data_and_on_the_runs_eval_split(run_dir):
    from phitune.evals.evaluate import evaluate

    m = evaluate(run_dir["run"], data=str(run_dir["data"]), verbose=False)
    assert m["eval_samples"] == len(CHATS)
    assert m["eval_tokens"] > 0 and 0.0 <= m["eval_token_accuracy"] <= 1.0
    assert m["eval_perplexity"] == pytest.approx(torch.tensor(m["eval_loss"]).exp().item(), rel=1e-6)
    m2 = evaluate(run_dir["run"], verbose=False)
    assert m2["eval_samples"] == 4


def test_evaluate_loss_matches_a_plain_forward(run_dir):
    """Mean next-token cross-entropy over the trained (assistant) tokens, computed with model(...).logits."""
    from phitune.config import load_config
    from phitune.data import prepare_data
    from phitune.evals.evaluate import evaluate

    cfg = load_config(str(run_dir["run"] / "phitune_config.yaml"))
    import dataclasses

    prepared = prepare_data(dataclasses.replace(cfg.data, eval_split=None), run_dir["tokenizer"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(prepared.train)):
            s = prepared.train[i]
            ids = torch.tensor([list(s["input_ids"])])
            labels = torch.tensor([list(s["labels"])])
            logits = run_dir["model"](ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    m = evaluate(run_dir["run"], data=str(run_dir["data"]), batch_size=3, verbose=False)
    assert m["eval_tokens"] == count
    assert m["eval_loss"] == pytest.approx(total / count, rel=1e-4)


def test_evaluate_without_eval_data_says_how_to_give_some(run_dir, tmp_path):
    import shutil

    from phitune.evals.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    text = (run / "phitune_config.yaml").read_text().replace("eval_split: 4", "eval_split: null")
    (run / "phitune_config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="--data"):
        evaluate(run)


def test_preview_needs_no_model_weights(run_dir, tmp_path):
    import shutil

    from phitune.training.preview import preview

    tok_only = tmp_path / "tok-only"
    shutil.copytree(run_dir["base"], tok_only, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tok_only}\ndata:\n  train: {run_dir['data']}\n  max_seq_length: 64\n"
                   f"  cache_dir: {tmp_path / 'cache'}\npeft_config: {{target_modules: all-linear}}\n")
    out = io.StringIO()
    prepared = preview(str(cfg), n=2, color=False, output=out)
    assert len(prepared.train) == len(CHATS)
    text = out.getvalue()
    assert "plus" in text  # samples are printed
    assert "\x1b[" not in text  # no colours when asked for none


def test_checkpoint_folder_works_as_a_run_dir(run_dir, tmp_path):
    import shutil

    from phitune.generation.chat import chat
    from phitune.runs.folder import open_run

    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    ckpt = run / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, ckpt / name)
    (ckpt / "meta.json").write_text("{}")
    r = open_run(ckpt)
    assert r.root == run and r.adapter_dir == ckpt
    a = chat(ckpt, prompt="What is 1 plus 1?", greedy=True, max_new_tokens=5, stream=False)
    b = chat(run, prompt="What is 1 plus 1?", greedy=True, max_new_tokens=5, stream=False)
    assert a == b


def test_relative_paths_of_the_training_folder_work_from_anywhere(run_dir, tmp_path, monkeypatch):
    """A config trained in /proj with `model: base` and `output_dir: runs/x` is reopened from another folder."""
    import shutil

    import yaml

    from phitune.generation.chat import chat
    from phitune.runs.folder import load_run_config

    proj = tmp_path / "proj"
    shutil.copytree(run_dir["base"], proj / "base")
    shutil.copy(run_dir["data"], proj / "chats.jsonl")
    run = proj / "runs" / "x"
    shutil.copytree(run_dir["run"], run)
    cfg = yaml.safe_load((run / "phitune_config.yaml").read_text())
    cfg["model"]["name_or_path"] = "base"
    cfg["data"]["train"] = "chats.jsonl"
    cfg["training_config"]["output_dir"] = "runs/x"
    (run / "phitune_config.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_run_config(run)
    assert loaded.model.name_or_path == str(proj / "base")
    assert loaded.data.train == str(proj / "chats.jsonl")
    assert chat(run, prompt="hi", greedy=True, max_new_tokens=3, stream=False) == \
        chat(run_dir["run"], prompt="hi", greedy=True, max_new_tokens=3, stream=False)
