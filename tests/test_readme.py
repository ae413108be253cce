"""The README's generated tables match the code, and its first lines give the two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from common.stackdoc import key_rows, stack_keys_table
from service.config import Settings
from service.settings_doc import settings_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _block(name: str) -> str:
    match = re.search(rf"<!-- {name}:begin[^>]*-->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert match, f"README has no generated {name} block"
    return match.group(1)


def test_settings_table_is_current() -> None:
    assert _block("settings") == settings_table(), "regenerate with `python -m service.settings_doc`"
    for name in Settings.model_fields:
        assert f"`LOADPROOF_{name.upper()}`" in README


def test_stack_keys_table_is_current_and_complete() -> None:
    assert _block("stack-keys") == stack_keys_table(), "regenerate with `python -m common.stackdoc`"
    for key, _default, description in key_rows():
        assert f"`{key}`" in README
        assert description, f"{key} has no description"


def test_readme_opens_with_what_and_the_two_commands() -> None:
    head = README[:2000]
    assert head.startswith("# loadproof\n")
    assert head.index("make demo") < head.index("make test") < head.index("pulumi up")
