"""SIGINT and SIGTERM during `phitune train` (real processes): a checkpoint at the step reached, the resume command
printed, exit 130/143; a second Ctrl-C during that save waits for it; the printed command resumes to exactly the
uninterrupted run."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from helpers import losses, tiny_config

from phitune.training import checkpoint as ckpt
from phitune.cli import resume_command
from phitune.training.interrupt import Interrupted, StopOnSignal
from phitune.training.train import finetune

from helpers import ROOT
RESUME = "training_config.resume_from_checkpoint=auto"


def _config(model_dir, files, out, **training) -> dict:
    # A constant learning rate: the schedule does not depend on max_steps, so the interrupted run (max_steps far
    # away) and the reference (max_steps = where it stopped + 2) train the same steps. Dropout and accumulation on,
    # so the checkpoint must hold the RNG and the data position of a step boundary.
    cfg = tiny_config(model_dir, files, out, max_steps=100_000, lr_scheduler_type="constant",
                      gradient_accumulation_steps=2, **training)
    cfg["peft_config"]["lora_dropout"] = 0.1
    cfg["data"]["eval"] = None
    return cfg


def _start(cfg: dict, tmp_path: Path, env: dict | None = None):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "phitune", "train", str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, env


def _wait_for_steps(proc, out: Path, n: int) -> None:
    deadline = time.monotonic() + 240
    while len(losses(out)) < n if (out / "metrics.jsonl").exists() else True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)


def _resume_and_compare(stderr: str, env: dict, out: Path, cfg: dict, tmp_path: Path) -> str:
    """Run the printed resume command for 2 more steps; it must end where the uninterrupted run ends. Returns the
    resumed run's console output."""
    line = next(li for li in stderr.splitlines() if li.startswith("resume with: "))
    command = shlex.split(line[len("resume with: "):])
    assert command[:2] == ["phitune", "train"] and command[-2:] == ["--set", RESUME]
    stopped = ckpt.latest_checkpoint(out)
    step = int(stopped.name.split("-")[1])
    assert [s for s, _ in losses(out)] == list(range(1, step + 1))  # logged up to the checkpoint's step
    more = ["--set", f"training_config.max_steps={step + 2}"]
    resumed = subprocess.run([sys.executable, "-m", "phitune", *command[1:], *more], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped}" in resumed.stderr

    ref = tmp_path / "uninterrupted"
    finetune({**cfg, "training_config": {**cfg["training_config"], "output_dir": str(ref), "max_steps": step + 2}})
    assert losses(out) == losses(ref)  # bitwise on the CPU, as every resume
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return resumed.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_prints_the_resume_command_and_exits_143(tiny_model_dir, chat_files,
                                                                           tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, chat_files, out)
    proc, env = _start(cfg, tmp_path)
    try:
        _wait_for_steps(proc, out, 3)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM received: finishing the current step, then saving a checkpoint" in stderr
    assert "phitune train: stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    assert not list((out / "checkpoints").glob(".tmp-*"))
    _resume_and_compare(stderr, env, out, cfg, tmp_path)


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_save_waits_for_it_then_exits_130(tiny_model_dir, chat_files,
                                                                   tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, chat_files, out)
    proc, env = _start(cfg, tmp_path, env={"PHITUNE_TEST_SLOW_SAVE": "3"})  # every save sleeps 3 s before its rename
    try:
        _wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob(".tmp-checkpoint-*/meta.json")):  # the save is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT again: stopping as soon as the save in progress is complete" in stderr
    assert "Traceback" not in stderr
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the save completed: renamed into place
    env.pop("PHITUNE_TEST_SLOW_SAVE")
    _resume_and_compare(stderr, env, out, cfg, tmp_path)


@pytest.mark.slow
def test_ctrl_c_during_dpo_resumes_exactly_with_the_checkpoint_reference_log_probs(tiny_model_dir, tmp_path):
    """A DPO run (precompute_ref_log_probs, dropout, accumulation by pairs) stopped by SIGINT: its checkpoint holds
    the reference log-probs, and the resume reads them (nothing is computed again) to end bitwise where the
    uninterrupted run ends."""
    words = ["apple", "river stone", "cloud", "tiger lemon piano", "glass", "mouse", "candle forest", "rocket"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w}) + "\n"
                             for w in words))
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, (pairs, pairs), out, method="dpo", precompute_ref_log_probs=True,
                  per_device_train_batch_size=2)
    proc, env = _start(cfg, tmp_path)
    try:
        _wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "reference log-probs of 16 samples precomputed" in stderr and "Traceback" not in stderr
    stopped = ckpt.latest_checkpoint(out)
    saved = torch.load(stopped / "training_state.pt", weights_only=True)["extra"]["reference_logps"]
    assert sorted(saved) == ["train"] and saved["train"].shape == (16,) and saved["train"].lt(0).all()
    resumed = _resume_and_compare(stderr, env, out, cfg, tmp_path)
    assert "precomputed" not in resumed  # read from the checkpoint, not computed again


def test_a_second_signal_outside_a_save_stops_at_once_and_inside_one_after_it():
    said = []
    # What was installed before (SIG_IGN when pytest runs in a background job, default_int_handler otherwise).
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal(say=said.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first one is only recorded
        with pytest.raises(Interrupted) as raised:
            with stop.saving():
                os.kill(os.getpid(), signal.SIGINT)
                finished = True  # the block runs to its end
        assert finished and raised.value.exit_code == 130
        with pytest.raises(Interrupted, match="second signal"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


def test_resume_command_keeps_the_arguments_and_replaces_an_earlier_resume_setting():
    argv = ["train", "my run.yaml", "--set", "training_config.learning_rate=1e-4", "--set",
            "training_config.resume_from_checkpoint=runs/x/checkpoints/checkpoint-5"]
    assert resume_command(argv) == ("phitune train 'my run.yaml' --set training_config.learning_rate=1e-4 "
                                    f"--set {RESUME}")
