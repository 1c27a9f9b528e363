"""Folders phitune writes: never into one it did not create, and one run at a time.

Every command that writes a folder (``train``'s output_dir, ``demo --out``, ``merge --out``, ``export --out``) calls
:func:`check_output_folder` before any slow work. A folder is usable when it does not exist yet, is empty, or holds
one of the files by which that command recognises its own earlier output (``phitune_config.yaml``, ``phitune.lock``
or checkpoints for a run; ``phitune_merge.json`` for a merged model; ``phitune_export.json`` for an export).
Anything else is refused, even with ``overwrite_output_dir`` or ``--force``, which only replace phitune's own earlier
output: the message names the key or flag that picks another folder. merge and export also refuse their own earlier
output unless ``--force`` is given (``replace=``); train decides that itself, as it may resume. A path that is a
file, or that cannot be created or written, is refused the same way (a ConfigError: exit 2, the path in the message,
no traceback).

A training run holds an advisory lock on its output folder for its whole life (:func:`lock_output_dir`):
``fcntl.flock`` on ``OUTPUT_DIR/phitune.lock``, which records the holder's pid, host, start time and command. A
second run on the same folder stops at once, naming the first. The kernel releases a flock when its process dies
(SIGKILL included), so a lock file left by a killed run is free and the next run simply takes it; nothing is
guessed from pids. The file stays after the run (it also marks the folder as phitune's). Where ``fcntl`` does not
exist (Windows) runs are not locked. On NFS, flock maps to byte-range locks (Linux >= 2.6.12), which NFS servers
hold across clients.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = "phitune.lock"
DEMO_MARKER = "phitune_demo.json"  # written by `phitune demo` before it trains
RUN_MARKERS = ("phitune_config.yaml", LOCK_NAME, DEMO_MARKER)
MERGE_MARKER = "phitune_merge.json"
EXPORT_MARKER = "phitune_export.json"  # written by `phitune export` into the folder it exports to


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a phitune training run (finished, running or stopped)."""
    if any((path / name).exists() for name in RUN_MARKERS):
        return True
    checkpoints = path / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*/meta.json"))


def is_demo_folder(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``phitune demo`` (which a new demo may replace)."""
    return (path / DEMO_MARKER).is_file() or (path / "demo_answers.json").is_file()


def is_merge_folder(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``phitune merge`` output."""
    return (path / MERGE_MARKER).is_file()


def is_export_folder(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``phitune export`` output."""
    return (path / EXPORT_MARKER).is_file()


def check_output_folder(path: str | os.PathLike, *, what: str, owned, choose: str, owner: str = "phitune",
                        replace: bool | None = None, create: bool = True) -> Path:
    """Refuse ``path`` unless phitune may write there; returns it as a Path (created if missing and ``create``).

    ``what`` names the setting in messages (``training_config.output_dir``, ``--out``); ``owned(path) -> bool``
    recognises the command's own earlier output (``owner`` names its writer in messages); ``choose`` says how to
    pick another folder. ``replace``: None lets the caller decide about its own earlier output; False refuses it
    (naming ``--force``), True accepts it. ``create=False``: for a folder written whole by
    :func:`phitune.runs.atomic.atomic_folder`, which is not created here (a failed command leaves nothing behind);
    its parent must then be writable.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: '{path}' is a file, not a folder; {choose}")
    if path.is_dir():
        try:
            with os.scandir(path) as entries:
                empty = next(entries, None) is None
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read the folder '{path}' ({exc.strerror}); {choose}") from None
        if not empty and not owned(path):
            raise ConfigError(
                f"{what}: '{path}' is not empty and was not written by {owner} ({_listing(path)}); phitune never "
                f"deletes or overwrites what it did not create. {choose[0].upper()}{choose[1:]}"
            )
        if not empty and replace is False:
            raise ConfigError(f"{what}: '{path}' holds an earlier {owner} output; pass --force (force=True) to "
                              f"replace it, or {choose}")
    if not create:  # written whole by runs.atomic.atomic_folder: a sibling is staged, so the parent must be writable
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{what}: cannot create the folder '{path}' ('{parent}' is not a writable folder); "
                              f"{choose}")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create the folder '{path}' ({exc.strerror}); {choose}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: the folder '{path}' is not writable; {choose}")
    return path


def _listing(path: Path, most: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"it holds {shown}"


class RunLock:
    """An advisory lock held on an output folder; :meth:`release` (or leaving the ``with`` block) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(folder: str | os.PathLike, *, what: str = "training_config.output_dir") -> RunLock:
    """Take the lock of ``folder`` (which must exist) or raise ConfigError naming the process that holds it."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None:  # pragma: no cover - Windows
        return RunLock(path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write the lock file '{path}' ({exc.strerror}); choose a writable "
                          "output_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(
            f"{what}: '{Path(folder)}' is in use by another phitune run ({holder}). Wait for it to finish or stop "
            "it, or choose another output_dir"
        ) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return RunLock(path, fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "its process is starting"
    text = f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"
    return text + (f": {info['command']}" if info.get("command") else "")
