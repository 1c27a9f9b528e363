"""The list of config keys with their defaults and docs: behind ``--help-config`` and the README's config reference."""

from __future__ import annotations

import dataclasses
from typing import Any


from ..adapt.config import LoraConfig
from ..data.config import DataConfig
from .model import ModelConfig
from .training_args import TrainingConfig


REQUIRED = "(required)"  # the default config_fields reports for a key without one


def config_sections() -> list[tuple[str, type]]:
    """(section name, its dataclass) of a run config, in the order of the YAML file."""
    return [("model", ModelConfig), ("data", DataConfig), ("training_config", TrainingConfig),
            ("peft_config", LoraConfig)]


def config_fields(cls) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of every key of a section class: the one list behind --help-config and the README's
    config reference (and the test that keeps them in sync)."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "notes":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        rows.append((f.name, default, f.metadata.get("doc", "")))
    return rows
