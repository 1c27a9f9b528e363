"""ConfigError.key: every section builder names the key it blames, and load_config blames the YAML line or the
--set item by that key (never by reading the message); RunConfig's sections are typed."""

import os
import pickle
import subprocess
import sys
import typing

import pytest

from phitune.config import DataConfig, LoraConfig, RunConfig, load_config
from phitune.errors import ConfigError

from helpers import ROOT


def _run(**sections):
    base = {"model": "microsoft/Phi-3-mini-4k-instruct", "data": {"train": "chats.jsonl"}}
    base.update(sections)
    return base


@pytest.mark.parametrize("sections, key", [
    ({"trainig_config": {}}, "trainig_config"),
    ({"model": 3}, "model"),
    ({"model": {"dtype": "float32"}}, "model.name_or_path"),
    ({"model": {"name_or_path": "x", "dtype": "int8"}}, "model.dtype"),
    ({"model": {"name_or_path": "phitune:nope"}}, "model.name_or_path"),
    ({"model": {"name_or_path": "x", "model_max_length": 0}}, "model.model_max_length"),
    ({"model": {"name_or_path": "x", "quantization": {"load_in_4bit": True}}}, "model.quantization.load_in_4bit"),
    ({"model": {"name_or_path": "x", "quantization": {"bnb_4bit_quant_type": "nf4", "type": "nf4"}}},
     "model.quantization.bnb_4bit_quant_type"),
    ({"model": {"name_or_path": "x", "torch_dtype": "float32", "dtype": "float32"}}, "model.torch_dtype"),
    ({"data": None}, "data"),
    ({"data": {"train": "d.jsonl", "max_seq_length": 4}}, "data.max_seq_length"),
    ({"data": {"train": "d.jsonl", "eval": "e.jsonl", "eval_split": 0.1}}, "data.eval_split"),
    ({"data": {"train": "d.jsonl", "role_map": {"bot": "robot"}}}, "data.role_map.bot"),
    ({"data": {"train": "d.jsonl", "columns": {"mesages": "chat"}}}, "data.columns.mesages"),
    ({"data": {"train": "d.jsonl", "packing": "yes"}}, "data.packing"),
    ({"training_config": 3}, "training_config"),
    ({"training_config": {"learnin_rate": 1e-4}}, "training_config.learnin_rate"),
    ({"training_config": {"seed": "one"}}, "training_config.seed"),
    ({"training_config": {"learning_rate": 0}}, "training_config.learning_rate"),
    ({"training_config": {"max_grad_norm": float("inf")}}, "training_config.max_grad_norm"),
    ({"training_config": {"adam_beta2": 1.0}}, "training_config.adam_beta2"),
    ({"training_config": {"bf16": True, "fp16": True}}, "training_config.fp16"),
    ({"training_config": {"warmup_ratio": 2.0}}, "training_config.warmup_ratio"),
    ({"training_config": {"warmup_steps": -1}}, "training_config.warmup_steps"),
    ({"training_config": {"fsdp": "full_shard shard_grad_op"}}, "training_config.fsdp"),
    ({"training_config": {"fsdp": "full_shard", "fsdp_config": {"nope": 1}}}, "training_config.fsdp_config.nope"),
    ({"training_config": {"report_to": "nope"}}, "training_config.report_to"),
    ({"training_config": {"label_smoothing_factor": 0.1}}, "training_config.label_smoothing_factor"),
    ({"training_config": {"evaluation_strategy": "no", "eval_strategy": "no"}}, "training_config.evaluation_strategy"),
    ({"peft_config": 3}, "peft_config"),
    ({"peft_config": {"r": 0}}, "peft_config.r"),
    ({"peft_config": {"lora_alpha": "x"}}, "peft_config.lora_alpha"),
    ({"peft_config": {"use_dora": True}}, "peft_config.use_dora"),
    ({"peft_config": {"peft_type": "IA3"}}, "peft_config.peft_type"),
])
def test_every_section_builder_raises_with_the_key_it_blames(sections, key):
    with pytest.raises(ConfigError) as err:
        load_config(_run(**sections))
    assert err.value.key == key, str(err.value)


YAML = """\
model:
  name_or_path: x
data:
  train: d.jsonl
  role_map:
    bot: robot
training_config:
  bf16: true
  seed: 1
  fp16: true
"""


def test_a_bad_key_is_blamed_on_its_own_line_whatever_its_message_starts_with(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    # the message names the section only; the key puts it on fp16's line (10), not the section's (7)
    assert str(err.value) == f"{path}:10: training_config: bf16 and fp16 are both true; choose one"
    assert err.value.key == "training_config.fp16"
    path.write_text(YAML.replace("  fp16: true\n", ""))
    with pytest.raises(ConfigError, match=rf"^{path}:6: data.role_map.bot: must map to system, user or assistant"):
        load_config(path)


def test_a_key_left_out_of_the_file_is_blamed_on_its_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: d.jsonl\nmodel:\n  dtype: float32\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: model.name_or_path is required"):
        load_config(path)


def test_the_set_item_that_set_the_blamed_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.replace("  fp16: true\n", "").replace("    bot: robot\n", "    bot: user\n"))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training_config.seed=3", "training_config.fp16=true"])
    assert str(err.value) == ("--set training_config.fp16=true: training_config: bf16 and fp16 are both true; "
                              "choose one")
    assert err.value.key == "training_config.fp16"
    with pytest.raises(ConfigError, match=r"^--set data.role_map.bot=robot: data.role_map.bot: must map"):
        load_config(path, ["data.role_map.bot=robot"])
    with pytest.raises(ConfigError, match=r"^--set training_config.learnin_rate=1: training_config: unknown key "):
        load_config(path, ["training_config.learnin_rate=1"])


def test_the_key_survives_pickling():
    err = pickle.loads(pickle.dumps(ConfigError("training_config.seed: expected int", key="training_config.seed")))
    assert err.key == "training_config.seed" and str(err) == "training_config.seed: expected int"
    assert ConfigError("no single key").key is None


def test_run_config_sections_are_typed_and_importing_phitune_config_loads_no_torch():
    hints = typing.get_type_hints(RunConfig)
    assert hints["data"] is DataConfig and hints["peft_config"] is LoraConfig
    code = "import sys, phitune.config\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "[]", out.stderr


def test_a_run_config_built_with_a_dict_section_is_refused():
    cfg = load_config(_run())
    with pytest.raises(ConfigError, match=r"data: expected a DataConfig, got dict") as err:
        RunConfig(model=cfg.model, data={"train": "d.jsonl"}, training_config=cfg.training_config,
                  peft_config=cfg.peft_config)
    assert err.value.key == "data"
