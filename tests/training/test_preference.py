"""training.preference: the losses as formulas, DPO/ORPO runs through the one training story (metrics with TRL's
names, gradient accumulation by pairs, exact resume with precomputed reference log-probs), `phitune eval` on a
preference run. The comparison with TRL itself is test_preference_trl.py."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import WORDS, losses, tiny_config

from phitune.adapt import add_lora
from phitune.config.training_args import TrainingConfig
from phitune.data import collate
from phitune.data.preference import prepare_preference_data
from phitune.errors import DataError
from phitune.training import preference
from phitune.training import train as train_module
from phitune.training.fast import PLAIN
from phitune.training.train import finetune

EPS = torch.finfo(torch.float32).eps


def _pairs(path, words):
    path.write_text("".join(json.dumps({"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w}) + "\n"
                            for w in words))
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return _pairs(d / "train.jsonl", WORDS[:8]), _pairs(d / "eval.jsonl", WORDS[8:])


def _config(model_dir, files, out, **training):
    training = {"method": "dpo", "max_steps": 6, "save_steps": 3, "gradient_accumulation_steps": 2,
                "per_device_train_batch_size": 2, "precompute_ref_log_probs": True, "logging_steps": 1,
                "lr_scheduler_type": "constant", **training}
    return tiny_config(model_dir, files, out, **training)


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    result = finetune(_config(tiny_model_dir, pair_files, out))
    return out, losses(out), result


# --- the formulas ---------------------------------------------------------------------------------------------------


def test_dpo_losses_are_the_formulas_of_trl():
    pc, pr = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -8.0])
    rc, rr = torch.tensor([-6.0, -8.5]), torch.tensor([-6.5, -8.0])
    nc, nr = torch.tensor([4, 6]), torch.tensor([5, 3])
    d = (pc - rc) - (pr - rr)
    beta, e = 0.2, 0.1
    sig, cr, rj = preference.dpo_losses(pc, pr, rc, rr, nc, nr, beta=beta, label_smoothing=e)
    assert torch.allclose(sig, -(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d))
    assert torch.allclose(cr, beta * (pc - rc)) and torch.allclose(rj, beta * (pr - rr))
    hinge, _, _ = preference.dpo_losses(pc, pr, rc, rr, nc, nr, beta=beta, loss_type="hinge")
    assert torch.allclose(hinge, torch.relu(1 - beta * d))
    ipo, _, _ = preference.dpo_losses(pc, pr, rc, rr, nc, nr, beta=beta, loss_type="ipo")
    assert torch.allclose(ipo, ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)


def test_orpo_odds_ratio_is_finite_and_exact_near_certainty():
    mean_c = torch.tensor([-1e-6, -0.5, -3.0], dtype=torch.float64)
    mean_r = torch.tensor([-2.0, -0.6, -1e-9], dtype=torch.float64)
    losses_, cr, _ = preference.orpo_losses(mean_c, mean_r, beta=0.1)
    odds = lambda m: m - torch.log(-torch.expm1(m))  # noqa: E731  log(p / (1 - p)) in float64
    assert torch.isfinite(losses_).all()
    assert torch.allclose(losses_, -0.1 * F.logsigmoid(odds(mean_c) - odds(mean_r)), rtol=1e-12)
    assert torch.allclose(cr, 0.1 * mean_c)


# --- one micro-batch vs two: gradient accumulation by pairs ----------------------------------------------------------


def test_gradient_accumulation_divides_by_pairs_not_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = _pairs(tmp_path / "pairs.jsonl", ["apple", "rocket candle forest"])  # replies of different lengths
    prepared = prepare_preference_data({"train": str(pairs), "max_seq_length": 64, "cache_dir": str(tmp_path)},
                                       tokenizer)
    assert prepared.train.lengths[0] < prepared.train.lengths[2]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    tc = TrainingConfig(method="dpo")
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(entries):
        model.zero_grad()
        batches = [collate(prepared.train, e, 64, packing=False, pad_token_id=tokenizer.pad_token_id)
                   for e in entries]
        pairs = sum(preference.count_pairs(b) for b in batches)
        for b in batches:
            (preference.pair_loss(model, b, tc=tc, fast=PLAIN).loss_sum / pairs).backward()
        return [p.grad.clone() for p in params]

    # a division by tokens would weight the longer pair's micro-batch differently
    one = grads([[[0], [1], [2], [3]]])
    two = grads([[[0], [1]], [[2], [3]]])
    for a, b in zip(one, two):
        assert torch.allclose(a, b, rtol=0, atol=EPS * math.sqrt(64 * 64) * float(a.abs().max()) + 1e-12)


# --- runs -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dpo_run_logs_trl_metric_names_in_metrics_jsonl_and_eval(dpo_run):
    out, _, result = dpo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(train) == 6 and evals
    for r in train:
        assert set(preference.METRICS) <= set(r) and r["pairs"] == 4  # 2 pairs x 2 micro-batches
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6  # a fresh adapter is the reference: -log sigmoid(0)
    assert {f"eval_{k}" for k in preference.METRICS} | {"eval_preference_accuracy"} <= set(evals[-1])
    assert result.metrics["train_pairs"] == 24 and "train_tokens" not in result.metrics
    assert train[-1]["rewards/margins"] > 0  # the chosen replies gained on the rejected ones


@pytest.mark.slow
def test_resume_reuses_the_checkpoint_reference_log_probs_and_continues_exactly(dpo_run, tiny_model_dir,
                                                                                 pair_files, tmp_path, monkeypatch):
    ref_out, ref_losses, _ = dpo_run
    state = torch.load(ref_out / "checkpoints" / "checkpoint-3" / "training_state.pt", weights_only=True)
    saved = state["extra"]["reference_logps"]
    assert saved["train"].shape == (16,) and saved["eval"].shape == (8,)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_out / "checkpoints" / "checkpoint-3", out / "checkpoints" / "checkpoint-3")

    def not_again(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again instead of read from the checkpoint")

    monkeypatch.setattr(preference, "reference_table", not_again)
    finetune(_config(tiny_model_dir, pair_files, out, resume_from_checkpoint="auto"))
    assert losses(out) == ref_losses[3:]  # bitwise equal on CPU
    final, ref_final = (load_file(str(p / "adapter_model.safetensors")) for p in (out, ref_out))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)


def test_a_bad_pair_stops_the_run_before_any_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    train = tmp_path / "pairs.jsonl"
    train.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                     + json.dumps({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                   "rejected": [{"role": "user", "content": "z"},
                                                {"role": "assistant", "content": "y"}]}) + "\n")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the data was checked")

    monkeypatch.setattr(train_module, "load_model_and_tokenizer", no_weights)
    cfg = _config(tiny_model_dir, (train, train), tmp_path / "out")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: prompts differ"):
        finetune(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_orpo_run_trains_without_a_reference(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("ORPO has no reference policy")

    monkeypatch.setattr(preference, "reference_logps", no_reference)
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, pair_files, out, method="orpo", max_steps=2)
    del cfg["training_config"]["precompute_ref_log_probs"]
    result = finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("nll_loss" in r for r in records if "loss" in r) and "eval_nll_loss" in result.metrics


@pytest.mark.slow
def test_eval_generate_compare_base_on_a_preference_run(dpo_run):
    from phitune import evaluate

    out, _, _ = dpo_run
    metrics = evaluate(out, generate=True, compare_base=True, max_new_tokens=6, verbose=False)
    assert 0 <= metrics["eval_preference_accuracy"] <= 1 and 0 <= metrics["base_eval_preference_accuracy"] <= 1
    assert metrics["gen_samples"] + metrics["gen_skipped"] == 4  # the eval pairs' prompts, chosen as reference
    assert metrics["eval_rewards/accuracies"] >= 0 and "base_gen_exact_match" in metrics
    report = open(metrics["report"], encoding="utf-8").read()
    assert "preference accuracy" in report
    samples = [json.loads(line) for line in open(metrics["samples_file"], encoding="utf-8")]
    assert {s["reference"] for s in samples} == {w[::-1] for w in WORDS[8:]}


@pytest.mark.slow
def test_dpo_on_a_4bit_base_trains_with_the_reference_as_the_4bit_base(tiny_model_dir, pair_files, tmp_path):
    """QLoRA + DPO: the reference is the 4-bit base with the adapters off, as for a 16-bit base."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, pair_files, out, max_steps=2, save_steps=1000)
    cfg["model"].update(load_in_4bit=True, quantization={"compute_dtype": "float32"})
    result = finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert trained and all(math.isfinite(r["loss"]) and "rewards/margins" in r for r in trained)
    assert "eval_rewards/accuracies" in result.metrics and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_dpo_run_exports_to_gguf_like_an_sft_run(dpo_run, tmp_path):
    pytest.importorskip("gguf")
    from phitune import export

    out, _, _ = dpo_run
    result = export(out, "gguf", tmp_path / "gguf", outtype="f32")
    assert any(p.suffix == ".gguf" for p in result.path.iterdir()), result.files


@pytest.mark.slow
def test_eval_generate_during_a_dpo_run_answers_the_eval_pairs_prompts_with_chosen_as_reference(
        tiny_model_dir, pair_files, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, pair_files, out, max_steps=1, gradient_accumulation_steps=1, eval_generate=2,
                  precompute_ref_log_probs=False)
    finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and "eval_rewards/accuracies" in evals[0]  # the pair metrics and the probe, one record
    prompts = evals[0]["generation_prompts"]
    assert [p["index"] for p in prompts] == [0, 1]  # the first 2 eval pairs, in file order
    assert [p["reference"] for p in prompts] == [w[::-1] for w in WORDS[8:10]]  # their chosen replies
    for p, w in zip(prompts, WORDS[8:10]):
        assert f"Reverse: {w}" in p["prompt"] and p["prompt"].rstrip().endswith("<|assistant|>")
    generations = evals[0]["generations"]
    assert [g["index"] for g in generations] == [0, 1] and all(isinstance(g["answer"], str) for g in generations)
    assert 0 <= evals[0]["gen_exact_match"] <= 1
