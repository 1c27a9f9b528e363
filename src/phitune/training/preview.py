"""``phitune preview``: a config's data as training will see it (statistics, rendered samples with the trained
tokens marked), before any model weights load.

    phitune.preview("config.yaml", n=3)
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from ..config import load_config
from ..data import format_stats, preview_text
from ..data.preference import prepare_run_data
from ..models.loading import load_tokenizer
from ..training.preflight import check_data_paths, check_model_source

# --- preview --------------------------------------------------------------------------------------------------------


def preview(config: Any, n: int = 3, color: bool | None = None, *, overrides: Sequence[str] | None = None,
            output=None):
    """Prepare a config's data as training would (tokenizer only, no model weights) and print the stats and ``n``
    samples with the trained tokens highlighted (``color``: None = when the output is a terminal). Returns the
    prepared data."""

    out = output if output is not None else sys.stdout
    run_config = load_config(config, overrides)
    if color is None:
        color = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
    check_model_source(run_config.model, weights=False)
    check_data_paths(run_config.data)
    tokenizer = load_tokenizer(run_config.model)
    prepared = prepare_run_data(run_config.data, tokenizer, run_config.training_config)
    print(format_stats(prepared.stats), file=out)
    print(file=out)
    print(preview_text(prepared, tokenizer, n, color), file=out)
    return prepared
