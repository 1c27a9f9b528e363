"""DataConfig: the ``data:`` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .._typed import field, from_dict, suggest
from ..errors import ConfigError

FORMATS = ("auto", "messages", "conversations", "alpaca", "prompt_completion", "text")
# Column (key) names each format reads; data.columns overrides any of them.
DEFAULT_COLUMNS = {
    "messages": "messages",
    "conversations": "conversations",
    "role": "role",
    "content": "content",
    "from": "from",
    "value": "value",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
    "prompt": "prompt",
    "completion": "completion",
    "text": "text",
    "chosen": "chosen",  # preference pairs (training_config.method dpo/orpo)
    "rejected": "rejected",
}


@dataclass
class DataConfig:
    """Where the chat data comes from and how it becomes tokens, labels and batches."""

    train: Any = field(None, doc="train data: a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, a Hub "
                                 "dataset name, a list of dicts or a datasets.Dataset")
    eval: Any = field(None, doc="eval data (same kinds as train); or use eval_split")
    eval_split: float | int | None = field(None, doc="take eval from train: a fraction in (0, 1) or a record count "
                                                      "(deterministic, from seed)")
    hub_config: str | None = field(None, doc="Hub dataset configuration name (the 'name' of load_dataset)")
    hub_train_split: str = field("train", doc="Hub split used for train (e.g. train_sft for ultrachat_200k)")
    hub_eval_split: str | None = field(None, doc="Hub split used for eval when eval names a Hub dataset")
    format: Literal["auto", "messages", "conversations", "alpaca", "prompt_completion", "text"] = field(
        "auto", doc="record format; auto detects it from the first record's keys")
    columns: dict = field(default_factory=dict, doc="column/key renames, e.g. {messages: chat, content: text}")
    role_map: dict = field(default_factory=dict, doc="extra role names mapped to system/user/assistant, "
                                                     "e.g. {bot: assistant}")
    chat_template: str | None = field(None, doc="chat template overriding the tokenizer's: Jinja text, a .jinja "
                                                "file's path, or 'phi3'; saved with the run's tokenizer, so eval, "
                                                "chat and export use it too")
    max_seq_length: int = field(2048, doc="tokens per sample (and per packed sequence); longer conversations "
                                          "lose their oldest turns first (see truncation)")
    truncation: Literal["auto", "drop", "error"] = field(
        "auto", doc="samples longer than max_seq_length: auto drops the oldest turns, then cuts the prompt from the "
                    "left (a sample that would lose its last user turn or the assistant header is dropped); drop: "
                    "drop them; error: stop, listing them")
    packing: bool = field(True, doc="pack several samples per sequence (no attention across samples)")
    train_on: Literal["assistant", "all", "last_assistant"] = field(
        "assistant", doc="which tokens get a loss: assistant turns (each through its end-of-turn token, e.g. <|end|>, "
                         "<|im_end|>; the last with the eos the template closes with), all, or the last reply")
    on_bad_record: Literal["error", "skip"] = field("error", doc="stop on bad records (error) or drop them (skip)")
    max_errors_shown: int = field(20, doc="bad records listed in full in the error/summary")
    add_bos: bool | None = field(None, doc="prepend exactly one bos token (None: when the tokenizer has one)")
    require_alternation: bool | None = field(None, doc="user/assistant must alternate (None: when the chat "
                                                       "template demands it)")
    seed: int = field(0, doc="seed of eval_split and of the batch order")
    cache_dir: str | None = field(None, doc="where tokenized data is cached (default $PHITUNE_CACHE_DIR or "
                                            "~/.cache/phitune/data)")
    cache: bool = field(True, doc="reuse tokenized data from cache_dir when sources/tokenizer/options match")

    def __post_init__(self):
        if self.max_seq_length < 8:
            raise ConfigError(f"data.max_seq_length: must be at least 8, got {self.max_seq_length}",
                              key="data.max_seq_length")
        if self.eval_split is not None:
            es = self.eval_split
            if isinstance(es, float) and not 0.0 < es < 1.0:
                raise ConfigError(f"data.eval_split: a fraction must be in (0, 1), got {es}; use an int for a count",
                                  key="data.eval_split")
            if isinstance(es, int) and es < 1:
                raise ConfigError(f"data.eval_split: a count must be >= 1, got {es}", key="data.eval_split")
            if self.eval is not None:
                raise ConfigError("data: set either eval (a separate source) or eval_split, not both",
                                  key="data.eval_split")
        for k in self.columns:
            if k not in DEFAULT_COLUMNS:
                raise ConfigError(f"data.columns: unknown column role '{k}'{suggest(k, DEFAULT_COLUMNS)}. "
                                  f"Known: {', '.join(DEFAULT_COLUMNS)}", key=f"data.columns.{k}")
        for k, v in self.role_map.items():
            if v not in ("system", "user", "assistant"):
                raise ConfigError(f"data.role_map.{k}: must map to system, user or assistant, got {v!r}",
                                  key=f"data.role_map.{k}")

    def column(self, name: str) -> str:
        return self.columns.get(name, DEFAULT_COLUMNS[name])

    @classmethod
    def from_any(cls, value: Any) -> "DataConfig":
        """A DataConfig from a dict, a DataConfig, or a bare source (path, Hub name, list of dicts, Dataset)."""
        if isinstance(value, cls):
            return value
        if value is None or isinstance(value, dict):
            return from_dict(cls, value, "data")
        return cls(train=value)
