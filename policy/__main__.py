"""The policy pack's entry point, run by Pulumi: ``pulumi preview --policy-pack policy/``.

Pulumi runs this directory as a script (``runpy.run_path``), which puts ``policy/`` itself first on
``sys.path``: ``rules`` is imported from there, and nothing else of the repository is importable (the
pack depends on ``pulumi-policy`` alone, see requirements.txt). Tests import ``policy.rules`` instead.
"""

from pulumi_policy import PolicyPack
from rules import MANDATORY, PACK_NAME, policies

PolicyPack(
    name=PACK_NAME,
    enforcement_level=MANDATORY,
    policies=policies(),
    description="loadproof cluster security: non-root, read-only root fs, limits, no plaintext secrets, "
    "Prometheus unexposed, Grafana anonymous access opt-in and Viewer-only, NetworkPolicies for every workload.",
)
