"""phitune's training step against the peer's (Trainer + peft, ../shared/bench/peer_baseline.py) on an H200, both
PREDICTED by phitune plan's machinery in one invocation: peak memory, step time and the ratio of tokens/s.

Both steps run on the same fake CUDA device (phitune.plan.fakegpu) under the same MemTracker and op recorder; each
op is priced by the same roofline at the H200's measured rates (phitune.plan.gpus), and the model is simulated at 2
and 4 decoder layers and extrapolated to 32 (phitune.plan.predict). The peer is simulated exactly as
benchmarks/plan_accuracy.py does (bf16 weights, LoraConfig(r=16, alpha=32, dropout=0.05, all-linear), Trainer's
bf16 autocast, fused AdamW, grad-norm clip). phitune: the same LoRA (float32 factors), training_config bf16: true,
its fast path, packing. Ratios of two predictions made the same way are the figures of merit: the roofline's
calibration factor (measured / roofline, see plan_accuracy.py) cancels in them.

Settings (Phi-3-mini shape, sequence 2048):
  blocks_b4       fixed 2048-token blocks, batch 4, no checkpointing
  blocks_b8_ckpt  fixed blocks, batch 8, gradient checkpointing
  chat_b4         peer_baseline.py's chat lengths (log-normal, median 300, first 40 % prompt), batch 4: the peer
                  right-pads each batch to its longest sample (simulated at the mean padded length of the sample
                  set), phitune packs; the ratio is of supervised tokens/s over the same samples
  qlora_b4        phitune QLoRA (NF4, double quant), batch 4, no checkpointing; against phitune LoRA's activations
  qlora_b1_ckpt   phitune QLoRA, batch 1, checkpointing (the qlora example)

    python benchmarks/gpu_predicted.py                         # the five settings (a few minutes on one core)
    python benchmarks/gpu_predicted.py --settings blocks_b4    # one
    python benchmarks/gpu_predicted.py --smoke                 # blocks_b4 on a tiny shape, seconds

Last lines: one JSON object per setting (the contract of issue 24). Every number printed is a prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from phitune.plan import fakegpu  # noqa: E402

if __name__ == "__main__":
    fakegpu.reexec_on_fake_cuda(str(Path(__file__).resolve()), sys.argv[1:])

import torch  # noqa: E402
from transformers import Phi3Config  # noqa: E402

from phitune.config import load_config  # noqa: E402
from phitune.data import batch_plan  # noqa: E402
from phitune.plan import gpus, predict  # noqa: E402
from phitune.plan.simulate import simulate_step  # noqa: E402

GiB = 2**30
SEQ = 2048
SETTINGS = ("blocks_b4", "blocks_b8_ckpt", "chat_b4", "qlora_b4", "qlora_b1_ckpt")
CHAT_SAMPLES = 256  # the chat sample set both sides train on (peer_baseline.py's distribution)
TOP_OPS = 8


def phitune_config(batch: int, checkpointing: bool = False, four_bit: bool = False, seq: int = SEQ):
    """phitune's run config for a setting: the peer's LoRA hyperparameters, bf16, the fast path, packing."""
    model = {"name_or_path": "microsoft/Phi-3-mini-4k-instruct", "dtype": "auto"}
    if four_bit:
        model.update({"load_in_4bit": True, "quantization": {"type": "nf4", "double_quant": True}})
    return load_config({
        "model": model,
        "data": {"train": "unused.jsonl", "max_seq_length": seq, "packing": True},
        "training_config": {"per_device_train_batch_size": batch, "bf16": True, "max_steps": 10,
                            "gradient_checkpointing": checkpointing},
        "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}})


def chat_samples(n: int, seq: int, vocab: int) -> list[dict]:
    """peer_baseline.py's ChatLengths: log-normal lengths (median 300, sigma 0.8) in [32, seq], first 40 % prompt."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(300)).clamp(32, seq).long().tolist()
    samples = []
    for n_tok in lengths:
        ids = torch.randint(0, vocab, (n_tok,), generator=g).tolist()
        labels = list(ids)
        labels[: int(n_tok * 0.4)] = [-100] * int(n_tok * 0.4)
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def supervised(sample: dict) -> int:
    """Positions whose next token is a label (the loss's count)."""
    return sum(1 for t in sample["labels"][1:] if t != -100)


def depths(hf_config) -> list[int]:
    return [hf_config.num_hidden_layers] if hf_config.num_hidden_layers <= 4 else list(predict.SHORT_DEPTHS)


def phitune_steps(cfg, hf_config, samples=None, entry=None):
    return [simulate_step(cfg, hf_config, n, "cuda", samples=samples, entry=entry) for n in depths(hf_config)]


def peer_steps(row, hf_config):
    from plan_accuracy import simulate_peer

    return [simulate_peer(row, n, hf_config) for n in depths(hf_config)]


def summary(steps, layers: int, tokens: int) -> dict:
    """Peak, activations, roofline step time at the H200's rates and the top ops of one extrapolated step."""
    h200 = gpus.GPUS["H200"]

    def ext(value):
        return predict.extrapolate(steps, layers, value)

    def by_op(step):
        agg = defaultdict(lambda: [0, 0, 0, 0.0])
        for o in step.ops:
            if o.no_move:
                continue
            a = agg[o.name]
            a[0] += 1
            a[1] += o.flops
            a[2] += o.nbytes
            a[3] += gpus.op_seconds(o.flops, o.nbytes, o.half, h200)
        return agg

    per_depth = [by_op(s) for s in steps]
    names = set().union(*per_depth)
    ops = []
    for name in names:
        at = [d.get(name, [0, 0, 0, 0.0]) for d in per_depth]
        vals = [at[0][k] if len(at) == 1 else predict._line(at[0][k], at[1][k], layers, (steps[0].layers,
                                                                                          steps[1].layers))
                for k in range(4)]
        ops.append({"name": name, "count": round(vals[0]), "flops": vals[1], "bytes": vals[2], "ms": vals[3] * 1e3})
    ops.sort(key=lambda o: -o["ms"])
    roof = ext(lambda s: gpus.roofline_seconds(s.ops, h200))
    launches = ext(lambda s: gpus.kernels(s.ops))
    return {"peak_gib": ext(lambda s: s.peak["Total"]) / GiB,
            "activation_gib": ext(lambda s: s.peak.get("Activation", 0)) / GiB,
            "roofline_s": roof, "range_s": (roof * gpus.TIME_RANGE[0],
                                            roof * gpus.TIME_RANGE[1] + launches * gpus.LAUNCH_S),
            "tokens": tokens, "tokens_per_s": tokens / roof, "ops": ops}


def run_setting(name: str, hf_config) -> dict:
    """Both sides of one setting, predicted."""
    from plan_accuracy import Row

    started = time.perf_counter()
    layers, seq = hf_config.num_hidden_layers, min(SEQ, hf_config.max_position_embeddings)
    out = {"setting": name, "phitune": None, "peer": None, "lora": None}
    if name in ("blocks_b4", "blocks_b8_ckpt"):
        batch, ckpt = (4, False) if name == "blocks_b4" else (8, True)
        steps = phitune_steps(phitune_config(batch, ckpt, seq=seq), hf_config)
        out["phitune"] = summary(steps, layers, steps[-1].supervised)
        row = Row(name, "trainer", batch, seq, 0.0, checkpointing=ckpt)
        out["peer"] = summary(peer_steps(row, hf_config), layers, batch * (seq - 1))
    elif name == "chat_b4":
        samples = chat_samples(CHAT_SAMPLES, seq, hf_config.vocab_size)
        total_supervised = sum(supervised(s) for s in samples)
        plan = batch_plan(samples, 4, seq, True, 0, 0)
        entry = plan[0]  # one packed micro-batch: its rows are (nearly) full, as all but the last are
        used = sorted({i for r in entry for i in r})
        where = {i: k for k, i in enumerate(used)}
        steps = phitune_steps(phitune_config(4, seq=seq), hf_config, [samples[i] for i in used],
                              [[where[i] for i in r] for r in entry])
        out["phitune"] = summary(steps, layers, steps[-1].supervised)
        out["phitune"]["note"] = f"{len(plan)} packed micro-batches for {CHAT_SAMPLES} samples"
        # supervised tokens/s over the whole set: every micro-batch costs about the first one's time
        out["phitune"]["tokens_per_s"] = total_supervised / (len(plan) * out["phitune"]["roofline_s"])
        padded = [max(len(samples[i]["input_ids"]) for i in range(k, min(k + 4, len(samples))))
                  for k in range(0, len(samples), 4)]  # the peer's sequential sampler, right-padded
        mean_padded = round(sum(padded) / len(padded))
        row = Row(name, "trainer", 4, mean_padded, 0.0, chat=True)
        out["peer"] = summary(peer_steps(row, hf_config), layers, 4 * (mean_padded - 1))
        out["peer"]["note"] = f"{len(padded)} batches, padded to {mean_padded} tokens on average"
        out["peer"]["tokens_per_s"] = total_supervised / (len(padded) * out["peer"]["roofline_s"])
    else:
        batch, ckpt = (4, False) if name == "qlora_b4" else (1, True)
        steps = phitune_steps(phitune_config(batch, ckpt, four_bit=True, seq=seq), hf_config)
        out["phitune"] = summary(steps, layers, steps[-1].supervised)
        lora = phitune_steps(phitune_config(batch, ckpt, seq=seq), hf_config)
        out["lora"] = summary(lora, layers, lora[-1].supervised)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def contract(r: dict) -> dict:
    """The issue's JSON line for one setting (null where a field does not apply)."""
    ph, peer, lora = r["phitune"], r["peer"], r["lora"]
    return {"setting": r["setting"],
            "phitune_peak_gib": round(ph["peak_gib"], 2),
            "peer_peak_gib": round(peer["peak_gib"], 2) if peer else None,
            "ratio_tokens_per_s": round(ph["tokens_per_s"] / peer["tokens_per_s"], 3) if peer else None,
            "phitune_activation_gib": round(ph["activation_gib"], 3) if lora else None,
            "lora_activation_gib": round(lora["activation_gib"], 3) if lora else None}


def print_side(label: str, s: dict) -> None:
    lo, hi = s["range_s"]
    print(f"  {label:<8} predicted peak {s['peak_gib']:6.2f} GiB (activations {s['activation_gib']:.2f} GiB), "
          f"predicted step {s['roofline_s'] * 1e3:7.1f} ms at the H200's roofline (plan range {lo * 1e3:.0f}-"
          f"{hi * 1e3:.0f} ms), predicted {s['tokens_per_s']:,.0f} tokens/s (roofline)"
          + (f"  [{s['note']}]" if s.get("note") else ""))
    print(f"    top ops by predicted time: {'name':<44} {'count':>6} {'GFLOP':>10} {'MB':>10} {'ms':>8}")
    for o in s["ops"][:TOP_OPS]:
        print(f"    {'':<27}{o['name'][:44]:<44} {o['count']:>6} {o['flops'] / 1e9:>10.1f} "
              f"{o['bytes'] / 1e6:>10.1f} {o['ms']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, from " + ", ".join(SETTINGS))
    parser.add_argument("--smoke", action="store_true", help="blocks_b4 on a tiny Phi-3 shape (seconds)")
    args = parser.parse_args()
    chosen = args.settings.split(",")
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    hf_config = Phi3Config()
    if args.smoke:
        chosen = ["blocks_b4"]
        hf_config = Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256,
                               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    print(f"All numbers below are PREDICTED by phitune plan's machinery (fake CUDA device, roofline at the H200's "
          f"measured rates), not measured. Shape: {hf_config.num_hidden_layers} layers, hidden "
          f"{hf_config.hidden_size}, sequence {min(SEQ, hf_config.max_position_embeddings)}.", flush=True)
    results = []
    for name in chosen:
        r = run_setting(name, hf_config)
        results.append(r)
        print(f"{name} ({r['seconds']} s to simulate)")
        print_side("phitune", r["phitune"])
        if r["peer"]:
            print_side("peer", r["peer"])
            ratio = r["phitune"]["tokens_per_s"] / r["peer"]["tokens_per_s"]
            print(f"  predicted ratio phitune/peer tokens/s: {ratio:.2f}"
                  + (" (supervised tokens)" if name == "chat_b4" else ""))
        if r["lora"]:
            print_side("LoRA", r["lora"])
            print(f"  predicted activations QLoRA/LoRA: "
                  f"{r['phitune']['activation_gib'] / max(r['lora']['activation_gib'], 1e-12):.3f}")
        sys.stdout.flush()
    for r in results:
        print(json.dumps(contract(r)))
    sys.stdout.flush()
    os._exit(0)  # skip teardown: the fake device's autograd thread


if __name__ == "__main__":
    main()
