"""models/loading.py: dtype decisions on CPUs with and without half-precision matrix hardware."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext

import pytest
import torch

from phitune.models import loading as model_mod
from phitune.config import TrainingConfig
from phitune.errors import ConfigError
from phitune.training.optim import autocast_context

CPU = torch.device("cpu")


def no_half_hardware(dtype):  # an AVX2 CPU: float32 only
    return dtype not in (torch.bfloat16, torch.float16)


def test_cpu_half_probe_answers_for_every_dtype():
    assert model_mod.cpu_has_fast_half(torch.float32) is True
    assert isinstance(model_mod.cpu_has_fast_half(torch.bfloat16), bool)
    assert isinstance(model_mod.cpu_has_fast_half(torch.float16), bool)


def test_bf16_weights_on_a_cpu_without_bf16_hardware_warn_with_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(model_mod, "cpu_has_fast_half", no_half_hardware)
    with caplog.at_level(logging.WARNING, logger="phitune"):
        assert model_mod.resolve_dtype("bfloat16", CPU) is torch.bfloat16  # the user's choice stands
    assert "model.dtype: bfloat16" in caplog.text and "model.dtype: auto" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="phitune"):
        assert model_mod.resolve_dtype("auto", CPU) is torch.float32
        assert model_mod.resolve_dtype("float32", CPU) is torch.float32
    assert caplog.text == ""


def test_bf16_autocast_falls_back_on_a_cpu_without_bf16_hardware(monkeypatch, caplog):
    tc = TrainingConfig(output_dir="/tmp/x", bf16=True, use_cpu=True)
    monkeypatch.setattr(model_mod, "cpu_has_fast_half", no_half_hardware)
    with caplog.at_level(logging.WARNING, logger="phitune"):
        ctx = autocast_context(tc, CPU)
    assert isinstance(ctx, nullcontext) and "bf16: false" in caplog.text
    monkeypatch.setattr(model_mod, "cpu_has_fast_half", lambda dtype: True)
    assert isinstance(autocast_context(tc, CPU), torch.autocast)


def test_auto_dtype_holds_the_frozen_base_in_bf16_only_under_bf16_autocast_on_bf16_hardware(monkeypatch):
    monkeypatch.setattr(model_mod, "cpu_has_fast_half", lambda dtype: True)  # AMX / AVX512-BF16
    assert model_mod.resolve_dtype("auto", CPU, bf16_autocast=True) is torch.bfloat16
    assert model_mod.resolve_dtype("auto", CPU) is torch.float32
    assert model_mod.resolve_dtype("float32", CPU, bf16_autocast=True) is torch.float32  # an explicit choice stands
    monkeypatch.setattr(model_mod, "cpu_has_fast_half", no_half_hardware)  # AVX2: nothing changes
    assert model_mod.resolve_dtype("auto", CPU, bf16_autocast=True) is torch.float32


def test_a_bf16_held_base_gives_the_float32_base_loss_and_lora_gradients_under_bf16_autocast(tiny_model_dir,
                                                                                          monkeypatch):
    """Under bfloat16 autocast every matmul already rounds the float32 weights to bfloat16, so holding the frozen
    base in bfloat16 changes only what autocast leaves in float32: the embedding output, the residual stream and the
    norms. Their rounding is bounded by bfloat16's unit roundoff per operation."""
    from phitune.adapt import add_lora
    from phitune.config import ModelConfig

    monkeypatch.setattr(model_mod, "cpu_has_fast_half", lambda dtype: True)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for bf16_base in (False, True):
        model, _ = model_mod.load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)), device="cpu",
                                                      bf16_autocast=bf16_base)
        torch.manual_seed(0)  # the same lora_A on both
        add_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, lora_dtype=torch.float32)
        with torch.no_grad():  # a non-zero lora_B, the same on both, so every LoRA factor gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        base_dtypes = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
        lora_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        results.append((loss.float().item(), grads, base_dtypes, lora_dtypes))
    (loss32, grads32, base32, _), (loss16, grads16, base16, lora16) = results
    assert base32 == {torch.float32} and base16 == {torch.bfloat16} and lora16 == {torch.float32}
    eps = torch.finfo(torch.bfloat16).eps / 2  # unit roundoff
    layers = 2
    # roundings left to bfloat16: the embedding, each layer's two norms and two residual adds, the final norm
    roundings = 1 + 4 * layers + 1
    assert abs(loss16 - loss32) <= roundings * eps * abs(loss32)
    for name, g in grads32.items():
        diff = (grads16[name] - g).norm().item()
        assert diff <= 2 * roundings * eps * g.norm().item(), name  # a gradient's own rounding on top of the loss's


def test_checkpoint_files_are_the_shards_of_the_index_in_order(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from phitune.config import build_model_config
    from phitune.models.loading import checkpoint_files

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    files = checkpoint_files(build_model_config(str(tmp_path / "sharded")))
    assert len(files) > 1 and [f.name for f in files] == list(dict.fromkeys(index.values()))
    assert checkpoint_files(build_model_config(str(tiny_model_dir))) == [tiny_model_dir / "model.safetensors"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        checkpoint_files(build_model_config(str(tmp_path / "none")))
