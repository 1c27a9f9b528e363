"""training_config.method and the preference keys (TRL's DPOConfig/ORPOConfig names)."""

from __future__ import annotations

import pytest

from phitune.config import load_config
from phitune.config.training_args import TrainingConfig
from phitune.errors import ConfigError

BASE = {"model": {"name_or_path": "org/model"}, "data": {"train": "pairs.jsonl"}}


def _tc(**keys):
    return load_config({**BASE, "training_config": keys}).training_config


def test_method_defaults_to_sft_and_dpo_keys_take_trl_defaults():
    assert _tc().method == "sft"
    tc = _tc(method="dpo")
    assert (tc.beta, tc.loss_type, tc.label_smoothing, tc.precompute_ref_log_probs, tc.max_prompt_length,
            tc.rpo_alpha) == (0.1, "sigmoid", 0.0, False, None, None)


@pytest.mark.parametrize("method, key, value", [("sft", "beta", 0.2), ("sft", "loss_type", "ipo"),
                                                ("orpo", "loss_type", "ipo"), ("orpo", "rpo_alpha", 1.0),
                                                ("orpo", "precompute_ref_log_probs", True),
                                                ("sft", "max_prompt_length", 64)])
def test_a_key_of_another_method_is_refused_by_name(method, key, value):
    with pytest.raises(ConfigError, match=rf"training_config\.{key}: a key of method .*but method is '{method}'"):
        _tc(method=method, **{key: value})


def test_a_key_of_another_method_is_refused_even_at_its_default_value():
    with pytest.raises(ConfigError, match="training_config.beta"):
        _tc(beta=0.1)


def test_mistyped_preference_keys_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'loss_type'"):
        _tc(method="dpo", loss_typ="ipo")
    with pytest.raises(ConfigError, match="loss_type: expected 'sigmoid' | 'ipo' | 'hinge'"):
        _tc(method="dpo", loss_type="kto")
    with pytest.raises(ConfigError, match="method: expected 'sft' | 'dpo' | 'orpo'"):
        _tc(method="ppo")


@pytest.mark.parametrize("keys, match", [({"beta": 0.0}, "beta must be > 0"),
                                         ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
                                         ({"label_smoothing": 0.1, "loss_type": "ipo"}, "only loss_type sigmoid"),
                                         ({"max_prompt_length": 1}, "max_prompt_length must be >= 2"),
                                         ({"rpo_alpha": -1.0}, "rpo_alpha must be >= 0")])
def test_out_of_range_preference_values_are_refused(keys, match):
    with pytest.raises(ConfigError, match=match):
        _tc(method="dpo", **keys)


def test_set_overrides_reach_the_method_check():
    cfg = load_config({**BASE, "training_config": {"method": "orpo"}}, ["training_config.beta=0.25"])
    assert cfg.training_config.beta == 0.25
    with pytest.raises(ConfigError, match="training_config.rpo_alpha"):
        load_config({**BASE, "training_config": {"method": "orpo"}}, ["training_config.rpo_alpha=0.5"])


def test_direct_construction_refuses_a_non_default_key_of_another_method():
    with pytest.raises(ConfigError, match="training_config.loss_type"):
        TrainingConfig(loss_type="hinge")


def test_the_resolved_config_of_each_method_loads_back_and_lists_only_its_keys():
    for method in ("sft", "dpo", "orpo"):
        cfg = load_config({**BASE, "training_config": {"method": method}})
        saved = cfg.to_dict()["training_config"]
        assert ("beta" in saved) == (method != "sft") and ("loss_type" in saved) == (method == "dpo")
        assert load_config(saved and {**BASE, "training_config": saved}).training_config == cfg.training_config


def test_the_shipped_dpo_example_loads_as_a_dpo_run():
    from helpers import ROOT

    cfg = load_config(ROOT / "examples" / "phi3-mini-dpo.yaml")
    tc = cfg.training_config
    assert (tc.method, tc.beta, tc.loss_type, tc.max_prompt_length) == ("dpo", 0.1, "sigmoid", 512)
    assert cfg.notes == [] and cfg.peft_config.target_modules == "all-linear"
