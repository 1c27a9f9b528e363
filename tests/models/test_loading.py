"""model.py: dtype decisions on a CPU without half-precision matrix hardware."""

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
