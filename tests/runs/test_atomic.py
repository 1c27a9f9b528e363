"""phitune.runs.atomic: a file or folder appears whole or not at all; failures and kills leave the previous content."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from phitune.errors import StorageError
from phitune.runs import atomic
from phitune.runs.atomic import atomic_file, atomic_folder, clean_leftovers, remove_folder, write_text

from helpers import ROOT


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_file_replaces_the_previous_one_only_once_complete(tmp_path):
    path = tmp_path / "report.html"
    write_text(path, "old", "the report")
    with pytest.raises(RuntimeError, match="renderer broke"):
        with atomic_file(path, "the report") as tmp:
            tmp.write_text("half")
            raise RuntimeError("renderer broke")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.html"]
    write_text(path, "new", "the report")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["report.html"]


def test_a_file_gets_the_mode_of_ordinary_files(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "w.bin", "weights") as tmp:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors creates its files
            os.close(fd)
    finally:
        os.umask(mask)
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_folder_is_swapped_in_whole_and_a_failed_one_leaves_the_previous_intact(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "merged"
    with atomic_folder(out, "the merged model") as staging:
        (staging / "model-1.safetensors").write_text("a")
        (staging / "model-2.safetensors").write_text("b")
    with pytest.raises(ValueError):
        with atomic_folder(out, "the merged model") as staging:
            (staging / "model.safetensors").write_text("half")
            raise ValueError("the merge check failed")
    assert _tree(out) == {"model-1.safetensors": b"a", "model-2.safetensors": b"b"}
    with atomic_folder(out, "the merged model") as staging:
        (staging / "model.safetensors").write_text("c")
    assert _tree(out) == {"model.safetensors": b"c"}  # no shard of the earlier content mixed in
    assert os.listdir(tmp_path) == ["merged"]


def test_the_exchange_swaps_two_folders_in_one_step_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert atomic._exchange(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["x"] and os.listdir(tmp_path / "a") == []


def test_a_full_disk_is_a_storage_error_naming_the_path_and_what_is_kept(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out, "the export") as staging:
        (staging / "model.gguf").write_text("old")
    with pytest.raises(StorageError) as err:
        with atomic_folder(out, "the export", keeps="The earlier export is intact.",
                           fix="free space or choose another folder (--out DIR)") as staging:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "model.gguf"))
    message = str(err.value)
    assert "model.gguf: cannot write the export: the disk is full" in message
    assert "The earlier export is intact. Fix: free space or choose another folder (--out DIR)" in message
    assert _tree(out) == {"model.gguf": b"old"} and os.listdir(tmp_path) == ["export"]


def test_leftovers_of_a_killed_writer_go_and_a_running_writers_stay(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".tmp-cache-{dead}-0123abcd").mkdir()
    (tmp_path / f".tmp-report.html-{dead}-0123abcd").write_text("half")
    (tmp_path / f".tmp-cache-{alive}-0123abcd").mkdir()
    (tmp_path / ".tmp-unrelated").mkdir()  # not one of ours: never touched
    clean_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f".tmp-cache-{alive}-0123abcd", ".tmp-unrelated"]


def test_a_swap_killed_between_its_two_renames_is_undone_by_the_next_write(tmp_path):
    # Without renameat2 the previous folder is renamed aside first; a kill right then leaves it only as ``.old-``.
    old = tmp_path / f".old-checkpoint-6-{_dead_pid()}-0123abcd"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    write_text(tmp_path / "other.txt", "x", "a file")  # any atomic write in the folder finishes the swap
    assert _tree(tmp_path / "checkpoint-6") == {"meta.json": b"{}"}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "other.txt"]


def test_a_kill_during_a_folder_write_leaves_the_previous_content(tmp_path):
    out = tmp_path / "cache"
    with atomic_folder(out, "the cache") as staging:
        (staging / "stats.json").write_text("old")
    code = ("import sys, time\nfrom phitune.runs.atomic import atomic_folder\n"
            "with atomic_folder(sys.argv[1], 'the cache', before_swap=lambda: time.sleep(60)) as staging:\n"
            "    (staging / 'stats.json').write_text('new')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        deadline = time.time() + 30
        while not list(tmp_path.glob(".tmp-cache-*/stats.json")):
            assert time.time() < deadline and proc.poll() is None, "the writer never got to its swap"
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "stats.json").read_text() == "old"
    with atomic_folder(out, "the cache") as staging:
        (staging / "stats.json").write_text("newer")
    assert (out / "stats.json").read_text() == "newer" and os.listdir(tmp_path) == ["cache"]


def test_a_removed_folder_never_stays_half_deleted_under_its_name(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "meta.json").write_text("{}")
    remove_folder(tmp_path / "checkpoint-3")
    assert os.listdir(tmp_path) == []


def test_a_symlinked_folder_is_written_where_it_points_and_a_file_is_never_replaced_by_a_folder(tmp_path):
    real = tmp_path / "disk" / "export"
    real.mkdir(parents=True)
    (tmp_path / "export").symlink_to(real)
    with atomic_folder(tmp_path / "export", "the export") as staging:
        (staging / "model.gguf").write_text("new")
    assert (tmp_path / "export").is_symlink() and _tree(real) == {"model.gguf": b"new"}
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="notes.txt: cannot write the export: "):
        with atomic_folder(tmp_path / "notes.txt", "the export"):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_scratch_folder_is_removed_on_exit_and_after_a_kill_by_the_next_write(tmp_path):
    with atomic.scratch_folder(tmp_path / "phi3-gguf", "merged") as work:
        (work / "model.safetensors").write_text("x")
        assert work.parent == tmp_path
    assert os.listdir(tmp_path) == []
    (tmp_path / f".tmp-phi3-gguf.merged-{_dead_pid()}-0123abcd").mkdir()  # what a killed export leaves
    write_text(tmp_path / "notes.txt", "x", "a file")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_a_failed_second_rename_puts_the_previous_folder_back_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "checkpoint-6"
    with atomic_folder(out, "checkpoint 6") as staging:
        (staging / "meta.json").write_text("old")
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(StorageError, match="checkpoint-6: cannot write checkpoint 6: an input/output error"):
        with atomic_folder(out, "checkpoint 6") as staging:
            (staging / "meta.json").write_text("new")
    assert _tree(out) == {"meta.json": b"old"} and os.listdir(tmp_path) == ["checkpoint-6"]
