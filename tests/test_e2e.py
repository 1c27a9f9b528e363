"""End to end through the CLI on CPU: train a tiny Phi-3 a few steps, check the run folder, resume from a
checkpoint, eval, chat --prompt, merge and reload the merged model with AutoModelForCausalLM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from phitune.cli import main

STEPS = 6
SAVE_EVERY = 3


def _chats():
    out = []
    for a in range(6):
        for b in range(5):
            out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.models.tokenizer import build_phi3_style_tokenizer

    root = tmp_path_factory.mktemp("e2e")
    tok = build_phi3_style_tokenizer(vocab_size=300)
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = root / "tiny-phi3"
    Phi3ForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)

    chats = _chats()
    (root / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:24]))
    (root / "eval.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[24:]))
    run = root / "run"
    (root / "config.yaml").write_text(f"""\
model:
  name_or_path: {base}
data:
  train: {root / 'train.jsonl'}
  eval: {root / 'eval.jsonl'}
  max_seq_length: 64
  cache_dir: {root / 'cache'}
training_config:
  output_dir: {run}
  learning_rate: 1.0e-2
  per_device_train_batch_size: 2
  per_device_eval_batch_size: 4
  max_steps: 100
  logging_steps: 1
  save_steps: {SAVE_EVERY}
  seed: 0
  disable_tqdm: true
peft_config:
  r: 4
  lora_alpha: 8
  lora_dropout: 0.0
  target_modules: all-linear
""")
    return {"root": root, "base": base, "run": run, "config": root / "config.yaml", "tokenizer": tok}


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _train_losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_train_resume_eval_chat_merge(workspace, tmp_path, capsys):
    run, cfg = workspace["run"], workspace["config"]

    # --- train (a --set override shortens the run) ---
    assert main(["train", str(cfg), "--set", f"training_config.max_steps={STEPS}"]) == 0
    out = capsys.readouterr().out
    assert f"run saved to {run}" in out

    names = {p.name for p in run.iterdir()}
    for expected in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                     "generation_config.json", "phitune_config.yaml", "metrics.jsonl", "README.md",
                     "data_stats.json", "checkpoints"):
        assert expected in names, f"{expected} missing from the run folder ({sorted(names)})"
    tok = workspace["tokenizer"]
    eot = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")}
    assert eot <= set(json.loads((run / "generation_config.json").read_text())["eos_token_id"])
    assert "max_steps: 6" in (run / "phitune_config.yaml").read_text()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{STEPS}"]
    losses = _train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    final_adapter = _adapter_tensors(run)

    # --- resume: drop the last checkpoint and the final adapter, continue from checkpoint-3 ---
    shutil.rmtree(run / "checkpoints" / f"checkpoint-{STEPS}")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    assert main(["train", str(cfg), "--set", f"training_config.max_steps={STEPS}",
                 "--set", "training_config.resume_from_checkpoint=auto"]) == 0
    capsys.readouterr()
    resumed_adapter = _adapter_tensors(run)
    assert resumed_adapter.keys() == final_adapter.keys()
    for key in final_adapter:
        torch.testing.assert_close(resumed_adapter[key], final_adapter[key], rtol=1e-5, atol=1e-6)
    resumed_losses = _train_losses(run)
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5)

    # --- eval ---
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["eval_samples"] == 6 and metrics["eval_tokens"] > 0
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)
    assert main(["eval", str(run), "--data", str(workspace["root"] / "train.jsonl"), "--json"]) == 0
    on_train = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert on_train["eval_samples"] == 24

    # --- chat, one shot ---
    assert main(["chat", str(run), "--prompt", "What is 2 plus 3?", "--greedy", "--max-new-tokens", "12"]) == 0
    answer = capsys.readouterr().out.strip()
    from phitune.generation.chat import chat

    assert answer == chat(run, prompt="What is 2 plus 3?", greedy=True, max_new_tokens=12, stream=False)

    # --- merge, reload without phitune's help, compare with the adapter model ---
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged_dir)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    from phitune.runs.folder import load_run_model

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapter_model, _, _ = load_run_model(run, device="cpu")
    from phitune.generation.generate import build_prompt_ids

    ids = torch.tensor([build_prompt_ids(tok, [{"role": "user", "content": "What is 4 plus 1?"}])])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-4, rtol=1e-4)
    # merging again into the same folder needs --force
    assert main(["merge", str(run), "--out", str(merged_dir)]) == 2
    assert "--force" in capsys.readouterr().err


def test_train_config_errors_exit_2_before_training(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(workspace["config"].read_text().replace("learning_rate:", "learnig_rate:"))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learnig_rate" in err and "did you mean 'learning_rate'" in err and "Traceback" not in err
    assert main(["train", str(workspace["config"]), "--set", "training_config.max_steps=zero"]) == 2
    assert "max_steps" in capsys.readouterr().err
