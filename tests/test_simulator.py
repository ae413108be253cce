"""The LLM simulator as a real process, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from loadtest import simulator_bench
from service import prompts
from service.limiter import parse_reset
from service.llm import LLMItem
from service.simtext import CHARS_PER_TOKEN, approx_tokens, generate_post, prompt_tokens
from tests.simproc import FAST_ENV, SimProc, running_simulator

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProc]:
    with running_simulator() as proc:
        yield proc


@pytest.fixture(autouse=True)
def clean(sim: SimProc) -> None:
    sim.reset()


def _client(sim: SimProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10)


def _batch(n: int) -> list[dict[str, str]]:
    items = [LLMItem(f"task-{i}", f"persona-{i % 3}", f"topic {i}") for i in range(n)]
    return prompts.build_messages(items, "v1")


def test_sync_client_returns_content_and_consistent_usage(sim: SimProc) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    with _client(sim) as client:
        r = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    content = r.choices[0].message.content
    assert content and r.choices[0].finish_reason == "stop"
    assert r.model == MODEL and r.usage is not None
    assert r.usage.completion_tokens == math.ceil(len(content) / CHARS_PER_TOKEN)
    assert r.usage.prompt_tokens == prompt_tokens(messages)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stats = sim.stats()
    assert stats["calls"] == 1 and stats["completed"] == 1 and stats["batch_calls"] == 0
    assert stats["completion_tokens"] == r.usage.completion_tokens


async def test_async_client_batched_prompt_returns_item_json(sim: SimProc) -> None:
    messages = _batch(5)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        r = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
        )
    content = r.choices[0].message.content or ""
    doc = json.loads(content)
    assert [i["id"] for i in doc["items"]] == [f"task-{i}" for i in range(5)]
    assert all(isinstance(i["post"], str) and i["post"] for i in doc["items"])
    assert r.usage is not None and r.usage.completion_tokens == approx_tokens(content)
    stats = sim.stats()
    assert stats["batch_calls"] == 1 and stats["items"] == 5 and stats["items_per_call"] == {"5": 1}


def test_content_is_deterministic_per_prompt_and_sized(sim: SimProc) -> None:
    with _client(sim) as client:
        a = client.chat.completions.create(model=MODEL, messages=_batch(2))  # type: ignore[arg-type]
        b = client.chat.completions.create(model=MODEL, messages=_batch(2))  # type: ignore[arg-type]
    assert a.choices[0].message.content == b.choices[0].message.content
    post = json.loads(a.choices[0].message.content or "")["items"][0]["post"]
    assert abs(approx_tokens(post) - 60) <= 3  # sim_output_tokens
    assert generate_post("x", 60) == generate_post("x", 60) != generate_post("y", 60)


def test_stream_with_usage_chunk(sim: SimProc) -> None:
    messages = [{"role": "user", "content": "stream please"}]
    with _client(sim) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        finish = None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        plain = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    text = "".join(pieces)
    assert text == plain.choices[0].message.content
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == approx_tokens(text)
    assert sim.stats()["streams"] == 1


def test_max_tokens_truncates_and_reports_length(sim: SimProc) -> None:
    with _client(sim) as client:
        r = client.chat.completions.create(
            model=MODEL,
            messages=_batch(3),  # type: ignore[arg-type]
            max_completion_tokens=20,
        )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 20
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content or "")


def test_injected_429_has_retry_after(sim: SimProc) -> None:
    sim.control(rate_429=1.0, retry_after_s=2.5)
    with _client(sim) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=_batch(1))  # type: ignore[arg-type]
    headers = info.value.response.headers
    assert headers["retry-after"] == "3" and headers["retry-after-ms"] == "2500"
    assert sim.stats()["injected"] == {"429": 1}


def test_script_then_rates(sim: SimProc) -> None:
    sim.control(script=["500", "ok"])
    with _client(sim) as client:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=_batch(1))  # type: ignore[arg-type]
        client.chat.completions.create(model=MODEL, messages=_batch(1))  # type: ignore[arg-type]
        sim.control(rate_500=1.0)
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model=MODEL, messages=_batch(1))  # type: ignore[arg-type]
    stats = sim.stats()
    assert stats["injected"] == {"500": 4} and stats["completed"] == 1 and stats["calls"] == 5


def test_malformed_items_at_rate_one(sim: SimProc) -> None:
    sim.control(rate_malformed=1.0)
    with _client(sim) as client:
        r = client.chat.completions.create(model=MODEL, messages=_batch(8))  # type: ignore[arg-type]
    doc = json.loads(r.choices[0].message.content or "")
    wanted = {f"task-{i}" for i in range(8)}
    valid = [i for i in doc["items"] if i.get("id") in wanted and isinstance(i.get("post"), str) and i["post"]]
    assert valid == []
    assert sim.stats()["injected"] == {"malformed_items": 8}


def test_hung_call_ends_when_client_gives_up(sim: SimProc) -> None:
    sim.control(script=["timeout"], hang_s=30)
    with _client(sim) as client, pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=_batch(1), timeout=0.5)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while sim.stats()["disconnects"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = sim.stats()
    assert stats["injected"] == {"timeout": 1} and stats["disconnects"] == 1 and stats["inflight"] == 0


def test_models_health_and_bad_requests(sim: SimProc) -> None:
    with _client(sim) as client:
        ids = {m.id for m in client.models.list()}
        assert {"gpt-4o-mini", "gpt-4o"} <= ids
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model=MODEL, messages=[])
    r = httpx.post(f"{sim.base_url}/chat/completions", content=b"{not json", timeout=5)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{sim.url}/nope", timeout=5).status_code == 404
    r = httpx.post(f"{sim.url}/control", json={"rate_429": 2}, timeout=5)
    assert r.status_code == 400 and "rate_429" in r.json()["error"]["message"]
    r = httpx.post(f"{sim.url}/control", json={"script": ["explode"]}, timeout=5)
    assert r.status_code == 400
    assert sim.stats()["bad_requests"] == 4


async def test_handles_many_concurrent_calls(sim: SimProc) -> None:
    """Hundreds of concurrent calls all complete (latency is asyncio sleeping, not CPU)."""
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk", max_retries=0, timeout=60) as client:
        calls = [
            client.chat.completions.create(model=MODEL, messages=_batch(1 + i % 5))  # type: ignore[arg-type]
            for i in range(300)
        ]
        done = await asyncio.gather(*calls)
    tokens = [r.usage.completion_tokens for r in done if r.usage is not None]
    assert len(tokens) == 300 and all(t > 0 for t in tokens)
    stats = sim.stats()
    assert stats["completed"] == 300 and stats["completion_tokens"] == sum(tokens) and stats["inflight"] == 0
    assert stats["max_inflight"] > 1


def test_stats_report_the_simulated_model(sim: SimProc) -> None:
    sim.control(rate_500=0.25)
    config = sim.stats()["config"]
    assert config["ttft_ms"] == 5 and config["itl_ms"] == 0.1 and config["output_tokens"] == 60
    assert config["faults"]["rate_500"] == 0.25 and config["chars_per_token"] == CHARS_PER_TOKEN


def _latency_bounds_ms(ttft: float, itl: float, jitter: float, tokens: int, load: float) -> tuple[float, float]:
    low = (ttft * (1 - jitter) + itl * (1 - jitter) * tokens) * load
    high = (ttft * (1 + jitter) + itl * (1 + jitter) * tokens) * load
    return low, high


@pytest.fixture(scope="module")
def kneed_sim() -> Iterator[SimProc]:
    env = {"LOADPROOF_SIM_TTFT_MS": "200", "LOADPROOF_SIM_ITL_MS": "1", "LOADPROOF_SIM_CONCURRENCY_KNEE": "4"}
    with running_simulator(env) as proc:
        yield proc


async def test_latency_follows_the_model_and_grows_past_the_knee(kneed_sim: SimProc) -> None:
    """Checks the planned latency the simulator reports (x-sim-*), not wall-clock time."""
    body = {"model": MODEL, "messages": _batch(1)}
    async with httpx.AsyncClient(base_url=kneed_sim.base_url, timeout=60) as http:
        alone = await http.post("/chat/completions", json=body)
        responses = await asyncio.gather(*(http.post("/chat/completions", json=body) for _ in range(24)))
    for r in [alone, *responses]:
        assert r.status_code == 200
        load = float(r.headers["x-sim-load"])
        low, high = _latency_bounds_ms(200, 1, 0.2, r.json()["usage"]["completion_tokens"], load)
        assert low <= float(r.headers["x-sim-latency-ms"]) <= high
    assert float(alone.headers["x-sim-load"]) == 1.0
    loads = [float(r.headers["x-sim-load"]) for r in responses]
    assert max(loads) > 1.0  # 24 concurrent calls against a knee of 4
    assert max(loads) <= 24 / 4 and kneed_sim.stats()["max_inflight"] >= 5


def test_bench_runs_and_reports_model_and_cpu() -> None:
    result = simulator_bench.run(calls=40, concurrency=8, batch=2, env=FAST_ENV)
    assert result["calls"] == 40 and result["batch"] == 2 and result["max_inflight"] <= 8
    assert result["latency_p95_s"] >= result["latency_p50_s"] > 0
    assert result["sim_cpu_s"] >= 0 and result["mean_completion_tokens"] > 100  # two ~60-token posts + JSON


def test_stream_abandoned_by_client_is_released(kneed_sim: SimProc) -> None:
    kneed_sim.reset()
    body = {"model": MODEL, "messages": _batch(3), "stream": True}
    with httpx.stream("POST", f"{kneed_sim.base_url}/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"] == "text/event-stream"
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "chat.completion.chunk"
    deadline = time.monotonic() + 10
    while kneed_sim.stats()["disconnects"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = kneed_sim.stats()
    assert stats["disconnects"] == 1 and stats["completed"] == 0 and stats["inflight"] == 0


async def test_reset_during_a_call_keeps_inflight_right(kneed_sim: SimProc) -> None:
    kneed_sim.reset()
    async with httpx.AsyncClient(base_url=kneed_sim.url, timeout=30) as http:
        call = asyncio.create_task(http.post("/v1/chat/completions", json={"model": MODEL, "messages": _batch(1)}))
        for _ in range(500):
            if (await http.get("/stats")).json()["inflight"] == 1:
                break
            await asyncio.sleep(0.005)
        reset = (await http.post("/stats/reset")).json()
        assert reset["inflight"] == 1 and reset["calls"] == 0
        assert (await call).status_code == 200
        after = (await http.get("/stats")).json()
    assert after["inflight"] == 0 and after["completed"] == 1 and after["calls"] == 0


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"stream_options": True}, "stream_options"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": True}, "max_completion_tokens"),
        ({"n": 2}, "n=1"),
        ({"model": ""}, "model"),
        ({"messages": [{"content": "no role"}]}, "role"),
    ],
)
def test_invalid_chat_requests_get_400_with_reason(sim: SimProc, extra: dict[str, object], reason: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(f"{sim.base_url}/chat/completions", json=body, timeout=5)
    assert r.status_code == 400 and reason in r.json()["error"]["message"]
    assert sim.stats()["calls"] == 0


@pytest.fixture
def limited(sim: SimProc) -> Iterator[SimProc]:
    yield sim
    sim.control(rpm=0, tpm=0)


def test_rate_limits_send_openai_headers_and_429_past_them(limited: SimProc) -> None:
    messages = [{"role": "user", "content": "hello"}]
    charge = prompt_tokens(messages) + 50
    limited.control(rpm=3, tpm=100 * charge)
    body: dict[str, object] = {"model": MODEL, "messages": messages, "max_tokens": 50}
    with httpx.Client(base_url=limited.base_url, timeout=10) as http:
        plain = http.post("/chat/completions", json=body)
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as streamed:
            streamed.read()
        third = http.post("/chat/completions", json=body)
        refused = http.post("/chat/completions", json=body)
    assert plain.status_code == streamed.status_code == third.status_code == 200
    h = plain.headers
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "2"
    assert h["x-ratelimit-limit-tokens"] == str(100 * charge)
    assert h["x-ratelimit-remaining-tokens"] == str(99 * charge)  # prompt + max_tokens at admission
    assert parse_reset(h["x-ratelimit-reset-requests"]) == pytest.approx(20.0, abs=0.5)  # 1 of 3/min
    assert streamed.headers["x-ratelimit-remaining-requests"] == "1"
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 15_000 < wait_ms <= 20_000 and refused.headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    stats = limited.stats()
    assert stats["rate_limited"] == {"requests": 1, "tokens": 0} and stats["injected"] == {}
    assert stats["config"]["rate_limits"] == {"rpm": 3, "tpm": 100 * charge}


def test_token_limit_refuses_calls_whose_cap_does_not_fit(limited: SimProc) -> None:
    messages = [{"role": "user", "content": "hello"}]
    limited.control(tpm=prompt_tokens(messages) + 1000)
    with httpx.Client(base_url=limited.base_url, timeout=10) as http:
        small = http.post("/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 600})
        big = http.post("/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 600})
    assert small.status_code == 200 and "x-ratelimit-limit-requests" not in small.headers
    assert big.status_code == 429 and big.json()["error"]["type"] == "tokens"
    assert limited.stats()["rate_limited"] == {"requests": 0, "tokens": 1}


def test_no_rate_limit_headers_without_limits(sim: SimProc) -> None:
    r = httpx.post(f"{sim.base_url}/chat/completions", json={"model": MODEL, "messages": _batch(1)}, timeout=10)
    assert r.status_code == 200 and not any(k.startswith("x-ratelimit") for k in r.headers)


@pytest.mark.parametrize(
    "body", [{"rpm": -1}, {"tpm": 1.5}, {"rpm": True}, {"concurrency_knee": 0}, {"concurrency_knee": "4"}]
)
def test_control_rejects_bad_limits(sim: SimProc, body: dict[str, object]) -> None:
    r = httpx.post(f"{sim.url}/control", json=body, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
