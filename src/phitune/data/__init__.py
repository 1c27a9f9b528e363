"""The chat-data pipeline: load -> validate -> render/mask -> truncate -> cache -> pack/collate; preview.

    prepared = prepare_data(DataConfig(train="chats.jsonl", max_seq_length=2048), tokenizer)
    plan = batch_plan(prepared.train, batch_size=4, max_seq_length=2048, packing=True, seed=0, epoch=0)
    batch = collate(prepared.train, plan[0], 2048, packing=True, attn_implementation="sdpa")
    print(format_stats(prepared.stats)); print(preview_text(prepared, tokenizer, n=3))
"""

from .batching import batch_plan, collate, pack_rows, packing_efficiency
from .config import DataConfig
from .prepare import PreparedData, default_cache_dir, prepare_data
from .preview import format_stats, preview_text
from .render import Renderer
from .sources import Problem, open_source
from .store import TokenizedSamples

__all__ = [
    "DataConfig",
    "PreparedData",
    "Problem",
    "Renderer",
    "TokenizedSamples",
    "batch_plan",
    "collate",
    "default_cache_dir",
    "format_stats",
    "open_source",
    "pack_rows",
    "packing_efficiency",
    "prepare_data",
    "preview_text",
]
