"""Where one training step's time goes: the peer's LoRA step (HF model + peft, loss from full logits, as the Trainer
computes it) against phitune's fast path, profiled op by op with torch.profiler on the same shape and batch.

Self time is grouped into matmuls (mm/addmm/bmm: the work both must do), attention kernels, dropout random numbers,
and everything else (norms, activations, RoPE, softmax/cross-entropy, casts, the optimizer). Matmul FLOPs come from
the profiler's own count, so the achieved matmul rate can be compared with this device's measured rate. The last
line bounds what a fast path doing the same matmul FLOPs can reach here: the peer's step time over phitune's matmul +
attention time, i.e. the speed-up if everything else cost nothing. (The measured matmul rate is the best of ten
2048^3 products; on a shared 2-core machine it moves by +-30% between runs, so it is context, not a bound.)

  python benchmarks/step_profile.py --size small --seq 512 --batch 2          # CPU, the issue-6 shape
  python benchmarks/step_profile.py --bf16 --matmuls 12    # bfloat16 on both sides (a CPU with AVX512-BF16 or AMX)

``--bf16``: both sides as train_throughput.py --bf16 runs them: the peer's model in bfloat16 under bfloat16 autocast
(TrainingArguments(bf16=True)); phitune's base in bfloat16 (models.loading.resolve_dtype's rule), LoRA factors
float32, the same autocast. ``--matmuls N`` lists each side's N slowest matmul shapes with their achieved rate, which
shows a shape that oneDNN runs on a slow path. ``--cpu-time`` runs one thread and times each op by the thread's CPU
time (a TorchDispatchMode around every aten op) instead of torch.profiler's wall clock: on a shared machine whose
load average exceeds its cores, wall-clock op times measure the neighbours (a 33 MFLOP skinny LoRA matmul then takes
15 ms in place of 0.2 ms), CPU time measures the work.

  python benchmarks/step_profile.py --bf16 --cpu-time --matmuls 12 --top 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_throughput import model_config  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
RNG = {"aten::bernoulli_", "aten::random_", "aten::uniform_", "aten::rand", "aten::rand_like"}


def peak_matmul_rate(n: int = 2048, reps: int = 10) -> float:
    """This CPU's fp32 matmul FLOP/s: the fastest of ``reps`` n^3 products (a shared machine's rate drifts)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _matmul_flops(shapes) -> float:
    """2·M·K·N of one mm/addmm/bmm call from its recorded input shapes (the two matrix operands)."""
    mats = [x for x in shapes if len(x) in (2, 3)]
    if len(mats) == 3:  # addmm(out, a, b)
        mats = mats[1:]
    (a, b) = mats[-2:]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def build(kind: str, a):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = model_config(a.size)
    cfg.use_cache = False
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    model = Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    if kind == "peer":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora, bias="none", target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def loss():
            return model(input_ids=ids, labels=ids).loss
    else:
        from phitune.adapt import add_lora
        from phitune.training.loss import apply_fast_path, forward_loss

        add_lora(model, {**lora, "target_modules": "all-linear"}, lora_dtype=torch.float32)
        fast = apply_fast_path(model, {"fast_path": "auto"})
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(a.seq).repeat(a.batch, 1)}

        def loss():
            out = forward_loss(model, batch, fast=fast)
            return out.loss_sum / out.n_tokens
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)

    def step():
        with autocast:
            value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile_step(kind: str, a, rate: float) -> dict:
    """torch.profiler's self CPU time per op (wall clock of each op, all threads)."""
    from torch.profiler import ProfilerActivity, profile

    step = build(kind, a)
    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    wall = (time.perf_counter() - t0) / a.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(a.steps):
            step()
    records = [(e.key, [list(x) for x in e.input_shapes], e.count, e.self_cpu_time_total / 1e6)
               for e in prof.key_averages(group_by_input_shape=True)]
    return summarise(kind, a, records, {"step_s": round(wall, 3)}, rate)


class _OpCPUTime(TorchDispatchMode):
    """Thread CPU time of every aten op that reaches the dispatcher, by (op, input shapes)."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[tuple, float] = {}
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        dt = (time.thread_time_ns() - t) / 1e9
        key = (f"aten::{func.overloadpacket.__name__}",
               tuple(tuple(x.shape) for x in args if isinstance(x, torch.Tensor)))
        self.seconds[key] = self.seconds.get(key, 0.0) + dt
        self.calls[key] = self.calls.get(key, 0) + 1
        return out


def cpu_time_step(kind: str, a, rate: float) -> dict:
    """Per-op thread CPU time with one thread: what each op costs in work, whatever the neighbours do (they take
    wall time, not this thread's CPU time; caches they evict still show)."""
    step = build(kind, a)
    for _ in range(a.warmup):
        step()
    t0 = time.thread_time()
    for _ in range(a.steps):
        step()
    cpu = (time.thread_time() - t0) / a.steps
    timer = _OpCPUTime()
    with timer:
        for _ in range(a.steps):
            step()
    records = [(k, [list(x) for x in shapes], timer.calls[(k, shapes)], t) for (k, shapes), t in timer.seconds.items()]
    return summarise(kind, a, records, {"step_cpu_s": round(cpu, 3)}, rate)


def summarise(kind: str, a, records, head: dict, rate: float) -> dict:
    """Group (op, input shapes, calls, seconds over a.steps steps) records into the row both modes print."""
    groups = {"matmul": 0.0, "attention": 0.0, "dropout_rng": 0.0, "other": 0.0}
    flops = 0
    others: dict[str, float] = {}
    shapes = []
    for key, input_shapes, count, seconds in records:
        t = seconds / a.steps
        if key in MATMUL:
            groups["matmul"] += t
            f = count * _matmul_flops(input_shapes) / a.steps
            flops += f
            shapes.append((t, key, [x for x in input_shapes if x], count // a.steps, f))
        elif "scaled_dot_product" in key or "flash_attention" in key:
            groups["attention"] += t
        elif key in RNG:
            groups["dropout_rng"] += t
        else:
            groups["other"] += t
            others[key] = others.get(key, 0.0) + t
    total = sum(groups.values())
    return {"run": kind, **head, "profiled_s": round(total, 3),
            "ops_per_step": sum(count for _, _, count, _ in records) // a.steps,
            **{f"{k}_s": round(v, 3) for k, v in groups.items()},
            "matmul_share": round(groups["matmul"] / total, 3), "matmul_gflop_per_step": round(flops / 1e9, 1),
            "matmul_gflops_achieved": round(flops / groups["matmul"] / 1e9, 1) if groups["matmul"] else None,
            "matmul_gflops_measured_rate": round(rate / 1e9, 1),
            "top_other_s": {k: round(v, 3) for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:a.top]},
            "slowest_matmuls": [{"op": k, "shapes": sh, "calls": n, "s": round(t, 3),
                                 "gflops": round(f / t / 1e9, 1) if t else None}
                                for t, k, sh, n, f in sorted(shapes, key=lambda x: -x[0])[:a.matmuls]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=8, help="how many of the 'other' ops to list by time")
    p.add_argument("--matmuls", type=int, default=0, help="list each side's N slowest matmul shapes")
    p.add_argument("--bf16", action="store_true", help="bfloat16 base and bfloat16 autocast on both sides")
    p.add_argument("--only", choices=["peer", "phitune"], default=None, help="profile one side only")
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, each op's thread CPU time instead of torch.profiler's wall time (a loaded "
                        "machine's neighbours then barely move the numbers)")
    p.add_argument("--smoke", action="store_true", help="smallest size, for CI: it runs; no result")
    a = p.parse_args(argv)
    if a.smoke:  # explicit arguments still win
        p.set_defaults(size="tiny", batch=1, seq=32, warmup=1, steps=1)
        a = p.parse_args(argv)
    if a.cpu_time:
        torch.set_num_threads(1)
    rate = peak_matmul_rate(256 if a.smoke else 2048)
    rows = {}
    for kind in ("peer", "phitune"):
        if a.only in (None, kind):
            rows[kind] = (cpu_time_step if a.cpu_time else profile_step)(kind, a, rate)
            print(json.dumps(rows[kind]), flush=True)
    if a.only:
        return
    peer, ours = rows["peer"], rows["phitune"]
    whole = ({"speedup_step_cpu": round(peer["step_cpu_s"] / ours["step_cpu_s"], 3)} if a.cpu_time
             else {"speedup_step_wall": round(peer["step_s"] / ours["step_s"], 3)})
    print(json.dumps({"ratio": "phitune / peer step time (profiled)",
                      "speedup": round(peer["profiled_s"] / ours["profiled_s"], 3), **whole,
                      "ceiling_if_only_matmul_and_attention": round(
                          peer["profiled_s"] / (ours["matmul_s"] + ours["attention_s"]), 3)}), flush=True)


if __name__ == "__main__":
    main()
