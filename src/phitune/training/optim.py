"""Seed, optimizer, learning-rate schedule and precision: the pieces ``train.py`` sets up before its loop."""

from __future__ import annotations

import logging
import math
import random
from contextlib import nullcontext

import numpy as np
import torch

from ..models import loading as models  # looked up at call time, so a test can stand in for cpu_has_fast_half
from ..config import TrainingConfig
from ..errors import ConfigError, PhituneError

log = logging.getLogger("phitune")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_tf32(tf32: bool | None, device: torch.device) -> None:
    if tf32 is not None and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def build_optimizer(model, tc: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PhituneError("no trainable parameters: peft_config targets nothing trainable")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda" or tc.optim == "adamw_torch_fused"
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon,
                             fused=fused)


def build_optimization(model, tc: TrainingConfig, device: torch.device, total_steps: int):
    """(optimizer, scheduler, gradient scaler) for ``total_steps`` steps; the scaler is active for fp16 on CUDA."""
    optimizer = build_optimizer(model, tc, device)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.fp16 and device.type == "cuda")
    return optimizer, scheduler, scaler


def lr_multiplier(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warmup, then the decay ``kind``."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear


def build_scheduler(optimizer, tc: TrainingConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = tc.warmup_steps_for(total_steps)
    if tc.lr_scheduler_type == "constant" and warmup:
        log.info("lr_scheduler_type constant ignores warmup (%d steps); use constant_with_warmup", warmup)
    kind = tc.lr_scheduler_type

    def factor(step: int) -> float:
        return lr_multiplier(step, kind=kind, warmup=warmup, total=total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_context(tc: TrainingConfig, device: torch.device):
    """bf16/fp16 mixed precision for forward passes (the base weights keep model.dtype)."""
    if tc.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("training_config.bf16: this GPU has no bfloat16 support; set fp16: true instead")
        if device.type == "cpu" and not models.cpu_has_fast_half(torch.bfloat16):
            log.warning("training_config.bf16: this CPU has no bfloat16 matrix hardware (AVX512-BF16 or AMX), where "
                        "bfloat16 autocast makes each backward matmul about 100x slower than float32; training in "
                        "the model's dtype instead. Set bf16: false to silence this.")
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if tc.fp16:
        if device.type != "cuda":
            log.info("training_config.fp16: float16 autocast needs a CUDA GPU; training in the model's dtype")
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def enable_gradient_checkpointing(model, tc: TrainingConfig) -> None:
    """Recompute activations in backward; non-reentrant so LoRA weights inside frozen blocks get gradients."""
    if tc.gradient_checkpointing:
        models.enable_checkpointing(model, tc.gradient_checkpointing_kwargs)
