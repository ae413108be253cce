"""The top-level packages import one way only:
service < common < policy < dashboards < localstack < loadtest < infra.

``infra`` (the Pulumi program) is the top and composes the rest; what the local demo and the cluster
share lives in ``common``; ``service`` imports none of the others. ``policy`` (the Pulumi policy pack)
sits above ``common`` but in fact imports nothing of ours either: Pulumi runs it as a script with only
``policy/`` on ``sys.path``. Every import counts, including the ones inside functions, so a cycle
cannot hide in a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

from common.stackconfig import REPO_ROOT

LAYERS = ["service", "common", "policy", "dashboards", "localstack", "loadtest", "infra"]
ALLOWED = {pkg: set(LAYERS[: i + 1]) for i, pkg in enumerate(LAYERS)}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & set(LAYERS)


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = {pkg: {} for pkg in LAYERS}
    for pkg in LAYERS:
        for path in sorted((REPO_ROOT / pkg).rglob("*.py")):
            for dep in imported_packages(path) - {pkg}:
                graph[pkg].setdefault(dep, []).append(str(path.relative_to(REPO_ROOT)))
    return graph


def test_every_top_level_package_is_in_a_layer() -> None:
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS), "place the new package in LAYERS (and docs/architecture.md)"


def test_packages_import_only_downwards() -> None:
    graph = package_graph()
    upward = [
        f"{pkg} -> {dep} ({', '.join(files)})"
        for pkg, deps in graph.items()
        for dep, files in deps.items()
        if dep not in ALLOWED[pkg]
    ]
    assert upward == [], "imports against the layering:\n" + "\n".join(upward)


def test_service_imports_nothing_of_ours() -> None:
    assert package_graph()["service"] == {}


def test_policy_pack_imports_nothing_of_ours() -> None:
    """Run by Pulumi with only ``policy/`` on ``sys.path`` and pulumi-policy installed: ``common`` would
    be allowed by the layering but is not importable there."""
    assert package_graph()["policy"] == {}


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def late():\n    from infra.program import deploy\nimport common.tools\n")
    assert imported_packages(f) == {"infra", "common"}
