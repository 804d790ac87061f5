"""The platform's erasure (``mailplane erase``) against the portal's own tables in the same store:
the audit log of every namespace names the address no longer (privacy policy §7), on both
backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailplane_portal.records import Records
from mailplane_relay.store import SqliteBackend, StoreBackend
from mailplane_relay.store.erasure import erase_address


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest,
                tmp_path: Path) -> AsyncIterator[tuple[StoreBackend, Records]]:
    backend: StoreBackend
    if request.param == "sqlite":
        path = str(tmp_path / "messagelog.sqlite3")
        backend, records = SqliteBackend(path), Records(sqlite_path=path)
    else:
        from mailplane_relay.store.postgres import PostgresBackend

        dsn = request.getfixturevalue("pg_dsn")
        backend, records = PostgresBackend(dsn), Records(dsn=dsn)
    await backend.open()
    await records.open()
    yield backend, records
    await records.close()
    await backend.close()


async def test_platform_erasure_masks_the_address_in_every_namespace_audit_log(
    store: tuple[StoreBackend, Records],
) -> None:
    backend, records = store
    await records.audit("team-a", "alice", "suppression.add", "gone@dest.test", "opt-out")
    await records.audit("team-b", "bob", "suppression.remove", "gone@dest.test",
                        "was manual: Gone@dest.test asked us")
    await records.audit("team-b", "bob", "suppression.add", "stay@dest.test", "")

    report = await erase_address(backend, "Gone@Dest.test")

    assert report.counts.get("portal_audit") == 2  # the report says where it was
    rows = (await records.audit_log("team-a")) + (await records.audit_log("team-b"))
    targets = sorted(r["target"] for r in rows)
    assert targets == ["g***@dest.test", "g***@dest.test", "stay@dest.test"]
    assert not [r for r in rows if "gone@" in r["detail"].lower()]


async def test_platform_erasure_without_the_portal_tables(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "messagelog.sqlite3"))
    await backend.open()
    try:
        report = await erase_address(backend, "gone@dest.test")
        assert "portal_audit" not in report.counts
    finally:
        await backend.close()
