"""Data sources: each yields ``(location, record)`` pairs, a record being a dict, or a :class:`Problem` when the
raw bytes could not even be parsed (bad JSON, bad UTF-8). Locations read ``file:line`` or ``file row N``."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

from ..errors import DataError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
              ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Problem:
    """Why a record is bad: a short reason (the key of the per-reason counts), the detail, and how to fix it."""

    reason: str
    detail: str
    fix: str

    def message(self, location: str) -> str:
        return f"{location}: {self.reason}: {self.detail}. Fix: {self.fix}"


class Source:
    """A place records come from. ``name`` is used in messages, ``fingerprint()`` in the cache key."""

    name = "data"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def units(self) -> Iterator[tuple[Callable | None, Any]]:
        """The records again, in the order ``__iter__`` yields them, each as ``(decode, unit)``: ``decode(units)``
        turns a list of units into ``(location, record)`` pairs (``decode`` None: the unit is that pair already).
        A source whose records are cheaper to ship as raw bytes (JSON Lines) yields those, and the decoding runs
        where the tokenizing does (a worker process)."""
        for pair in self:
            yield None, pair


def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _json_msg(e: json.JSONDecodeError) -> str:
    """json's message without its own trailing "at" ("Invalid control character at"), which we follow with one."""
    return e.msg[:-3] if e.msg.endswith(" at") else e.msg


def parse_jsonl_line(raw: bytes, loc: str) -> Any:
    """One JSON Lines line -> a record, or the Problem (not UTF-8, invalid JSON) that makes it unreadable."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors write one): not part of the data
        raw = raw[3:]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem("not UTF-8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8",
                       "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        truncated = not raw.endswith(b"\n")
        return Problem(
            "invalid JSON",
            f"{_json_msg(e)} at column {e.colno}" + (" (the last line looks cut off)" if truncated else ""),
            "write one complete JSON object per line" + (
                "; the file may have been truncated while writing, re-create it" if truncated else ""),
        )


def decode_jsonl_units(name: str, units: list) -> list:
    """``(lineno, raw line)`` units of a JSON Lines file -> ``(location, record)`` pairs."""
    out = []
    for lineno, raw in units:
        loc = f"{name}:{lineno}"
        out.append((loc, parse_jsonl_line(raw, loc)))
    return out


class FileSource(Source):
    def __init__(self, path: str, columns_needed=None):
        self.path = os.path.abspath(path)
        self.name = path
        ext = os.path.splitext(path)[1].lower()
        self.kind = FILE_KINDS.get(ext)
        if self.kind is None:
            raise DataError(f"{path}: unsupported file type '{ext}'. Fix: use .jsonl, .json, .csv or .parquet "
                            "(or a folder written by datasets.save_to_disk)")
        if os.path.getsize(self.path) == 0:
            raise DataError(f"{path}: the file is empty (no records). Fix: point data.train/data.eval at a file "
                            "with at least one record")

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        return _hash("file", self.path, st.st_size, st.st_mtime_ns)

    def __iter__(self):
        return getattr(self, "_iter_" + self.kind)()

    def _raw_lines(self):
        with open(self.path, "rb") as f:
            lineno = 0
            for raw in f:
                lineno += 1
                if raw.strip():
                    yield lineno, raw

    def _iter_jsonl(self):
        for lineno, raw in self._raw_lines():
            loc = f"{self.name}:{lineno}"
            yield loc, parse_jsonl_line(raw, loc)

    def units(self):
        if self.kind != "jsonl":
            yield from super().units()
            return
        decode = partial(decode_jsonl_units, self.name)
        for unit in self._raw_lines():
            yield decode, unit

    def _read_text(self, encoding: str) -> str:
        """The whole file as text; a non-UTF-8 byte is a DataError naming its line."""
        with open(self.path, "rb") as f:
            raw = f.read()
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{self.name}:{line}: not UTF-8: byte 0x{raw[e.start]:02x} is not valid UTF-8. Fix: "
                            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None

    def _iter_json(self):
        text = self._read_text("utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines saved as .json
                yield from self._iter_jsonl()
                return
            raise DataError(f"{self.name}:{e.lineno}: invalid JSON: {_json_msg(e)} at column {e.colno}. Fix: make the "
                            "file one JSON array of records (or use .jsonl, one object per line)")
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) == 1 and not any(k in data for k in ("messages", "conversations", "text", "instruction",
                                                                "prompt")):
                data = data[lists[0]]
            else:
                data = [data]
        if not isinstance(data, list):
            raise DataError(f"{self.name}:1: expected a JSON array of records, got {type(data).__name__}. Fix: "
                            "write [ {...}, {...} ]")
        if not data:
            raise DataError(f"{self.name}: the file holds no records (an empty array)")
        for i, rec in enumerate(data):
            yield f"{self.name} item {i}", rec

    def _iter_csv(self):
        delim = "\t" if self.path.lower().endswith(".tsv") else ","
        text = self._read_text("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
        if not reader.fieldnames:
            raise DataError(f"{self.name}:1: no header row. Fix: the first line must name the columns")
        self.fieldnames = list(reader.fieldnames)
        line = 1
        for row in reader:
            loc = f"{self.name}:{line + 1}"
            line = reader.line_num
            if None in row:
                yield loc, Problem("bad CSV row", f"{len(row[None])} more field(s) than the header's "
                                   f"{len(self.fieldnames)}", "quote fields that contain the delimiter")
                continue
            yield loc, {k: v for k, v in row.items()}

    def _iter_parquet(self):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield f"{self.name} row {row}", rec
                row += 1


class RecordsSource(Source):
    """An in-memory list of dicts."""

    def __init__(self, records, name="records"):
        self.records = records
        self.name = name

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for r in self.records:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
            h.update(b"\n")
        return "list-" + h.hexdigest()

    def __iter__(self):
        for i, r in enumerate(self.records):
            yield f"{self.name} item {i}", r


class DatasetSource(Source):
    """A datasets.Dataset (in memory, loaded from disk, or from the Hub)."""

    def __init__(self, ds, name="dataset"):
        self.ds = ds
        self.name = name

    def fingerprint(self) -> str:
        return _hash("dataset", getattr(self.ds, "_fingerprint", None) or id(self.ds), len(self.ds))

    def __iter__(self):
        n = len(self.ds)
        for start in range(0, n, 1024):
            batch = self.ds[start:start + 1024]  # column-major slice: one Arrow read per 1024 rows
            keys = list(batch)
            for j in range(len(batch[keys[0]]) if keys else 0):
                yield f"{self.name} row {start + j}", {k: batch[k][j] for k in keys}


def _pick_split(dd, split, name):
    if split in dd:
        return dd[split]
    raise DataError(f"{name}: no split '{split}'; it has {', '.join(dd)}. Fix: set data.hub_train_split / "
                    "data.hub_eval_split to one of them")


def check_local_path(spec: str, role: str) -> None:
    """A DataError when ``spec`` names a local file or folder (by its form) that does not exist."""
    if os.path.exists(spec):
        return
    ext = os.path.splitext(spec)[1].lower()
    if ext in FILE_KINDS or spec.startswith((".", "/", "~")) or os.sep in spec.strip("/") and spec.count("/") > 1:
        raise DataError(f"data.{role}: file not found: {spec}. Fix: check the path (relative paths are from "
                        f"the current directory, {os.getcwd()})")


def open_source(spec: Any, *, split: str = "train", hub_config: str | None = None, role: str = "train") -> Source:
    """The Source for a config value: path, folder, Hub name, list of dicts or datasets.Dataset."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return ChainSource([open_source(s, split=split, hub_config=hub_config, role=role) for s in spec])
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise DataError(f"data.{role}: the list of records is empty")
        return RecordsSource(spec, name=f"data.{role}")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if os.path.isdir(spec):
            return _disk_source(spec, split)
        if os.path.isfile(spec):
            return FileSource(spec)
        check_local_path(spec, role)
        return _hub_source(spec, split, hub_config, role)
    try:
        import datasets

        if isinstance(spec, datasets.Dataset):
            return DatasetSource(spec, name=f"data.{role}")
        if isinstance(spec, datasets.DatasetDict):
            return DatasetSource(_pick_split(spec, split, f"data.{role}"), name=f"data.{role}[{split}]")
    except ImportError:  # pragma: no cover
        pass
    raise DataError(f"data.{role}: cannot read {type(spec).__name__}. Fix: give a file path, a save_to_disk "
                    "folder, a Hub dataset name, a list of dicts or a datasets.Dataset")


class ChainSource(Source):
    def __init__(self, sources):
        self.sources = sources
        self.name = "+".join(s.name for s in sources)

    def fingerprint(self) -> str:
        return _hash(*(s.fingerprint() for s in self.sources))

    def __iter__(self):
        for s in self.sources:
            yield from s

    def units(self):
        for s in self.sources:
            yield from s.units()


def _disk_source(path: str, split: str) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # not a save_to_disk folder
        raise DataError(f"{path}: a folder, but not one written by datasets.save_to_disk ({e}). Fix: point at a "
                        "file, or save the dataset with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        return DatasetSource(_pick_split(ds, split, path), name=f"{path}[{split}]")
    return DatasetSource(ds, name=path)


def _hub_source(name: str, split: str, config: str | None, role: str) -> Source:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, wrong split: datasets raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        raise DataError(
            f"data.{role}: could not load Hub dataset '{name}' (config {config!r}, split '{split}'): "
            f"{type(e).__name__}: {first[:300]}. Fix: check the name and split"
            + (", or unset HF_HUB_OFFLINE" if offline else "")
            + "; without network access, download it once (datasets.load_dataset(...).save_to_disk(DIR)) and set "
            f"data.{role} to DIR or to a local .jsonl/.parquet file"
        ) from None
    return DatasetSource(ds, name=f"{name}[{split}]")
