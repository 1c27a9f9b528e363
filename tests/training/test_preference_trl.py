"""phitune's DPO and ORPO against TRL's DPOTrainer/ORPOTrainer with peft, on a tiny Phi-3 and a tiny Llama.

The same base weights, the same non-zero adapter (TRL's peft adapter copied into phitune through the PEFT format) and
the same token tensors go to both; losses, metrics and LoRA gradients must agree within float32 rounding.

Tolerances: every compared number is a function of log-probs of ``n`` tokens, each the output of ``LAYERS`` decoder
layers whose dot products run over at most ``INTERMEDIATE`` terms. Two float32 evaluations that order their sums
differently (sdpa vs eager kernels, chunked vs full log-softmax) differ by rounding errors that grow like the square
root of the number of terms (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3), so a summed log-prob
moves by about ``EPS * sqrt(REDUCTION) * sum|log p|``; a loss by its slope times that (beta for sigmoid, the squared
term's slope for IPO, 1 + beta for ORPO); a LoRA gradient, summed over every position of the batch, by
``EPS * sqrt(REDUCTION * positions) * max|grad|``. (Measured here: 1e-7 on the losses, a few % of these bounds on the
gradients.)
TRL is a test dependency only (pyproject: test extras); importing it takes ~12 s here, hence ``slow``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from phitune.adapt import add_lora, load_adapter_state_dict
from phitune.config.training_args import TrainingConfig
from phitune.data import collate
from phitune.data.preference import prepare_preference_data
from phitune.training import preference
from phitune.training.fast import PLAIN
from phitune.training.loss import apply_fast_path

pytest.importorskip("trl")
pytestmark = pytest.mark.slow

EPS = torch.finfo(torch.float32).eps
HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 2
REDUCTION = INTERMEDIATE * LAYERS  # the longest dot product a token's log-prob goes through, per layer, times layers
WORDS = ["apple", "river", "stone", "cloud"]
TARGETS = {"phi3": ["o_proj", "down_proj"], "llama": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def _records():
    return [{"prompt": [{"role": "user", "content": f"Reverse: {w}"}],
             "chosen": [{"role": "assistant", "content": w[::-1]}],
             "rejected": [{"role": "assistant", "content": (w + " " + w) if k % 2 else w}]}
            for k, w in enumerate(WORDS)]


def _base(family: str, tok):
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    cls, config = (Phi3ForCausalLM, Phi3Config) if family == "phi3" else (LlamaForCausalLM, LlamaConfig)
    cfg = config(vocab_size=len(tok) + 5, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                 num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return cls(cfg).eval()


def _trl_trainer(method: str, model, tok, tmp_path, family: str, **keys):
    from datasets import Dataset
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], lora_dropout=0.0)
    common = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(WORDS), report_to=[],
                  use_cpu=True, max_length=None)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common, **keys), train_dataset=Dataset.from_list(
            _records()), processing_class=tok, peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common, **keys), train_dataset=Dataset.from_list(
            _records()), processing_class=tok, peft_config=lora)
    torch.manual_seed(1)
    with torch.no_grad():  # a fresh adapter is zero (policy == reference): make it move the log-probs
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return trainer


def _phitune_model(base, trainer, family: str, fast: str):
    from peft import get_peft_model_state_dict

    model = copy.deepcopy(base)
    add_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[family], "lora_dropout": 0.0})
    load_adapter_state_dict(model, get_peft_model_state_dict(trainer.model), "TRL's adapter")
    model.train()  # as in training: dropout is 0 in both configs, so train mode changes nothing but the code path
    return model, (apply_fast_path(model) if fast == "fast" else PLAIN)


def _batches(tok, tmp_path):
    """phitune's batch (rows chosen 0, rejected 0, ...) and the same tensors in TRL's layouts."""
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    prepared = prepare_preference_data({"train": str(path), "max_seq_length": 64, "cache_dir": str(tmp_path / "c")},
                                       tok)
    ours = collate(prepared.train, [[i] for i in range(len(prepared.train))], 64, packing=False,
                   pad_token_id=tok.pad_token_id)

    def halves(t):
        return torch.cat([t[0::2], t[1::2]])

    completion = (ours["labels"] != -100).long()
    dpo = {"input_ids": halves(ours["input_ids"]), "attention_mask": halves(ours["attention_mask"]),
           "completion_mask": halves(completion)}
    orpo = {}
    for side, rows in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
        orpo.update({f"{side}_input_ids": ours["input_ids"][rows], f"{side}_attention_mask":
                     ours["attention_mask"][rows], f"{side}_labels": ours["labels"][rows]})
    return ours, dpo, orpo, prepared


def _lora_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA factors by "module path.lora_A|lora_B" (phitune's and peft's names agree on that)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.replace("base_model.model.", "").replace(".default.weight", "")
            out[key] = p.grad.detach().clone()
    return out


def _logp_tol(values: torch.Tensor) -> float:
    return float(EPS * math.sqrt(REDUCTION) * values.abs().sum())


def _grad_tol(g: torch.Tensor, batch: dict) -> float:
    return float(EPS * math.sqrt(REDUCTION * batch["input_ids"].numel()) * g.abs().max())


@pytest.fixture(scope="module")
def tok():
    from phitune.models.tokenizer import build_phi3_style_tokenizer

    return build_phi3_style_tokenizer(vocab_size=300)


def _assert_lora_grads_equal(model, trainer, batch: dict) -> None:
    ours_g, trl_g = _lora_grads(model), _lora_grads(trainer.model)
    assert sorted(ours_g) == sorted(trl_g) and ours_g
    for key, g in trl_g.items():
        scale = float(g.abs().max())
        assert scale > 0, key  # the comparison means something only when the gradient is not zero
        assert torch.allclose(ours_g[key], g, rtol=0, atol=_grad_tol(g, batch)), key


@pytest.mark.parametrize("family", ["phi3", "llama"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("fast", ["plain", "fast"])
def test_dpo_loss_metrics_and_lora_gradients_equal_trl(tmp_path, tok, family, loss_type, fast):
    base = _base(family, tok)
    trainer = _trl_trainer("dpo", copy.deepcopy(base), tok, tmp_path, family, beta=0.1, loss_type=[loss_type])
    model, path = _phitune_model(base, trainer, family, fast)
    ours, theirs, _, _ = _batches(tok, tmp_path)

    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, theirs)
    trl_loss.backward()
    tc = TrainingConfig(method="dpo", beta=0.1, loss_type=loss_type)
    out = preference.pair_loss(model, ours, tc=tc, fast=path)
    loss = out.loss_sum / out.n_pairs
    loss.backward()

    n = int(out.n_pairs)
    logps = torch.tensor([out.sums["logps/chosen"], out.sums["logps/rejected"]]) / n
    tol_logp = _logp_tol(logps * n * 2)  # policy and reference sums of every row
    # d(loss)/d(delta) bound: beta for sigmoid and hinge (0 past its kink), 2 sqrt(loss) for IPO's square
    slope = 2 * abs(float(loss)) ** 0.5 if loss_type == "ipo" else 0.1
    if loss_type == "hinge":  # every pair on the linear side of the kink (sum relu(x) = sum x): gradients comparable
        assert abs(float(loss) - (1 - float(out.sums["rewards/margins"]) / n)) <= slope * 4 * tol_logp
    assert abs(float(loss) - float(trl_loss)) <= slope * 4 * tol_logp + EPS * abs(float(trl_loss))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in preference.METRICS:
        assert abs(float(out.sums[key]) / n - metrics[key]) <= tol_logp, key
    _assert_lora_grads_equal(model, trainer, ours)


# label_smoothing and rpo_alpha in TRL 1.16 terms. TRL 1.16's sigmoid loss ignores label_smoothing; conservative DPO,
# -(1-e) logsig(b d) - e logsig(-b d) (what TRL's sigmoid computed before 1.0, and what phitune keeps), is the
# weighted sum 2(1-e) x sigmoid - (1-2e) x robust of TRL 1.16's losses, robust being
# (-(1-e) logsig(b d) + e logsig(-b d)) / (1-2e). rpo_alpha (TRL < 1.0: alpha x the chosen replies' token-mean NLL)
# is TRL 1.16's loss_type [sigmoid, sft] with loss_weights [1, alpha].
E, ALPHA = 0.1, 0.5
VARIANTS = {
    "label_smoothing": ({"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * (1 - E), -(1 - 2 * E)],
                         "label_smoothing": E}, {"label_smoothing": E}),
    "rpo_alpha": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, ALPHA]}, {"rpo_alpha": ALPHA}),
}


@pytest.mark.parametrize("family", ["phi3", "llama"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_label_smoothing_and_rpo_alpha_losses_and_lora_gradients_equal_trl(tmp_path, tok, family, variant):
    trl_keys, ours_keys = VARIANTS[variant]
    base = _base(family, tok)
    trainer = _trl_trainer("dpo", copy.deepcopy(base), tok, tmp_path, family, beta=0.1, **trl_keys)
    model, path = _phitune_model(base, trainer, family, "plain")
    ours, theirs, _, _ = _batches(tok, tmp_path)

    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, theirs)
    trl_loss.backward()
    out = preference.pair_loss(model, ours, tc=TrainingConfig(method="dpo", beta=0.1, **ours_keys), fast=path)
    loss = out.loss_sum / out.n_pairs
    loss.backward()

    n = int(out.n_pairs)
    tol_logp = _logp_tol(torch.tensor([float(out.sums["logps/chosen"]), float(out.sums["logps/rejected"])]) * 2)
    # the DPO part: slope <= beta in delta, which carries 4 summed log-probs (policy and reference, both sides)
    tol = 0.1 * 4 * tol_logp
    if variant == "rpo_alpha":  # + alpha x a token mean of log-probs: the error of one
        tol += ALPHA * EPS * math.sqrt(REDUCTION) * float(out.sums["nll_loss"]) / n
    else:  # TRL adds two terms, each within 2x the loss here (|beta delta| << 1), with weights 2(1-e) and 1-2e
        assert abs(float(out.sums["rewards/margins"])) / n < 1
        tol += EPS * (2 * (1 - E) + (1 - 2 * E)) * 2 * abs(float(trl_loss))
    assert abs(float(loss) - float(trl_loss)) <= tol
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in preference.METRICS:
        assert abs(float(out.sums[key]) / n - metrics[key]) <= tol_logp, key
    _assert_lora_grads_equal(model, trainer, ours)


@pytest.mark.parametrize("family", ["phi3", "llama"])
@pytest.mark.parametrize("fast", ["plain", "fast"])
def test_orpo_loss_metrics_and_lora_gradients_equal_trl(tmp_path, tok, family, fast):
    base = _base(family, tok)
    trainer = _trl_trainer("orpo", copy.deepcopy(base), tok, tmp_path, family, beta=0.1)
    model, path = _phitune_model(base, trainer, family, fast)
    ours, _, theirs, _ = _batches(tok, tmp_path)

    trainer.model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, theirs)
    trl_loss.backward()
    out = preference.pair_loss(model, ours, tc=TrainingConfig(method="orpo", beta=0.1), fast=path)
    loss = out.loss_sum / out.n_pairs
    loss.backward()

    n = int(out.n_pairs)
    nll = float(out.sums["nll_loss"]) / n
    # per-token means: a mean of n log-probs carries the error of one; the NLL term is a mean too (slope 1)
    tol = (1 + 0.1) * EPS * math.sqrt(REDUCTION) * (nll + abs(float(out.sums["logps/chosen"]) / n)
                                          + abs(float(out.sums["logps/rejected"]) / n))
    assert abs(float(loss) - float(trl_loss)) <= tol
    assert abs(nll - trl_metrics["nll_loss"]) <= EPS * math.sqrt(REDUCTION) * nll
    for key in preference.METRICS:
        assert abs(float(out.sums[key]) / n - trl_metrics[key]) <= tol, key
    _assert_lora_grads_equal(model, trainer, ours)


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_reference_log_probs_with_adapters_off_equal_a_separately_loaded_base_model(tmp_path, tok, family):
    from transformers import AutoModelForCausalLM

    base = _base(family, tok)
    base.save_pretrained(tmp_path / "base")
    trainer = _trl_trainer("dpo", copy.deepcopy(base), tok, tmp_path, family)
    model, path = _phitune_model(base, trainer, family, "fast")
    ours, _, _, _ = _batches(tok, tmp_path)

    reference = preference.reference_logps(model, ours, path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        mask = preference.reply_positions(ours)
        separate = preference.token_logps(loaded, ours, mask, PLAIN).sum(1)
        policy = preference.token_logps(model, ours, mask, path).sum(1)
    assert torch.allclose(reference, separate, rtol=0, atol=_logp_tol(separate))
    assert (policy - separate).abs().max() > 10 * _logp_tol(separate)  # the adapter does move the policy


def test_phitune_renders_the_pair_as_trl_tokenizes_it_plus_one_bos(tmp_path, tok):
    """TRL tokenizes with apply_chat_template, which writes no BOS for Phi-3's template; phitune renders pairs as its
    SFT renders chats: exactly one BOS first. Everything after it is the same token for token."""
    base = _base("phi3", tok)
    trainer = _trl_trainer("dpo", base, tok, tmp_path, "phi3")
    _, _, _, prepared = _batches(tok, tmp_path)
    for k in range(len(WORDS)):
        row = trainer.train_dataset[k]
        for side, name in ((0, "chosen_ids"), (1, "rejected_ids")):
            ids, labels = prepared.train.arrays(2 * k + side)
            assert ids.tolist() == [tok.bos_token_id] + row["prompt_ids"] + row[name]
            assert ids[labels != -100].tolist() == row[name]  # the loss covers exactly TRL's completion
