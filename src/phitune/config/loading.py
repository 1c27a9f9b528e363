"""``load_config``: a YAML file (with its line numbers, for errors) or dicts, ``--set`` overrides, and the blame of a
bad key on the file line or the override that set it; the run status line of ``phitune_config.yaml``."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .._typed import suggest
from ..errors import ConfigError
from .run import SECTIONS, RunConfig, build_run_config


# --- YAML, overrides --------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; everyone writes ``1e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """(data, {dotted key path: line}) of a YAML config file; YAML errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = _yaml_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc}"
                          f"{' ' + exc.context if exc.context else ''}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with sections {', '.join(SECTIONS)}, "
                          f"got {type(data).__name__}")
    return data, _key_lines(node)


def _key_lines(node, prefix: tuple = ()) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = prefix + (str(k.value),)
            out[".".join(path)] = k.start_mark.line + 1
            out.update(_key_lines(v, path))
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as a YAML scalar/flow value) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. training_config.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}': empty key")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"override '{item}': unknown section '{parts[0]}'{suggest(parts[0], SECTIONS)}; "
                              f"the sections are {', '.join(SECTIONS)}")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({exc})") from None
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if isinstance(child, (str, Path)) and i == 0 and p == "model":
                child = {"name_or_path": str(child)}
            elif isinstance(child, (str, Path)) and i == 0 and p == "data":
                child = {"train": str(child)}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is {child!r}, not a mapping")
            node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(source: str | Path | Mapping[str, Any] | RunConfig, overrides: Sequence[str] | None = None
                ) -> RunConfig:
    """Load and check a run config from a YAML file or a dict of sections; ``overrides``: ``["a.b=c", ...]``."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        source = source.to_dict()
    lines: dict[str, int] = {}
    name = None
    if isinstance(source, (str, Path)):
        name = str(source)
        data, lines = read_yaml(source)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise ConfigError(f"load_config: expected a YAML path or a dict of sections, got {type(source).__name__}")
    data = apply_overrides(data, overrides or [])
    given = {item.split("=", 1)[0].strip(): item for item in overrides or []}
    try:
        return build_run_config(data, source=name)
    except ConfigError as exc:
        item = _override_of(exc.key, given)
        if item is not None:  # the value came from the command line: say so, not a line of the file
            raise ConfigError(f"--set {item}: {exc}", key=exc.key) from None
        if name is None:
            raise
        raise ConfigError(f"{name}{_line_of(exc.key, lines)}: {exc}", key=exc.key) from None


def _override_of(key: str | None, given: Mapping[str, str]) -> str | None:
    """The ``--set`` item that set ``key`` (the key an error blames), or one beneath it (``data.train=...`` for
    ``data.train`` or, when a whole section is blamed, any key of it)."""
    if key is None:
        return None
    for dotted, item in given.items():
        if dotted == key or "." in key and dotted.startswith(key + "."):
            return item
    return None


def _line_of(key: str | None, lines: Mapping[str, int]) -> str:
    """``:LINE`` of ``key`` in the YAML file, or of the closest enclosing key written there (a key left at its
    default is blamed on its section); empty when none is."""
    parts = key.split(".") if key else []
    for n in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:n]))
        if line is not None:
            return f":{line}"
    return ""


RUN_STATUS_PREFIX = "# phitune run: "


def save_config(config: RunConfig, path: str | Path, status: str | None = None) -> None:
    """Write the resolved config (every default filled in) as YAML; ``status`` (e.g. "incomplete") goes into a
    first comment line, which run_status reads back."""
    head = f"{RUN_STATUS_PREFIX}{status}\n" if status else ""
    Path(path).write_text(head + config.to_yaml(), encoding="utf-8")


def run_status(path: str | Path) -> str | None:
    """The status save_config wrote into a config file ("incomplete", "complete"), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    return first[len(RUN_STATUS_PREFIX):].split()[0] if first.startswith(RUN_STATUS_PREFIX) else None
