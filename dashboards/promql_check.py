"""Run a throwaway Prometheus and evaluate PromQL against it: the check that every query is valid.

Parsing alone misses type errors (``rate()`` of a gauge expression, histogram functions on floats,
vector matching); only evaluation by a real Prometheus catches them. Used by the tests and usable by
the measurement code to read one number (:func:`instant_value`).
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.prometheus_config import PROMETHEUS_FLAGS, render_yaml
from common.tools import tool


class PromQLError(RuntimeError):
    """Prometheus refused or failed to evaluate an expression; the message carries its error."""


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; other test runs get others)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prometheus_process(
    config: Mapping[str, Any],
    workdir: Path,
    *,
    binary: str | None = None,
    extra_flags: Sequence[str] = (),
    ready_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Start Prometheus with ``config`` (remote-write receiver and native histograms on) on a free
    127.0.0.1 port, yield its base URL, and stop it (SIGTERM, then SIGKILL) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "prometheus.yml"
    cfg_path.write_text(render_yaml(dict(config)))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    cmd = [
        binary or tool("prometheus"),
        f"--config.file={cfg_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        *PROMETHEUS_FLAGS,
        *extra_flags,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                output = (workdir / "prometheus.log").read_text()
                raise RuntimeError(f"prometheus exited with {proc.returncode}: {output}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def api(
    base_url: str, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]], *, method: str = "POST"
) -> Any:
    """Call a Prometheus HTTP API endpoint; returns ``data`` or raises :class:`PromQLError`.

    POST (form body) where the API allows it, so long expressions never hit URL length limits.
    """
    encoded = urllib.parse.urlencode(params)
    if method == "GET":
        req = urllib.request.Request(f"{base_url}{path}?{encoded}" if encoded else f"{base_url}{path}")
    else:
        req = urllib.request.Request(f"{base_url}{path}", data=encoded.encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc = json.load(resp)
    except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
        try:
            doc = json.load(exc)
        except ValueError:
            raise PromQLError(f"HTTP {exc.code} from {path}") from exc
    if doc.get("status") != "success":
        raise PromQLError(f"{doc.get('errorType')}: {doc.get('error')}")
    return doc["data"]


def instant_query(base_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Evaluate ``expr`` at ``at`` (default now); returns the result list (empty = no data)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api(base_url, "/api/v1/query", params)
    result = data["result"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return result


def instant_value(base_url: str, expr: str, at: float | None = None) -> float | None:
    """The single number ``expr`` yields, ``None`` when there is no data; several series are an error."""
    result = instant_query(base_url, expr, at)
    if not result:
        return None
    if len(result) > 1:
        raise PromQLError(f"expected one series, got {len(result)}: {expr}")
    sample = result[0]
    if "value" not in sample:
        raise PromQLError(f"expected a float sample, got a histogram: {expr}")
    value = float(sample["value"][1])
    return None if math.isnan(value) else value


def series_names(base_url: str) -> list[str]:
    """Every metric name Prometheus holds."""
    return list(api(base_url, "/api/v1/label/__name__/values", {}, method="GET"))


_VAR = re.compile(r"\$(__range|__rate_interval|__interval|testid)\b")


def expand_grafana_variables(expr: str, *, range_: str = "5m", rate_interval: str = "1m", testid: str = ".*") -> str:
    """Substitute the Grafana variables the dashboards use, as Grafana would before sending a query."""
    values = {"__range": range_, "__rate_interval": rate_interval, "__interval": rate_interval, "testid": testid}
    return _VAR.sub(lambda m: values[m.group(1)], expr)
