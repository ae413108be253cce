"""What the simulated model writes, and how many tokens it says that took.

Token counts are an APPROXIMATION used only by the simulator: ``ceil(characters / 4)`` per text plus
a small per-message overhead for prompts, computed from the text actually received and returned, so
``usage`` is consistent with the content (the service bills exactly what the simulator reports).
Posts are deterministic in their seed text, so tests and cache checks can compare them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

CHARS_PER_TOKEN = 4  # approximation, simulator only (see module docstring)
MESSAGE_OVERHEAD_TOKENS = 3  # role/separators per chat message
REPLY_PRIMING_TOKENS = 3  # the assistant turn header
_WORD_TEXT = (
    "today really honestly finally morning coffee team build ship learn small steps big ideas "
    "simple clear bold quiet fast slow better every week plan notes share thanks friends people "
    "work craft detail focus practice progress moment story question answer reason change future "
    "past bright calm curious careful patient open honest kind sharp fresh new old good great tiny "
    "huge local global city garden kitchen studio office road trail river mountain light rain sun "
    "wind night music book film game code design data test launch idea draft sketch note list goal "
    "habit"
)
_WORDS = tuple(_WORD_TEXT.split())


def approx_tokens(text: str) -> int:
    """Approximate token count of ``text`` (~4 characters per token)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Approximate prompt tokens of a chat request."""
    body = sum(approx_tokens(_content_text(m.get("content"))) + MESSAGE_OVERHEAD_TOKENS for m in messages)
    return body + REPLY_PRIMING_TOKENS


def generate_post(seed_text: str, tokens: int, persona: str = "", topic: str = "") -> str:
    """Deterministic pseudo-post of about ``tokens`` approximate tokens, seeded by ``seed_text``."""
    rng = random.Random(int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=8).digest(), "big"))
    target = tokens * CHARS_PER_TOKEN
    parts: list[str] = []
    if persona or topic:
        parts.append(f"{persona[:40] or 'Me'} on {topic[:60] or 'things'}:")
    length = sum(len(p) + 1 for p in parts)
    sentence_left = 0
    while length < target:
        word = rng.choice(_WORDS)
        if sentence_left == 0:
            word = word.capitalize()
            sentence_left = rng.randint(6, 12)
        sentence_left -= 1
        if sentence_left == 0:
            word += "."
        parts.append(word)
        length += len(word) + 1
    text = " ".join(parts)
    if len(text) > target:  # cut at a word boundary
        text = text[: target + 1].rsplit(" ", 1)[0]
    return text if text.endswith(".") else text.rstrip(".,:") + "."


def batch_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The items of a batched prompt (last user message is ``{"items": [{"id": ...}, ...]}``), else None."""
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if user is None:
        return None
    text = _content_text(user.get("content")).strip()
    if not text.startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    items = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        return None
    if not all(isinstance(i, dict) and isinstance(i.get("id"), str | int) for i in items):
        return None
    return items
