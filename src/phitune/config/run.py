"""The whole run: its four sections (``RunConfig``) built from dicts, and written back as plain data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from .._typed import suggest
from ..adapt.config import LoraConfig, parse_lora_config
from ..data.config import DataConfig
from ..errors import ConfigError
from .model import ModelConfig, build_model_config
from .training_args import TrainingConfig, build_training_config


SECTIONS = ("model", "data", "training_config", "peft_config")

# --- the whole run ----------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The four sections of a run (each section's dataclass lives with the code that reads it: ``data`` in
    phitune.data, ``peft_config`` in phitune.adapt; both modules are leaves that import no torch)."""

    model: ModelConfig
    data: DataConfig
    training_config: TrainingConfig
    peft_config: LoraConfig
    source: str | None = dataclasses.field(default=None, compare=False)  # the YAML file, for messages

    def __post_init__(self):
        # a dict in a section would fail much later, inside training; build_run_config turns dicts into sections
        for name, cls in _SECTION_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {type(value).__name__}; build the "
                                  "config with phitune.config.load_config or build_run_config", key=name)

    @property
    def notes(self) -> list[str]:
        """One line per accepted key that has no effect, from every section."""
        out: list[str] = []
        for name in SECTIONS:
            out.extend(getattr(getattr(self, name), "notes", []) or [])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (every default filled in), as written to phitune_config.yaml."""
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "training_config": TrainingConfig,
                  "peft_config": LoraConfig}


def _section_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        skip = obj.keys_not_read() if hasattr(obj, "keys_not_read") else ()
        for f in dataclasses.fields(obj):
            if not f.init or f.name == "notes" or f.name in skip:
                continue
            out[f.name] = _plain(getattr(obj, f.name))
        return out
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    return _plain(obj)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return _section_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # e.g. a datasets.Dataset passed as data.train: named, not serialised


def build_run_config(sections: Mapping[str, Any], source: str | None = None) -> RunConfig:
    """A RunConfig from a dict with the four sections (each a dict, a section object, or a shorthand)."""
    for key in sections:
        if key not in SECTIONS:
            raise ConfigError(f"unknown config section '{key}'{suggest(key, SECTIONS)}; the sections are "
                              f"{', '.join(SECTIONS)}", key=str(key))
    model = build_model_config(sections.get("model"))
    training = build_training_config(sections.get("training_config"))
    data = _build_data_config(sections.get("data"))
    peft = parse_lora_config(sections.get("peft_config"), "peft_config")
    return RunConfig(model=model, data=data, training_config=training, peft_config=peft, source=source)


def _build_data_config(value) -> DataConfig:
    if isinstance(value, DataConfig):
        return value
    if value is None:
        raise ConfigError("data: the section is required (at least data.train: a file, folder or Hub dataset)",
                          key="data")
    return DataConfig.from_any(value)
