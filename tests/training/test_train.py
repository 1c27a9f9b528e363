"""phitune.training.train: the loop learns, accumulation is token-normalised, schedules, the output folder, clear
stops."""

import json
import math

import pytest
import torch
import yaml
from helpers import COOKBOOK_PEFT_CONFIG, COOKBOOK_TRAINING_CONFIG
from helpers import losses, tiny_config

from phitune.config import build_training_config, load_config
from phitune.errors import ConfigError, PhituneError
from phitune.data import prepare_data
from phitune.training.optim import enable_gradient_checkpointing, lr_multiplier
from phitune.training.step import batch_maker, train_step
from phitune.training.train import finetune


def test_loss_goes_down_and_the_output_folder_describes_itself(tiny_model_dir, chat_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, chat_files, tmp_path / "run", max_steps=10, eval_strategy="steps",
                      eval_steps=5)
    result = finetune(model=cfg["model"], data=cfg["data"], training_config=cfg["training_config"],
                      peft_config=cfg["peft_config"])
    out = result.output_dir
    curve = [loss for _, loss in losses(out)]
    assert len(curve) == 10 and curve[-1] < curve[0] - 0.2

    names = {p.name for p in out.iterdir()}
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "phitune_config.yaml", "metrics.jsonl", "loss_curve.png", "README.md",
                 "data_stats.json"):
        assert name in names, name
    tok = result.tokenizer
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    vocab = tok.get_vocab()
    assert sorted(stops) == sorted({vocab["<|endoftext|>"], vocab["<|assistant|>"], vocab["<|end|>"]})
    saved = yaml.safe_load((out / "phitune_config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(tiny_model_dir)
    assert load_config(out / "phitune_config.yaml").training_config.max_steps == 10
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir) and adapter_cfg["r"] == 4

    m = result.metrics
    assert m["train_steps"] == 10 and m["eval_loss"] > 0
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert 0 <= m["eval_token_accuracy"] <= 1
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [r["step"] for r in evals] == [5, 10]
    assert "Final metrics" in (out / "README.md").read_text()

    # The same output_dir again, without resume or overwrite: refused before any slow work.
    with pytest.raises(ConfigError, match="already holds a run.*resume_from_checkpoint: auto"):
        finetune(cfg)


def test_cookbook_training_and_peft_configs_train_verbatim(tiny_model_dir, chat_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, chat_files, tmp_path / "unused")
    cfg["training_config"] = dict(COOKBOOK_TRAINING_CONFIG)
    cfg["peft_config"] = dict(COOKBOOK_PEFT_CONFIG)
    # Only the folder changes: bf16 autocast, gradient checkpointing, cosine with warmup_ratio, epochs, on CPU.
    result = finetune(cfg, output_dir=str(tmp_path / "cookbook"), overrides=["training_config.disable_tqdm=true"])
    assert result.metrics["train_steps"] == 8  # 1 epoch of 32 conversations, 4 per step
    assert math.isfinite(result.metrics["train_loss"])
    assert (tmp_path / "cookbook" / "adapter_model.safetensors").is_file()


def test_finetune_rejects_unknown_arguments():
    with pytest.raises(ConfigError, match="did you mean 'peft_config'"):
        finetune(model="x", data="d.jsonl", pef_config={})


def _setup(tiny_model_dir, chat_files, tmp_path, **training):
    """Model with LoRA and the tokenized data, as finetune builds them."""
    from phitune.adapt import add_lora
    from phitune.models.loading import load_model_and_tokenizer

    cfg = load_config(tiny_config(tiny_model_dir, chat_files, tmp_path, **training))
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(cfg.model, device="cpu")
    add_lora(model, cfg.peft_config, lora_dtype=torch.float32)
    with torch.no_grad():  # non-zero B so that every LoRA factor has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    data = prepare_data(cfg.data, tok)
    return cfg, model, tok, data


def _grads_after_one_step(model, batches, tc):
    """SGD with lr 1 and no clipping: the update IS the gradient."""
    from phitune.training.loss import forward_loss

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_step(model, batches, opt, sched, scaler, tc, torch.device("cpu"), torch.autocast("cpu",
                       enabled=False), forward_loss)
    update = [b - p.detach() for b, p in zip(before, params)]
    with torch.no_grad():
        for b, p in zip(before, params):
            p.copy_(b)
    return update, stats


def test_gradient_accumulation_is_normalised_by_supervised_tokens(tiny_model_dir, chat_files, tmp_path):
    cfg, model, tok, data = _setup(tiny_model_dir, chat_files, tmp_path, max_grad_norm=0.0)
    make = batch_maker(model, tok, cfg.data)
    tc = cfg.training_config
    # Four conversations of different lengths: one batch of 4 vs two micro-batches of 2 (different token counts).
    idx = sorted(range(len(data.train)), key=lambda i: len(data.train[i]["input_ids"]))
    four = [idx[0], idx[1], idx[-2], idx[-1]]
    one, s1 = _grads_after_one_step(model, [make(data.train, four)], tc)
    two, s2 = _grads_after_one_step(model, [make(data.train, four[:2]), make(data.train, four[2:])], tc)
    assert s1["tokens"] == s2["tokens"]
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert sum(float(u.abs().sum()) for u in one) > 0


def test_gradient_checkpointing_still_gives_lora_gradients(tiny_model_dir, chat_files, tmp_path):
    cfg, model, tok, data = _setup(tiny_model_dir, chat_files, tmp_path, max_grad_norm=0.0)
    batch = batch_maker(model, tok, cfg.data)(data.train, [0, 1, 2])
    plain, _ = _grads_after_one_step(model, [batch], cfg.training_config)
    enable_gradient_checkpointing(model, build_training_config({"gradient_checkpointing": True}))
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed, _ = _grads_after_one_step(model, [batch], cfg.training_config)
    for a, b in zip(plain, checkpointed):
        assert float(b.abs().sum()) > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_schedules():
    f = lr_multiplier
    # warmup: (step + 1) / (warmup + 1), then decay to 0 at the last step
    assert [f(s, kind="linear", warmup=3, total=10) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3, kind="linear", warmup=3, total=10) == 1.0
    assert f(3 + 7 // 2, kind="linear", warmup=3, total=10) == pytest.approx(1 - 3 / 7)
    assert f(10, kind="linear", warmup=3, total=10) == 0.0
    assert f(0, kind="cosine", warmup=0, total=10) == 1.0
    assert f(5, kind="cosine", warmup=0, total=10) == pytest.approx(0.5)
    assert f(10, kind="cosine", warmup=0, total=10) == pytest.approx(0.0)
    assert f(0, kind="constant", warmup=5, total=10) == 1.0  # TrainingArguments' constant ignores warmup
    assert f(0, kind="constant_with_warmup", warmup=4, total=10) == pytest.approx(0.2)
    assert f(9, kind="constant_with_warmup", warmup=4, total=10) == 1.0
    assert build_training_config({"warmup_ratio": 0.2}).warmup_steps_for(48) == 10  # ceil(9.6)
    assert build_training_config({"warmup_steps": 0.1}).warmup_steps_for(50) == 5
    assert build_training_config({"warmup_steps": 7, "warmup_ratio": 0.5}).warmup_steps_for(50) == 7


def test_learning_rate_follows_the_schedule_in_a_run(tiny_model_dir, chat_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, chat_files, tmp_path / "run", max_steps=6, warmup_steps=2,
                      lr_scheduler_type="cosine", learning_rate=1e-3)
    out = finetune(cfg).output_dir
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    want = [1e-3 * lr_multiplier(s, kind="cosine", warmup=2, total=6) for s in range(6)]
    assert lrs == pytest.approx(want)


def test_nonfinite_loss_stops_with_a_message_and_dumps_the_batch(tiny_model_dir, chat_files, tmp_path,
                                                                 monkeypatch):
    import phitune.training.loss

    real = phitune.training.loss.forward_loss
    calls = {"n": 0}

    def poisoned(model, batch, with_accuracy=False, **kw):
        out = real(model, batch, with_accuracy, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(phitune.training.loss, "forward_loss", poisoned)
    cfg = tiny_config(tiny_model_dir, chat_files, tmp_path / "run", max_steps=5)
    with pytest.raises(PhituneError, match=r"step 3: the loss is not finite.*nonfinite_batch.pt.*learning_rate"):
        finetune(cfg)
    dump = torch.load(tmp_path / "run" / "nonfinite_batch.pt", weights_only=True)
    assert dump["step"] == 3 and dump["batches"][0]["input_ids"].shape[0] == 4


def test_missing_report_backend_is_a_clear_error_before_loading(tiny_model_dir, chat_files, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    cfg = tiny_config(tiny_model_dir, chat_files, tmp_path / "run", report_to="wandb")
    with pytest.raises(ConfigError, match=r"report_to: wandb is not installed; `pip install phitune\[wandb\]`"):
        finetune(cfg)


def test_bf16_base_keeps_float32_adapters_and_overwrite_starts_over(tiny_model_dir, chat_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, chat_files, tmp_path / "run", max_steps=3, save_steps=1)
    cfg["model"]["dtype"] = "bfloat16"
    result = finetune(cfg)
    assert result.model.dtype == torch.bfloat16
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    assert math.isfinite(result.metrics["eval_loss"])
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 3

    cfg["training_config"].update(overwrite_output_dir=True, max_steps=1, save_steps=1000)
    finetune(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # the earlier run's checkpoints are gone
    assert len(losses(tmp_path / "run")) == 1


def test_saved_config_uses_absolute_local_paths(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    # A run started with relative paths must reopen (eval/chat/merge) from any working directory.
    monkeypatch.chdir(tiny_model_dir.parent)
    cfg = tiny_config(tiny_model_dir.name, chat_files, tmp_path / "run", max_steps=1)
    out = finetune(cfg).output_dir
    saved = yaml.safe_load((out / "phitune_config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(tiny_model_dir.resolve())
    assert saved["data"]["train"] == str(chat_files[0].resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve())


def test_report_to_tensorboard_writes_events_that_tensorboard_reads(tiny_model_dir, chat_files, tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="tensorboard is not installed (pip install phitune[tensorboard])")
    out = tmp_path / "run"
    finetune(tiny_config(tiny_model_dir, chat_files, out, report_to="tensorboard", eval_strategy="steps",
                         eval_steps=3))
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    acc = accumulator.EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss_tag = next(t for t in tags if t.endswith("loss") and "eval" not in t)
    steps = [e.step for e in acc.Scalars(loss_tag)]
    assert steps == [r["step"] for r in logged if "loss" in r]
    for event, record in zip(acc.Scalars(loss_tag), (r for r in logged if "loss" in r)):
        assert event.value == pytest.approx(record["loss"], rel=1e-6)  # float32 in the event file
    evals = [r for r in logged if "eval_loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("eval/loss")] == \
        [(r["step"], r["eval_loss"]) for r in evals] and evals
