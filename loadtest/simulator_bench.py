"""How much the LLM simulator costs and whether it follows its latency model under load.

``python -m loadtest.simulator_bench --calls 4000 --concurrency 400 --batch 1 --knee 10000``

Starts its own simulator process on a free port, drives it with a minimal HTTP/1.1 keep-alive client
on raw asyncio streams (one connection per concurrent caller; a full HTTP client library costs more
CPU than the simulator at hundreds of connections and would measure itself), and prints one JSON
line: throughput, client-observed latency percentiles, the latency the model predicts for the mean
token count, and the simulator's own CPU seconds per call (from ``/proc``). Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service import prompts
from service.llm import LLMItem

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _caller(port: int, jobs: list[int], batch: int, latencies: list[float], tokens: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while jobs:
            i = jobs.pop()
            items = [LLMItem(f"bench-{i}-{k}", f"persona-{k}", f"topic {i}/{k}") for k in range(batch)]
            body = json.dumps({"model": "gpt-4o-mini", "messages": prompts.build_messages(items, "v1")}).encode()
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(head + body)
            response_head = await reader.readuntil(b"\r\n\r\n")
            if not response_head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {response_head[:80]!r}")
            length = next(
                int(line.split(b":", 1)[1])
                for line in response_head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            doc = json.loads(await reader.readexactly(length))
            latencies.append(time.perf_counter() - started)
            tokens.append(doc["usage"]["completion_tokens"])
    finally:
        writer.close()


async def _drive(port: int, calls: int, concurrency: int, batch: int) -> tuple[float, list[float], list[int]]:
    jobs = list(range(calls))
    latencies: list[float] = []
    tokens: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*(_caller(port, jobs, batch, latencies, tokens) for _ in range(concurrency)))
    return time.perf_counter() - started, sorted(latencies), tokens


def run(calls: int, concurrency: int, batch: int, env: dict[str, str]) -> dict[str, Any]:
    port = _free_port()
    proc_env = {**os.environ, **env, "LOADPROOF_SIM_HOST": "127.0.0.1", "LOADPROOF_SIM_PORT": str(port)}
    proc_env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "service.simulator"], env=proc_env, cwd=ROOT)
    try:
        for _ in range(400):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError("simulator exited during startup")
            time.sleep(0.05)
        cpu_before = _cpu_seconds(proc.pid)
        wall, latencies, tokens = asyncio.run(_drive(port, calls, concurrency, batch))
        cpu = _cpu_seconds(proc.pid) - cpu_before
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    cfg = stats["config"]
    mean_tokens = sum(tokens) / len(tokens)
    return {
        "calls": calls,
        "concurrency": concurrency,
        "batch": batch,
        "knee": cfg["concurrency_knee"],
        "wall_s": round(wall, 2),
        "calls_per_s": round(calls / wall, 1),
        "latency_p50_s": round(_percentile(latencies, 0.50), 3),
        "latency_p95_s": round(_percentile(latencies, 0.95), 3),
        "model_mean_s_without_load": round((cfg["ttft_ms"] + cfg["itl_ms"] * mean_tokens) / 1000, 3),
        "mean_completion_tokens": round(mean_tokens, 1),
        "max_inflight": stats["max_inflight"],
        "sim_cpu_s": round(cpu, 2),
        "sim_cpu_ms_per_call": round(cpu / calls * 1000, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.simulator_bench", description="Benchmark the LLM simulator."
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="items per call")
    parser.add_argument("--knee", type=int, default=None, help="override LOADPROOF_SIM_CONCURRENCY_KNEE")
    args = parser.parse_args(argv)
    env = {} if args.knee is None else {"LOADPROOF_SIM_CONCURRENCY_KNEE": str(args.knee)}
    print(json.dumps(run(args.calls, args.concurrency, args.batch, env)))


if __name__ == "__main__":
    main()
