"""phitune.training.checkpoint: atomic checkpoints, exact resume on CPU, rotation, refusal of incompatible configs,
SIGKILL."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from helpers import losses, tiny_config, tiny_lora_module

from phitune.training import checkpoint as ckpt
from phitune.errors import CheckpointError
from phitune.training.train import finetune

from helpers import ROOT


def _config(model_dir, files, out, **training):
    # Dropout on, accumulation over 2 micro-batches, an epoch boundary at step 4: resume must restore RNG and the
    # data position, not just the weights.
    training = {"max_steps": 6, "save_steps": 3, "gradient_accumulation_steps": 2, **training}
    cfg = tiny_config(model_dir, files, out, **training)
    cfg["data"]["eval"] = None
    cfg["peft_config"]["lora_dropout"] = 0.1
    return cfg


@pytest.fixture(scope="module")
def reference(tiny_model_dir, chat_files, tmp_path_factory):
    """An uninterrupted run: (output folder, per-step losses)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finetune(_config(tiny_model_dir, chat_files, out))
    return out, losses(out)


def _resumed_from(reference_out: Path, step: int, out: Path) -> None:
    """A run folder as a run killed after checkpoint ``step`` would leave it."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_out / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")


def test_checkpoint_contents(reference):
    out, _ = reference
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    c3 = out / "checkpoints" / "checkpoint-3"
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainable.safetensors", "training_state.pt",
                 "meta.json"):
        assert (c3 / name).is_file(), name
    state = torch.load(c3 / "training_state.pt", weights_only=True)  # plain data and tensors only
    assert state["step"] == 3 and state["data_position"] == {"epoch": 0, "micro_batch": 6}
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    meta = ckpt.read_meta(out / "checkpoints" / "checkpoint-6")
    assert meta["data_position"] == {"epoch": 1, "micro_batch": 4}  # 8 micro-batches per epoch, 2 per step
    assert meta["settings"]["training_config"]["gradient_accumulation_steps"] == 2


def test_resume_auto_continues_exactly(reference, tiny_model_dir, chat_files, tmp_path):
    ref_out, ref_losses = reference
    out = tmp_path / "run"
    _resumed_from(ref_out, 3, out)
    result = finetune(_config(tiny_model_dir, chat_files, out, resume_from_checkpoint="auto"))
    assert losses(out) == ref_losses[3:]  # bitwise equal on CPU
    final, ref_final = load_file(str(out / "adapter_model.safetensors")), load_file(
        str(ref_out / "adapter_model.safetensors"))
    assert final.keys() == ref_final.keys()
    for k in final:
        assert torch.equal(final[k], ref_final[k]), k
    assert result.metrics["train_steps"] == 6


def test_resume_from_a_checkpoint_path(reference, tiny_model_dir, chat_files, tmp_path):
    ref_out, ref_losses = reference
    out = tmp_path / "elsewhere"
    finetune(_config(tiny_model_dir, chat_files, out, resume_from_checkpoint=str(ref_out / "checkpoints" /
                                                                                 "checkpoint-3")))
    assert losses(out) == ref_losses[3:]


def test_incompatible_config_is_refused_before_loading(reference, tiny_model_dir, chat_files, tmp_path):
    ref_out, _ = reference
    path = str(ref_out / "checkpoints" / "checkpoint-3")
    cfg = _config(tiny_model_dir, chat_files, tmp_path / "a", resume_from_checkpoint=path,
                  per_device_train_batch_size=2)
    with pytest.raises(CheckpointError, match=r"different config \(training_config.per_device_train_batch_size: "
                                              r"4 -> 2\).*original settings"):
        finetune(cfg)
    cfg = _config(tiny_model_dir, chat_files, tmp_path / "b", resume_from_checkpoint=path)
    cfg["peft_config"]["r"] = 8
    with pytest.raises(CheckpointError, match=r"peft_config.r: 4 -> 8"):
        finetune(cfg)
    # Longer training is allowed: max_steps is not part of the hash.
    settings = ckpt.resume_settings(__import__("phitune.config", fromlist=["x"]).load_config(
        _config(tiny_model_dir, chat_files, tmp_path / "c", max_steps=60)))
    ckpt.check_compatible(Path(path), settings)


def test_resume_true_needs_a_checkpoint_auto_does_not(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.resolve_resume(True, tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def _fake_checkpoint(out: Path, step: int) -> Path:
    p = out / "checkpoints" / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "meta.json").write_text(json.dumps({"step": step}))
    return p


def test_rotation_keeps_the_newest_and_ignores_partial_folders(tmp_path):
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".tmp-checkpoint-50-123").mkdir()  # a save killed mid-way
    (tmp_path / "checkpoints" / "checkpoint-60").mkdir()  # no meta.json: never complete
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (10, 20, 30, 40)]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-40"
    deleted = ckpt.rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["checkpoint-10", "checkpoint-20"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]
    ckpt.rotate_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoints" / "checkpoint-30")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]
    ckpt.rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-40"]
    assert ckpt.rotate_checkpoints(tmp_path, None) == []


def test_save_total_limit_in_a_run(tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    finetune(_config(tiny_model_dir, chat_files, out, max_steps=4, save_steps=1, save_total_limit=2,
                     gradient_accumulation_steps=1))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])


_CHILD = """
import sys, yaml
from phitune.training.train import finetune
finetune(yaml.safe_load(open(sys.argv[1])))
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_resume_auto(reference, tiny_model_dir, chat_files, tmp_path):
    """Kill the training process while it writes checkpoint-6 (checkpoint-3 is complete), then resume."""
    ref_out, ref_losses = reference
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, chat_files, out)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PHITUNE_TEST_SLOW_SAVE="6:120", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg_path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob(".tmp-checkpoint-6-*/meta.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the save of checkpoint-6"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    # The latest checkpoint is complete and loads; the half-written one is not listed.
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == "checkpoint-3"
    torch.load(latest / "training_state.pt", weights_only=True)
    load_file(str(latest / "trainable.safetensors"))

    cfg["training_config"]["resume_from_checkpoint"] = "auto"
    result = finetune(cfg)
    assert losses(out) == ref_losses  # metrics.jsonl: steps 1-3 from the killed run, 4-6 from the resumed one
    assert result.metrics["train_steps"] == 6
    ref_final = json.loads((ref_out / "final_metrics.json").read_text())
    assert result.metrics["train_loss"] == ref_final["train_loss"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]


class _FullDisk:
    """An optimizer whose state cannot be written: torch.save's zip writer fails as on a full disk."""

    def state_dict(self):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    from phitune.errors import StorageError

    model = tiny_lora_module()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save = dict(model=model, scheduler=scheduler, data_position={"epoch": 0, "micro_batch": 2}, settings={"a": 1})
    first = ckpt.save_checkpoint(tmp_path, 2, optimizer=optimizer, **save)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # the same step saved again (as after a resume from an older checkpoint), failing midway
    with pytest.raises(StorageError, match=r"cannot write checkpoint 2: the write failed.*Earlier checkpoints are "
                                           r"intact"):
        ckpt.save_checkpoint(tmp_path, 2, optimizer=_FullDisk(), **save)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert ckpt.checkpoint_problem(first) is None
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint-2"]  # the half-written folder is gone
    again = ckpt.save_checkpoint(tmp_path, 2, optimizer=optimizer, **save)  # replaced whole once it succeeds
    assert again == first and ckpt.checkpoint_problem(again) is None
    assert (again / ckpt.TRAINABLE_NAME).read_bytes() != before[ckpt.TRAINABLE_NAME]
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint-2"]


def test_a_full_disk_while_the_adapter_is_saved_is_reported_as_the_checkpoints_failure(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from phitune.errors import StorageError

    model = tiny_lora_module()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    # save_adapter's own atomic write is nested in the checkpoint's: the message is the checkpoint's
    with pytest.raises(StorageError, match=r"checkpoints/checkpoint-4/adapter_model\.safetensors: cannot write "
                                           r"checkpoint 4: the disk is full.*Earlier checkpoints are intact"):
        ckpt.save_checkpoint(tmp_path, 4, model=model, optimizer=optimizer, scheduler=scheduler,
                             data_position={"epoch": 0, "micro_batch": 4}, settings={})
    assert os.listdir(tmp_path / "checkpoints") == []
