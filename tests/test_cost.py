"""Price table, overrides and cost arithmetic; startup refuses an unpriced model."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import Settings
from service.cost import DEFAULT_PRICES, Price, PriceError, PriceTable, cost_usd, parse_prices
from service.llm import LLMClient


def make_settings(**values: Any) -> Settings:
    return Settings(**values)


def test_builtin_prices() -> None:
    assert DEFAULT_PRICES["gpt-4o-mini"] == Price(0.15, 0.60)
    assert DEFAULT_PRICES["gpt-4o"] == Price(2.50, 10.00)
    assert DEFAULT_PRICES["gpt-4.1-mini"] == Price(0.40, 1.60)
    assert DEFAULT_PRICES["gpt-4.1-nano"] == Price(0.10, 0.40)
    assert DEFAULT_PRICES["gpt-3.5-turbo"] == Price(0.50, 1.50)


def test_cost_arithmetic() -> None:
    # 1M input at $0.15 + 1M output at $0.60
    assert cost_usd("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    # 200 in, 300 out: (200 * 0.15 + 300 * 0.60) / 1e6
    assert cost_usd("gpt-4o-mini", 200, 300) == pytest.approx(0.00021)
    assert cost_usd("gpt-4o", 1000, 0) == pytest.approx(0.0025)
    assert cost_usd("gpt-4o-mini", 0, 0) == 0.0


def test_dated_snapshot_priced_like_alias() -> None:
    assert PriceTable().price("gpt-4o-mini-2024-07-18") == Price(0.15, 0.60)


def test_overrides_parse_and_merge() -> None:
    assert parse_prices("") == {}
    assert parse_prices(" a=1/2 , b = 0.5 / 0.25 ,") == {"a": Price(1.0, 2.0), "b": Price(0.5, 0.25)}
    table = PriceTable("gpt-4o-mini=1/3,my-local-model=0/0")
    assert table.price("gpt-4o-mini") == Price(1.0, 3.0)
    assert table.price("gpt-4o") == DEFAULT_PRICES["gpt-4o"]
    assert table.cost_usd("my-local-model", 10**6, 10**6) == 0.0
    assert cost_usd("gpt-4o-mini", 10**6, 10**6, overrides="gpt-4o-mini=1/3") == pytest.approx(4.0)


@pytest.mark.parametrize("spec", ["gpt-4o-mini", "gpt-4o-mini=0.15", "x=a/b", "=1/2", "x=1/-2", "x=1/2/3"])
def test_malformed_override_is_a_clear_error(spec: str) -> None:
    with pytest.raises(PriceError, match="model=input/output"):
        parse_prices(spec)


def test_unknown_model_error_names_the_fix() -> None:
    with pytest.raises(PriceError, match="LOADPROOF_LLM_PRICES='no-such-model="):
        PriceTable().price("no-such-model")


def test_client_refuses_unpriced_model_at_startup() -> None:
    with pytest.raises(PriceError, match="no-such-model"):
        LLMClient(make_settings(llm_model="no-such-model"))


def test_client_refuses_unknown_prompt_version_at_startup() -> None:
    with pytest.raises(ValueError, match="prompt_version"):
        LLMClient(make_settings(prompt_version="v999"))


async def test_client_accepts_override_priced_model() -> None:
    client = LLMClient(make_settings(llm_model="my-local-model", llm_prices="my-local-model=0.01/0.02"))
    try:
        assert client.price == Price(0.01, 0.02)
    finally:
        await client.aclose()
