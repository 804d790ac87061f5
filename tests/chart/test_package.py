"""The packaged chart (what `helm package` produces and users install) carries everything the
templates read, and installs the same manifests as the chart directory."""

from __future__ import annotations

import tarfile
from pathlib import Path

import helm_python as helm

from .conftest import CHART_DIR, NAMESPACE, RELEASE, render_install


def test_packaged_chart_installs_the_same_manifests(tmp_path: Path) -> None:
    archive = Path(helm.package(CHART_DIR, destination=tmp_path))
    assert archive.name == "mailplane-0.1.0.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for needed in ("mailplane/Chart.yaml", "mailplane/values.yaml", "mailplane/values.schema.json",
                   "mailplane/README.md", "mailplane/templates/NOTES.txt",
                   "mailplane/files/rules.yaml", "mailplane/files/dashboard.json",
                   "mailplane/files/crds/mailplane.io_smtprelays.yaml"):
        assert needed in names
    assert not [n for n in names if n.startswith("mailplane/ci/")], ".helmignore drops ci/"

    values = {"monitoring": {"prometheusRule": {"enabled": True}}}
    cfg = helm.Config(storage_driver="memory", namespace=NAMESPACE)
    try:
        with helm.Chart.load(archive) as chart:
            release = cfg.install(chart, RELEASE, values, dry_run="client", namespace=NAMESPACE)
    finally:
        cfg.close()
    assert release["manifest"] == render_install(values).manifest
