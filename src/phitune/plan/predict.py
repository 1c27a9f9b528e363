"""From two short simulated steps to the plan of the full model: extrapolation in depth, the parts of the peak,
whether it fits each GPU, and the step time from the roofline.

Every per-layer quantity (weights, saved activations, FLOPs, bytes moved) is linear in the number of decoder layers,
so a model of L layers is predicted from the same step at 2 and 4 layers: x(L) = x(2) + (x(4) - x(2)) / 2 * (L - 2)
(checked against full-depth simulations in tests/plan/test_plan_simulate.py). A model of 4 layers or fewer is simulated
whole.
"""

from __future__ import annotations

import time

import torch

from ..config import RunConfig
from . import gpus as gpu_table
from .gpus import MARGIN_FRACTION, MARGIN_GIB, fits
from .simulate import StepSimulation, model_dtype, simulate_step

GiB = 2**30
SHORT_DEPTHS = (2, 4)


def not_modelled(cfg: RunConfig, world_size: int) -> list[str]:
    """What the plan does not see, for this config: printed with every plan."""
    tc = cfg.training_config
    out = ["memory allocated inside kernels (cuBLAS workspaces, FlashAttention's float32 accumulators: about "
           "0.1 GiB on the H200 measurements), the CUDA context and allocator fragmentation: covered by the margin"]
    if world_size > 1:
        out.append("NCCL buffers and the time of the gradient all-reduce / FSDP collectives (per-rank compute only)")
    if tc.torch_compile:
        out.append("torch.compile (training_config.torch_compile): planned as the eager step")
    if tc.use_liger_kernel:
        out.append("Liger's Triton kernels (use_liger_kernel): no fake implementation; planned without them")
    if cfg.model.load_in_4bit:
        out.append("the 4-bit base runs on the meta device (bitsandbytes' weights cannot wrap fake tensors): no "
                   "autocast there, so the LoRA factors are simulated in bf16 and their float32 bytes added back; "
                   "attention as sdpa's flash kernel (phitune's varlen kernel on a GPU: the same memory class)")
    if cfg.model.attn_implementation == "flash_attention_2":
        out.append("the flash-attn package's kernels: planned as torch's own FlashAttention (same memory class)")
    return out


def _line(a: float, b: float, layers: int, short: tuple[int, int]) -> float:
    lo, hi = short
    return a + (b - a) / (hi - lo) * (layers - lo)


def simulate_depths(cfg: RunConfig, hf_config, device: str = "cuda", world_size: int = 1, batch=None
                    ) -> tuple[list[StepSimulation], int]:
    """The simulated steps the plan extrapolates from, and the model's depth (``batch``: (samples, rows) of a real
    micro-batch, else the worst case)."""
    layers = hf_config.num_hidden_layers
    depths = [layers] if layers <= SHORT_DEPTHS[1] else list(SHORT_DEPTHS)
    samples, entry = batch or (None, None)
    return [simulate_step(cfg, hf_config, n, device, world_size=world_size, samples=samples, entry=entry)
            for n in depths], layers


def extrapolate(steps: list[StepSimulation], layers: int, value) -> float:
    """``value(step)`` at ``layers`` decoder layers from the simulated depths (exact when one depth is the model's)."""
    if len(steps) == 1:
        return float(value(steps[0]))
    a, b = steps
    return _line(value(a), value(b), layers, (a.layers, b.layers))


def peak_parts(steps: list[StepSimulation], layers: int, accumulation: int) -> dict[str, float]:
    """The predicted peak (GiB) and its parts: base weights, adapter + its gradients + optimizer state, activations,
    backward temporaries, other."""
    def cat(name):
        return extrapolate(steps, layers, lambda s: s.peak.get(name, 0))

    adapter = extrapolate(steps, layers, lambda s: s.trainable_bytes)
    grads = cat("Gradient")
    if accumulation > 1 and grads == 0:  # the first micro-batch's gradients are alive through the next ones
        grads = adapter
    parts = {
        "weights": cat("Parameter") + cat("Buffer") - adapter,
        "adapter_gradients_optimizer": adapter + grads + cat("Optstate"),
        "activations": cat("Activation"),
        "backward_temporaries": cat("Temp"),
        "other": cat("Other"),
    }
    parts = {k: round(v / GiB, 3) for k, v in parts.items()}
    return {"total": round(sum(parts.values()), 3), **parts}


def gpu_rows(steps, layers: int, cfg: RunConfig, total_gib: float, tokens: int, chosen) -> list[dict]:
    """Per GPU: memory, fits, step-time range and tokens/s range of one device (``tokens``: one device's per step)."""
    accumulation = cfg.training_config.gradient_accumulation_steps
    rows = []
    for g in chosen:
        ok, left = fits(total_gib, g.memory_gib)
        row = {"gpu": g.name, "memory_gib": g.memory_gib, "fits": ok, "headroom_gib": left}
        if cfg.training_config.bf16 and not g.bf16:
            row["fits"] = False
            row["refused"] = "no bfloat16 on this GPU: phitune refuses training_config.bf16; set fp16: true"
        if g.bandwidth_gbs:
            roof = extrapolate(steps, layers, lambda s: gpu_table.roofline_seconds(s.ops, g)) * accumulation
            launches = extrapolate(steps, layers, lambda s: gpu_table.kernels(s.ops)) * accumulation
            low = roof * gpu_table.TIME_RANGE[0]
            high = roof * gpu_table.TIME_RANGE[1] + launches * gpu_table.LAUNCH_S
            row.update({"roofline_seconds": round(roof, 4), "step_seconds": [round(low, 3), round(high, 3)],
                        "tokens_per_second_per_device": [round(tokens / high), round(tokens / low)], "rates": g.source})
        rows.append(row)
    return rows


def predict(cfg: RunConfig, hf_config, *, gpus=None, world_size: int = 1, shape_from: str = "",
            device: str = "cuda", batch=None) -> dict:
    """The plan of ``cfg`` (see ``phitune.plan.plan``) as plain data; every number in it is a prediction."""
    started = time.perf_counter()
    tc = cfg.training_config
    chosen = list(gpus) if gpus else [gpu_table.GPUS[n] for n in gpu_table.DEFAULT_GPUS]
    steps, layers = simulate_depths(cfg, hf_config, device, world_size, batch)
    accumulation = tc.gradient_accumulation_steps
    peak = peak_parts(steps, layers, accumulation)
    rows, length = steps[-1].batch_shape
    tokens = rows * length * accumulation  # per device
    flops = extrapolate(steps, layers, lambda s: sum(o.flops for o in s.ops)) * accumulation
    return {
        "predicted": True,
        "model": cfg.model.name_or_path,
        "shape_from": shape_from,
        "layers": layers,
        "simulated_layers": [s.layers for s in steps],
        "device": device,
        "micro_batch": [rows, length],
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "gradient_checkpointing": bool(tc.gradient_checkpointing),
        "dtype": str(model_dtype(cfg, torch.device(device))).replace("torch.", ""),
        "fast_path": list(steps[-1].fast_path),
        "attention_kernels": steps[-1].attention_kernels,
        "peak_gib": peak,
        "margin": f"fits = peak x {1 + MARGIN_FRACTION:g} + {MARGIN_GIB:g} GiB <= GPU memory",
        "tokens_per_step": tokens * world_size,
        "supervised_tokens_per_micro_batch": steps[-1].supervised,
        "flops_per_step": int(flops * world_size),
        "flops_per_token": round(flops / max(rows * length * accumulation, 1)),
        "gpus": gpu_rows(steps, layers, cfg, peak["total"], tokens, chosen),
        "time_model": (f"roofline of each op at the GPU's rates, x {gpu_table.TIME_RANGE[0]}-"
                       f"{gpu_table.TIME_RANGE[1]} (calibrated on H200 measurements)"),
        "not_modelled": not_modelled(cfg, world_size),
        "answers": steps[-1].answers,
        "plan_seconds": round(time.perf_counter() - started, 1),
    }
