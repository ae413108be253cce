"""Prometheus (and Grafana, when installed) for the local stack, configured by the same builders as the cluster."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from common.prometheus_config import PROMETHEUS_FLAGS, local_config, promtool_check, render_yaml
from common.stackconfig import StackConfig
from common.tools import optional_tool, tool
from localstack.process import ManagedProcess, free_port, http_check, port_is_free


class PrometheusServer:
    """Debian's Prometheus on 127.0.0.1 with a temp TSDB, remote-write receiver and native histograms."""

    def __init__(
        self,
        scrape_targets: dict[str, list[str]],
        *,
        scrape_interval_s: int,
        workdir: Path,
        port: int | None = None,
        preferred_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        if port is None:
            port = preferred_port if preferred_port and port_is_free(preferred_port) else free_port()
        self.port = port
        self.config_text = render_yaml(local_config(scrape_targets, scrape_interval_s))
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def remote_write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def start(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        promtool_check(self.config_text)  # raises PromtoolError with promtool's own message
        config = self.workdir / "prometheus.yml"
        config.write_text(self.config_text)
        binary = tool("prometheus")
        self.process = ManagedProcess(
            "prometheus",
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                *PROMETHEUS_FLAGS,
            ],
            cwd=self.workdir,
            log_path=self.workdir / "prometheus.log",
            ready=http_check(f"{self.url}/-/ready"),
        )
        self.process.start()
        self.process.wait_ready(timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=15)


class GrafanaServer:
    """``grafana-server`` with the project's provisioning and dashboards, if the binary exists.

    Loopback only, anonymous Viewer on (see :func:`common.grafana_config.loopback_config`).
    """

    def __init__(self, cfg: StackConfig, prometheus_url: str, *, workdir: Path) -> None:
        self.cfg = cfg
        self.prometheus_url = prometheus_url
        self.workdir = workdir
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @staticmethod
    def available() -> bool:
        return optional_tool("grafana-server") is not None or optional_tool("grafana") is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ini_text(self) -> str:
        """This Grafana's ``grafana.ini``: the stack's hardening with :func:`loopback_config` applied."""
        from common.grafana_config import grafana_ini, loopback_config

        return grafana_ini(loopback_config(self.cfg.monitoring.grafana), self.url + "/")

    def start(self, timeout: float = 90.0) -> float:
        from common.grafana_config import dashboard_provider, datasource_provisioning
        from dashboards.build import all_dashboards

        t0 = time.monotonic()
        prov = self.workdir / "provisioning"
        dash_dir = self.workdir / "dashboards"
        for sub in ("datasources", "dashboards", "plugins", "alerting"):
            (prov / sub).mkdir(parents=True, exist_ok=True)
        dash_dir.mkdir(parents=True, exist_ok=True)
        interval = self.cfg.monitoring.prometheus.scrape_interval_s
        (prov / "datasources" / "loadproof.yaml").write_text(
            render_yaml(datasource_provisioning(self.prometheus_url, scrape_interval_s=interval))
        )
        (prov / "dashboards" / "loadproof.yaml").write_text(render_yaml(dashboard_provider(str(dash_dir))))
        for name, doc in all_dashboards(self.cfg.loadtest.thresholds).items():
            (dash_dir / name).write_text(json.dumps(doc))
        ini = self.workdir / "grafana.ini"
        ini.write_text(self.ini_text())
        server = optional_tool("grafana-server")
        argv = [server] if server else [tool("grafana"), "server"]
        home = next((p for p in ("/usr/share/grafana", "/opt/grafana") if Path(p).is_dir()), None)
        if home:
            argv.append(f"--homepath={home}")
        argv += [
            f"--config={ini}",
            "cfg:server.http_addr=127.0.0.1",
            f"cfg:server.http_port={self.port}",
            f"cfg:paths.data={self.workdir / 'data'}",
            f"cfg:paths.logs={self.workdir / 'logs'}",
            f"cfg:paths.provisioning={prov}",
        ]
        self.process = ManagedProcess(
            "grafana",
            argv,
            env={**_base_env(), "GF_SECURITY_ADMIN_PASSWORD": secrets.token_urlsafe(18)},
            cwd=self.workdir,
            log_path=self.workdir / "grafana.log",
            ready=http_check(f"{self.url}/api/health"),
        )
        self.process.start()
        self.process.wait_ready(timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=15)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LOADPROOF_", "GF_"))}
