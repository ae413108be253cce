"""``make serve``: the local stack in the foreground, supervised, until Ctrl-C / SIGTERM.

    python -m localstack.serve [--stack dev] [--port 8080] [--status-file PATH]

A crashed API or worker process (or Postgres, Redis, the simulator) is restarted with backoff and the
restart is printed with its exit status, from its first second: one that dies while the stack starts
is restarted the same way and the start waits for it; ``status.json`` in the stack's work dir (or
``--status-file``) holds every process's pid, state and restart count, rewritten every second. A
crash loop stops the stack with exit code 1 and the failing process's log tail; a part that never
comes up ends it with exit code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common.stackconfig import load
from localstack.process import free_port, port_is_free
from localstack.reaper import reaper
from localstack.stack import LocalStack
from localstack.supervisor import CrashLoop

SIMULATOR_PORT = 8090


def write_status(stack: LocalStack, path: Path) -> None:
    ports = {
        "orchestrator": stack.orchestrator.port if stack.orchestrator else None,
        "simulator": stack.simulator.port,
        "postgres": stack.postgres.port,
        "redis": stack.redis.port,
        **{w.name: w.metrics_port for w in stack.workers},
    }
    status: dict[str, object] = {"api": stack.orchestrator_url, "ports": ports, "parts": {}}
    if stack.supervisor is not None:
        status["parts"] = stack.supervisor.status()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    tmp.replace(path)  # readers never see half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("LOADPROOF_PORT", "8080")))
    parser.add_argument("--simulator-port", type=int, default=None)
    parser.add_argument("--status-file", type=Path, default=None)
    args = parser.parse_args(argv)

    cfg = load(args.stack)
    if not port_is_free(args.port):
        return _fail(f"port {args.port} is busy; pass --port or set LOADPROOF_PORT to another port")
    sim_port = args.simulator_port or SIMULATOR_PORT
    if not port_is_free(sim_port):
        moved = free_port()
        print(f"  note: port {sim_port} is busy (another simulator?); the simulator uses {moved}", flush=True)
        sim_port = moved

    def progress(name: str, seconds: float) -> None:
        print(f"  {name:<14} ready in {seconds:5.2f}s", flush=True)

    print(f"loadproof: starting the local stack (stack {args.stack!r})", flush=True)
    stack = LocalStack(
        cfg.service_env(),
        workers=max(1, cfg.workers.processes),
        orchestrator_port=args.port,
        simulator_port=sim_port,
        simulator_env=cfg.simulator_env(),
        durable_postgres=True,
        progress=progress,
        handle_signals=True,
        supervise=True,
    )
    reaper().remove_on_death(str(stack.workdir))  # killed outright: the watchdog removes the data too
    status_file = args.status_file or stack.workdir / "status.json"
    code, started = 0, False
    try:
        with stack:
            started = True
            print(f"\n  API            {stack.orchestrator_url}  (docs: {stack.orchestrator_url}/docs)")
            print(f"  metrics        {stack.orchestrator_url}/metrics")
            print(f"  LLM simulator  {stack.simulator_url}  (stats: {stack.simulator_url}/stats)")
            for w in stack.workers:
                print(f"  {w.name:<14} {w.metrics_url}")
            print(f"  postgres       {stack.postgres.url}")
            print(f"  redis          {stack.redis.url}")
            print(f"  status         {status_file}  (pids, restarts)")
            print(f"  logs           {stack.workdir / 'logs'}\n\nCtrl-C to stop.", flush=True)
            try:
                while True:
                    write_status(stack, status_file)
                    stack.check_alive()
                    time.sleep(1.0)
            except CrashLoop as exc:
                print(f"\n{exc}\n{exc.log_tail}", file=sys.stderr, flush=True)
                code = 1
            except KeyboardInterrupt:
                print("\nstopping...", flush=True)
            finally:
                restarts = {k: v for k, v in stack.restarts().items() if v}
                stack.cleanup()  # stops in reverse order, then removes the temp data
    except (RuntimeError, TimeoutError) as exc:  # a part never came up (a crash loop while starting included)
        if started:
            raise
        print(f"\nthe local stack did not start: {exc}", file=sys.stderr, flush=True)
        stack.cleanup()
        return 3
    print(f"stopped. restarts: {restarts or 'none'}")
    return code


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
