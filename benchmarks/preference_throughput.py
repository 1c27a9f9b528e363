"""DPO throughput and peak memory: phitune against TRL's DPOTrainer + peft, same model shape, data and LoRA, in one run.

Each run is its own child process, so peak memory is measured per run: RSS on CPU (os.wait4's ru_maxrss, which
includes what each imports: TRL brings the Trainer, accelerate and datasets), torch.cuda.max_memory_allocated on GPU.
Both use the reference policy TRL uses with peft and phitune uses with LoRA: the same model with its adapters off
(one no-grad forward per micro-batch, no precomputation), the sigmoid loss, beta 0.1, AdamW, LoRA r 16 on every
linear layer (phitune's Phi-3 slices qkv_proj/gate_up_proj per projection; peft adapts the fused layers as one),
dropout 0, gradient checkpointing off in both (``--ckpt``: on in both; TRL's DPOConfig defaults to on). Pairs: a
random-word prompt and two random-word replies of log-normal lengths (seed 0), as chat records both tokenize with
the model's chat template. Timing: ``--warmup`` steps, then ``--steps`` timed steps;
pairs/s = timed pairs / timed seconds (phitune: around train_step; TRL: between its step callbacks).

  python benchmarks/preference_throughput.py --smoke     # a tiny model (CI; ~25 s of CPU, TRL import included)
  python benchmarks/preference_throughput.py --size small --batch 4 --steps 4
  python benchmarks/preference_throughput.py --size small --device cuda --batch 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
         "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
         "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16)}


def model_dir(a, root: Path) -> Path:
    """A randomly initialised Phi-3 of the size asked (Phi-3's 32,064-token vocabulary) and the Phi-3-style
    tokenizer, saved where both children load them."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.models.tokenizer import build_phi3_style_tokenizer

    tok = build_phi3_style_tokenizer()
    shape = dict(SIZES[a.size], num_key_value_heads=SIZES[a.size]["num_attention_heads"])
    cfg = Phi3Config(vocab_size=max(len(tok), 32064), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def pairs(n: int, prompt_words: int, reply_words: int) -> list[dict]:
    rng = random.Random(0)
    vocab = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "glass", "mouse", "candle", "forest",
             "rocket", "amber", "delta", "harbor", "meadow"]

    def words(median):
        k = max(2, int(math.exp(rng.gauss(math.log(median), 0.5))))
        return " ".join(rng.choice(vocab) for _ in range(k))

    return [{"prompt": [{"role": "user", "content": words(prompt_words)}],
             "chosen": [{"role": "assistant", "content": words(reply_words)}],
             "rejected": [{"role": "assistant", "content": words(reply_words)}]} for _ in range(n)]


# --- children ---------------------------------------------------------------------------------------------------------


def child_phitune(a, folder: Path, data: Path) -> dict:
    import torch

    from phitune.adapt import add_lora
    from phitune.config.training_args import TrainingConfig
    from phitune.data.preference import pair_plan, prepare_preference_data
    from phitune.models.loading import load_model_and_tokenizer
    from phitune.training import preference
    from phitune.training.loss import apply_fast_path
    from phitune.training.optim import (autocast_context, build_optimizer, build_scheduler,
                                        enable_gradient_checkpointing)
    from phitune.training.step import process_batch, train_step

    dev = torch.device(a.device)
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    model, tok = load_model_and_tokenizer({"name_or_path": str(folder / "model"), "dtype": dtype}, device=dev)
    steps = a.warmup + a.steps
    tc = TrainingConfig(output_dir=str(folder / "out"), method="dpo", per_device_train_batch_size=a.batch,
                        max_steps=steps, learning_rate=5e-5, use_cpu=a.device == "cpu", bf16=a.device == "cuda",
                        gradient_checkpointing=a.ckpt)
    add_lora(model, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
             lora_dtype=torch.float32)
    enable_gradient_checkpointing(model, tc)
    fast = apply_fast_path(model, tc)
    model.train()
    prepared = prepare_preference_data({"train": str(data), "max_seq_length": a.max_length, "cache": False}, tok)
    plan = pair_plan(prepared.train, a.batch, seed=0, epoch=0)
    make = preference.pair_batch_maker(model, tok, prepared.config, fast)
    forward, units = preference.objective(tc, fast)
    optimizer = build_optimizer(model, tc, dev)
    scheduler = build_scheduler(optimizer, tc, steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    autocast = autocast_context(tc, dev)
    timed = 0
    for i in range(steps):
        if i == a.warmup:
            _sync(a)
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        batch = process_batch(make, prepared.train, plan[i % len(plan)])
        r = train_step(model, [batch], optimizer, scheduler, scaler, tc, dev, autocast, forward, units)
        timed += r["tokens"] if i >= a.warmup else 0
    _sync(a)
    out = {"run": "phitune", "pairs_per_s": round(timed / (time.perf_counter() - t0), 3),
           "last_loss": round(r["loss"], 4),
           "rewards/margins": round(r["sums"]["rewards/margins"] / max(r["tokens"], 1), 5)}
    if a.device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def child_trl(a, folder: Path, data: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=dtype).to(a.device)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    steps = a.warmup + a.steps
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.warmup:
                _sync(a)
                if a.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                _sync(a)
                marks.append(time.perf_counter())

    args = DPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=a.batch, max_steps=steps,
                     learning_rate=5e-5, beta=0.1, loss_type=["sigmoid"], max_length=a.max_length, report_to=[],
                     logging_steps=10**6, save_strategy="no", use_cpu=a.device == "cpu", bf16=a.device == "cuda",
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="linear", warmup_steps=0,
                     gradient_checkpointing=a.ckpt)  # TRL's default is on; both run the same way here
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=lora, callbacks=[Clock()])
    result = trainer.train()
    out = {"run": "trl", "pairs_per_s": round(a.steps * a.batch / (marks[1] - marks[0]), 3),
           "mean_loss": round(result.training_loss, 4)}  # the Trainer reports the run's mean, not the last step
    if a.device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _sync(a):
    if a.device == "cuda":
        import torch

        torch.cuda.synchronize()


# --- parent -----------------------------------------------------------------------------------------------------------


def _json(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:  # the Trainer prints Python dicts too
        return {}


def run_measured(cmd: list[str], env: dict) -> tuple[dict, float, str]:
    """Run ``cmd``; its JSON result line, its peak RSS in GiB, and stderr's tail."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        rows = [r for r in map(_json, out.read().splitlines()) if "run" in r]
        tail = err.read()[-1500:]
    row = rows[-1] if rows and os.waitstatus_to_exitcode(status) == 0 else {"error": tail}
    return row, usage.ru_maxrss / 2**20, tail  # ru_maxrss is KiB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=40)
    p.add_argument("--reply-words", type=int, default=60)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing in both (TRL's default; off: both)")
    p.add_argument("--repeat", type=int, default=1, help="run both this many times, interleaved; best of each")
    p.add_argument("--smoke", action="store_true", help="tiny model, 8 pairs, 2 timed steps (CI)")
    p.add_argument("--child", choices=["phitune", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.size, a.batch, a.pairs, a.prompt_words, a.reply_words, a.steps, a.warmup = "tiny", 2, 8, 8, 8, 2, 1
    if a.child:
        folder = Path(a.folder)
        run = child_phitune if a.child == "phitune" else child_trl
        print(json.dumps(run(a, folder, folder / "pairs.jsonl")), flush=True)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir(a, folder)
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                    pairs(a.pairs, a.prompt_words, a.reply_words)))
        print(json.dumps({"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "size": a.size, **SIZES[a.size], "vocab": 32064, "pairs_per_step": a.batch,
                          "timed_steps": a.steps, "max_length": a.max_length, "gradient_checkpointing": a.ckpt}),
              flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TOKENIZERS_PARALLELISM="false")
        best: dict = {}
        args = ["--size", a.size, "--device", a.device, "--batch", str(a.batch), "--max-length", str(a.max_length),
                "--warmup", str(a.warmup), "--steps", str(a.steps), "--folder", tmp] + (["--ckpt"] if a.ckpt else [])
        for _ in range(max(1, a.repeat)):
            for name in ("trl", "phitune"):
                row, rss, _ = run_measured([sys.executable, __file__, *args, "--child", name], env)
                row.setdefault("run", name)
                if a.device != "cuda":
                    row["peak_rss_gib"] = round(rss, 3)
                print(json.dumps(row), flush=True)
                if "pairs_per_s" in row and row["pairs_per_s"] > best.get(name, {}).get("pairs_per_s", -1):
                    best[name] = row
    if "trl" in best and "phitune" in best:
        mem = "peak_mem_gib" if a.device == "cuda" else "peak_rss_gib"
        ours, theirs = best["phitune"], best["trl"]
        print(json.dumps({"ratio": "phitune / trl",
                          "pairs_per_s": round(ours["pairs_per_s"] / theirs["pairs_per_s"], 3),
                          "peak_memory": round(ours[mem] / theirs[mem], 3)}), flush=True)


if __name__ == "__main__":
    main()
