"""``per_device_train_batch_size: auto``: the largest micro-batch that fits a GPU size, checkpointing only when
needed, the effective batch kept; a clear refusal on a CPU."""

from __future__ import annotations

import functools

import pytest
import torch
from test_plan_simulate import run_config, tiny_phi3_config

from phitune.config import load_config
from phitune.errors import ConfigError
from phitune.plan import auto, gpus, resolve_auto_batch
from phitune.plan.simulate import simulate_step


@functools.lru_cache(maxsize=None)
def _peak(rows: int, checkpointing: bool) -> float:
    cfg = run_config(per_device_train_batch_size=rows, gradient_checkpointing=checkpointing)
    sim = simulate_step(cfg, tiny_phi3_config(2), 2, device="cpu", record_ops=False)
    return sim.peak["Total"] / 2**30  # unrounded: the tiny model's rows differ by a few hundred KiB


def peak_gib(cfg) -> float:
    """The planner: the tiny model's step simulated on a fake CPU, as phitune plan does on a fake GPU."""
    tc = cfg.training_config
    return _peak(tc.per_device_train_batch_size, tc.gradient_checkpointing)


def gpu_between(rows: int, checkpointing: bool) -> float:
    """A GPU size on which ``rows`` fit and ``rows + 1`` do not (margin included)."""
    low, high = _peak(rows, checkpointing), _peak(rows + 1, checkpointing)
    return gpus.MARGIN_GIB + (1 + gpus.MARGIN_FRACTION) * (low + high) / 2


def auto_config(**training):
    base = run_config().to_dict()
    base["training_config"].update({"per_device_train_batch_size": "auto", **training})
    return load_config(base)


def test_auto_picks_the_largest_micro_batch_that_fits_the_gpu():
    memory = gpu_between(6, False)
    cfg, choice = auto.choose(auto_config(), memory, peak_gib)
    assert choice["per_device_train_batch_size"] == 6
    assert cfg.training_config.per_device_train_batch_size == 6 and cfg.training_config.gradient_accumulation_steps == 1
    assert choice["predicted_peak_gib"] == round(_peak(6, False), 2)  # the plan of the chosen size, logged


def test_auto_keeps_the_target_batch_and_prefers_no_checkpointing_when_it_reaches_it():
    memory = gpu_between(3, False)  # without checkpointing 3 rows fit; with it, more
    assert _peak(4, True) < _peak(4, False)
    cfg, choice = auto.choose(auto_config(gradient_checkpointing="auto", auto_batch_target=8), memory, peak_gib)
    # 2 is the largest divisor of 8 that fits without checkpointing: 2 x 4 accumulation = the 8 rows asked for
    assert (choice["per_device_train_batch_size"], choice["gradient_accumulation_steps"]) == (2, 4)
    assert choice["gradient_checkpointing"] is False
    assert cfg.training_config.auto_batch_target is None  # decided: the saved config says what ran


def test_auto_turns_checkpointing_on_only_when_nothing_fits_without_it():
    memory = gpus.MARGIN_GIB + (1 + gpus.MARGIN_FRACTION) * (_peak(1, True) + _peak(1, False)) / 2
    assert _peak(1, True) < _peak(1, False)
    _, choice = auto.choose(auto_config(gradient_checkpointing="auto"), memory, peak_gib)
    assert choice["gradient_checkpointing"] is True and choice["per_device_train_batch_size"] >= 1


def test_auto_that_cannot_fit_one_row_says_what_to_try():
    with pytest.raises(Exception, match="even one row of 128 tokens"):
        auto.choose(auto_config(), gpus.MARGIN_GIB, peak_gib)


def test_auto_batch_on_a_cpu_is_a_clear_message_not_a_guess():
    with pytest.raises(ConfigError, match="auto sizes the micro-batch for the CUDA GPU.*on the cpu"):
        resolve_auto_batch(auto_config(), torch.device("cpu"))


def test_auto_keys_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="gradient_checkpointing: auto chooses together"):
        load_config({**run_config().to_dict(), "training_config": {"gradient_checkpointing": "auto"}})
    with pytest.raises(ConfigError, match="auto_batch_target: only used with"):
        load_config({**run_config().to_dict(), "training_config": {"auto_batch_target": 16}})
