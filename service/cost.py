"""What an LLM call costs, from the token counts the endpoint bills (``usage``).

Prices are USD per 1M tokens, input and output separately. The built-in table holds list prices as
published by the vendor at the time of writing; they are not fetched or verified at run time, so
override them via config (``LOADPROOF_LLM_PRICES`` / stack ``llm.prices``) whenever they change.
An unknown model is an error when the price table is built (at startup), never at the first call:
a service that cannot price its calls must not start and report $0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M input (prompt) and output (completion) tokens."""

    input_per_m: float
    output_per_m: float

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_m + output_tokens * self.output_per_m) / TOKENS_PER_PRICE_UNIT


# List prices as published by the vendor (standard tier, USD per 1M tokens); override via config.
DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}

# Vendors answer with dated snapshots ("gpt-4o-mini-2024-07-18"); they are priced like their alias.
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_NUMBER = r"\d+(?:\.\d+)?"
_ENTRY = re.compile(rf"^(?P<model>[^=\s]+)\s*=\s*(?P<inp>{_NUMBER})\s*/\s*(?P<out>{_NUMBER})$")


class PriceError(ValueError):
    """A price override is malformed, or a model has no price."""


def parse_prices(spec: str) -> dict[str, Price]:
    """Parse ``model=in/out,model=in/out`` (USD per 1M tokens); empty entries are ignored."""
    prices: dict[str, Price] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise PriceError(
                f"invalid price override {entry!r}: expected 'model=input/output' in USD per 1M tokens, "
                "e.g. 'gpt-4o-mini=0.15/0.60'"
            )
        prices[match["model"]] = Price(float(match["inp"]), float(match["out"]))
    return prices


class PriceTable:
    """The built-in prices with config overrides merged over them."""

    def __init__(self, overrides: str = "", base: Mapping[str, Price] = DEFAULT_PRICES) -> None:
        self._prices: dict[str, Price] = {**base, **parse_prices(overrides)}

    @property
    def models(self) -> list[str]:
        return sorted(self._prices)

    def price(self, model: str) -> Price:
        """The price of ``model`` (or of its undated alias); raises ``PriceError`` if unknown."""
        found = self._prices.get(model)
        if found is None:
            found = self._prices.get(_SNAPSHOT_SUFFIX.sub("", model))
        if found is None:
            raise PriceError(
                f"no price for model {model!r}; known: {', '.join(self.models)}. "
                f"Add one with LOADPROOF_LLM_PRICES='{model}=<input>/<output>' (USD per 1M tokens)."
            )
        return found

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int) -> float:
        return self.price(model).cost_usd(input_tokens, output_tokens)


def cost_usd(model: str, input_tokens: int, output_tokens: int, overrides: str = "") -> float:
    """USD for one call's billed tokens; ``overrides`` as in ``Settings.llm_prices``."""
    return PriceTable(overrides).cost_usd(model, input_tokens, output_tokens)
