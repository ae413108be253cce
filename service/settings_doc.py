"""Print the settings table of docs/settings.md from ``Settings.model_fields``: ``python -m service.settings_doc``.

Generated, so the documentation cannot drift from the code: every field's env variable, default and
description come from ``service/config.py``.
"""

from __future__ import annotations

from pydantic import SecretStr

from service.config import Settings


def _default(value: object) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def settings_table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        env = f"LOADPROOF_{name.upper()}"
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{env}` | `{_default(field.default)}` | {desc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
