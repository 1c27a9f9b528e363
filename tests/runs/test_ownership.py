"""phitune.runs.ownership through the real CLI: no command writes into a folder it did not create, a bad output path
is a
clear exit 2, and one run at a time holds an output folder (two real processes; a killed holder's lock is free)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from phitune.runs import ownership as outdir
from phitune.cli import main

from helpers import ROOT
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _config_file(tmp_path, model_dir, files, out, **training) -> Path:
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model_dir, files, out, **training)))
    return path


def _foreign(folder: Path) -> dict:
    """A folder holding someone's work; returns its contents to compare with afterwards."""
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "data" / "results.csv").write_text("a,b\n1,2\n")
    return _contents(folder)


def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_run(folder: Path) -> dict:
    """What a real `phitune train` leaves: config, adapter, a checkpoint."""
    ckpt = folder / "checkpoints" / "checkpoint-40"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 40}))
    (folder / "phitune_config.yaml").write_text("model: {name_or_path: x}\n")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return _contents(folder)


# --- train ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_train_refuses_a_non_empty_folder_it_did_not_create(overwrite, tiny_model_dir, chat_files, tmp_path,
                                                            capsys):
    out = tmp_path / "victim"
    before = _foreign(out)
    cfg = _config_file(tmp_path, tiny_model_dir, chat_files, out, overwrite_output_dir=overwrite)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"training_config.output_dir: '{out}' is not empty and was not written by phitune" in err
    assert "--set training_config.output_dir=NEW_DIR" in err and "Traceback" not in err
    assert _contents(out) == before


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_train_output_dir_that_cannot_be_written_exits_2_with_the_path(case, tiny_model_dir, chat_files,
                                                                      tmp_path, capsys):
    target = tmp_path / "target"
    if case == "a file":
        target.write_text("not a folder")
        out, expected = target, "is a file, not a folder"
    elif case == "under a file":
        target.write_text("not a folder")
        out, expected = target / "run", "cannot create the folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        target.mkdir()
        target.chmod(0o555)
        out, expected = target / "run", "cannot create the folder"
    try:
        assert main(["train", str(_config_file(tmp_path, tiny_model_dir, chat_files, out))]) == 2
    finally:
        if target.is_dir():
            target.chmod(0o755)
    err = capsys.readouterr().err
    assert f"'{out}'" in err and expected in err and "Traceback" not in err


# --- demo -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["someone's files", "a training run"])
def test_demo_refuses_a_folder_that_is_not_an_earlier_demo(kind, tmp_path, capsys):
    out = tmp_path / "runs" / "victim"
    before = _foreign(out) if kind == "someone's files" else _fake_run(out)
    assert main(["demo", "--out", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"demo --out: '{out}' is not empty and was not written by phitune demo" in err
    assert "phitune demo --out NEW_DIR" in err and "Traceback" not in err
    assert _contents(out) == before


@pytest.mark.slow  # 12 CPU seconds (2 threads, measured for issue 21; slow = over ~5)
def test_demo_replaces_an_earlier_demo(tmp_path):
    from phitune.embedded.demo import demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_answers.json").write_text("{}")  # what an earlier demo leaves
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    result = demo(out, max_steps=1, max_questions=2, show=0, out=open(os.devnull, "w"))
    assert result.output_dir == out and (out / outdir.DEMO_MARKER).is_file()
    assert json.loads((out / "demo_answers.json").read_text())["answers"]


# --- merge (see also tests/runs/test_run_commands.py: an earlier merge is replaced only with --force) ---


def test_merge_cli_refuses_a_folder_it_did_not_write_even_with_force(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run)
    (run / "adapter_config.json").write_text("{}")
    out = tmp_path / "models"
    before = _foreign(out)
    assert main(["merge", str(run), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"merge --out: '{out}' is not empty and was not written by phitune merge" in err and "--out DIR" in err
    assert _contents(out) == before
    (tmp_path / "file").write_text("x")
    assert main(["merge", str(run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# --- the lock: two real processes -------------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from phitune.runs.ownership import check_output_folder, is_run_folder, lock_output_dir
out = check_output_folder(sys.argv[1], what="output_dir", owned=is_run_folder, choose="")
lock = lock_output_dir(out)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # 9 CPU seconds (2 threads, measured for issue 21; slow = over ~5)
def test_a_second_run_on_a_locked_folder_stops_at_once_naming_the_holder_and_a_killed_holder_frees_it(
        tiny_model_dir, chat_files, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        cfg = _config_file(tmp_path, tiny_model_dir, chat_files, out, max_steps=2, overwrite_output_dir=True)
        second = subprocess.run([sys.executable, "-m", "phitune", "train", str(cfg)], env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another phitune run (pid {holder.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
        assert not (out / "metrics.jsonl").exists()  # it stopped before writing anything
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    # The killed holder's lock file is still there, with its pid; the kernel released its flock.
    assert json.loads((out / outdir.LOCK_NAME).read_text())["pid"] == holder.pid
    third = subprocess.run([sys.executable, "-m", "phitune", "train", str(cfg)], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    lock = outdir.lock_output_dir(tmp_path)
    with pytest.raises(Exception, match=rf"in use by another phitune run \(pid {os.getpid()} on "):
        outdir.lock_output_dir(tmp_path)
    lock.release()
    with outdir.lock_output_dir(tmp_path):
        pass
    outdir.lock_output_dir(tmp_path).release()
