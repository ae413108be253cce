"""Dashboards JSON and Grafana provisioning: stable uids, one datasource, thresholds at the stack's
targets, no panel without a query, and a hardened grafana.ini without secrets.

(That every dashboard expression evaluates in a real Prometheus is in test_prometheus_config.py,
where the Prometheus holding real data lives.)
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import queries as q
from common.grafana_config import (
    ADMIN_PASSWORD_ENV,
    DATASOURCE_UID,
    dashboard_provider,
    datasource_provisioning,
    grafana_ini,
    grafana_settings,
    loopback_config,
)
from common.stackconfig import GrafanaConfig, StackConfig, ThresholdsConfig, load
from dashboards.build import INTERNALS_UID, OVERVIEW_UID, all_dashboards, main

CUSTOM = ThresholdsConfig.model_validate({"p95Ms": 250, "errorRate": 0.02, "costPer1kTokensUsd": 0.005})


def _panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows nest their panels


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _red_step(panel: dict[str, Any]) -> float:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return next(s["value"] for s in steps if s["color"] == "red")


def _stat(doc: dict[str, Any], title_prefix: str) -> dict[str, Any]:
    matches = [p for p in _panels(doc) if p["type"] == "stat" and p["title"].startswith(title_prefix)]
    assert len(matches) == 1, (title_prefix, [p["title"] for p in matches])
    return matches[0]


def test_uids_stable_and_deterministic() -> None:
    first, second = all_dashboards(), all_dashboards()
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert {name: doc["uid"] for name, doc in first.items()} == {
        "overview.json": OVERVIEW_UID,
        "service-internals.json": INTERNALS_UID,
    }
    assert OVERVIEW_UID == "loadproof-overview"
    assert INTERNALS_UID == "loadproof-service-internals"


def test_panel_ids_unique_and_every_panel_has_a_query() -> None:
    for name, doc in all_dashboards().items():
        ids = [p["id"] for p in _panels(doc)]
        assert len(ids) == len(set(ids)), name
        for panel in _panels(doc):
            if panel["type"] == "row":
                continue
            targets = panel.get("targets") or []
            assert targets, f"{name}: panel {panel['title']!r} has no query"
            for t in targets:
                assert t["expr"].strip(), f"{name}: empty expr in {panel['title']!r}"
                assert t["refId"]


def test_datasource_uid_everywhere() -> None:
    for name, doc in all_dashboards().items():
        text = json.dumps(doc)
        assert "${DS_" not in text and "__inputs" not in doc, name
        for panel in _panels(doc):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        refs = [n["datasource"] for n in _walk(doc) if isinstance(n.get("datasource"), dict)]
        assert refs and all(r.get("uid") == DATASOURCE_UID for r in refs), name


@pytest.mark.parametrize(
    ("thresholds", "p95", "err", "cost"),
    [(None, 400.0, 0.01, 0.008), (CUSTOM, 250.0, 0.02, 0.005)],
)
def test_thresholds_at_targets(thresholds: ThresholdsConfig | None, p95: float, err: float, cost: float) -> None:
    doc = all_dashboards(thresholds)["overview.json"]
    assert _red_step(_stat(doc, "p95_latency_ms")) == p95
    assert _red_step(_stat(doc, "server_p95_latency_ms")) == p95
    assert _red_step(_stat(doc, "error_rate")) == err
    assert _red_step(_stat(doc, "llm_cost_per_1k_tokens_usd")) == cost
    assert _red_step(_stat(doc, "dropped_iterations")) == 1
    for title in ("p95_latency_ms", "error_rate", "llm_cost_per_1k_tokens_usd"):
        steps = _stat(doc, title)["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0] == {"color": "green", "value": None}, title  # below the target: green
    # Time series draw the same targets as dashed lines.
    lines = {
        p["title"]: _red_step(p)
        for p in _panels(doc)
        if p["type"] == "timeseries" and p["fieldConfig"]["defaults"].get("custom", {}).get("thresholdsStyle")
    }
    assert sorted(lines.values()) == sorted([p95, err, cost])


def test_dev_stack_thresholds_match_defaults() -> None:
    stack = load("dev").loadtest.thresholds
    assert all_dashboards(stack) == all_dashboards()


def test_overview_titles_use_stack_output_words() -> None:
    doc = all_dashboards()["overview.json"]
    titles = " ".join(p["title"] for p in _panels(doc))
    for word in q.headline("1m"):
        if word in ("server_error_rate", "billed_cost_per_1k_tokens_usd", "cost_per_request_usd", "llm_spend_usd"):
            continue  # shown inside time series legends / described, not as their own titles
        assert word in titles, word
    stats = [p for p in _panels(doc) if p["type"] == "stat"]
    for panel in stats:
        target = panel["targets"][0]
        assert target["instant"] is True, panel["title"]
        assert "$__range" in target["expr"], panel["title"]  # the whole selected range, not "now"


def test_testid_variable_drives_k6_panels() -> None:
    doc = all_dashboards()["overview.json"]
    (var,) = doc["templating"]["list"]
    assert var["name"] == "testid" and var["type"] == "query"
    assert var["datasource"]["uid"] == DATASOURCE_UID
    assert var["includeAll"] is True and var["allValue"] == ".*"
    for panel in _panels(doc):
        for target in panel.get("targets", []):
            if "k6_" in target["expr"]:
                assert 'testid=~"$testid"' in target["expr"], target["expr"]


def test_service_internals_covers_the_internals() -> None:
    doc = all_dashboards()["service-internals.json"]
    exprs = " ".join(t["expr"] for p in _panels(doc) for t in p.get("targets", []))
    for name in (
        q.DB_POOL_IN_USE,
        q.DB_POOL_OVERFLOW,
        q.DB_POOL_WAITERS,
        q.DB_POOL_WAIT,
        q.QUEUE_DEPTH,
        q.QUEUE_PENDING,
        q.LLM_REQUESTS,
        q.LLM_BATCH_SIZE,
        q.LLM_TOKENS,
        q.TOKENS_DELIVERED,
        q.CACHE_BREAKER_OPEN,
        q.LLM_BREAKER_OPEN,
        q.HTTP_INFLIGHT,
        q.HTTP_LOOP_LAG,
        q.HTTP_SHED_SHARE,
        q.LLM_INFLIGHT,
        q.TASK_COMPLETION,
    ):
        assert name in exprs, name


def test_build_cli_writes_one_file_per_dashboard(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--stack", "dev"])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(all_dashboards())
    for path in tmp_path.iterdir():
        assert json.loads(path.read_text())["uid"] in (OVERVIEW_UID, INTERNALS_UID)


# ---------------------------------------------------------------- Grafana provisioning


def test_datasource_provisioning() -> None:
    doc = datasource_provisioning("http://prometheus.loadproof.svc:9090/", scrape_interval_s=5)
    (ds,) = doc["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus" and ds["isDefault"] is True
    assert ds["url"] == "http://prometheus.loadproof.svc:9090"
    assert ds["jsonData"]["timeInterval"] == "5s"
    with pytest.raises(ValueError):
        datasource_provisioning("prometheus:9090")


def test_dashboard_provider() -> None:
    (provider,) = dashboard_provider("/var/lib/grafana/dashboards/loadproof")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/loadproof"
    assert provider["allowUiUpdates"] is False
    with pytest.raises(ValueError):
        dashboard_provider("relative/path")


def _ini(cfg: GrafanaConfig, root_url: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(grafana_ini(cfg, root_url))
    return parser


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("anonymous", [False, True])
def test_grafana_ini_hardened(tls: bool, anonymous: bool) -> None:
    cfg = GrafanaConfig.model_validate(
        {"tls": tls, "tlsSecret": "g-tls", "anonymousViewing": anonymous, "host": "g.example"}
    )
    root = f"{'https' if tls else 'http'}://g.example/"
    ini = _ini(cfg, root)
    expect = {
        ("users", "allow_sign_up"): "false",
        ("users", "allow_org_create"): "false",
        ("snapshots", "external_enabled"): "false",
        ("security", "cookie_secure"): "true" if tls else "false",
        ("security", "strict_transport_security"): "true" if tls else "false",
        ("security", "disable_gravatar"): "true",
        ("security", "disable_initial_admin_creation"): "false",
        ("security", "content_security_policy"): "true",
        ("security", "allow_embedding"): "false",
        ("auth.anonymous", "enabled"): "true" if anonymous else "false",
        ("auth.anonymous", "org_role"): "Viewer",
        ("analytics", "reporting_enabled"): "false",
        ("analytics", "check_for_updates"): "false",
        ("server", "root_url"): root,
    }
    for (section, key), value in expect.items():
        assert ini.get(section, key) == value, (section, key)
    # Admins must be able to log in: the login form is never disabled.
    assert ini.get("auth", "disable_login_form", fallback="false") == "false"


def test_grafana_ini_has_no_secret() -> None:
    cfg = GrafanaConfig.model_validate({})
    text = grafana_ini(cfg, "http://grafana.loadproof.local/")
    ini = _ini(cfg, "http://grafana.loadproof.local/")
    keys = {key for section in ini.sections() for key in ini[section]}
    assert not any("password" in key or "secret" in key for key in keys), keys
    assert "admin_password" not in text and "secret_key" not in text
    assert ADMIN_PASSWORD_ENV == "GF_SECURITY_ADMIN_PASSWORD"
    assert grafana_settings(cfg, "http://grafana.loadproof.local/")["security"]["admin_user"] == "admin"


def test_grafana_ini_rejects_scheme_that_contradicts_tls() -> None:
    with pytest.raises(ValueError, match="tls"):
        grafana_ini(GrafanaConfig.model_validate({"tls": True, "certIssuer": "le"}), "http://g.example/")
    with pytest.raises(ValueError):
        grafana_ini(GrafanaConfig.model_validate({}), "g.example")


def test_local_grafana_is_anonymous_plain_http_whatever_the_stack() -> None:
    """The demo's Grafana (127.0.0.1) keeps anonymous Viewer on and plain http, even for a stack that
    turns anonymous viewing off and TLS on for the cluster."""
    from localstack.monitoring import GrafanaServer

    doc = load("dev").model_dump(mode="json", by_alias=True)
    doc["monitoring"]["grafana"].update({"tls": True, "certIssuer": "le", "anonymousViewing": False})
    stack = StackConfig.model_validate(doc)
    cluster = stack.monitoring.grafana
    local = loopback_config(cluster)
    assert (local.tls, local.anonymous_viewing) == (False, True)
    assert (cluster.tls, cluster.anonymous_viewing) == (True, False)  # the stack's own config is untouched
    server = GrafanaServer(stack, "http://127.0.0.1:9090", workdir=Path("/nonexistent"))
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(server.ini_text())
    assert ini.get("auth.anonymous", "enabled") == "true"
    assert ini.get("auth.anonymous", "org_role") == "Viewer"
    assert ini.get("security", "cookie_secure") == "false"
    assert ini.get("server", "root_url") == f"{server.url}/"
