"""Request and response bodies of the API; they are also what ``/openapi.json`` documents."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

PersonaId = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$"),
    Field(description="1-64 characters of `a-z`, `0-9`, `_`, `-`.", examples=["tech-optimist"]),
]
Topic = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
    Field(description="What the post is about; 1-500 characters after trimming.", examples=["rust in production"]),
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
    input_tokens: int | None = Field(None, description="Prompt tokens billed for this task's share of its call.")
    output_tokens: int | None = Field(None, description="Completion tokens of this task's post.")
    cost_usd: float | None = Field(None, description="USD for this task's share of its LLM call.")


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
