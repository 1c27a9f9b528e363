"""phitune.cli: parsing, help texts, exit codes and error messages (no model is loaded here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import phitune
from phitune import cli

COMMANDS = ["train", "plan", "eval", "chat", "merge", "preview", "demo"]


def run_main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"phitune {phitune.__version__}"


def test_main_help_lists_every_command_with_examples(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for name in COMMANDS:
        assert f"\n    {name} " in out
    assert "examples:" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: phitune {command}")
    assert "examples:" in out
    assert f"phitune {command}" in out.split("examples:")[1]


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2
    assert "COMMAND" in err or "required" in err


def test_unknown_command_is_a_usage_error(capsys):
    code, _, err = run_main(["trian"], capsys)
    assert code == 2
    assert "invalid choice" in err


def test_parsing_of_each_command():
    p = cli.build_parser()
    a = p.parse_args(["train", "c.yaml", "--set", "training_config.max_steps=3", "--set", "peft_config.r=4"])
    assert (a.command, a.config, a.overrides) == ("train", "c.yaml", ["training_config.max_steps=3", "peft_config.r=4"])
    a = p.parse_args(["eval", "run", "--data", "x.jsonl", "--batch-size", "2", "--max-samples", "5", "--json"])
    assert (a.run_dir, a.data, a.batch_size, a.max_samples, a.json) == ("run", "x.jsonl", 2, 5, True)
    a = p.parse_args(["chat", "run", "--prompt", "hi", "--system", "be nice", "--max-new-tokens", "7", "--greedy",
                      "--temperature", "0", "--seed", "1"])
    assert (a.prompt, a.system, a.max_new_tokens, a.greedy, a.temperature, a.seed) == \
        ("hi", "be nice", 7, True, 0.0, 1)
    a = p.parse_args(["chat", "run", "--top-p", "0.8", "--top-k", "20", "--repetition-penalty", "1.1"])
    assert (a.temperature, a.top_p, a.top_k, a.repetition_penalty, a.greedy) == (None, 0.8, 20, 1.1, False)
    a = p.parse_args(["chat", "run"])  # nothing given: the run's generation_config.json decides
    assert (a.temperature, a.top_p, a.top_k, a.repetition_penalty, a.greedy) == (None, None, None, None, False)
    a = p.parse_args(["merge", "run", "--out", "m", "--dtype", "bfloat16", "--force"])
    assert (a.run_dir, a.out, a.dtype, a.force) == ("run", "m", "bfloat16", True)
    a = p.parse_args(["preview", "c.yaml", "-n", "5", "--no-color", "--set", "data.packing=false"])
    assert (a.config, a.num_samples, a.color, a.overrides) == ("c.yaml", 5, False, ["data.packing=false"])
    assert p.parse_args(["preview", "c.yaml"]).color is None
    a = p.parse_args(["demo", "--out", "d", "--max-steps", "5", "--set", "peft_config.r=4"])
    assert (a.out, a.max_steps, a.overrides) == ("d", 5, ["peft_config.r=4"])


@pytest.mark.parametrize("argv, message", [
    (["train", "c.yaml", "--set", "learning_rate"], "KEY=VALUE"),
    (["train", "c.yaml", "--set", "=3"], "KEY=VALUE"),
    (["chat", "run", "--max-new-tokens", "0"], "expected a number >= 1"),
    (["chat", "run", "--temperature", "-1"], "expected a number >= 0"),
    (["eval", "run", "--batch-size", "two"], "expected a whole number"),
    (["merge", "run"], "--out"),
    (["merge", "run", "--out", "m", "--dtype", "int8"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert message in err


def test_train_without_config_exits_2(capsys):
    code, _, err = run_main(["train"], capsys)
    assert code == 2
    assert "CONFIG" in err and "Traceback" not in err


def test_missing_config_file_exits_2_without_traceback(tmp_path, capsys):
    code, _, err = run_main(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert "nope.yaml" in err and "Traceback" not in err


def test_config_error_exits_2_with_file_line_and_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: some/model\ndata: {train: x.jsonl}\ntraining_config:\n  learning_rat: 1.0e-4\n")
    code, _, err = run_main(["preview", str(cfg)], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert f"{cfg}:4" in err and "learning_rat" in err and "did you mean 'learning_rate'" in err


def test_bad_set_override_section_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: some/model\ndata: {train: x.jsonl}\n")
    code, _, err = run_main(["train", str(cfg), "--set", "trainig_config.max_steps=3"], capsys)
    assert code == 2
    assert "trainig_config" in err and "did you mean 'training_config'" in err


@pytest.mark.parametrize("command", [["eval"], ["chat", "--prompt", "hi"], ["merge", "--out", "OUT"]])
def test_missing_run_dir_exits_2_before_loading_anything(command, tmp_path, capsys):
    argv = [command[0], str(tmp_path / "no-such-run")] + [a.replace("OUT", str(tmp_path / "m")) for a in command[1:]]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_main(["eval", str(tmp_path)], capsys)
    assert code == 2
    assert "phitune_config.yaml" in err and "AutoModelForCausalLM" in err


def test_run_without_final_adapter_points_at_the_latest_checkpoint(tmp_path, capsys):
    (tmp_path / "phitune_config.yaml").write_text("model: x\n")
    for step in (5, 10):
        ckpt = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text("{}")
    code, _, err = run_main(["chat", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2
    assert "no final adapter" in err and "checkpoint-10" in err


def test_unexpected_errors_exit_1_with_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kaput")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():
        action.set_defaults(func=boom)
    code, _, err = run_main(["demo"], capsys)
    assert code == 1
    assert "Traceback" in err and "kaput" in err


def test_help_config_lists_every_section(capsys):
    code, out, _ = run_main(["train", "--help-config"], capsys)
    assert code == 0
    for section in ("model:", "data:", "training_config:", "peft_config:"):
        assert section in out
    assert "learning_rate" in out and "name_or_path" in out


def test_python_dash_m_and_entry_point_agree():
    res = subprocess.run([sys.executable, "-m", "phitune", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout.strip() == f"phitune {phitune.__version__}"
    res = subprocess.run([sys.executable, "-m", "phitune", "eval", "/nonexistent/run"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_every_command_is_a_public_python_function():
    from phitune.evals.evaluate import evaluate
    from phitune.generation.chat import chat
    from phitune.runs.merge import merge
    from phitune.training.preview import preview
    assert phitune.evaluate is evaluate and phitune.chat is chat
    assert phitune.merge is merge and phitune.preview is preview
    assert callable(phitune.finetune)
