"""The README's config reference is generated from the config dataclasses; it must match them."""

import importlib.util

from helpers import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "scripts" / "sync_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_in_sync():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _script().synced(text) == text, "run: python scripts/sync_readme.py"


def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block
