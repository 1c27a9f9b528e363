"""How well does ``phitune plan``'s machinery predict real GPU runs? Predicted vs measured for the six H200 rows of
../shared/bench/README.md, and the roofline's calibration on the four rows with a throughput.

The peer's steps are simulated exactly as they ran there, on a fake CUDA device (phitune.plan.fakegpu), under
MemTracker: Trainer + peft (../shared/bench/peer_baseline.py: LoraConfig(r=16, alpha=32, dropout=0.05,
all-linear), bf16 weights, Trainer's bf16 autocast with fp32 outputs, fused AdamW, grad-norm clip 1.0), with and
without gradient checkpointing, on fixed blocks of 2048 tokens or on its chat-length batches (right-padded to the
longest sample of the batch: 1321 at batch 4, 2048 at batch 8), and hf_ceiling.py's plain loop (peft LoRA with
dropout 0 and no autocast, or a frozen base). The model is simulated at 2 and 4 decoder layers and extrapolated to
32, as ``phitune plan`` does (``--full``: all 32). Measured peak = torch.cuda.max_memory_allocated after warm-up.

    python benchmarks/plan_accuracy.py                   # the six rows (about a minute on one core)
    python benchmarks/plan_accuracy.py --rows ckpt8,chat8-ckpt --json   # two rows (the test runs these)
    python benchmarks/plan_accuracy.py --smoke                          # one row, about 20 s

On a CPU-only torch the script re-executes itself with phitune's fake CUDA runtime loaded first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from phitune.plan import fakegpu  # noqa: E402

if __name__ == "__main__":
    fakegpu.reexec_on_fake_cuda(str(Path(__file__).resolve()), sys.argv[1:])

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from transformers import Phi3Config  # noqa: E402

from phitune.plan import gpus, predict  # noqa: E402
from phitune.plan.simulate import OpRecorder, StepSimulation, shaped_config  # noqa: E402

GiB = 2**30
SEQ = 2048


@dataclass(frozen=True)
class Row:
    """One H200 measurement (bench/README.md; peaks to 0.01 GiB from sim/README.md)."""

    name: str
    stack: str  # "trainer" (peer_baseline.py) or "plain" (hf_ceiling.py)
    batch: int
    length: int  # tokens per row of the batch (the padded length for chat data)
    measured_gib: float
    tokens_per_s: float | None = None  # measured throughput, fixed blocks only (a step time)
    checkpointing: bool = False
    chat: bool = False  # right-padded rows with an attention mask
    lora: bool = True


ROWS = (
    Row("peer4", "trainer", 4, SEQ, 50.24, 15685),
    Row("ckpt8", "trainer", 8, SEQ, 16.52, 11494, checkpointing=True),
    Row("chat4", "trainer", 4, 1321, 35.53, chat=True),
    Row("chat8-ckpt", "trainer", 8, SEQ, 16.55, checkpointing=True, chat=True),
    Row("plain-lora", "plain", 4, SEQ, 54.49, 13719),
    Row("plain-frozen", "plain", 4, SEQ, 37.29, 20976, lora=False),
)


def simulate_peer(row: Row, layers: int, hf_config=None) -> StepSimulation:
    """One steady-state step of the peer's configuration ``row`` with ``layers`` decoder layers on fake CUDA
    (``hf_config``: the model's shape, default Phi-3-mini's)."""
    from peft import LoraConfig, get_peft_model

    dev = torch.device("cuda", 0)
    shape = shaped_config(hf_config or Phi3Config(), layers)
    with fakegpu.fake_device("cuda") as kernels, FakeTensorMode(allow_non_fake_inputs=True):
        from transformers import Phi3ForCausalLM

        with torch.device(dev):
            model = Phi3ForCausalLM._from_config(shape, attn_implementation="sdpa", dtype=torch.bfloat16)
        if row.stack == "trainer":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                                     task_type="CAUSAL_LM", target_modules="all-linear"))
            if row.checkpointing:  # TrainingArguments(gradient_checkpointing=True, use_reentrant False)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            if row.lora:
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                         target_modules="all-linear"))
            else:  # the frozen base: activation gradients only
                model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True) if params else None
        if optimizer is not None:  # the state exists after the warm-up steps
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        forward = model.forward
        if row.stack == "trainer":  # accelerate's bf16 mixed precision: autocast, outputs converted to fp32
            from accelerate.utils import convert_outputs_to_fp32

            forward = convert_outputs_to_fp32(torch.autocast("cuda", dtype=torch.bfloat16)(model.forward))
        ids = torch.randint(0, shape.vocab_size, (row.batch, row.length), device=dev)
        batch = {"input_ids": ids, "labels": ids}
        if row.chat:
            batch = {"input_ids": ids, "labels": ids.clone(),
                     "attention_mask": torch.ones(row.batch, row.length, dtype=torch.long, device=dev)}
        answers = fakegpu.Answers(int_value=row.length, scalars={"fast_all": not row.chat})
        tracker = fakegpu.frozen_safe_mem_tracker()
        tracker.track_external(model, *([optimizer] if optimizer is not None else []))
        recorder = OpRecorder()
        model.train()
        with answers, tracker, recorder:
            if row.stack == "trainer":
                items = (batch["labels"][..., 1:] != -100).sum()  # Trainer's num_items_in_batch, on the device
                loss = forward(**batch, num_items_in_batch=items)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                model.zero_grad(set_to_none=True)
            else:
                loss = forward(**batch).loss
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        peak = fakegpu.peak_by_category(tracker, "cuda")
        trainable = sum(p.numel() * p.element_size() for p in params)
    return StepSimulation(layers=layers, peak=peak, ops=recorder.ops, trainable_bytes=trainable,
                          batch_shape=(row.batch, row.length), supervised=row.batch * (row.length - 1),
                          attention_kernels=dict(kernels))


def evaluate(row: Row, full: bool) -> dict:
    """Predicted vs measured for one row."""
    started = time.perf_counter()
    layers = Phi3Config().num_hidden_layers
    steps = [simulate_peer(row, layers)] if full else [simulate_peer(row, n) for n in predict.SHORT_DEPTHS]
    peak = predict.extrapolate(steps, layers, lambda s: s.peak["Total"]) / GiB
    out = {"row": row.name, "batch": row.batch, "length": row.length, "checkpointing": row.checkpointing,
           "measured_gib": row.measured_gib, "predicted_gib": round(peak, 2),
           "error_pct": round((peak - row.measured_gib) / row.measured_gib * 100, 2),
           "attention_kernels": steps[-1].attention_kernels}
    h200 = gpus.GPUS["H200"]
    roof = predict.extrapolate(steps, layers, lambda s: gpus.roofline_seconds(s.ops, h200))
    launches = predict.extrapolate(steps, layers, lambda s: gpus.kernels(s.ops))
    low, high = roof * gpus.TIME_RANGE[0], roof * gpus.TIME_RANGE[1] + launches * gpus.LAUNCH_S
    out.update({"roofline_ms": round(roof * 1e3, 1), "plan_range_ms": [round(low * 1e3, 1), round(high * 1e3, 1)]})
    if row.tokens_per_s:
        measured = row.batch * row.length / row.tokens_per_s
        out.update({"measured_ms": round(measured * 1e3, 1), "measured_over_roofline": round(measured / roof, 3),
                    "in_range": low <= measured <= high})
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated row names")
    parser.add_argument("--full", action="store_true", help="simulate all 32 layers instead of extrapolating")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--smoke", action="store_true", help="the cheapest row only (no peft, no Trainer): a quick "
                        "check that the machinery runs")
    args = parser.parse_args()
    if args.smoke:
        args.rows = "plain-frozen"
    by_name = {r.name: r for r in ROWS}
    results = [evaluate(by_name[name], args.full) for name in args.rows.split(",")]
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        line = (f"{r['row']:<13} predicted {r['predicted_gib']:6.2f} GiB  measured {r['measured_gib']:6.2f} GiB  "
                f"({r['error_pct']:+.2f} %)")
        if "measured_ms" in r:
            line += (f"  | step: roofline {r['roofline_ms']:.0f} ms, plan range {r['plan_range_ms'][0]:.0f}-"
                     f"{r['plan_range_ms'][1]:.0f} ms, measured {r['measured_ms']:.0f} ms "
                     f"(x{r['measured_over_roofline']}, {'inside' if r['in_range'] else 'OUTSIDE'})")
        print(line, flush=True)
    if not args.json:
        ratios = [r["measured_over_roofline"] for r in results if "measured_over_roofline" in r]
        if ratios:
            print(f"calibration: measured / roofline = {min(ratios):.3f}-{max(ratios):.3f} on {len(ratios)} rows; "
                  f"the plan prints roofline x {gpus.TIME_RANGE[0]}-{gpus.TIME_RANGE[1]}")
    sys.stdout.flush()
    os._exit(0)  # skip teardown: the fake device's autograd thread


if __name__ == "__main__":
    main()
