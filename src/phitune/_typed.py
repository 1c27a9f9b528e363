"""Typed configuration sections: dataclasses built from dicts that reject unknown keys with "did you mean".

Every config section of phitune (model, data, training_config, peft_config) is a dataclass whose fields carry the
defaults and a one-line doc in ``metadata["doc"]``. :func:`from_dict` builds one from a plain dict (YAML, Python) and
checks key names and value types before any slow work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, doc: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a one-line doc (shown by ``phitune train --help-config`` and in the README)."""
    kw: dict[str, Any] = {"metadata": {"doc": doc}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], data: Mapping[str, Any] | None, section: str, *, legacy: Mapping[str, str] = ()) -> T:
    """Build dataclass ``cls`` from ``data``; ``section`` names it in errors (e.g. ``"training_config"``).

    ``legacy`` maps accepted-but-inert key names to the note explaining why they have no effect; those keys are
    dropped from the result and the notes are returned through ``cls.__notes__`` (a list on the instance, if present).
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {type(data).__name__}", key=section)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in data.items():
        if key in legacy:
            notes.append(f"{section}.{key}: {legacy[key]}")
            continue
        if key not in fields:
            raise ConfigError(
                f"{section}: unknown key '{key}'{suggest(key, list(fields) + list(legacy))}. "
                f"Known keys: {', '.join(sorted(fields))}", key=f"{section}.{key}"
            )
        tp = hints.get(key, Any)
        if not _type_ok(value, tp):
            raise ConfigError(
                f"{section}.{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})",
                key=f"{section}.{key}",
            )
        if isinstance(value, float) and not math.isfinite(value):  # YAML .nan/.inf: never a usable setting
            raise ConfigError(f"{section}.{key}: must be a finite number, got {value}", key=f"{section}.{key}")
        kwargs[key] = value
    obj = cls(**kwargs)
    if notes and hasattr(obj, "notes"):
        obj.notes.extend(notes)  # type: ignore[attr-defined]
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The resolved config as plain data (for YAML/JSON in the output folder)."""
    return dataclasses.asdict(obj)


def notes_field():
    """A dataclass field for a section's notes (accepted keys without effect); not a config key."""
    # Not a config key: one-line notes about accepted keys that have no effect (printed when training starts).
    return dataclasses.field(default_factory=list, init=False, repr=False, compare=False)


def remap_keys(section: str, data: Mapping, aliases: Mapping[str, str], inert: Mapping[str, str]):
    """Apply renamed keys and drop inert ones; returns (dict, notes)."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in data.items():
        if key in aliases:
            new = aliases[key]
            if new in data:
                raise ConfigError(f"{section}: both '{key}' and '{new}' are set; '{key}' is the old name of "
                                  f"'{new}', keep one", key=f"{section}.{key}")
            out[new] = value
        elif key in inert:
            notes.append(f"{section}.{key}: {inert[key]}")
        else:
            out[key] = value
    return out, notes

