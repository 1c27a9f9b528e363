"""Tokenized samples on disk: flat int32 token ids, a uint8 trained mask and int64 offsets. A sample is read with
``pread`` when it is needed, so a 200k-conversation data set costs no RAM beyond its offsets (8 bytes a sample).
Each sample's record (``file:line``) is kept too, one JSON string a line in sources.jsonl, read in order only (by
``phitune preview --json``), so it costs no RAM either. Also the cache root's housekeeping (:func:`remove_orphans`).

Not memory-mapped on purpose: random access to a mapping faults whole readahead windows (64-128 KiB) into the
process, so its resident size grew with the data set (measured: +220 MB between 20k and 50k conversations after
only 50 packed batches); pages read with ``pread`` stay in the page cache, outside the process's RSS."""

from __future__ import annotations

import json
import os
import shutil
from array import array
from typing import Iterable

import numpy as np

from ..runs.atomic import is_leftover
from .labels import IGNORE_INDEX


SOURCES_FILE = "sources.jsonl"


class SampleWriter:
    """Appends samples to ``folder`` in chunks; ``close()`` writes meta.json."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self._ids = open(os.path.join(folder, "input_ids.bin"), "wb")
        self._mask = open(os.path.join(folder, "trained.bin"), "wb")
        self._sources = open(os.path.join(folder, SOURCES_FILE), "w", encoding="utf-8")
        self.lengths = array("q")  # 8 bytes a sample, not a Python int object each
        self.n_tokens = 0
        self.n_trained = 0

    def add(self, ids: np.ndarray, trained: np.ndarray, source: str) -> None:
        """Append one sample: its ids, trained flags and record (``file:line``)."""
        self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._mask.write(np.ascontiguousarray(trained, dtype=np.uint8).tobytes())
        self._sources.write(json.dumps(source) + "\n")
        self.lengths.append(len(ids))
        self.n_tokens += len(ids)
        self.n_trained += int(trained.sum())

    def add_many(self, ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray, sources: Iterable[str]) -> None:
        """Append several samples at once: their ids and trained flags concatenated, their lengths and records."""
        if not len(lengths):
            return
        self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._mask.write(np.ascontiguousarray(trained, dtype=np.uint8).tobytes())
        self._sources.write("".join(json.dumps(where) + "\n" for where in sources))
        self.lengths.frombytes(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
        self.n_tokens += int(len(ids))
        self.n_trained += int(np.count_nonzero(trained))

    def close(self, pad_token_id: int = 0) -> None:
        self._ids.close()
        self._mask.close()
        self._sources.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        offsets.tofile(os.path.join(self.folder, "offsets.bin"))
        with open(os.path.join(self.folder, "meta.json"), "w") as f:
            json.dump({"samples": len(self.lengths), "tokens": self.n_tokens, "trained_tokens": self.n_trained,
                       "pad_token_id": pad_token_id}, f)


class TokenizedSamples:
    """A read-only sequence of samples; ``samples[i]`` is ``{"input_ids": [...], "labels": [...]}`` with labels
    -100 where no loss is taken. ``lengths`` (numpy) lets batch planning run without touching the tokens."""

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        self.pad_token_id = meta.get("pad_token_id", 0)
        self.num_tokens = meta["tokens"]
        self.num_trained_tokens = meta["trained_tokens"]
        n = meta["samples"]
        self.offsets = np.fromfile(os.path.join(folder, "offsets.bin"), dtype=np.int64, count=n + 1)
        self.lengths = np.diff(self.offsets)
        self._files: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # file handles do not travel; reopened on first use
        return state

    def __del__(self):
        for f in getattr(self, "_files", {}).values():
            try:
                f.close()
            except Exception:  # pragma: no cover
                pass

    def _read(self, name: str, dtype, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, dtype)
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(os.path.join(self.folder, name), "rb", buffering=0)
        size = np.dtype(dtype).itemsize
        if hasattr(os, "pread"):
            buf = os.pread(f.fileno(), (b - a) * size, a * size)
        else:  # pragma: no cover - no pread (Windows)
            f.seek(a * size)
            buf = f.read((b - a) * size)
        if len(buf) != (b - a) * size:
            raise OSError(f"{self.folder}/{name}: truncated (expected {(b - a) * size} bytes at {a * size}, got "
                          f"{len(buf)}); delete the cache folder to re-tokenize")
        return np.frombuffer(buf, dtype=dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32, labels int64 with -100 where untrained) of sample i, as numpy arrays."""
        if i < 0:
            i += len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self._read("input_ids.bin", np.int32, a, b)
        labels = np.where(self._read("trained.bin", np.uint8, a, b) != 0, ids, IGNORE_INDEX).astype(np.int64)
        return ids, labels

    def sources(self):
        """Each sample's record (``file:line``, ``file item N``, ``dataset row N``), in sample order."""
        with open(os.path.join(self.folder, SOURCES_FILE), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        ids, labels = self.arrays(i)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TokenizedSamples({len(self)} samples, {self.num_tokens} tokens, {self.folder})"


def remove_orphans(root: str) -> None:
    """Delete the temporary folders of processes that are gone: a killed run (SIGKILL skips atexit) leaves its
    ``.tmp-PID-*`` folder behind, which would otherwise hold its tokens on disk for good."""
    for name in os.listdir(root):
        parts = name.split("-")
        if is_leftover(name) or not name.startswith(".tmp-") or len(parts) < 3 or not parts[1].isdigit():
            continue  # an atomic write's leftover is runs/atomic.py's to clean
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # alive, owned by another user
            pass
