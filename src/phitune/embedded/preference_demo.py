"""``phitune demo --preference``: DPO with LoRA on the CPU, offline, starting from the chat-tuned demo model.

1. SFT: the embedded demo's run (``examples/demo.yaml``) teaches the tiny pretrained Phi-3 to answer chat questions;
   its answers are whole sentences ("The home of Taimfel Bilby is in Brindle."). The adapter is merged: that model
   is the start, and DPO's reference.
2. Pairs whose chosen reply follows a rule the model does not follow yet: the sentence exclaimed ("The home of
   Taimfel Bilby is in Brindle!") is chosen, the plain one rejected. (A bare-fact rule, "Brindle.", was tried first:
   this model recalls a fact only through its sentence, so DPO learned the form and lost the facts.) Train pairs
   come from the demo's chat data (people it was tuned on), held-out pairs from ``held_out.jsonl`` (the others).
3. DPO (``training_config.method: dpo``) through :func:`phitune.finetune`, then :func:`phitune.evaluate` with
   ``generate=True, compare_base=True`` on the held-out pairs: preference accuracy (chosen more likely than
   rejected) and exact match against the chosen reply, before (the SFT model: LoRA off) and after; the report is
   ``OUT/dpo/eval/report.html``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..adapt import merge_lora
from ..config import load_config
from ..evals.evaluate import evaluate
from ..runs import ownership as outdir
from ..training.train import finetune
from .demo import CONFIG_FILE, EVAL_FILE, HELD_OUT_FILE, MODEL_DIR, TRAIN_FILE, _check_assets, read_held_out

DEFAULT_OUTPUT_DIR = "phitune-demo-preference"
# DPO settings for the tiny model: a large step size suits LoRA on a 1M-parameter model (as the SFT demo's 3e-3).
# rpo_alpha 1: DPO alone pushed both replies' likelihood down (logps/chosen -36 -> -62) until greedy answers
# collapsed to "........" (held-out exact match 0 %); the NLL term on the chosen reply keeps them (88 %).
DPO_SETTINGS = {"method": "dpo", "beta": 0.1, "rpo_alpha": 1.0, "learning_rate": 2e-3, "num_train_epochs": 1,
                "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.05, "logging_steps": 10, "save_strategy": "no", "use_cpu": True,
                "overwrite_output_dir": True, "seed": 0}


@dataclass
class PreferenceDemoResult:
    """What ``preference_demo`` returns: the DPO run folder, the held-out numbers before (the SFT model) and after
    DPO, and the report."""

    output_dir: Path
    preference_accuracy_before: float
    preference_accuracy_after: float
    exact_match_before: float
    exact_match_after: float
    n_pairs: int
    wall_s: float
    report: Path | None = None


def exclaimed(sentence: str) -> str:
    """A demo answer exclaimed: its final full stop becomes "!" ("The home of X is in Brindle." -> "... Brindle!")."""
    return (sentence[:-1] if sentence.endswith(".") else sentence) + "!"


def train_pairs(path: str | os.PathLike = TRAIN_FILE) -> list[dict]:
    """One pair per question of the demo's chat data: the question (with the turns before it), the answer exclaimed
    chosen, the plain sentence the SFT model was taught rejected."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                out.append({"prompt": msgs[:i], "chosen": exclaimed(m["content"]), "rejected": m["content"]})
    return out


def held_out_pairs(questions: Sequence[dict]) -> list[dict]:
    """The held-out questions (people never in the chat data) as pairs of the same rule."""
    return [{"prompt": q["messages"], "chosen": exclaimed(q["answer"]), "rejected": q["answer"]}
            for q in questions]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def preference_demo(output_dir: str | os.PathLike | None = None, *, sft_steps: int | None = None,
                    max_steps: int | None = None, max_pairs: int | None = None,
                    overrides: Sequence[str] | None = None, out=None) -> PreferenceDemoResult:
    """SFT the bundled tiny Phi-3 (the demo's run), merge it, then DPO it towards exclaimed answers, and print
    preference accuracy and exact match on held-out pairs before and after (see the module docstring).

    ``sft_steps``/``max_steps`` shorten the two trainings and ``max_pairs`` the held-out evaluation (tests use
    them); ``overrides`` (``training_config.key=value``...) apply to the DPO run."""
    started = time.perf_counter()
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_assets()
    root = Path(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR)
    outdir.check_output_folder(root, what="demo --out", owned=outdir.is_demo_folder, owner="phitune demo",
                               choose="choose another folder: phitune demo --preference --out NEW_DIR")
    (root / outdir.DEMO_MARKER).write_text(json.dumps({"written_by": "phitune demo"}) + "\n", encoding="utf-8")

    say("phitune demo --preference: DPO with LoRA on the CPU, from the chat-tuned demo model")
    sft_settings = [f"model.name_or_path={MODEL_DIR}", f"data.train={TRAIN_FILE}", f"data.eval={EVAL_FILE}",
                    f"training_config.output_dir={root / 'sft'}", f"data.cache_dir={root / 'data_cache'}"]
    if sft_steps is not None:
        sft_settings.append(f"training_config.max_steps={sft_steps}")
    t = time.perf_counter()
    say(f"[1/3] SFT (the demo's run, examples/demo.yaml) -> {root / 'sft'}; merged -> {root / 'sft-merged'}")
    sft = finetune(load_config(CONFIG_FILE, sft_settings))
    merged = merge_lora(sft.model)
    merged.save_pretrained(root / "sft-merged")
    sft.tokenizer.save_pretrained(root / "sft-merged")
    sft_s = time.perf_counter() - t
    del sft, merged

    questions = read_held_out(HELD_OUT_FILE)[:max_pairs]
    train_file = _write_jsonl(root / "pairs_train.jsonl", train_pairs())
    eval_file = _write_jsonl(root / "pairs_held_out.jsonl", held_out_pairs(questions))
    example = held_out_pairs(questions[:1])[0]
    say(f"[2/3] DPO on {sum(1 for _ in open(train_file))} pairs: chosen {example['chosen']!r} over rejected "
        f"{example['rejected']!r} -> {root / 'dpo'}")
    base = load_config(CONFIG_FILE)
    config = {"model": {"name_or_path": str(root / "sft-merged"), "dtype": "float32"},
              "data": {"train": str(train_file), "eval": str(eval_file), "max_seq_length": base.data.max_seq_length,
                       "cache_dir": str(root / "data_cache")},
              "training_config": {**DPO_SETTINGS, "output_dir": str(root / "dpo"),
                                  **({"max_steps": max_steps} if max_steps is not None else {})},
              "peft_config": {"r": base.peft_config.r, "lora_alpha": base.peft_config.lora_alpha,
                              "target_modules": base.peft_config.target_modules, "lora_dropout": 0.0}}
    t = time.perf_counter()
    run = finetune(config, overrides=list(overrides or []))
    dpo_s = time.perf_counter() - t

    t = time.perf_counter()
    say(f"[3/3] the SFT model (LoRA off) and the DPO-tuned one on {len(questions)} held-out pairs")
    metrics = evaluate(run.output_dir, generate=True, compare_base=True, max_new_tokens=24, verbose=False)
    eval_s = time.perf_counter() - t
    wall = time.perf_counter() - started
    result = PreferenceDemoResult(
        output_dir=Path(run.output_dir), preference_accuracy_before=metrics["base_eval_preference_accuracy"],
        preference_accuracy_after=metrics["eval_preference_accuracy"],
        exact_match_before=metrics["base_gen_exact_match"], exact_match_after=metrics["gen_exact_match"],
        n_pairs=len(questions), wall_s=wall, report=Path(metrics["report"]))
    (Path(run.output_dir) / "demo_preference.json").write_text(json.dumps(
        {"preference_accuracy_before": result.preference_accuracy_before,
         "preference_accuracy_after": result.preference_accuracy_after,
         "exact_match_before": result.exact_match_before, "exact_match_after": result.exact_match_after,
         "held_out_pairs": len(questions), "wall_s": round(wall, 1), "sft_s": round(sft_s, 1),
         "dpo_s": round(dpo_s, 1), "eval_s": round(eval_s, 1)}, indent=1), encoding="utf-8")
    say("")
    say(f"held-out pairs ({len(questions)} people never in the training data), SFT model -> after DPO:")
    say(f"  preference accuracy (chosen more likely than rejected): {result.preference_accuracy_before:.0%} -> "
        f"{result.preference_accuracy_after:.0%}")
    say(f"  exact match with the chosen (exclaimed) answer:          {result.exact_match_before:.0%} -> "
        f"{result.exact_match_after:.0%}")
    say(f"wall time {wall:.0f} s (SFT {sft_s:.0f} s, DPO {dpo_s:.0f} s, evaluation {eval_s:.0f} s)")
    say(f"report: {result.report}")
    return result
