"""The relay's small state files (revocations, rotations, drain order, MTA-STS cache) are
replaced whole, readable by the relay's user only, and leave no temporary file behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailplane_relay.files import replace_durably


def test_a_replaced_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "rotations.json"
    old = os.umask(0)
    try:
        replace_durably(target, b'{"a": 1}')
        replace_durably(target, b'{"a": 2}')
    finally:
        os.umask(old)
    assert target.read_bytes() == b'{"a": 2}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rotations.json"]


def test_a_failed_replace_keeps_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "drain-order.json"
    replace_durably(target, b"old")
    (tmp_path / "blocker").mkdir()
    with pytest.raises(OSError):
        replace_durably(tmp_path / "blocker", b"new")  # a directory cannot be replaced by a file
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "drain-order.json"]


def test_a_temporary_file_a_crash_left_with_a_wide_mode_is_not_reused_readable(
        tmp_path: Path) -> None:
    target = tmp_path / "revocations.json"
    stale = tmp_path / f".revocations.json.{os.getpid()}.tmp"
    stale.write_bytes(b"stale")
    stale.chmod(0o644)
    replace_durably(target, b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not stale.exists()
