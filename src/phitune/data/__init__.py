"""The chat-data pipeline: load -> validate -> render/mask -> truncate -> cache -> pack/collate; preview.

    prepared = prepare_data(DataConfig(train="chats.jsonl", max_seq_length=2048), tokenizer)
    plan = batch_plan(prepared.train, batch_size=4, max_seq_length=2048, packing=True, seed=0, epoch=0)
    batch = collate(prepared.train, plan[0], 2048, packing=True, attn_implementation="sdpa")
    print(format_stats(prepared.stats)); print(preview_text(prepared, tokenizer, n=3))
    for record in sample_records(prepared): ...   # {"split", "index", "source", "input_ids", "labels"} per sample
"""

from .._lazy import exports

# Imported on first use (PEP 562), so ``phitune.data.config`` is a leaf that phitune.config can import without
# loading the pipeline (torch, tokenizers, numpy).
_EXPORTS = {
    "batch_plan": "batching", "collate": "batching", "pack_rows": "batching", "packing_efficiency": "batching",
    "DataConfig": "config",
    "PreparedData": "prepare", "default_cache_dir": "prepare", "prepare_data": "prepare",
    "format_stats": "preview", "preview_text": "preview", "sample_records": "preview",
    "Renderer": "render",
    "Problem": "sources", "open_source": "sources",
    "pair_plan": "preference", "prepare_preference_data": "preference",
    "TokenizedSamples": "store",
}
__all__ = sorted(_EXPORTS)


__getattr__ = exports(__name__, _EXPORTS)
