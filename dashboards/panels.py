"""Panel building blocks shared by every dashboard: stat and time-series panels, thresholds, the run picker.

Headline stat panels are *instant* queries over ``$__range``: each shows the value over the whole
selected time range (set the range to the measured window to compare with the report), never the
last few seconds. Time series use ``$__rate_interval``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from common import queries as q
from common.grafana_config import DATASOURCE_UID

OVERVIEW_UID = "loadproof-overview"
INTERNALS_UID = "loadproof-service-internals"
TAGS = ["loadproof"]
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
RANGE = "$__range"  # stat panels: the whole selected time range
RATE = "$__rate_interval"  # time series: the smallest safe rate() window
MEASURED = q.MEASURED_PHASE  # headline client stats: warm-up excluded, like the report

GREEN, RED, NEUTRAL = "green", "red", "blue"

Target = tuple[str, str]  # (legend, expr)


class PanelIds:
    """Assigns stable panel ids in declaration order, so links like ``viewPanel=3`` keep working."""

    def __init__(self) -> None:
        self._next = 1

    def id(self) -> int:
        value = self._next
        self._next += 1
        return value


def target(ref: str, expr: str, legend: str, *, instant: bool) -> prometheus.Dataquery:
    query = prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend).datasource(DATASOURCE)
    return query.instant() if instant else query.range()


def thresholds(bad_at: float | None, *, bad_below: bool = False) -> dashboard.ThresholdsConfig:
    """Green/red split at the target (red from ``bad_at`` upwards, or below it); neutral without one."""
    if bad_at is None:
        steps = [dm.Threshold(value=None, color=NEUTRAL)]
    elif bad_below:
        steps = [dm.Threshold(value=None, color=RED), dm.Threshold(value=bad_at, color=GREEN)]
    else:
        steps = [dm.Threshold(value=None, color=GREEN), dm.Threshold(value=bad_at, color=RED)]
    return dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def stat_panel(
    ids: PanelIds,
    title: str,
    expr: str,
    unit: str,
    description: str,
    *,
    bad_at: float | None = None,
    decimals: int | None = None,
) -> stat.Panel:
    panel = (
        stat.Panel()
        .id(ids.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(target("A", expr, title, instant=True))
        .unit(unit)
        .thresholds(thresholds(bad_at))
        .color_mode(cm.BigValueColorMode.BACKGROUND if bad_at is not None else cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .no_value("no data")
        .height(4)
        .span(8)
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return panel


def series_panel(
    ids: PanelIds,
    title: str,
    targets: Sequence[Target],
    unit: str,
    description: str,
    *,
    target_line: float | None = None,
    min_zero: bool = True,
    span: int = 12,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(ids.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .line_width(1)
        .fill_opacity(10)
        .span_nulls(False)
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .height(8)
        .span(span)
    )
    for i, (legend, expr) in enumerate(targets):
        panel = panel.with_target(target(chr(ord("A") + i), expr, legend, instant=False))
    if min_zero:
        panel = panel.min(0)
    if target_line is not None:
        panel = panel.thresholds(thresholds(target_line)).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    return panel


def testid_variable() -> dashboard.QueryVariable:
    """k6 runs present in Prometheus, newest first when ids sort by time; "All" = every run."""
    return (
        dashboard.QueryVariable("testid")
        .label("k6 test id")
        .description("The k6 run (testid tag) the client-side panels show.")
        .datasource(DATASOURCE)
        .query(f"label_values({q.K6_HTTP_REQS}, {q.K6_TESTID_LABEL})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_DESC)
        .include_all(True)
        .all_value(".*")
        .multi(False)
        .allow_custom_value(False)
    )


def links() -> dashboard.DashboardLink:
    """A dropdown to the other loadproof dashboards, keeping the time range (and the testid)."""
    return (
        dashboard.DashboardLink("loadproof")
        .type(dm.DashboardLinkType.DASHBOARDS)
        .tags(TAGS)
        .as_dropdown(True)
        .keep_time(True)
        .include_vars(True)
    )


def encode(built: Any) -> dict[str, Any]:
    return json.loads(JSONEncoder(sort_keys=True).encode(built))
