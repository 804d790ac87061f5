"""Metrics of a worker process (prometheus_client's multiprocess mode) without a getpid call per
update: each process still writes only its own files, also a child forked after metrics exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = r"""
import json, os, sys
from prometheus_client import CollectorRegistry, multiprocess
from mailplane_relay.metrics import RelayMetrics, process_id

metrics = RelayMetrics.create()
metrics.rejected.labels(reason="size").inc(2)
metrics.spool_commit_latency.observe(0.001)
child = os.fork()
if child == 0:
    # The child's updates go to files of its own, never into the parent's.
    metrics.rejected.labels(reason="size").inc(5)
    metrics.spool_commit_latency.observe(0.001)
    os._exit(0 if process_id() == os.getpid() else 3)
_, status = os.waitpid(child, 0)
metrics.rejected.labels(reason="size").inc(1)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
print(json.dumps({
    "parent": os.getpid(), "child": child, "status": status,
    "total": registry.get_sample_value("mailplane_relay_rejected_total", {"reason": "size"}),
    "count": registry.get_sample_value("mailplane_relay_spool_commit_seconds_count"),
}))
"""


def test_a_forked_child_writes_its_own_files_and_the_sums_hold(tmp_path: Path) -> None:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["status"] == 0, "the child's process id was not renewed after the fork"
    files = {p.name for p in tmp_path.iterdir()}
    assert f"counter_{result['parent']}.db" in files
    assert f"counter_{result['child']}.db" in files
    assert f"histogram_{result['child']}.db" in files
    # 2 + 1 in the parent, 5 in the child: nothing lost, nothing written twice.
    assert result["total"] == 8.0
    assert result["count"] == 2.0
