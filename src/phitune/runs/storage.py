"""File-system failures while writing (disk full, read-only, no permission) as one clear error naming the path.

A full disk shows up in different clothes depending on the writer: OSError(ENOSPC) from Python's own files,
RuntimeError("... unexpected pos ...") or "file write failed" from torch.save's zip writer, a SafetensorError from
safetensors. ``writing(path)`` turns each into a StorageError (exit 2) that says where and why; the caller has
already arranged that nothing complete is overwritten (runs/atomic.py writes everything to a temporary sibling first).
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import StorageError

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than this file system (or a limit) allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "an input/output error (a failing disk?)",
}
# what torch.save's and safetensors' writers say when the underlying write fails
_TRAINING_FIX = ("free space or choose a writable training_config.output_dir, then run again "
                 "(resume_from_checkpoint: auto continues from the last complete checkpoint)")
_WRITING: ContextVar[str | None] = ContextVar("phitune_writing", default=None)  # the outermost write in progress
_WRITE_FAILED = ("unexpected pos", "file write failed", "no space left", "write failed", "i/o error")


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"; {shutil.disk_usage(p).free / 2**20:.0f} MiB free there"
            except OSError:
                return ""
    return ""


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, in words, when ``exc`` is a file-system failure; None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        return _REASONS[exc.errno]
    text = str(exc).lower()
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
        if any(s in text for s in _WRITE_FAILED):
            return f"the write failed ({str(exc).strip()[:120]}): is the disk full?"
        if isinstance(exc, OSError):
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


@contextmanager
def writing(path: str | os.PathLike, what: str, keeps: str = "", fix: str | None = None):
    """Run the writes of ``what`` under ``path``; a file-system failure becomes a StorageError naming the path,
    the reason and the free space (``keeps``: what is still intact; ``fix``: how to recover, by default training's
    advice: free space or another output_dir, then resume)."""
    outer = _WRITING.get() is None
    token = _WRITING.set(what)
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below; anything else goes on unchanged
        reason = write_failure(exc)
        if reason is None or not outer:  # nested (an adapter saved into a checkpoint): the outermost one words it
            raise
        where = Path(getattr(exc, "filename", None) or path)
        raise StorageError(f"{where}: cannot write {what}: {reason}{_free_space(Path(path))}."
                           f"{' ' + keeps if keeps else ''} Fix: {fix or _TRAINING_FIX}") from None
    finally:
        _WRITING.reset(token)


def readable_like_the_rest(path: str | os.PathLike) -> None:
    """Give a file the mode Python's own files get under the current umask (safetensors writes its files 0600,
    so the weights of a run were the one file other users of a shared folder could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
