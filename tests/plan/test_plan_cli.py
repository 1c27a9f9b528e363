"""``phitune plan`` from the command line: the fake-CUDA child process, the printed and JSON plans, the errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from phitune.cli import main
from phitune.plan import predict


def tiny_yaml(tmp_path, model_dir, train="unused.jsonl", **training) -> str:
    tc = {"per_device_train_batch_size": 2, "bf16": True, **training}
    lines = ["model:", f"  name_or_path: {model_dir}", "data:", f"  train: {train}", "  max_seq_length: 64",
             "  cache: false", "training_config:"] + [f"  {k}: {json.dumps(v)}" for k, v in tc.items()] + [
             "peft_config:", "  r: 4", "  lora_alpha: 8", "  target_modules: all-linear"]
    path = tmp_path / "plan.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_unknown_gpu_is_refused_before_any_simulation(tmp_path, tiny_model_dir, capsys):
    code = main(["plan", tiny_yaml(tmp_path, tiny_model_dir), "--gpu", "H900"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--gpu H900: not in phitune's GPU table" in err and "--gpu-memory" in err


def test_unknown_config_key_is_refused_with_its_line(tmp_path, tiny_model_dir, capsys):
    path = tiny_yaml(tmp_path, tiny_model_dir, per_device_train_batch_sise=2)
    assert main(["plan", path]) == 2
    err = capsys.readouterr().err
    assert "per_device_train_batch_sise" in err and "plan.yaml:" in err and "did you mean" in err


@pytest.mark.slow  # a child process that imports torch and transformers: ~10-20 s on 2 shared cores
def test_json_plan_of_the_tiny_model_on_a_fake_cuda_gpu(tmp_path, tiny_model_dir, capsys):
    code = main(["plan", tiny_yaml(tmp_path, tiny_model_dir), "--gpu", "L4", "--gpu-memory", "1", "--json",
                 "--world-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    p = json.loads(out)
    assert p["predicted"] is True and p["device"] == "cuda"
    assert p["micro_batch"] == [2, 64] and p["tokens_per_step"] == 2 * 64 * 2
    assert p["attention_kernels"] or any("varlen" in n for n in p["fast_path"])
    parts = p["peak_gib"]
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.01)
    l4, tiny_gpu = p["gpus"]
    assert l4["gpu"] == "L4" and l4["fits"] and l4["step_seconds"][0] < l4["step_seconds"][1]
    assert tiny_gpu["fits"] is False and "step_seconds" not in tiny_gpu  # 1 GiB < the 1 GiB margin + peak; no time
    assert any("NCCL" in item for item in p["not_modelled"])  # world size 2: what is not seen is said
    assert p["flops_per_step"] > 0


def test_fits_leaves_the_stated_margin():
    assert predict.fits(10.0, 11.5) == (True, 0.0)
    assert predict.fits(10.0, 11.49)[0] is False


@pytest.mark.slow  # two rows, each simulated at 2 and 4 layers of the Phi-3-mini shape: ~30 s on one core
def test_accuracy_benchmark_predicts_two_h200_rows_within_3_percent():
    script = ROOT / "benchmarks" / "plan_accuracy.py"
    done = subprocess.run([sys.executable, str(script), "--rows", "ckpt8,chat8-ckpt", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["row"] for r in rows] == ["ckpt8", "chat8-ckpt"]
    for r in rows:
        assert abs(r["error_pct"]) < 3.0, r
    assert rows[0]["in_range"], rows[0]  # the measured step time lies inside the plan's range


def test_an_architecture_transformers_cannot_build_is_refused_with_exit_2(tmp_path, capsys):
    model = tmp_path / "odd-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert main(["plan", tiny_yaml(tmp_path, model)]) == 2
    err = capsys.readouterr().err
    assert "transformers cannot build this architecture" in err and "config.json" in err


def test_an_unknown_hub_id_offline_says_how_to_get_its_config(tmp_path, capsys):
    assert main(["plan", tiny_yaml(tmp_path, "someone/not-cached-model")]) == 2
    err = capsys.readouterr().err
    assert "built-in table" in err and "huggingface-cli download someone/not-cached-model config.json" in err


@pytest.mark.slow  # the child process, as above
def test_data_plans_the_largest_real_batch(tmp_path, tiny_model_dir, chat_files, capsys):
    code = main(["plan", tiny_yaml(tmp_path, tiny_model_dir, train=chat_files[0]), "--data", "--gpu", "T4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "the largest of the training data's" in out and "real tokens" in out
    assert "T4" in out and "REFUSED" in out  # bf16 on a T4: said, not planned as if it would run


def test_phitune_plan_stays_callable_after_its_subpackage_is_imported():
    import phitune.plan.gpus  # sets the attribute phitune.plan to the package

    assert callable(phitune.plan) and phitune.plan.plan.__doc__.startswith("Predict the peak GPU memory")
