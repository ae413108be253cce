"""Grafana dashboards as code (grafana-foundation-sdk), generated at build time, never committed.

Every expression comes from :mod:`common.queries`; panel titles carry the stack-output word
(``p95_latency_ms``, ``achieved_qps`` ...) so a number on screen can be matched to the report.

One module per dashboard (:mod:`dashboards.overview`, :mod:`dashboards.internals`), built from
the blocks in :mod:`dashboards.panels`.

``python -m dashboards.build --out DIR [--stack dev]`` writes one JSON file per dashboard;
:func:`all_dashboards` returns the same documents for the Grafana ConfigMap.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.stackconfig import ThresholdsConfig, load
from dashboards.internals import service_internals
from dashboards.overview import overview
from dashboards.panels import INTERNALS_UID, OVERVIEW_UID

__all__ = ["INTERNALS_UID", "OVERVIEW_UID", "all_dashboards", "main"]


def all_dashboards(thresholds: ThresholdsConfig | None = None) -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON; thresholds default to :class:`ThresholdsConfig`'s defaults."""
    t = thresholds or ThresholdsConfig.model_validate({})
    return {"overview.json": overview(t), "service-internals.json": service_internals()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write loadproof's Grafana dashboards as JSON files.")
    parser.add_argument("--out", type=Path, required=True, help="Output directory.")
    parser.add_argument("--stack", default=None, help="Take thresholds from Pulumi.<stack>.yaml (default: built-in).")
    args = parser.parse_args(argv)
    thresholds = load(args.stack).loadtest.thresholds if args.stack else None
    args.out.mkdir(parents=True, exist_ok=True)
    for name, doc in all_dashboards(thresholds).items():
        (args.out / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(args.out / name)


if __name__ == "__main__":
    main()
