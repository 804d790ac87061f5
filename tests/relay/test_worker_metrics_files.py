"""The supervisor's /metrics reads its workers' metric files (prometheus_client multiprocess
mode) while workers start and stop: a file a starting worker has created but not sized yet, or
one the supervisor removed after the listing (a dead worker's gauges), is left out of that
scrape instead of failing it with a 500. Real files written by the library's own writer."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from mailplane_relay.metrics import WorkerFilesCollector


def write(path: Path, metric: str, sample: str, value: float,
          labels: dict[str, str] | None = None) -> None:
    """A worker's file, as the library's multiprocess values write it."""
    labels = labels or {}
    d = MmapedDict(str(path))
    d.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), "help"),
                  value, 0.0)
    d.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    # Two live workers' files.
    write(tmp_path / "counter_101.db", "mailplane_relay_x", "mailplane_relay_x_total", 3)
    write(tmp_path / "counter_102.db", "mailplane_relay_x", "mailplane_relay_x_total", 4)
    write(tmp_path / "gauge_livesum_101.db", "mailplane_relay_g", "mailplane_relay_g", 1,
          {"state": "suspended"})
    write(tmp_path / "gauge_livesum_102.db", "mailplane_relay_g", "mailplane_relay_g", 2,
          {"state": "suspended"})
    # A worker starting: its file exists and is still empty.
    (tmp_path / "histogram_103.db").touch()
    # A dead worker's gauge file, listed and then removed before it is read: a name that
    # lists and cannot be opened.
    os.symlink(tmp_path / "gone", tmp_path / "gauge_all_104.db")
    return tmp_path


def test_a_scrape_leaves_out_files_being_created_or_removed(state_dir: Path) -> None:
    registry = CollectorRegistry()
    WorkerFilesCollector(registry, path=str(state_dir))  # type: ignore[no-untyped-call]
    text = generate_latest(registry).decode()
    assert "mailplane_relay_x_total 7.0" in text
    assert 'mailplane_relay_g{state="suspended"} 3.0' in text


@pytest.mark.parametrize("left", ["histogram_103.db", "gauge_all_104.db"])
def test_the_library_collector_fails_on_the_same_files(state_dir: Path, left: str) -> None:
    """What the collector above protects against: each of the two files alone fails the
    library's collector (so a scrape would answer 500)."""
    for name in ("histogram_103.db", "gauge_all_104.db"):
        if name != left:
            os.unlink(state_dir / name)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(state_dir))  # type: ignore[no-untyped-call]
    with pytest.raises((struct.error, FileNotFoundError)):
        generate_latest(registry)
