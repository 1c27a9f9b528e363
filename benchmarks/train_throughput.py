"""Training throughput: phitune's normal training path against the peer (Trainer + peft), in one invocation.

Each run is its own child process (the peer: ../shared/bench/peer_baseline.py; phitune: this file with --child), so
peak memory is measured per run: RSS on CPU (os.wait4's ru_maxrss), torch.cuda.max_memory_allocated on GPU. Prints
one JSON line per run, then one ratio line per phitune variant against the first peer variant.

phitune's path is train.py's: add_lora (fp32 adapters) -> gradient checkpointing -> apply_fast_path -> batch_plan /
collate (packing) -> build_optimizer -> train_step(forward_loss). Variants turn fast-path pieces off one at a time:
  fast         apply_fast_path as train.py calls it (everything that helps on this device)
  plain        fast_path off and the loss from model(...).logits: the same loop with no fast path
  no_loss      fast path without the chunked lm_head cross-entropy
  no_lora      ... without the fused LoRA-linear function          no_mlp   ... without the fused SwiGLU+down
  no_norm      ... without the fused RMSNorm                       no_rope  ... without the fused qkv split + RoPE
  dense        ... keeping sdpa and the dense 4-D packed mask (no varlen attention)
  compile      fast + torch_compile (decoder layers)               liger    fast + use_liger_kernel (CUDA)
Append "+ckpt" to a variant for gradient checkpointing (e.g. fast+ckpt).
``--bf16`` (a CPU with bfloat16 matrix hardware, or CUDA): phitune with ``training_config.bf16: true`` and its base
dtype rule (models.loading.resolve_dtype: the frozen base in bfloat16 where the hardware has it, LoRA factors and
optimizer state float32); the peer with its --bf16 (model loaded in bfloat16, TrainingArguments(bf16=True), as the
cookbook does).

  python benchmarks/train_throughput.py --size small --seq 512 --batch 2 --steps 3 --variants fast,plain
  python benchmarks/train_throughput.py --bf16 --size small --seq 512 --batch 2 --steps 3 --variants fast
  python benchmarks/train_throughput.py --size mini --device cuda --batch 4 --seq 2048 --data chat \
      --variants fast --peer base,liger
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the phitune variants of the module docstring, each optionally followed by "+ckpt"
VARIANTS = ("fast", "plain", "no_loss", "no_lora", "no_mlp", "no_norm", "no_rope", "dense", "compile", "liger")


def peer_script(required: bool = True) -> Path | None:
    env = os.environ.get("PHITUNE_PEER_DIR")
    for d in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "bench", ROOT / "shared" / "bench"]:
        if (d / "peer_baseline.py").exists():
            return d / "peer_baseline.py"
    if not required:
        return None
    raise SystemExit("peer_baseline.py not found: set PHITUNE_PEER_DIR to the folder holding it")


def unknown_variants(variants: str) -> list[str]:
    """The names in a --variants list that are not a VARIANTS entry with an optional "+ckpt"."""
    out = []
    for v in filter(None, variants.split(",")):
        base, plus, extra = v.partition("+")
        if base not in VARIANTS or (plus and extra != "ckpt"):
            out.append(v)
    return out


def model_config(size: str):
    from transformers import Phi3Config

    if size == "mini":
        return Phi3Config()  # Phi-3-mini-4k shape, 3.8B (as peer_baseline.py)
    if size == "small":
        return Phi3Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16)
    return Phi3Config(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8)


def flops_per_token(cfg, attn_len: float) -> float:
    """Forward FLOPs per token: 2 x linear weights (layers + lm_head) + attention (as peer_baseline.py counts)."""
    H, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size  # F: MLP width
    hd = H // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    lin = L * (H * (H + 2 * kv) + H * H + H * 2 * F + F * H) + H * V
    return 2 * lin + 4 * attn_len * H * L


def chat_lengths(n: int, seq: int):
    """The same draws as peer_baseline.ChatLengths (seed 0; log-normal, median 300, capped at seq; 40% prompt)."""
    import torch

    g = torch.Generator().manual_seed(0)
    lens = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(300)).clamp(32, seq).long()
    return lens, g


def make_samples(a, vocab: int, n_rows: int):
    """Tokenized samples (input_ids, labels lists) for phitune's data pipeline."""
    import torch

    if a.data == "blocks":
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (n_rows, a.seq), generator=g)
        return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in x]
    n = max(64, int(n_rows * a.seq / 250))  # enough samples to fill n_rows packed rows
    lens, g = chat_lengths(n, a.seq)
    out = []
    for length in lens.tolist():
        x = torch.randint(0, vocab, (length,), generator=g)
        y = x.clone()
        y[: int(length * 0.4)] = -100
        out.append({"input_ids": x.tolist(), "labels": y.tolist()})
    return out


def matmul_rate(device: str, n: int | None = None) -> float:
    """Measured matmul FLOP/s of this device (fp32 2048^3 on CPU, bf16 8192^3 on GPU, or n^3), 10 products after 2
    warm-ups. On a 2-core CPU both phitune and the peer train at about this rate (MFU ~1.0): the step is matmul-bound
    there."""
    import torch

    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    n = n or size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 10
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


# --- one phitune run (child process) ---------------------------------------------------------------------------------


def child(a) -> dict:
    import torch

    from phitune.adapt import add_lora
    from phitune.config import TrainingConfig
    from phitune.data import batch_plan
    from phitune.models.loading import resolve_dtype
    from phitune.training.loss import Pieces, apply_fast_path, forward_loss
    from phitune.training.optim import autocast_context, build_optimizer, build_scheduler, enable_gradient_checkpointing
    from phitune.training.step import batch_maker, train_step

    variant = a.child
    base, _, extra = variant.partition("+")
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cfg = model_config(a.size)
    cfg.use_cache = False
    # train.py's rule: on CUDA bfloat16; on a CPU bfloat16 only with --bf16 (autocast) and bf16 matrix hardware
    dtype = resolve_dtype("auto", dev, bf16_autocast=a.bf16) if a.device != "cuda" else torch.bfloat16
    from transformers import Phi3ForCausalLM

    with dev:
        model = Phi3ForCausalLM._from_config(cfg, attn_implementation=a.attn, dtype=dtype)
    steps = a.warmup + a.steps
    tc = TrainingConfig(output_dir="/tmp/phitune_bench", per_device_train_batch_size=a.batch, max_steps=steps,
                        learning_rate=2e-4, gradient_checkpointing="ckpt" in extra, use_cpu=a.device == "cpu",
                        torch_compile=base == "compile", use_liger_kernel=base == "liger", bf16=a.bf16)
    tc.fast_path = "off" if base == "plain" else "auto"
    pieces = Pieces(loss=base != "no_loss", lora=base != "no_lora", mlp=base != "no_mlp", norm=base != "no_norm",
                    rope=base != "no_rope", attention=base != "dense")
    add_lora(model, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
             lora_dtype=torch.float32)
    enable_gradient_checkpointing(model, tc)
    fast = apply_fast_path(model, tc, pieces)
    notes = fast.notes
    model.train()
    samples = make_samples(a, cfg.vocab_size, steps * a.batch * 2)
    plan = batch_plan(samples, a.batch, a.seq, packing=True, seed=0, epoch=0)
    if a.data == "blocks":
        plan.sort()  # sequential, as the peer's sampler
    make = batch_maker(model, None, argparse.Namespace(max_seq_length=a.seq, packing=True), fast)
    batches = [make(samples, plan[i]) for i in range(steps)]
    optimizer = build_optimizer(model, tc, dev)
    scheduler = build_scheduler(optimizer, tc, steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    autocast = autocast_context(tc, dev)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    tokens = supervised = 0
    for i, b in enumerate(batches):
        if i == a.warmup:
            sync()
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        r = train_step(model, [b], optimizer, scheduler, scaler, tc, dev, autocast,
                       functools.partial(forward_loss, fast=fast))
        if i >= a.warmup:
            # real tokens, padding not counted; a plan entry is a list of rows, each row the samples packed in it
            tokens += sum(len(samples[k]["input_ids"]) for row in plan[i] for k in row)
            supervised += r["tokens"]
    sync()
    dt = time.perf_counter() - t0
    if a.data == "blocks":
        supervised = a.steps * a.batch * a.seq  # the peer counts every token as supervised on blocks
    out = {"run": "phitune", "variant": variant, "tokens_per_s": round(tokens / dt, 1),
           "supervised_tokens_per_s": round(supervised / dt, 1), "last_loss": round(r["loss"], 4),
           "fast_path": list(notes), "fused_modules": sum("Fused" in type(m).__name__ for m in model.modules()),
           "attn": model.config._attn_implementation, "base_dtype": str(dtype).replace("torch.", ""),
           "bf16": a.bf16}
    if a.device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# --- the parent: runs, memory, ratios ---------------------------------------------------------------------------------


def _json(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:  # the Trainer prints Python dicts too
        return {}


def run_measured(cmd: list[str], env: dict) -> tuple[list[dict], float, str, float]:
    """Run ``cmd``; return its JSON lines, its peak RSS in GiB, stderr's tail, and its CPU seconds (user + system,
    the whole process: imports and model building included)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [_json(x) for x in out.read().splitlines() if x.startswith("{")]
        tail = err.read()[-2000:]
    return lines, usage.ru_maxrss / 2**20, tail, usage.ru_utime + usage.ru_stime  # ru_maxrss is KiB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small", "mini"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", default="blocks", choices=["blocks", "chat"])
    p.add_argument("--variants", default="fast,plain", help="phitune variants (see the module docstring)")
    p.add_argument("--peer", default="base", help="peer_baseline.py variants (base, ckpt, liger, ...); '' for none")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole peer/phitune sequence this many times, interleaved; ratios use each run's "
                        "best tokens/s, and tokens_per_s_median the medians (CPU timings on a shared machine drift)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (phitune: training_config bf16: "
                   "true; the peer: bfloat16 weights and bf16=True)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and variant names, print the runs it would make, run nothing "
                        "(DRY_RUN=1 bash benchmarks/gpu_run.sh)")
    a = p.parse_args(argv)
    if a.smoke:  # explicit arguments still win; no peer: peer_baseline.py lives outside the repository
        p.set_defaults(size="tiny", seq=64, batch=2, warmup=1, steps=1, variants="fast,plain", peer="")
        a = p.parse_args(argv)
    if unknown_variants(a.child or a.variants):
        p.error(f"unknown variant(s) {', '.join(unknown_variants(a.child or a.variants))}: "
                f"one of {', '.join(VARIANTS)}, optionally followed by +ckpt")
    if a.dry_run:
        peer = peer_script(required=False)
        print(json.dumps({"dry_run": True, "size": a.size, "device": a.device, "batch": a.batch, "seq": a.seq,
                          "data": a.data, "phitune": a.variants.split(","), "peer": [v for v in a.peer.split(",") if v],
                          "peer_script": str(peer) if peer else None}), flush=True)
        if a.peer and peer is None:
            print("warning: peer_baseline.py not found (copy ../shared/bench as gpu_run.sh's header says, or set "
                  "PHITUNE_PEER_DIR)", file=sys.stderr)
        return
    if a.child:
        try:
            print(json.dumps(child(a)), flush=True)
        except Exception as e:  # one failing variant must not hide the others
            print(json.dumps({"run": "phitune", "variant": a.child, "error": repr(e)[:400]}), flush=True)
            raise
        return

    import torch

    cfg = model_config(a.size)
    common = ["--size", a.size, "--device", a.device, "--attn", a.attn, "--batch", str(a.batch), "--seq", str(a.seq),
              "--warmup", str(a.warmup), "--steps", str(a.steps), "--data", a.data] + (["--bf16"] if a.bf16 else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rate = matmul_rate(a.device, 256 if a.smoke else None)
    attn_len = a.seq if a.data == "blocks" else float(chat_lengths(4096, a.seq)[0].float().mean())
    fpt = flops_per_token(cfg, attn_len)
    print(json.dumps({"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "matmul_tflops": round(rate / 1e12, 3), "forward_gflop_per_token": round(fpt / 1e9, 3),
                      "size": a.size, "batch": a.batch, "seq": a.seq, "data": a.data, "steps": a.steps,
                      "bf16": a.bf16, "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    results = []
    jobs = [("peer", v, [sys.executable, str(peer_script()), *common, "--variants", v])
            for v in a.peer.split(",") if v]
    jobs += [("phitune", v, [sys.executable, __file__, *common, "--child", v]) for v in a.variants.split(",") if v]
    jobs = jobs * max(1, a.repeat)
    for kind, v, cmd in jobs:
        lines, rss, err, cpu = run_measured(cmd, env)
        row = next((x for x in lines if "tokens_per_s" in x or "error" in x), None)
        if row is None:
            row = {"run": kind, "variant": v, "error": err[-400:]}
        row.setdefault("run", kind)
        if a.device != "cuda":
            row["peak_rss_gib"] = round(rss, 3)
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)  # after the run; includes the run's own threads
            # with one thread (OMP_NUM_THREADS=1) a run's CPU seconds are its work, whatever the neighbours take
            row["process_cpu_s"] = round(cpu, 1)
        if "tokens_per_s" in row:
            mult = 3 if "ckpt" in v else 2  # forward + activation gradients (+ recompute), as peer_baseline.py
            row["mfu"] = round(row["tokens_per_s"] * fpt * mult / rate, 4)
        results.append(row)
        print(json.dumps(row), flush=True)
    runs: dict = {}  # every repeat's tokens/s per (run, variant), for the medians
    for r in results:
        if "tokens_per_s" in r:
            runs.setdefault((r["run"], r.get("variant")), []).append(r["tokens_per_s"])
    best: dict = {}
    for r in results:  # best tokens/s of each (run, variant) over the repeats
        key = (r["run"], r.get("variant"))
        if "tokens_per_s" in r and (key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]):
            best[key] = r
    failed = [r for r in results if "error" in r]
    results = list(best.values())
    peers = [r for r in results if r["run"] == "peer"]
    mem = "peak_mem_gib" if a.device == "cuda" else "peak_rss_gib"
    for r in results:
        if r["run"] == "phitune" and peers:
            ref = peers[0]
            print(json.dumps({"ratio": f"phitune {r['variant']} / peer {ref['variant']}",
                              "tokens_per_s": round(r["tokens_per_s"] / ref["tokens_per_s"], 3),
                              "supervised_tokens_per_s": round(r["supervised_tokens_per_s"]
                                                               / ref["supervised_tokens_per_s"], 3),
                              "peak_memory": round(r.get(mem, 0) / ref[mem], 3) if ref.get(mem) else None,
                              "tokens_per_s_median": round(statistics.median(runs[("phitune", r["variant"])])
                                                           / statistics.median(runs[("peer", ref["variant"])]), 3)}),
                  flush=True)
    if failed:  # a failing variant fails the invocation (gpu_run.sh and CI see it), after every row is printed
        sys.exit(f"{len(failed)} run(s) failed: {', '.join(str(r.get('variant')) for r in failed)}")


if __name__ == "__main__":
    main()
