"""phitune.config: the cookbook's dicts load verbatim, typos get "did you mean", YAML errors name file:line."""


import pytest

from phitune.config import (ModelConfig, TrainingConfig, apply_overrides, build_model_config, build_training_config,
                            config_fields, load_config)
from phitune.errors import ConfigError

from helpers import COOKBOOK_PEFT_CONFIG, COOKBOOK_TRAINING_CONFIG, ROOT

# The Phi-3 model card's sample_finetune.py, pasted verbatim.


def _run(**sections):
    base = {"model": "microsoft/Phi-3-mini-4k-instruct", "data": {"train": "chats.jsonl"}}
    base.update(sections)
    return base


def test_cookbook_dicts_load_verbatim_with_notes_for_inert_keys():
    cfg = load_config(_run(training_config=COOKBOOK_TRAINING_CONFIG, peft_config=COOKBOOK_PEFT_CONFIG))
    tc = cfg.training_config
    assert tc.learning_rate == 5e-6 and tc.lr_scheduler_type == "cosine" and tc.bf16
    assert tc.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert tc.warmup_steps_for(100) == 20  # warmup_ratio is honoured
    assert tc.overwrite_output_dir is True and tc.log_level == "info"
    notes = "\n".join(cfg.notes)
    assert "do_eval" in notes and "remove_unused_columns" in notes and "no effect" in notes
    assert len(cfg.notes) == 2
    assert cfg.peft_config.r == 16 and cfg.peft_config.target_modules == "all-linear"


def test_evaluation_strategy_is_an_alias_of_eval_strategy():
    tc = build_training_config({"evaluation_strategy": "steps", "eval_steps": 5})
    assert tc.eval_strategy == "steps"
    with pytest.raises(ConfigError, match="old name"):
        build_training_config({"evaluation_strategy": "steps", "eval_strategy": "no"})


def test_unknown_key_says_did_you_mean():
    with pytest.raises(ConfigError, match=r"training_config: unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        build_training_config({"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match=r"did you mean 'name_or_path'"):
        build_model_config({"name_or_pth": "x"})
    with pytest.raises(ConfigError, match=r"unknown config section 'trainng_config'.*did you mean 'training_config'"):
        load_config({"model": "x", "data": "d.jsonl", "trainng_config": {}})


def test_transformers_keys_phitune_does_not_implement():
    tc = build_training_config({"dataloader_num_workers": 0, "push_to_hub": False, "do_train": True})
    assert len(tc.notes) == 3
    with pytest.raises(ConfigError, match="deepspeed.*does not implement"):
        build_training_config({"deepspeed": "ds.json"})


def test_type_and_range_errors_name_the_key():
    with pytest.raises(ConfigError, match="training_config.learning_rate: expected float"):
        build_training_config({"learning_rate": "fast"})
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be >= 1"):
        build_training_config({"per_device_train_batch_size": 0})
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        build_training_config({"lr_scheduler_type": "polynomial"})
    with pytest.raises(ConfigError, match="report_to: unknown backend 'tensorbord'.*did you mean 'tensorboard'"):
        build_training_config({"report_to": "tensorbord"})
    with pytest.raises(ConfigError, match="bf16 and fp16"):
        build_training_config({"bf16": True, "fp16": True})


def test_model_shorthand_aliases_and_required_name():
    assert build_model_config("microsoft/Phi-3-mini-4k-instruct").name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    m = build_model_config({"name_or_path": "x", "torch_dtype": "bfloat16", "use_cache": False})
    assert m.dtype == "bfloat16" and any("use_cache" in n for n in m.notes)
    with pytest.raises(ConfigError, match="name_or_path is required"):
        build_model_config({})
    with pytest.raises(ConfigError, match="model.dtype"):
        build_model_config({"name_or_path": "x", "dtype": "int8"})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: x\ndata: d.jsonl\ntraining_config:\n  learning_rate: [1e-4\n  seed: 1\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+:\d+: invalid YAML"):
        load_config(p)


def test_key_errors_in_yaml_name_file_and_line(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("model: x\ndata: d.jsonl\ntraining_config:\n  seed: 1\n  learnin_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=rf"{p}:5: training_config: unknown key 'learnin_rate'.*did you mean"):
        load_config(p)
    p.write_text("model: x\ndata: d.jsonl\ntraining_config:\n  seed: one\n")
    with pytest.raises(ConfigError, match=rf"{p}:4: training_config.seed: expected int"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_yaml_values(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: microsoft/Phi-3-mini-4k-instruct\ndata: d.jsonl\ntraining_config:\n  seed: 1\n")
    cfg = load_config(p, ["training_config.learning_rate=1e-4", "training_config.report_to=[]",
                          "peft_config.target_modules=[qkv_proj, o_proj]", "model.dtype=float32",
                          "training_config.resume_from_checkpoint=auto", "training_config.bf16=true"])
    tc = cfg.training_config
    assert tc.learning_rate == 1e-4 and tc.bf16 is True and tc.resume_from_checkpoint == "auto"
    assert cfg.peft_config.target_modules == ["qkv_proj", "o_proj"]
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct" and cfg.model.dtype == "float32"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["training_config.seed"])
    with pytest.raises(ConfigError, match="did you mean 'peft_config'"):
        apply_overrides({}, ["pef_config.r=8"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_run(training_config=COOKBOOK_TRAINING_CONFIG, peft_config=COOKBOOK_PEFT_CONFIG))
    p = tmp_path / "phitune_config.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again.to_dict() == cfg.to_dict()
    assert again.to_dict()["model"]["name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"


def test_every_key_has_a_doc():
    for cls in (ModelConfig, TrainingConfig):
        for key, _default, doc in config_fields(cls):
            assert doc, f"{cls.__name__}.{key} has no doc"


def test_example_phi3_mini_lora_yaml_is_valid():
    cfg = load_config(ROOT / "examples" / "phi3-mini-lora.yaml")
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    tc = cfg.training_config
    for key, value in COOKBOOK_TRAINING_CONFIG.items():
        if key not in ("do_eval", "remove_unused_columns"):
            assert getattr(tc, key) == value, key
    assert cfg.peft_config.r == 16 and cfg.peft_config.lora_alpha == 32
    assert cfg.data.max_seq_length == 2048 and cfg.data.packing is True
