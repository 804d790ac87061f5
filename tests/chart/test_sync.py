"""The chart's copies of the CRDs, rules and dashboard are byte-identical to their sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import CHART_DIR, ROOT


def test_chart_copies_are_in_sync() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync-chart"), "--check"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_every_crd_has_a_copy() -> None:
    sources = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert len(sources) == 4
    copies = sorted(p.name for p in (CHART_DIR / "files" / "crds").glob("*.yaml"))
    assert copies == sources
    for name in sources:
        assert (CHART_DIR / "files" / "crds" / name).read_bytes() == (
            ROOT / "crds" / name).read_bytes()


def test_check_mode_notices_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    """On a copy of the tree, so a parallel test never sees the drifted file."""
    for rel in ("scripts/sync-chart", "crds", "monitoring", "charts/mailplane/files"):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    script = [sys.executable, str(tmp_path / "scripts" / "sync-chart")]
    (tmp_path / "charts/mailplane/files/rules.yaml").write_text("groups: []\n")
    (tmp_path / "charts/mailplane/files/crds/mailplane.io_old.yaml").write_text("{}\n")

    r = subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "out of date: charts/mailplane/files/rules.yaml" in r.stderr
    assert "stale copy: charts/mailplane/files/crds/mailplane.io_old.yaml" in r.stderr

    assert subprocess.run(script, capture_output=True, timeout=30).returncode == 0
    assert subprocess.run([*script, "--check"], capture_output=True, timeout=30).returncode == 0
    assert (tmp_path / "charts/mailplane/files/rules.yaml").read_bytes() == (
        ROOT / "monitoring" / "rules.yaml").read_bytes()
