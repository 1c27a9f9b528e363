"""Regenerate the config reference in README.md from the config dataclasses (their defaults and one-line docs).

    python scripts/sync_readme.py          # rewrite the block between the config-reference markers
    python scripts/sync_readme.py --check  # exit 1 if README.md is out of date (tests/test_readme.py runs this)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from phitune.config import REQUIRED, config_fields, config_sections

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _shown(value) -> str:
    if value == REQUIRED:
        return "required"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    try:
        return "`" + json.dumps(value) + "`"
    except TypeError:
        return "`" + repr(value) + "`"


def config_reference_markdown() -> str:
    out = []
    for section, cls in config_sections():
        out += [f"**`{section}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for key, default, doc in config_fields(cls):
            escaped = doc.replace("|", "\\|")
            out.append(f"| `{key}` | {_shown(default)} | {escaped} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def synced(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference_markdown()}{END}{tail}"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = synced(text)
    if "--check" in argv:
        if new != text:
            print("README.md's config reference is out of date: run python scripts/sync_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
