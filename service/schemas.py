"""Request and response bodies of the API; they are also what ``/openapi.json`` documents."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

PersonaId = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$"),
    Field(description="1-64 characters of `a-z`, `0-9`, `_`, `-`.", examples=["tech-optimist"]),
]
# ``Idempotency-Key`` header: 1-200 printable ASCII characters, inner spaces allowed (HTTP trims them at
# the ends anyway). Refuses what Postgres cannot store (NUL) and what HTTP cannot carry (controls).
IDEMPOTENCY_KEY_PATTERN = r"^[!-~](?:[ -~]{0,198}[!-~])?$"

# Whitespace as the service means it everywhere: ``str.isspace()``, which is what ``str.strip()`` and
# the ``\s`` of Python's ``re`` (``service.cache.clean_topic``) use. Spelled out, so the pattern below
# means the same in ECMA-262 (JSON Schema), Python and Rust (pydantic) regular expressions; a test
# checks it against ``str.isspace()`` over every code point.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
TOPIC_MAX = 500


def _char_class(chars: str) -> str:
    """The body of a regex character class for ``chars``, consecutive runs as ``\\uXXXX-\\uXXXX`` ranges."""
    codes = sorted(map(ord, chars))
    runs: list[list[int]] = []
    for code in codes:
        if runs and code == runs[-1][1] + 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in runs)


_WS = _char_class(WHITESPACE)
# The topic rule as one pattern, published in the OpenAPI spec: optional whitespace, then 1-500
# characters that start and end with a non-whitespace character, then optional whitespace; no NUL
# anywhere (Postgres ``text`` cannot hold it). ``_topic`` below enforces exactly this, with
# per-rule messages; a property test checks the two agree.
TOPIC_PATTERN = f"^[{_WS}]*[^{_WS}\\u0000](?:[^\\u0000]{{0,{TOPIC_MAX - 2}}}[^{_WS}\\u0000])?[{_WS}]*$"


def _topic(value: str) -> str:
    """Trimmed (``str.strip``); refused when not UTF-8-encodable, empty, longer than ``TOPIC_MAX`` or
    holding a NUL.

    A lone surrogate (a ``\\ud800`` escape, or its bytes, which ``json.loads`` lets through) cannot be
    stored, hashed into the cache key or sent to the LLM. Pydantic checks that only for strings it
    converts (``persona_id``, with its pattern), not for a plain ``str`` like this one: hence here.
    """
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise PydanticCustomError(
                "string_unicode", "Input should be a valid string, unable to parse raw data as a unicode string"
            ) from None
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "String should not contain NUL (\\u0000) characters")
    value = value.strip()
    if not value:
        raise PydanticCustomError(
            "string_too_short",
            "String should have at least 1 character that is not whitespace",
            {"min_length": 1},
        )
    if len(value) > TOPIC_MAX:
        raise PydanticCustomError(
            "string_too_long",
            "String should have at most {max_length} characters after trimming whitespace",
            {"max_length": TOPIC_MAX},
        )
    return value


Topic = Annotated[
    str,
    AfterValidator(_topic),
    Field(
        description=(
            "What the post is about: at least one character that is not whitespace, at most "
            f"{TOPIC_MAX} characters after trimming surrounding whitespace (inner runs of whitespace are "
            "collapsed to one space when stored), no NUL (U+0000). Whitespace = Python's `str.isspace()`."
        ),
        examples=["rust in production"],
        json_schema_extra={"pattern": TOPIC_PATTERN},
    ),
]
TaskStatus = Literal["queued", "running", "done", "failed"]


class TaskIn(BaseModel):
    """``POST /task`` body."""

    model_config = ConfigDict(extra="ignore")

    persona_id: PersonaId
    topic: Topic


class TaskAccepted(BaseModel):
    """202: stored durably and queued; poll ``GET /task/{task_id}``.

    ``status`` is ``queued`` for a new task; a coalesced request or a replayed ``Idempotency-Key``
    gets the existing task's current state.
    """

    status: Literal["queued", "running", "failed"] = "queued"
    task_id: UUID


class TaskDone(BaseModel):
    """200: a post is already available (``cached`` = served from the cache without an LLM call)."""

    status: Literal["done"] = "done"
    task_id: UUID
    post: str
    cached: bool


class Usage(BaseModel):
    input_tokens: int | None = Field(
        None,
        description="Prompt tokens billed for this task's share of its call; null until the call's "
        "usage arrives (a streamed post is done a moment before).",
    )
    output_tokens: int | None = Field(None, description="Completion tokens of this task's post (null as above).")
    cost_usd: float | None = Field(None, description="USD for this task's share of its LLM call (null as above).")


class Timings(BaseModel):
    accepted_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    completion_s: float | None = Field(None, description="finished_at - accepted_at, seconds.")


class TaskView(BaseModel):
    """``GET /task/{task_id}``."""

    task_id: UUID
    status: TaskStatus
    persona_id: str
    topic: str
    post: str | None = None
    cached: bool = False
    usage: Usage
    timings: Timings
    attempts: int = Field(description="Deliveries to a worker so far.")
    error: str | None = Field(None, description="Why the last attempt failed, or why the task was dead-lettered.")


class ErrorOut(BaseModel):
    """Any 4xx/5xx produced by the service itself (422s use FastAPI's detailed list instead)."""

    detail: str


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
