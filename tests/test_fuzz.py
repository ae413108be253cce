"""The API contract under property-based fuzzing, and the bad inputs fuzzing (and review) found.

**The fuzz run.** schemathesis generates requests from ``/openapi.json`` (valid ones and deliberately
invalid ones: wrong types, pattern violations, undecodable bodies, odd methods) and checks every answer
against the same spec: no 5xx, every status code documented, every body conforming to its schema, and,
because the spec must say what the server enforces, schema-valid input accepted and schema-invalid
input refused.

It runs against the real service process, ``python -m service.orchestrator`` (uvicorn with httptools
and uvloop, exactly what the image runs) on a free port, with the session's real Postgres, Redis and
LLM simulator. Not in-process ASGI, for two reasons:

* requests go through the real HTTP parser and the ``Guard`` middleware the way clients' requests do;
  an in-process transport hands the app things no HTTP server delivers (a NUL byte in a header) and
  skips what a server does (trimming header whitespace), so the two kinds of run disagree on edge
  cases and the contract is about the deployed server;
* schemathesis calls synchronously while the app's pools (SQLAlchemy, Redis) belong to one event
  loop: a separate process keeps them apart, with no thread or event-loop juggling in the test.

Bounded: ``FUZZ_EXAMPLES`` examples per operation and phase, no shrinking, fixed seed (``derandomize``)
so a failure reproduces and the run takes seconds (set ``LOADPROOF_FUZZ_EXAMPLES`` for a deeper run).

**The regression tests** pin each case found, in-process on both ``POST /task`` paths: the ``Guard``'s
fast path (JSON body, no ``Idempotency-Key``) and the FastAPI route (with the key), which must answer
alike. An in-process transport is the right tool here: it delivers the worst a client could send.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from localstack.servers import PostgresServer, RedisServer
from localstack.services import OrchestratorServer, SimulatorServer
from service.cache import clean_topic
from service.schemas import IDEMPOTENCY_KEY_PATTERN, TOPIC_MAX, TOPIC_PATTERN, WHITESPACE, TaskIn
from tests.conftest import api_client, make_settings, service_env

FUZZ_EXAMPLES = int(os.environ.get("LOADPROOF_FUZZ_EXAMPLES", "100"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]
JSON_HEADERS = {"content-type": "application/json"}


# --- the fuzz run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_server(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> Iterator[OrchestratorServer]:
    with OrchestratorServer(service_env(postgres, redis_server, simulator)) as api:
        yield api


@pytest.fixture
def api_schema(api_server: OrchestratorServer, clean_state: None) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=FUZZ_EXAMPLES, no_shrink=True
    )
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_contract_holds_under_fuzzing(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


def test_the_hand_found_cases_over_real_http(
    api_server: OrchestratorServer, postgres: PostgresServer, clean_state: None
) -> None:
    """The same cases as below through uvicorn's HTTP parser: 422 each, nothing stored."""
    bodies = [
        json.dumps({"persona_id": "p", "topic": "R_\u0000 x"}).encode(),
        json.dumps({"persona_id": "p", "topic": "ok \ud800"}).encode(),  # ensure_ascii: a \ud800 escape
        b'{"persona_id": "p", "topic": "ok \xed\xa0\x80"}',  # the surrogate as (invalid) UTF-8 bytes
        json.dumps({"persona_id": "p", "topic": "\f"}).encode(),
    ]
    with httpx.Client(base_url=api_server.url, timeout=10) as client:
        for body in bodies:
            for headers in (JSON_HEADERS, {**JSON_HEADERS, "Idempotency-Key": "k1"}):
                r = client.post("/task", content=body, headers=headers)
                assert r.status_code == 422, (body, headers, r.text)
        doc = client.get("/openapi.json").json()
    assert "400" not in doc["paths"]["/task"]["post"]["responses"]
    assert _rows(postgres) == 0


# --- regression tests, both POST /task paths -------------------------------------------------------
def _rows(pg: PostgresServer) -> int:
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM tasks").fetchone()
        return int(row[0]) if row else 0


async def _post_both_ways(client: httpx.AsyncClient, body: bytes) -> list[httpx.Response]:
    """The body through the fast path (no key) and through the FastAPI route (keyed)."""
    fast = await client.post("/task", content=body, headers=JSON_HEADERS)
    routed = await client.post("/task", content=body, headers={**JSON_HEADERS, "Idempotency-Key": "regression-1"})
    return [fast, routed]


def _names_field(response: httpx.Response, field: str, fragment: str) -> bool:
    errors = response.json()["detail"]
    return any(e["loc"][-1] == field and fragment in e["msg"].lower() for e in errors)


@pytest.mark.parametrize(
    ("doc", "field", "fragment"),
    [
        # Postgres text cannot hold NUL: it was a 500 (psycopg DataError) on both paths.
        ({"persona_id": "p", "topic": "R_\u0000 x"}, "topic", "nul"),
        ({"persona_id": "p", "topic": "\u0000"}, "topic", "nul"),
        ({"persona_id": "p\u0000", "topic": "t"}, "persona_id", "pattern"),
        # A lone surrogate (sent as a \ud800 escape) is not UTF-8-encodable: pydantic refuses it, and
        # FastAPI's 422 handler then failed encoding its own answer (which echoes the input): a 500.
        ({"persona_id": "p", "topic": "ok \ud800"}, "topic", "unicode"),
        ({"persona_id": "p", "topic": "\udfff"}, "topic", "unicode"),
        ({"persona_id": "p\ud800", "topic": "t"}, "persona_id", "unicode"),
        # Whitespace only, by Python's definition (what clean_topic collapses): "\f" was refused while
        # the schema said it was valid; "\x1c" (not whitespace to pydantic's own trimming) was *accepted*
        # and stored as an empty topic.
        ({"persona_id": "p", "topic": "\f"}, "topic", "at least 1"),
        ({"persona_id": "p", "topic": "\x1c\x1d\x1e\x1f"}, "topic", "at least 1"),
        ({"persona_id": "p", "topic": "\u3000\u2028\x85"}, "topic", "at least 1"),
        ({"persona_id": "p", "topic": "\x1c" + "x" * (TOPIC_MAX + 1)}, "topic", f"at most {TOPIC_MAX}"),
    ],
)
async def test_bad_field_is_422_naming_it_on_both_paths(
    postgres: PostgresServer,
    redis_server: RedisServer,
    simulator: SimulatorServer,
    clean_state: None,
    doc: dict[str, Any],
    field: str,
    fragment: str,
) -> None:
    body = json.dumps(doc).encode()  # ensure_ascii: what any JSON client sends for these strings
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        responses = await _post_both_ways(client, body)
    for r in responses:
        assert r.status_code == 422, r.text
        assert _names_field(r, field, fragment), r.json()
    assert responses[0].json() == responses[1].json()
    assert _rows(postgres) == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"persona_id": "p", "topic": "\xff"}', "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "RecursionError"),  # deeper than json.loads goes
    ],
)
async def test_undecodable_body_is_422_json_invalid_not_400(
    postgres: PostgresServer,
    redis_server: RedisServer,
    simulator: SimulatorServer,
    clean_state: None,
    body: bytes,
    reason: str,
) -> None:
    """FastAPI answered these 400, which the spec does not list; malformed JSON is 422 ``json_invalid``
    whatever is wrong with it (a syntax error already was)."""
    async with api_client(make_settings(postgres, redis_server, simulator, max_body_bytes=16384)) as client:
        responses = await _post_both_ways(client, body)
        syntax = await client.post("/task", content=b'{"persona_id": ', headers=JSON_HEADERS)
    for r in responses:
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["type"] == "json_invalid" and error["loc"] == ["body"]
        assert error["ctx"]["error"] == reason
    assert syntax.status_code == 422 and syntax.json()["detail"][0]["type"] == "json_invalid"


async def test_surrogate_as_raw_bytes_is_422_naming_the_field(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, clean_state: None
) -> None:
    """``json.loads`` decodes UTF-8 with ``surrogatepass``: the encoded surrogate arrives as a lone one."""
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        responses = await _post_both_ways(client, b'{"persona_id": "p", "topic": "ok \xed\xa0\x80"}')
    for r in responses:
        assert r.status_code == 422 and _names_field(r, "topic", "unicode"), r.text
        assert r.json()["detail"][0]["input"] == "ok \\ud800"  # echoed, backslash-escaped
    assert _rows(postgres) == 0


@pytest.mark.parametrize(
    "key",
    [
        b"a\x00b",  # Postgres cannot store it: was a 500
        b"a\x01b",
        b"\xe9t\xe9",  # not ASCII (latin-1 bytes)
        b" lead",
        b"trail ",
        b"k" * 201,
    ],
)
async def test_bad_idempotency_key_is_422_naming_the_header(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, clean_state: None, key: bytes
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        r = await client.post("/task", json={"persona_id": "p", "topic": "t"}, headers={"Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert any(e["loc"] == ["header", "idempotency-key"] for e in r.json()["detail"]), r.json()
    assert _rows(postgres) == 0


async def test_edge_values_that_are_valid_are_accepted_on_both_paths(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, clean_state: None
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        keyed = {**JSON_HEADERS, "Idempotency-Key": "order 42"}  # printable ASCII with an inner space
        r = await client.post("/task", content=b'{"persona_id": "p", "topic": "x"}', headers=keyed)
        assert r.status_code == 202, r.text
        for i, topic in enumerate(["\x1c emoji \U0001f600 \x1c", "\u00e9t\u00e9 \u2003 ok", "x" * TOPIC_MAX]):
            body = json.dumps({"persona_id": "p", "topic": topic}).encode()
            fast = await client.post("/task", content=body, headers=JSON_HEADERS)
            routed = await client.post("/task", content=body, headers={**JSON_HEADERS, "Idempotency-Key": f"e{i}"})
            assert fast.status_code == routed.status_code == 202, (fast.text, routed.text)
            stored = (await client.get(f"/task/{fast.json()['task_id']}")).json()
            assert stored["topic"] == clean_topic(topic) and stored["topic"] == stored["topic"].strip()


async def test_openapi_states_the_rules_the_server_enforces(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        doc = (await client.get("/openapi.json")).json()
    post = doc["paths"]["/task"]["post"]
    assert "400" not in post["responses"] and "422" in post["responses"]
    topic = doc["components"]["schemas"]["TaskIn"]["properties"]["topic"]
    assert topic["pattern"] == TOPIC_PATTERN and "after trimming" in topic["description"]
    assert "maxLength" not in topic and "minLength" not in topic  # the pattern says it, after trimming
    (key,) = [p for p in post["parameters"] if p["name"].lower() == "idempotency-key"]
    assert key["schema"]["anyOf"][0]["pattern"] == IDEMPOTENCY_KEY_PATTERN


# --- the topic rule: one definition of whitespace, pattern == validator -----------------------------
def test_whitespace_is_str_isspace_and_what_clean_topic_collapses() -> None:
    everything = map(chr, range(sys.maxunicode + 1))
    assert set(WHITESPACE) == {c for c in everything if c.isspace()}
    assert re.fullmatch(r"\s+", WHITESPACE) and clean_topic(WHITESPACE + "x" + WHITESPACE) == "x"


def _accepted(topic: str) -> bool:
    try:
        TaskIn(persona_id="p", topic=topic)
    except ValidationError:
        return False
    return True


_TOPIC_CHARS = st.sampled_from(WHITESPACE) | st.sampled_from("\x00ab\U0001f600\u00e9") | st.characters()


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(
    st.tuples(
        st.text(st.sampled_from(WHITESPACE), max_size=3),
        st.text(_TOPIC_CHARS, max_size=8) | st.integers(TOPIC_MAX - 2, TOPIC_MAX + 2).map(lambda n: "x" * n),
        st.text(_TOPIC_CHARS, max_size=3),
    ).map("".join)
)
def test_the_published_topic_pattern_is_exactly_what_the_server_accepts(topic: str) -> None:
    assert (re.fullmatch(TOPIC_PATTERN, topic) is not None) == _accepted(topic), repr(topic)
