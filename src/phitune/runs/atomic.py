"""Atomic writes: a file or a folder appears complete under its name, or not at all, and what was there before
stays until the new content is complete. Checkpoints, merged models, exports, the data cache, saved adapters and
eval reports are all written this way.

A file: written to a sibling ``.tmp-NAME-PID-TOKEN``, fsynced, renamed onto ``NAME`` (``os.replace``, atomic on
POSIX), then the folder holding it fsynced.

A folder: built in a sibling ``.tmp-NAME-PID-TOKEN/``; every file in it is fsynced, then it takes ``NAME``'s place:

- ``NAME`` absent: one ``os.replace``;
- ``NAME`` present: on Linux, one ``renameat2(RENAME_EXCHANGE)`` swaps the two names (so ``NAME`` always names
  complete content), then the old content, now under the temporary name, is deleted. Where that call does not exist
  (other systems, some file systems) ``NAME`` is first renamed to ``.old-NAME-PID-TOKEN``, the new folder to
  ``NAME``, and the old one deleted; a kill between those two renames leaves the previous content under the
  ``.old-`` name, which the next atomic write in the same folder renames back (:func:`clean_leftovers`).

A failure (an exception, a full disk) deletes the temporary sibling and leaves ``NAME`` as it was; file-system
failures become a StorageError through :func:`phitune.runs.storage.writing`, naming the path and the reason. A
process killed mid-write leaves at worst a ``.tmp-`` sibling, deleted by the next atomic write in that folder once
its process is gone (writers still running, e.g. another process filling the same data cache, are left alone).

This module imports nothing of phitune but ``runs.storage``, so ``data/`` and ``adapt/`` use it without cycles.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .storage import readable_like_the_rest, writing

_TMP, _OLD = ".tmp-", ".old-"


# --- the public helpers -----------------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | os.PathLike, what: str, *, keeps: str = "", fix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write the file there. On a clean exit it is fsynced and renamed onto
    ``path``; on any failure it is deleted and ``path`` keeps its previous content. ``what``/``keeps``/``fix`` word
    a StorageError (see :func:`phitune.runs.storage.writing`)."""
    path = _real(path)
    with writing(path, what, keeps=keeps, fix=fix):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path.parent)
        tmp = _sibling(path, _TMP)
        try:
            yield tmp
            _fsync_file(tmp)
            readable_like_the_rest(tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _name_the_target(exc, tmp, path)
            raise


def write_text(path: str | os.PathLike, text: str, what: str, **wording) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path, what, **wording) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike, what: str, *, keeps: str = "", fix: str | None = None,
                  before_swap=None) -> Iterator[Path]:
    """Yield an empty staging folder next to ``path``; write the folder's content there. On a clean exit every file
    is fsynced and the folder takes ``path``'s place (replacing what was there); on any failure it is deleted and
    ``path`` is untouched. ``before_swap``: called once the content is complete, just before the swap (a test hook)."""
    path = _real(path)
    with writing(path, what, keeps=keeps, fix=fix):
        if os.path.lexists(path) and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it exists and is not a folder", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path.parent)
        staging = _sibling(path, _TMP)
        staging.mkdir()
        try:
            yield staging
            _fsync_tree(staging)
            if before_swap is not None:
                before_swap()
            _swap_in(staging, path)
            _fsync_dir(path.parent)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _name_the_target(exc, staging, path)
            raise


@contextmanager
def scratch_folder(next_to: str | os.PathLike, name: str) -> Iterator[Path]:
    """Yield an empty working folder beside ``next_to`` (same file system), deleted on exit; one left by a killed
    process is deleted by the next atomic write there, like any other temporary sibling."""
    folder = _sibling(Path(next_to).with_name(f"{Path(next_to).name}.{name}"), _TMP)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted one under its name: it is renamed to a
    ``.tmp-`` sibling first (which the next atomic write cleans up if the deletion is cut short)."""
    path = Path(path)
    trash = _sibling(path, _TMP)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(folder: str | os.PathLike) -> None:
    """Finish what killed writers left in ``folder``: delete their ``.tmp-`` siblings, and put a ``.old-`` one back
    under its name when that name is missing (a swap cut between its two renames), else delete it. Entries of
    processes still running are left alone."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        parsed = _parse(entry)
        if parsed is None:
            continue
        kind, name, pid = parsed
        if _alive(pid):
            continue
        leftover, target = folder / entry, folder / name
        if kind == _OLD and not os.path.lexists(target):
            os.replace(leftover, target)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def is_leftover(name: str) -> bool:
    """Whether a file name is one of this module's temporary siblings (for listings that must skip them)."""
    return _parse(name) is not None


# --- names ------------------------------------------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> Path:
    """``path``, or what it links to: a symlinked output keeps pointing where its owner put it, and the staging
    sibling lands on the same file system as the content it replaces."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f"{kind}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")


def _name_the_target(exc: BaseException, tmp: Path, target: Path) -> None:
    """Make an OSError name the file being written rather than its temporary sibling, which is gone by the time the
    message is read."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if not name:
        return
    try:
        inside = Path(name).relative_to(tmp)
    except ValueError:
        return
    exc.filename = str(target / inside)


def _parse(entry: str) -> tuple[str, str, int] | None:
    """(kind, target name, pid) of a temporary sibling's name, or None for any other name."""
    kind = _TMP if entry.startswith(_TMP) else _OLD if entry.startswith(_OLD) else None
    if kind is None:
        return None
    parts = entry[len(kind):].rsplit("-", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or len(parts[2]) != 8:
        return None
    try:
        int(parts[2], 16)
    except ValueError:
        return None
    return kind, parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own writes are cleaned up by their own ``except``
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by another user
        return True
    return True


# --- the swap ---------------------------------------------------------------------------------------------------------


def _swap_in(staging: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    if _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the previous content
        return
    old = _sibling(path, _OLD)
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old, path)  # the previous content goes back under its name at once
        raise
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (Linux renameat2, glibc >= 2.28); False where that is not
    available, so the caller falls back to two renames (a real failure, e.g. a read-only disk, shows up there)."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _renameat2 = False
    if not _renameat2:
        return False
    done = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


# --- durability -------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync_file(Path(folder, name))
        _fsync_dir(Path(folder))
