"""What the export targets share with ``phitune.exports.export``: the error type and the source being exported."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import PhituneError
from ..runs.folder import RunFolder


class ExportError(PhituneError, ValueError):
    """An export cannot be made as asked (the message says why and what to do instead)."""


@dataclasses.dataclass
class Source:
    """Where an export reads from: a run folder (``run`` set) or an already merged model folder (``model_dir``)."""

    run: RunFolder | None
    model_dir: Path | None
    config: object | None  # the run's RunConfig

    @property
    def quantized(self) -> bool:
        return bool(self.config is not None and getattr(self.config.model, "load_in_4bit", False))
