"""Grafana provisioning and a hardened ``grafana.ini``, as data (no Pulumi import).

The cluster component puts these into ConfigMaps; the dashboards reference the datasource by the
fixed :data:`DATASOURCE_UID`, so they work unchanged wherever Prometheus lives. The admin password is
never written here: Grafana reads it from :data:`ADMIN_PASSWORD_ENV`, fed from a Kubernetes Secret.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from common.stackconfig import GrafanaConfig

DATASOURCE_UID = "loadproof-prometheus"
DATASOURCE_NAME = "Prometheus"
DASHBOARD_FOLDER = "loadproof"
ADMIN_PASSWORD_ENV = "GF_SECURITY_ADMIN_PASSWORD"
ADMIN_USER = "admin"


def datasource_provisioning(prometheus_url: str, *, scrape_interval_s: int = 5) -> dict[str, Any]:
    """Provisioned Prometheus datasource, default, read-only in the UI.

    ``timeInterval`` = the scrape interval, so ``$__rate_interval`` never spans fewer than the samples
    rate() needs.
    """
    parsed = urlparse(prometheus_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"prometheus_url must be an http(s) URL, got {prometheus_url!r}")
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": DATASOURCE_NAME,
                "uid": DATASOURCE_UID,
                "type": "prometheus",
                "access": "proxy",
                "url": prometheus_url.rstrip("/"),
                "isDefault": True,
                "editable": False,
                "jsonData": {
                    "httpMethod": "POST",
                    "timeInterval": f"{scrape_interval_s}s",
                    "prometheusType": "Prometheus",
                },
            }
        ],
    }


def dashboard_provider(path: str) -> dict[str, Any]:
    """File provider for the generated dashboards; UI edits are not saved (the code is the source)."""
    if not path.startswith("/"):
        raise ValueError(f"dashboard path must be absolute, got {path!r}")
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": DASHBOARD_FOLDER,
                "orgId": 1,
                "folder": DASHBOARD_FOLDER,
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": path, "foldersFromFilesStructure": False},
            }
        ],
    }


def loopback_config(cfg: GrafanaConfig) -> GrafanaConfig:
    """The local demo's Grafana (bound to 127.0.0.1): plain http, anonymous Viewer on, whatever the stack says.

    Only processes on the machine reach it, and they reach the unauthenticated Prometheus on
    127.0.0.1 as well, so anonymous queries expose nothing new; its admin password is random and never
    shown, so anonymous viewing is how the demo's dashboards are read.
    """
    return cfg.model_copy(update={"tls": False, "anonymous_viewing": True})


def _bool(value: bool) -> str:
    return "true" if value else "false"


def grafana_settings(cfg: GrafanaConfig, root_url: str) -> dict[str, dict[str, str]]:
    """The ini as sections -> keys, so tests and callers can inspect it without parsing text.

    Anonymous access (Viewer, never more) follows ``anonymous_viewing``; administrators log in with the
    form (``disable_login_form`` stays unset). Sign-up, org creation, external snapshots, public
    dashboards, gravatar, telemetry and update checks are off; secure cookies and HSTS follow TLS.
    """
    parsed = urlparse(root_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"root_url must be an http(s) URL, got {root_url!r}")
    if cfg.tls != (parsed.scheme == "https"):
        raise ValueError(f"root_url {root_url!r} does not match tls={cfg.tls}: login cookies would break")
    return {
        "server": {
            "domain": cfg.host,
            "root_url": root_url,
            "enforce_domain": "false",
            "enable_gzip": "true",
        },
        "security": {
            "admin_user": ADMIN_USER,
            "disable_initial_admin_creation": "false",
            "cookie_secure": _bool(cfg.tls),
            "cookie_samesite": "lax",
            "strict_transport_security": _bool(cfg.tls),
            "content_security_policy": "true",
            "x_content_type_options": "true",
            "x_xss_protection": "true",
            "allow_embedding": "false",
            "disable_gravatar": "true",
            "disable_brute_force_login_protection": "false",
        },
        "users": {
            "allow_sign_up": "false",
            "allow_org_create": "false",
            "auto_assign_org": "true",
            "auto_assign_org_role": "Viewer",
            "viewers_can_edit": "false",
        },
        "auth": {"disable_signout_menu": "false"},
        "auth.anonymous": {
            "enabled": _bool(cfg.anonymous_viewing),
            "org_name": "Main Org.",
            "org_role": "Viewer",
            "hide_version": "true",
        },
        "snapshots": {"external_enabled": "false"},
        "public_dashboards": {"enabled": "false"},
        "analytics": {
            "reporting_enabled": "false",
            "check_for_updates": "false",
            "check_for_plugin_updates": "false",
            "feedback_links_enabled": "false",
        },
        "news": {"news_feed_enabled": "false"},
        "dashboards": {"min_refresh_interval": "5s"},
        "log": {"mode": "console"},
    }


def grafana_ini(cfg: GrafanaConfig, root_url: str) -> str:
    """Hardened ``grafana.ini`` text; see :func:`grafana_settings`. Contains no secret."""
    lines: list[str] = [f"# Generated by common/grafana_config.py; admin password from ${ADMIN_PASSWORD_ENV}."]
    for section, keys in grafana_settings(cfg, root_url).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
    return "\n".join(lines) + "\n"
