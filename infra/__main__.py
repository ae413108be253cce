"""Pulumi entry point (``main: infra/`` in Pulumi.yaml): deploy loadproof, run the test, export the results."""

from __future__ import annotations

import sys
from pathlib import Path

# Pulumi runs this file as a script; the repo root makes `infra`, `service`, `loadtest`, `dashboards` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi

from infra.program import deploy, read_config

cfg, secrets = read_config()
for key, value in deploy(cfg, secrets).items():
    pulumi.export(key, value)
