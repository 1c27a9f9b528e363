"""QLoRA training throughput and memory: phitune on a 4-bit base against the cookbook's way (Trainer + peft +
bitsandbytes 4-bit), in one invocation.

The parent writes one random Phi-3-shaped model (safetensors) and runs each side as its own child process, both
loading it with the same BitsAndBytesConfig (nf4, double quant, compute dtype = bf16 on CUDA, fp32 on CPU):
  phitune  phitune.models.loading.load_kwargs -> prepare_kbit_training -> add_lora (fp32 adapters) -> gradient
  checkpointing
           -> apply_fast_path -> build_optimizer -> train_step(forward_loss), as train.py runs them
  peer     prepare_model_for_kbit_training -> get_peft_model -> transformers Trainer (the Phi-3 cookbook's QLoRA)
Same LoRA (r=16, alpha=32, dropout 0.05, all-linear), same random blocks (batch x seq, every token supervised), same
number of timed steps after warm-up. Peak memory: torch.cuda.max_memory_allocated on GPU, the child's peak RSS on
CPU. Prints one JSON line per run and a ratio line (phitune / peer).

  OMP_NUM_THREADS=1 python benchmarks/qlora_throughput.py --size tiny --seq 256 --batch 2 --steps 3 --repeat 2  # CPU
(one thread on a shared CPU: with more threads than free cores, oversubscription swings tokens/s by 2-3x per run)
  python benchmarks/qlora_throughput.py --size mini --device cuda --batch 1 --seq 2048 --steps 5 --ckpt
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def model_config(size: str):
    from transformers import Phi3Config

    if size == "mini":
        return Phi3Config()  # Phi-3-mini-4k shape, 3.8B
    if size == "small":
        return Phi3Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16)
    return Phi3Config(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8)


def dtype_for(device: str):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def write_model(a, folder: Path) -> None:
    import torch
    from transformers import Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = model_config(a.size)
    cfg.use_cache = False
    with torch.device(a.device):
        model = Phi3ForCausalLM._from_config(cfg, dtype=dtype_for(a.device))
    model.save_pretrained(folder, safe_serialization=True)


def blocks(a, vocab: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, a.batch, a.seq), generator=g)


def bnb_config(a):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype_for(a.device))


def _load(a, quantization_config):
    from transformers import AutoModelForCausalLM

    kw = {"device_map": {"": a.device}} if a.device == "cuda" else {}
    return AutoModelForCausalLM.from_pretrained(a.model_dir, quantization_config=quantization_config,
                                                dtype=dtype_for(a.device), attn_implementation=a.attn, **kw)


def _sync(a):
    import torch

    if a.device == "cuda":
        torch.cuda.synchronize()


def _peak(a, out: dict) -> dict:
    import torch

    if a.device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


# --- phitune ----------------------------------------------------------------------------------------------------------


def run_phitune(a) -> dict:
    import torch

    from phitune.models.loading import load_kwargs, prepare_kbit_training
    from phitune.adapt import add_lora
    from phitune.config import ModelConfig, TrainingConfig
    from phitune.training.loss import apply_fast_path, forward_loss
    from phitune.training.optim import autocast_context, build_optimizer, build_scheduler, enable_gradient_checkpointing
    from phitune.training.step import train_step

    dev = torch.device(a.device)
    mc = ModelConfig(name_or_path=a.model_dir, load_in_4bit=True,
                     quantization={"type": "nf4", "double_quant": True, "compute_dtype": "auto"})
    model = _load(a, load_kwargs(mc, dev, dtype_for(a.device))["quantization_config"])
    prepare_kbit_training(model)
    model.config.use_cache = False
    steps = a.warmup + a.steps
    tc = TrainingConfig(output_dir=tempfile.gettempdir(), per_device_train_batch_size=a.batch, max_steps=steps,
                        learning_rate=2e-4, gradient_checkpointing=a.ckpt, bf16=a.device == "cuda",
                        use_cpu=a.device == "cpu")
    add_lora(model, LORA, lora_dtype=torch.float32)
    enable_gradient_checkpointing(model, tc)
    fast = apply_fast_path(model, tc)
    model.train()
    optimizer = build_optimizer(model, tc, dev)
    scheduler = build_scheduler(optimizer, tc, steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    autocast = autocast_context(tc, dev)
    data = blocks(a, model.config.vocab_size, steps)
    for i in range(steps):
        if i == a.warmup:
            _sync(a)
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        ids = data[i]
        r = train_step(model, [{"input_ids": ids, "labels": ids}], optimizer, scheduler, scaler, tc, dev, autocast,
                       functools.partial(forward_loss, fast=fast))
    _sync(a)
    dt = time.perf_counter() - t0
    return _peak(a, {"run": "phitune", "tokens_per_s": round(a.steps * a.batch * a.seq / dt, 1),
                     "last_loss": round(r["loss"], 4), "fast_path": list(fast.notes)})


# --- the peer: the cookbook's QLoRA ----------------------------------------------------------------------------------


def run_peer(a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = _load(a, bnb_config(a))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    steps = a.warmup + a.steps
    data = blocks(a, model.config.vocab_size, steps)

    class Blocks(Dataset):
        def __len__(self):
            return steps * a.batch

        def __getitem__(self, i):
            x = data[i // a.batch, i % a.batch]
            return {"input_ids": x, "labels": x}

    times = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (a.warmup, steps):
                _sync(a)
                times[state.global_step] = time.perf_counter()
                if state.global_step == a.warmup and a.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, max_steps=steps,
                             learning_rate=2e-4, logging_steps=10**6, save_strategy="no", report_to=[],
                             bf16=a.device == "cuda", use_cpu=a.device == "cpu", gradient_checkpointing=a.ckpt,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Timer()])
    result = trainer.train()
    dt = times[steps] - times[a.warmup]
    return _peak(a, {"run": "peer", "tokens_per_s": round(a.steps * a.batch * a.seq / dt, 1),
                     "train_loss": round(result.training_loss, 4)})


# --- the parent -------------------------------------------------------------------------------------------------------


def run_measured(cmd: list[str], env: dict) -> tuple[dict | None, float, str]:
    """Run ``cmd``; return its JSON result line, its peak RSS in GiB, and stderr's tail."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        rows = [json.loads(x) for x in out.read().splitlines() if x.startswith('{"run"')]
        return (rows[-1] if rows else None), usage.ru_maxrss / 2**20, err.read()[-1500:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "mini"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--runs", default="peer,phitune")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate the runs this many times and keep each one's best tokens/s (for a busy CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = p.parse_args(argv)
    if a.smoke:  # explicit arguments still win
        p.set_defaults(size="tiny", seq=32, batch=1, warmup=1, steps=1)
        a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_phitune(a) if a.child == "phitune" else run_peer(a)), flush=True)
        return

    import torch

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from importlib.metadata import version  # the children import them; the parent only names them

    print(json.dumps({"device": a.device, "torch": torch.__version__, "bitsandbytes": version("bitsandbytes"),
                      "peft": version("peft"), "threads": torch.get_num_threads(), "size": a.size, "batch": a.batch,
                      "seq": a.seq, "steps": a.steps, "gradient_checkpointing": a.ckpt, "lora": LORA}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_model(a, Path(tmp))
        if a.device == "cuda":
            torch.cuda.empty_cache()
        common = [sys.executable, __file__, "--size", a.size, "--device", a.device, "--attn", a.attn,
                  "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps),
                  "--model-dir", tmp] + (["--ckpt"] if a.ckpt else [])
        results, failed = {}, []
        for _ in range(a.repeat):
            for run in a.runs.split(","):
                row, rss, err = run_measured(common + ["--child", run], env)
                row = row or {"run": run, "error": err}
                if "error" in row:
                    failed.append(run)
                if a.device != "cuda":
                    row["peak_rss_gib"] = round(rss, 3)
                print(json.dumps(row), flush=True)
                if row.get("tokens_per_s", -1) > results.get(run, {}).get("tokens_per_s", -1):
                    results[run] = row
    ours, peer = results.get("phitune", {}), results.get("peer", {})
    if "tokens_per_s" in ours and "tokens_per_s" in peer:
        mem = "peak_mem_gib" if a.device == "cuda" else "peak_rss_gib"
        print(json.dumps({"ratio": f"phitune / peer (best of {a.repeat})",
                          "tokens_per_s": round(ours["tokens_per_s"] / peer["tokens_per_s"], 3),
                          "peak_memory": round(ours[mem] / peer[mem], 3)}), flush=True)
    if failed:  # a failing run fails the invocation, after every row is printed
        sys.exit(f"run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
