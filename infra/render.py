"""Evaluate the Pulumi program offline and turn it into validated Kubernetes manifests.

``python -m infra.render --stack dev`` (``make manifests STACK=dev``) runs ``infra/program.py`` under
``pulumi.runtime.set_mocks`` (no Pulumi CLI, no cluster), records the inputs of every resource the
program registers, and writes each Kubernetes object to ``build/manifests/<stack>/NN-<kind>-<name>.yaml``
and the Kubernetes provider every one of them uses to ``provider.json`` there.
Then it checks them the way a cluster would, as far as that is possible offline:

* every object against the Kubernetes OpenAPI schema (``kubernetes-validate``, strict: unknown
  fields are errors) for each version in :data:`K8S_VERSIONS`; custom resources (KEDA's), which it
  does not know, against the schema of their CRD in ``infra/crds.py``, just as strictly;
* the Prometheus ConfigMap with ``promtool check config`` / ``check rules``;
* the k6 script from its ConfigMap with ``k6 inspect``, using the runner Job's own environment;
* every Kubernetes resource (Helm releases and reads included) goes through the stack's one explicit
  Kubernetes provider (``infra.program.kubernetes_provider``), never Pulumi's default one.

Exit status is non-zero, with every problem listed, if anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pulumi
import yaml
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor

from common import prometheus_config as pc
from common.stackconfig import PROJECT, REPO_ROOT, SECRET_KEYS, StackConfig, load, stack_file
from common.tools import tool
from infra import crds
from infra.program import PROVIDER_NAME, deploy, read_config

K8S_VERSIONS = ("1.29.0", "1.33.0")
# Stand-ins for secret config and generated passwords: tests scan every non-Secret object for them.
MOCK_SECRETS = {
    "databaseUrl": "postgresql+psycopg://ext:mock-secret-database-url@db.example.com:5432/loadproof",
    "redisUrl": "rediss://:mock-secret-redis-url@redis.example.com:6380/0",
    "llmApiKey": "sk-mock-secret-llm-api-key",
}
MOCK_RUN_HEX = "1a2b3c4d"
K8S_PROVIDER_TYPE = "pulumi:providers:kubernetes"
PROVIDER_FILE = "provider.json"  # next to the manifests: the stack's provider, its inputs, what it manages
# What the mock cluster answers for the API server's EndpointSlice (kind's node address and port).
MOCK_API_SERVER = {"address": "172.18.0.2", "port": 6443}
KIND_ORDER = (
    "Namespace",
    "ResourceQuota",
    "LimitRange",
    "NetworkPolicy",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "StatefulSet",
    "Deployment",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "TriggerAuthentication",
    "ScaledObject",
    "Ingress",
    "Job",
)


def mock_password(name: str) -> str:
    return f"mock-password-{name}"


def mock_report(test_id: str, profile: str) -> dict[str, Any]:
    """What the fake report ConfigMap holds: clearly fake numbers, never shown as measured."""
    from common.outputs import STACK_OUTPUTS

    doc: dict[str, Any] = dict.fromkeys(STACK_OUTPUTS, None)
    doc.update({"test_id": test_id, "profile": profile, "mock": True})
    return doc


def mock_api_server_slice() -> dict[str, Any]:
    """The ``default/kubernetes`` EndpointSlice as the API server publishes it (one control-plane node)."""
    return {
        "addressType": "IPv4",
        "endpoints": [{"addresses": [MOCK_API_SERVER["address"]], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": MOCK_API_SERVER["port"], "protocol": "TCP"}],
    }


@dataclass
class Recorded:
    typ: str
    name: str
    inputs: dict[str, Any]


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    """Records every registered resource's inputs and answers like a cooperative provider."""

    profile: str = "demo"
    resources: list[Recorded] = field(default_factory=list)
    reads: list[tuple[str, str]] = field(default_factory=list)  # (type, id)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        if args.resource_id:  # a read (`.get`): the API server's EndpointSlice, or the report ConfigMap
            with self.lock:
                self.reads.append((args.typ, args.resource_id))
            ns, _, name = args.resource_id.partition("/")
            metadata = {"name": name, "namespace": ns}
            if args.typ == "kubernetes:discovery.k8s.io/v1:EndpointSlice":
                return args.resource_id, self.output_state(args, {"metadata": metadata, **mock_api_server_slice()})
            data = {"report.json": json.dumps(mock_report(f"lp-{MOCK_RUN_HEX}", self.profile))}
            return args.resource_id, {"metadata": metadata, "data": data}
        with self.lock:
            self.resources.append(Recorded(args.typ, args.name, args.inputs))
        state: dict[str, Any] = dict(args.inputs)
        if args.typ == "random:index/randomPassword:RandomPassword":
            state["result"] = mock_password(args.name)
        elif args.typ == "random:index/randomId:RandomId":
            state.update({"hex": MOCK_RUN_HEX, "b64Url": "GivDTQ", "b64Std": "GivDTQ==", "dec": "439041101"})
        elif args.typ in ("kubernetes:core/v1:Service", "kubernetes:networking.k8s.io/v1:Ingress"):
            state["status"] = {"loadBalancer": {"ingress": [{"ip": "10.0.0.10"}]}}
        state = self.output_state(args, state)
        return f"{args.name}-id", state

    def output_state(self, args: pulumi.runtime.MockResourceArgs, state: dict[str, Any]) -> dict[str, Any]:
        """Hook for tests that need a provider to answer differently."""
        return state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return {}, None


class RecordingMonitor(MockMonitor):
    """Also records each registration's dependencies (URNs), which ``Mocks.new_resource`` never sees."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.dependencies: dict[str, set[str]] = {}  # logical name -> URNs it waits for
        self.urns: dict[str, str] = {}  # logical name -> URN
        self.create_timeouts: dict[str, str] = {}  # logical name -> customTimeouts.create ("" = provider default)
        self.ignore_changes: dict[str, list[str]] = {}  # logical name -> ignoreChanges
        self.retained: set[str] = set()  # logical names registered with retainOnDelete
        self.providers: dict[str, str] = {}  # logical name -> provider reference ("<urn>::<id>"; "" = default)
        self.types: dict[str, str] = {}  # logical name -> resource type (registered or read)
        self.replace_with: dict[str, set[str]] = {}  # logical name -> URNs whose replacement replaces it

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        self.dependencies[request.name] = set(request.dependencies)
        self.urns[request.name] = response.urn
        self.create_timeouts[request.name] = request.customTimeouts.create
        self.ignore_changes[request.name] = list(request.ignoreChanges)
        self.providers[request.name] = request.provider
        self.types[request.name] = request.type
        self.replace_with[request.name] = set(request.replace_with)
        if request.retainOnDelete:
            self.retained.add(request.name)
        return response

    def ReadResource(self, request: Any) -> Any:
        response = super().ReadResource(request)
        self.dependencies[request.name] = set(request.dependencies)
        self.urns[request.name] = response.urn
        self.providers[request.name] = request.provider
        self.types[request.name] = request.type
        return response


@dataclass
class Evaluation:
    cfg: StackConfig
    outputs: dict[str, Any]
    mocks: RecordingMocks
    monitor: RecordingMonitor
    secret_outputs: set[str] = field(default_factory=set)  # stack outputs Pulumi stores encrypted

    def waits_for(self, name: str, other: str) -> bool:
        """Whether resource ``name`` was registered with a dependency on resource ``other`` (logical names)."""
        return self.monitor.urns[other] in self.monitor.dependencies[name]

    def replaced_with(self, name: str, other: str) -> bool:
        """Whether resource ``name`` was registered with ``replaceWith`` resource ``other`` (logical names)."""
        return self.monitor.urns[other] in self.monitor.replace_with.get(name, set())

    def create_timeout_s(self, name: str) -> float | None:
        """The ``customTimeouts.create`` of resource ``name`` in seconds; None when unset."""
        text = self.monitor.create_timeouts.get(name, "")
        if not text:
            return None
        units = {"s": 1, "m": 60, "h": 3600}
        return float(text[:-1]) * units[text[-1]]

    def manifests(self) -> list[dict[str, Any]]:
        return manifests(self.mocks.resources)

    def provider_inputs(self) -> dict[str, Any]:
        """The inputs of the stack's Kubernetes provider (e.g. ``context``)."""
        (found,) = [r for r in self.mocks.resources if r.typ == K8S_PROVIDER_TYPE and r.name == PROVIDER_NAME]
        return to_plain(found.inputs)

    def default_provider_users(self) -> list[str]:
        """Kubernetes resources (registered or read) not bound to the stack's explicit provider; [] = none."""
        own = self.monitor.urns[PROVIDER_NAME]
        return sorted(
            name
            for name, ref in self.monitor.providers.items()
            if self.monitor.types[name].startswith("kubernetes:") and not ref.startswith(f"{own}::")
        )


def config_values(cfg: StackConfig) -> dict[str, str]:
    """The stack config as Pulumi hands it to a program: ``loadproof:key`` -> string (JSON for objects)."""
    dumped = cfg.model_dump(mode="json", by_alias=True)
    out: dict[str, str] = {}
    for key, value in dumped.items():
        if isinstance(value, dict | list):
            out[f"{PROJECT}:{key}"] = json.dumps(value)
        elif isinstance(value, bool):
            out[f"{PROJECT}:{key}"] = "true" if value else "false"
        else:
            out[f"{PROJECT}:{key}"] = str(value)
    return out


def evaluate(
    cfg: StackConfig,
    *,
    stack: str = "dev",
    secrets: dict[str, str] | None = None,
    mocks: RecordingMocks | None = None,
) -> Evaluation:
    """Run the program under mocks with ``cfg`` as its stack config; secrets default to :data:`MOCK_SECRETS`."""
    mocks = mocks or RecordingMocks(profile=cfg.loadtest.profile)
    values = config_values(cfg)
    secret_values = MOCK_SECRETS if secrets is None else secrets
    for key, value in secret_values.items():
        if key not in SECRET_KEYS:
            raise ValueError(f"unknown secret key {key!r}")
        values[f"{PROJECT}:{key}"] = value
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(values, secret_keys=[f"{PROJECT}:{k}" for k in secret_values])
    holder: dict[str, Any] = {}
    secret: set[str] = set()

    @pulumi.runtime.test
    def run() -> pulumi.Output[None]:
        parsed, secret_outputs = read_config()
        outputs = deploy(parsed, secret_outputs)

        async def secret_names() -> list[str]:
            return [k for k, v in outputs.items() if isinstance(v, pulumi.Output) and await v.is_secret()]

        return pulumi.Output.all(
            pulumi.Output.all(**outputs).apply(holder.update),
            pulumi.Output.from_input(secret_names()).apply(secret.update),
        ).apply(lambda _: None)

    run()
    return Evaluation(cfg=cfg, outputs=holder, mocks=mocks, monitor=monitor, secret_outputs=secret)


# ---------------------------------------------------------------------------- manifests


def _api_version_kind(typ: str) -> tuple[str, str] | None:
    """``kubernetes:apps/v1:Deployment`` -> (``apps/v1``, ``Deployment``); None for non-Kubernetes types."""
    parts = typ.split(":")
    if len(parts) != 3 or parts[0] != "kubernetes" or parts[1].startswith("helm.sh"):
        return None
    group_version = parts[1]
    if group_version.startswith("core/"):
        group_version = group_version[len("core/") :]
    return group_version, parts[2]


_SECRET_SIG: str = rpc._special_sig_key  # Pulumi's wire marker of a secret value


def _clean(value: Any) -> Any:
    """Mock inputs carry numbers as floats (integral ones become ints) and secrets wrapped (unwrapped)."""
    if isinstance(value, dict) and _SECRET_SIG in value and "value" in value:
        return _clean(value["value"])
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def to_plain(inputs: dict[str, Any]) -> dict[str, Any]:
    """Recorded inputs as plain data (ints for integral floats, secrets unwrapped)."""
    return _clean(inputs)


def to_manifest(rec: Recorded) -> dict[str, Any] | None:
    avk = _api_version_kind(rec.typ)
    if avk is None:
        return None
    body = _clean(rec.inputs)
    body["apiVersion"], body["kind"] = avk
    ordered = {"apiVersion": body.pop("apiVersion"), "kind": body.pop("kind"), "metadata": body.pop("metadata", {})}
    ordered.update(body)
    return ordered


def _sort_key(m: dict[str, Any]) -> tuple[int, str, str]:
    kind = m["kind"]
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return rank, m["metadata"].get("namespace", ""), m["metadata"].get("name", "")


def manifests(recorded: Iterable[Recorded]) -> list[dict[str, Any]]:
    """Kubernetes objects in apply order (namespace first, Jobs last), deterministic."""
    out = [m for m in (to_manifest(r) for r in recorded) if m is not None]
    return sorted(out, key=_sort_key)


def file_name(index: int, manifest: dict[str, Any]) -> str:
    return f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata'].get('name', 'unnamed')}.yaml"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (scripts, configs, dashboards in ConfigMaps) as ``|`` blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML falls back to quoting by itself when a block cannot carry the text exactly.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(obj: dict[str, Any]) -> str:
    """One object as YAML: keys sorted (the order kubectl prints), multi-line text as blocks."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, width=1000, allow_unicode=True)


def write(objects: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.yaml"):
        old.unlink()
    paths = []
    for i, obj in enumerate(objects):
        path = out_dir / file_name(i, obj)
        path.write_text(dump(obj), encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- checks


def validate(objects: list[dict[str, Any]], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Strict OpenAPI validation of every object (custom resources: their CRD's schema); returns problems
    (empty = valid)."""
    problems = []
    for obj in objects:
        if crds.is_custom(obj):
            problems += crds.validate(obj)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path) if hasattr(exc, "path") else ""
                problems.append(f"{obj['kind']}/{obj['metadata'].get('name')} (k8s {version}) {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{obj['kind']}/{obj['metadata'].get('name')} (k8s {version}): {exc}")
    return problems


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"].get("name") == name:
            return obj
    raise KeyError(f"no {kind}/{name} among the rendered objects")


def runner_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = [o for o in objects if o["kind"] == "Job" and o["spec"].get("completionMode") == "Indexed"]
    if len(jobs) != 1:
        raise KeyError(f"expected one Indexed (k6 runner) Job, found {len(jobs)}")
    return jobs[0]


def check_prometheus(objects: list[dict[str, Any]]) -> list[str]:
    data = find(objects, "ConfigMap", "prometheus-config")["data"]
    try:
        pc.promtool_check(data["prometheus.yml"], data.get(pc.RULES_FILE))
    except pc.PromtoolError as exc:
        return [f"promtool: {exc}"]
    return []


def check_k6(objects: list[dict[str, Any]]) -> list[str]:
    script = find(objects, "ConfigMap", "k6-script")["data"]["task.js"]
    job = runner_job(objects)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    with tempfile.TemporaryDirectory(prefix="loadproof-k6-inspect-") as tmp:
        path = Path(tmp) / "task.js"
        path.write_text(script)
        # `k6 inspect` does not pass the process environment to the script (`k6 run` does): use -e.
        flags = [arg for k in sorted(env) for arg in ("-e", f"{k}={env[k]}")]
        proc = subprocess.run(
            [tool("k6"), "inspect", *flags, str(path)],
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if proc.returncode != 0:
        return [f"k6 inspect failed:\n{proc.stdout}{proc.stderr}"]
    return []


def check_provider(evaluation: Evaluation) -> list[str]:
    """Every Kubernetes resource uses the stack's explicit provider (none falls back to the default one)."""
    return [f"{name}: not bound to provider {PROVIDER_NAME!r}" for name in evaluation.default_provider_users()]


def check_all(objects: list[dict[str, Any]]) -> list[str]:
    return validate(objects) + check_prometheus(objects) + check_k6(objects)


def render_stack(stack: str, out_root: Path) -> tuple[list[Path], list[str], list[str]]:
    """Write and check one stack's manifests; returns (files, problems, non-Kubernetes resources)."""
    cfg = load(stack)
    evaluation = evaluate(cfg, stack=stack)
    objects = evaluation.manifests()
    paths = write(objects, out_root / stack)
    others = sorted(
        f"{r.typ.rsplit(':', 1)[-1]} {r.name}"
        for r in evaluation.mocks.resources
        if _api_version_kind(r.typ) is None and not r.typ.startswith(("loadproof:", K8S_PROVIDER_TYPE))
    )
    provider = evaluation.provider_inputs()
    bound = sorted(n for n, t in evaluation.monitor.types.items() if t.startswith("kubernetes:"))
    doc = {"type": K8S_PROVIDER_TYPE, "name": PROVIDER_NAME, "inputs": provider, "resources": bound}
    (out_root / stack / PROVIDER_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    context = provider.get("context") or "(the kubeconfig's current context)"
    others.append(f"Provider {PROVIDER_NAME} with context {context}, used by every Kubernetes object ({PROVIDER_FILE})")
    return paths, check_all(objects) + check_provider(evaluation), others


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.render", description="Render and validate the Kubernetes manifests offline."
    )
    parser.add_argument("--stack", default="dev", help="reads Pulumi.<stack>.yaml")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "manifests")
    args = parser.parse_args(argv)
    if not stack_file(args.stack).exists():
        print(f"error: {stack_file(args.stack)} does not exist", file=sys.stderr)
        return 2
    paths, problems, others = render_stack(args.stack, args.out)
    print(f"wrote {len(paths)} manifests to {args.out / args.stack}")
    if others:
        print(f"not Kubernetes objects (managed by Pulumi, no manifest): {', '.join(others)}")
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(
        f"all valid: kubernetes-validate (strict, {', '.join(K8S_VERSIONS)}), CRD schemas (infra/crds.py), "
        "promtool, k6 inspect"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
