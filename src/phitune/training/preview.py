"""``phitune preview``: a config's data as training will see it (statistics, rendered samples with the trained
tokens marked, or every sample's ids and labels as JSON lines), before any model weights load.

    phitune.preview("config.yaml", n=3)
    phitune.preview("config.yaml", json=True)          # one JSON object per sample on stdout
    records = list(phitune.preview_records("config.yaml"))
"""

from __future__ import annotations

import json as _json
import os
import sys
from typing import Any, Iterator, Sequence

from ..config import load_config
from ..data import format_stats, preview_text, sample_records
from ..data.preference import prepare_run_data
from ..models.chat_template import with_chat_template
from ..models.loading import load_tokenizer
from ..training.preflight import check_data_paths, check_model_source

# --- preview --------------------------------------------------------------------------------------------------------


def _prepare(config: Any, overrides: Sequence[str] | None):
    """(prepared data, tokenizer) of a config, as training makes them (tokenizer only, no model weights)."""
    run_config = load_config(config, overrides)
    check_model_source(run_config.model, weights=False)
    check_data_paths(run_config.data)
    tokenizer = with_chat_template(load_tokenizer(run_config.model), run_config.data.chat_template)
    return prepare_run_data(run_config.data, tokenizer, run_config.training_config), tokenizer


def preview(config: Any, n: int | None = None, color: bool | None = None, *, overrides: Sequence[str] | None = None,
            output=None, json: bool = False):
    """Prepare a config's data as training would (tokenizer only, no model weights) and print the stats and ``n``
    samples (None: 3) with the trained tokens highlighted (``color``: None = when the output is a terminal).
    ``json``: instead, one JSON object per sample and line (:func:`phitune.data.sample_records`; every sample when
    ``n`` is None, else ``n`` per split), the statistics going to stderr. Returns the prepared data."""

    out = output if output is not None else sys.stdout
    prepared, tokenizer = _prepare(config, overrides)
    if json:
        print(format_stats(prepared.stats), file=sys.stderr)
        for record in sample_records(prepared, n=n):
            out.write(_json.dumps(record) + "\n")
        out.flush()
        return prepared
    if color is None:
        color = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
    print(format_stats(prepared.stats), file=out)
    print(file=out)
    print(preview_text(prepared, tokenizer, 3 if n is None else n, color), file=out)
    return prepared


def preview_records(config: Any, *, overrides: Sequence[str] | None = None) -> Iterator[dict]:
    """Every sample of a config's data as training sees it: ``{"split", "index", "source", "input_ids", "labels"}``
    (train, then eval), the records ``phitune preview --json`` prints. The data is prepared before this returns."""
    prepared, _ = _prepare(config, overrides)
    return sample_records(prepared)
