"""Write a ``Pulumi.<stack>.yaml`` from a :class:`StackConfig`, every key with its description as a comment.

The stack files are the documentation of every knob (like Ansible's group_vars), so they are
generated from the schema rather than written by hand: ``python -m common.stackfile`` rewrites
``Pulumi.dev.yaml`` (all defaults), ``Pulumi.kind.yaml`` (:data:`KIND_OVERRIDES`), ``Pulumi.k3d.yaml``
(:data:`K3D_OVERRIDES`) and ``Pulumi.eks.yaml`` (:data:`EKS_OVERRIDES`), and a test fails when any drifts
from the schema.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel

from common.stackconfig import PROJECT, StackConfig, stack_file

_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "null", "y", "n", "~"}
SECRETS_NOTE = (
    "# Secrets are set with `pulumi config set --secret` (databaseUrl, redisUrl, llmApiKey) "
    "and never written here in plain text."
)
HEADERS = {
    "dev": [
        "# Stack `dev`: every knob of loadproof with its default and what it does (like Ansible group_vars).",
        "# `make demo` reads this same file (STACK=dev); `pulumi up` on stack `dev` too, on a cluster of real",
        "# nodes (its requests do not fit kind on a 4-CPU Docker VM: use stack `kind` there, docs/cluster.md).",
        SECRETS_NOTE,
    ],
    "kind": [
        "# Stack `kind`: a laptop kind cluster (infra/kind-cluster.yaml). Small requests, one k6 runner,",
        "# ingress-nginx installed on the node kind maps ports 80/443 to, the `smoke` profile,",
        "# Grafana on http://grafana.127.0.0.1.nip.io/ (see readme: cluster path).",
        SECRETS_NOTE,
    ],
    "k3d": [
        "# Stack `k3d`: a laptop k3d (k3s) cluster. Sized like `kind`, but k3s's own Traefik serves the Ingress",
        "# (ingress-nginx's hostPorts would collide with its svclb pods), and the Grafana NetworkPolicy admits",
        "# Traefik's pods in kube-system (k3s enforces NetworkPolicies). Steps: docs/cluster-kind-k3d.md.",
        SECRETS_NOTE,
    ],
    "eks": [
        "# Stack `eks`: an example for Amazon EKS. Sizes are the defaults (real nodes); what differs:",
        "# * PVCs use StorageClass `gp3`. EKS provisions no EBS volume without the EBS CSI driver, and a new",
        "#   cluster need not have a default class: install the `aws-ebs-csi-driver` add-on with an IAM role",
        "#   holding AmazonEBSCSIDriverPolicy (IRSA or EKS Pod Identity), then create the class: provisioner",
        "#   ebs.csi.aws.com, parameters.type gp3, volumeBindingMode WaitForFirstConsumer (docs/cluster.md).",
        "#   Without them the PVCs stay Pending and `pulumi up` waits on Postgres until it times out.",
        "# * kubeContext `loadproof-eks`: `aws eks update-kubeconfig --name <cluster> --alias loadproof-eks`.",
        "# * image: push the service image to a registry the nodes can pull from (ECR) and put its name here",
        "#   (the account and region below are placeholders).",
        "# * No ingress controller is installed (the bundled ingress-nginx is the kind flavour, hostPorts): install",
        "#   one for class `nginx` in `ingressNamespace`; `pulumi up` does not wait for its address",
        "#   (output `grafana_ingress`).",
        SECRETS_NOTE,
    ],
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; an empty map replaces (that is how an override clears a map key such as a node selector)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


KIND_OVERRIDES: dict[str, Any] = {
    "kubeContext": "kind-loadproof",  # `kind create cluster --name loadproof` names the context so
    "baseline": {
        "quotaCpu": "8",
        "quotaMemory": "12Gi",
        "quotaCpuLimits": "16",
        "quotaMemoryLimits": "12Gi",
        "ingressController": True,
        # kind's node (infra/kind-cluster.yaml) carries ingress-ready=true: the default node selector fits.
    },
    "postgres": {
        "storage": "1Gi",
        # 3+1 API pods and 1+1 workers need 184; 220 also covers KEDA's 2+1 worker pods (workers.autoscaling).
        "maxConnections": 220,
        "resources": {"cpuRequest": "100m", "cpuLimit": "1", "memoryRequest": "128Mi", "memoryLimit": "512Mi"},
    },
    "redis": {"resources": {"cpuRequest": "50m", "cpuLimit": "500m", "memoryRequest": "64Mi", "memoryLimit": "384Mi"}},
    "orchestrator": {
        "replicas": 1,
        # Smaller pools so that 3+1 API pods, the workers and the report fit maxConnections.
        "dbPoolSize": 10,
        "dbMaxOverflow": 20,
        "autoscale": {"minReplicas": 1, "maxReplicas": 3},
        "resources": {"cpuRequest": "250m", "cpuLimit": "1", "memoryRequest": "128Mi", "memoryLimit": "512Mi"},
    },
    # Off, but sized so that turning it on fits this stack's quota (limits.cpu) and maxConnections.
    "workers": {"replicas": 1, "autoscaling": {"maxReplicas": 2}},
    "monitoring": {
        "prometheus": {
            "storage": "2Gi",
            "resources": {"cpuRequest": "100m", "cpuLimit": "1", "memoryRequest": "256Mi", "memoryLimit": "1Gi"},
        },
        "grafana": {"host": "grafana.127.0.0.1.nip.io"},
    },
    "loadtest": {
        "runners": 1,
        "profile": "smoke",
        "drainS": 30,
        "runnerResources": {"cpuRequest": "250m", "cpuLimit": "1", "memoryRequest": "128Mi", "memoryLimit": "512Mi"},
    },
}


# k3d: the kind sizes; Traefik (k3s's bundled ingress controller, in kube-system) instead of ingress-nginx.
K3D_OVERRIDES: dict[str, Any] = _merge(
    KIND_OVERRIDES,
    {
        "baseline": {
            "ingressController": False,
            "ingressNamespace": "kube-system",
            "ingressPodSelector": {"app.kubernetes.io/name": "traefik"},
            "ingressNodeSelector": {},
        },
        "monitoring": {"grafana": {"ingressClass": "traefik"}},
        "kubeContext": "k3d-loadproof",  # `k3d cluster create loadproof`
    },
)

# EKS: the default sizes; gp3 volumes through the EBS CSI driver, an image from a registry, a pinned context.
EKS_STORAGE_CLASS = "gp3"
EKS_OVERRIDES: dict[str, Any] = {
    "kubeContext": "loadproof-eks",
    "image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/loadproof:dev",
    "baseline": {"ingressController": False, "ingressNodeSelector": {}},
    "postgres": {"storageClass": EKS_STORAGE_CLASS},
    "redis": {"storageClass": EKS_STORAGE_CLASS},
    "monitoring": {"prometheus": {"storageClass": EKS_STORAGE_CLASS}},
}
OVERRIDES: dict[str, dict[str, Any]] = {"dev": {}, "kind": KIND_OVERRIDES, "k3d": K3D_OVERRIDES, "eks": EKS_OVERRIDES}


def config_for(stack: str) -> StackConfig:
    base = StackConfig().model_dump(mode="json", by_alias=True)
    return StackConfig.model_validate(_merge(base, OVERRIDES[stack]))


def scalar(value: object) -> str:
    """A YAML scalar that reads back as the same type (quoted when YAML would reinterpret it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if text == "":
        return '""'
    risky = any(ch in text for ch in ":#{}[],&*?|<>=!%@`'\"") or text.strip() != text
    looks_typed = text.lower() in _YAML_WORDS or text.replace(".", "", 1).isdigit()
    return json.dumps(text) if risky or looks_typed else text


def _emit(model: BaseModel, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        desc = field.description or ""
        if isinstance(value, BaseModel):
            lines += [f"{pad}# {desc}", f"{pad}{key}:"]
            _emit(value, indent + 1, lines)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            lines += [f"{pad}# {desc}", f"{pad}{key}:"]
            for sub_key, sub in value.items():
                lines.append(f"{pad}  {sub_key}:")
                _emit(sub, indent + 2, lines)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            lines += [f"{pad}# {desc}", f"{pad}{key}:"]
            for item in value:
                for i, (n2, f2) in enumerate(type(item).model_fields.items()):
                    lines.append(f"{pad}  {'- ' if i == 0 else '  '}{f2.alias or n2}: {scalar(getattr(item, n2))}")
        elif isinstance(value, dict):
            body = ", ".join(f"{scalar(k)}: {scalar(v)}" for k, v in value.items())
            lines.append(f"{pad}{key}: {{{body}}}  # {desc}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(scalar(v) for v in value)}]  # {desc}")
        else:
            lines.append(f"{pad}{key}: {scalar(value)}  # {desc}")


def render(cfg: StackConfig, header: list[str]) -> str:
    lines = [*header, "config:"]
    for name, field in StackConfig.model_fields.items():
        key = field.alias or name
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            lines += [f"  # {field.description}", f"  {PROJECT}:{key}:"]
            _emit(value, 2, lines)
        else:
            lines.append(f"  {PROJECT}:{key}: {scalar(value)}  # {field.description}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the commented stack files from the schema.")
    parser.add_argument("stacks", nargs="*", default=sorted(HEADERS))
    for stack in parser.parse_args(argv).stacks:
        stack_file(stack).write_text(render(config_for(stack), HEADERS[stack]))
        print(f"wrote {stack_file(stack)}")


if __name__ == "__main__":
    main()
