"""Print the stack-key table of docs/stack-keys.md from the schema: ``python -m common.stackdoc``.

Generated for the same reason as the stack files: documentation that cannot drift. One row per leaf
key (``loadproof:<section>.<key>``), with its default and description.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from common.stackconfig import PROJECT, StackConfig


def _rows(model: BaseModel, prefix: str) -> list[tuple[str, object, str]]:
    rows: list[tuple[str, object, str]] = []
    for name, field in type(model).model_fields.items():
        key = f"{prefix}{field.alias or name}"
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            rows.extend(_rows(value, f"{key}."))
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            names = ", ".join(f"`{n}`" for n in value)
            rows.append((key, f"{{{', '.join(value)}}}", f"{field.description} Built in: {names}; each has:"))
            first = next(iter(value.values()))
            for sub, sub_field in type(first).model_fields.items():
                shown = {n: getattr(v, sub) for n, v in value.items()}
                rows.append((f"{key}.<name>.{sub_field.alias or sub}", shown, sub_field.description or ""))
        else:
            rows.append((key, value, field.description or ""))
    return rows


def key_rows() -> list[tuple[str, object, str]]:
    """(``loadproof:path``, default, description) for every leaf key of the schema."""
    return [(f"{PROJECT}:{k}", v, d) for k, v, d in _rows(StackConfig(), "")]


def _show(value: object) -> str:
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        # stages: `duration`→`target` req/s per profile
        return "; ".join(
            f"{n}: " + ", ".join(f"{st.duration}→{st.target}/s" for st in stages) for n, stages in value.items()
        )
    if isinstance(value, dict) and value and all(isinstance(v, bool | int | float | str) for v in value.values()):
        # one scalar per profile: `name: value`, as compact as the stages
        return ", ".join(f"{n}: {_show(v)}" for n, v in value.items())
    if isinstance(value, dict | list):
        text = json.dumps(value, default=lambda v: v.model_dump(mode="json", by_alias=True))
        return "per profile, see `Pulumi.dev.yaml`" if len(text) > 60 else text
    if isinstance(value, bool):
        return "true" if value else "false"
    return '""' if value == "" else str(value)


def stack_keys_table() -> str:
    lines = ["| Key | Default | Meaning |", "|---|---|---|"]
    for key, value, desc in key_rows():
        lines.append(f"| `{key}` | `{_show(value)}` | {desc.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(stack_keys_table())
