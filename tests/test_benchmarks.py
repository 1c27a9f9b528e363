"""Every script in benchmarks/ runs at its smallest size (--smoke) within 30 CPU seconds, and gpu_run.sh's commands
parse on a CPU (DRY_RUN=1), so a benchmark can never again break unseen (issue 21: train_throughput.py failed for
every phitune variant after batch_plan started returning rows).

The budget is CPU time (user + system of the script and every process it waited for), not wall time: on a shared
machine the wall clock measures the neighbours. The scripts run with one thread: with two on a busy machine,
OpenMP's spin-waiting doubles the CPU time of the same work (qlora_throughput.py --smoke: 30 CPU seconds with two
threads at a load average of 14, 19 with one). One thread's CPU time is about its wall time on an idle machine,
which two cores only shorten.
"""

import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

BENCH = ROOT / "benchmarks"
CPU_BUDGET_S = 30.0  # issue 21: each benchmark runs in CI at its smallest size in under 30 s

# script -> (optional packages it needs, what its output must show: it measured, not just started)
SMOKE = {
    "activation_memory.py": (("peft",), ['"run": "peer"', '"run": "phitune"', '"saved_total_gib"']),
    "cpu_half_matmul.py": ((), ['"dtype": "float32"', '"dtype": "bfloat16"', '"input_grad_dY_W_s"']),
    "data_pipeline.py": ((), ['"conversations": 200', '"end_to_end_tokens_per_s"', '"cache_hit": true']),
    "demo_decoding.py": ((), ["held-out exact match: greedy", "ceiling through the base lm_head"]),
    "generate_throughput.py": ((), ["tokens/s", "answers identical token for token"]),
    "gpu_predicted.py": (("peft",), ["PREDICTED", "predicted ratio phitune/peer", '"setting": "blocks_b4"']),
    "loading_memory.py": ((), ["x single", "before", "after"]),
    "loss_chunks.py": ((), ['"dtype": "float32", "chunk"', '"dtype": "bfloat16", "chunk"', '"default": true']),
    "lora_layers.py": (("peft", "loralib"), ["phitune Linear", "loralib/phitune =", "peft/phitune ="]),
    "plan_accuracy.py": ((), ["predicted", "measured", "calibration: measured / roofline"]),
    "preference_throughput.py": (("trl", "peft"), ['"run": "trl", "pairs_per_s"', '"run": "phitune", "pairs_per_s"',
                                                  '"ratio": "phitune / trl"']),
    "qlora_cpu_accuracy.py": (("bitsandbytes",), ["nf4 64x96: max|err|", "fp4 64x96: max|err|"]),
    "qlora_throughput.py": (("bitsandbytes", "peft"), ['"run": "peer", "tokens_per_s"',
                                                       '"run": "phitune", "tokens_per_s"', '"ratio"']),
    "step_profile.py": (("peft",), ['"run": "peer"', '"run": "phitune"', '"speedup"']),
    "tokenizer_fidelity.py": ((), ["llama.cpp reference texts equal", "phitune uses"]),
    "train_throughput.py": ((), ['"variant": "fast", "tokens_per_s"', '"variant": "plain", "tokens_per_s"']),
    "truncation_scaling.py": ((), ["20 turns:", "80 turns:", "tokens kept"]),
}


# scripts that read files kept outside the repository (the workplace's shared folder), skipped where it is missing
NEEDS_FILES = {"tokenizer_fidelity.py": ROOT.parent / "shared" / "tokenizers" / "phi-3-mini" / "tokenizer.json"}


def bench_env(tmp_path) -> dict:
    """PYTHONPATH with this checkout's src first, one thread (see the module docstring), `python3` = this
    interpreter."""
    bin_dir = Path(sys.executable).parent  # a virtualenv's bin/ (a symlink elsewhere would lose the virtualenv)
    if not (bin_dir / "python3").exists():
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "python3").symlink_to(sys.executable)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", TMPDIR=str(tmp_path))


def run_measured(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """The finished command and the CPU seconds it and its waited-for descendants used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_every_benchmark_script_has_a_smoke_run():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(SMOKE)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_its_smallest_size_within_30_cpu_seconds(script, tmp_path):
    needs, expected = SMOKE[script]
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e '.[test]')")
    if script in NEEDS_FILES and not NEEDS_FILES[script].exists():
        pytest.skip(f"needs {NEEDS_FILES[script]} (outside the repository)")
    done, cpu_s = run_measured([sys.executable, str(BENCH / script), "--smoke"], bench_env(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, f"{text!r} not in the output:\n{done.stdout[-3000:]}"
    assert '"error"' not in done.stdout
    assert cpu_s < CPU_BUDGET_S, f"{script} --smoke used {cpu_s:.1f} CPU seconds"


def test_train_throughput_refuses_an_unknown_variant_before_running_anything(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--variants", "fast,fsat",
                           "--dry-run"], capture_output=True, text=True, env=bench_env(tmp_path), cwd=ROOT)
    assert done.returncode == 2 and "unknown variant(s) fsat" in done.stderr


@pytest.mark.slow
def test_train_throughput_bf16_trains_phitune_with_bf16_and_the_base_dtype_rule(tmp_path):
    """--bf16 reaches phitune's run: training_config.bf16 on, and the frozen base in bfloat16 exactly where this CPU
    has bfloat16 matrix hardware (models.loading.resolve_dtype), float32 elsewhere."""
    import torch

    from phitune.models.loading import cpu_has_fast_half

    done = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--smoke", "--bf16"],
                          capture_output=True, text=True, env=bench_env(tmp_path), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"run": "phitune"')]
    assert len(rows) == 2 and all(r["bf16"] is True for r in rows)
    expected = "bfloat16" if cpu_has_fast_half(torch.bfloat16) else "float32"
    assert {r["base_dtype"] for r in rows} == {expected}


@pytest.mark.slow
def test_gpu_run_dry_run_checks_every_command_on_a_cpu(tmp_path):
    env = dict(bench_env(tmp_path), DRY_RUN="1", OUT=str(tmp_path / "out"))
    done, cpu_s = run_measured(["bash", str(BENCH / "gpu_run.sh")], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run: every command checked" in done.stdout
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"dry_run"')]
    # every bench line of both parts ("main" and "ablations"), each with the arguments the device run gets
    assert len(runs) == done.stdout.count("== ") == 5
    assert {v for r in runs for v in r["phitune"]} >= {"fast", "plain", "fast+ckpt", "dense", "compile", "liger"}
    assert all(r["size"] == "mini" and r["device"] == "cuda" and r["seq"] == 2048 for r in runs)
    assert "tests collected" in (tmp_path / "out" / "gpu_tests.txt").read_text()
    assert cpu_s < CPU_BUDGET_S, f"the dry run used {cpu_s:.1f} CPU seconds"


@pytest.mark.slow
def test_step_profile_cpu_time_mode_times_every_op_of_both_steps_in_bf16(tmp_path):
    """--cpu-time (one thread, each aten op's thread CPU time) with --bf16 and --matmuls: both steps are timed op by
    op, and the slowest matmuls are listed with their shapes."""
    pytest.importorskip("peft")
    done, cpu_s = run_measured([sys.executable, str(BENCH / "step_profile.py"), "--smoke", "--cpu-time", "--bf16",
                                "--matmuls", "3"], bench_env(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    steps = [r for r in rows if "run" in r]
    assert [r["run"] for r in steps] == ["peer", "phitune"]
    for r in steps:
        assert r["step_cpu_s"] > 0 and r["ops_per_step"] > 0 and r["matmul_s"] > 0
        assert len(r["slowest_matmuls"]) == 3 and all(len(m["shapes"]) >= 2 for m in r["slowest_matmuls"])
    assert "speedup_step_cpu" in rows[-1]
    assert cpu_s < CPU_BUDGET_S, f"step_profile.py --smoke --cpu-time used {cpu_s:.1f} CPU seconds"
