"""Lazy package exports (PEP 562): a name is imported from its submodule the first time it is asked for."""

from __future__ import annotations

import importlib
from typing import Callable


def exports(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """The ``__getattr__`` of ``package``: ``names`` maps an exported name to the submodule that defines it."""

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(f".{module}", package), name)

    return __getattr__
