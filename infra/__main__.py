"""Pulumi entry point (``main: infra/`` in Pulumi.yaml): deploy loadproof, run the test, export the results."""

from __future__ import annotations

import sys
from pathlib import Path

# Pulumi runs this directory as a script, which puts infra/ itself first on sys.path; there its
# modules would shadow real packages (infra/redis.py vs redis, infra/loadtest.py vs loadtest).
# Import everything from the repo root instead, as the tests and `make manifests` do.
_INFRA = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _INFRA]
sys.path.insert(0, str(_INFRA.parent))

import pulumi  # noqa: E402

from infra.program import deploy, read_config  # noqa: E402

cfg, secrets = read_config()
for key, value in deploy(cfg, secrets).items():
    pulumi.export(key, value)
