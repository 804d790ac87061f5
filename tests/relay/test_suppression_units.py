"""The suppression list's cache, rule by rule, in process: who is told of new entries, entries
kept while the store does not answer, the cache file a pod starts from when a shared store is
down, the gauge and the store health. The store is the real SQLite backend; a store that
fails, or that stands for a shared database, is a thin wrapper around it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import SqliteBackend, SuppressionList, complaint_hash
from mailplane_relay.store.health import StoreHealth


class Wrapped:
    """The real backend; ``down`` makes every call fail as an unreachable database does, and
    ``shared`` says whether it stands for a database other pods share."""

    def __init__(self, backend: SqliteBackend, *, shared: bool = True) -> None:
        self._backend = backend
        self.shared = shared
        self.description = "postgresql://db.test/mail"
        self.down = False
        self.upserts: list[tuple[str, str, str, float]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kw: Any) -> Any:
            if self.down:
                raise ConnectionError("connection refused")
            if name == "suppression_upsert":
                self.upserts.append(args)
            return await attr(*args, **kw)
        return call


@pytest.fixture
async def sqlite(tmp_path: Path) -> Any:
    b = SqliteBackend(str(tmp_path / "s.sqlite3"))
    await b.open()
    yield b
    await b.close()


@pytest.fixture
def metrics() -> RelayMetrics:
    return RelayMetrics.create(CollectorRegistry())


async def refreshed(supp: SuppressionList) -> None:
    """A refresh pass that started after the call has ended. A refresher that stopped fails the
    test after a generous bound (a pass takes milliseconds) rather than hanging it."""
    await asyncio.wait_for(supp.wait_refreshed(), 20)


def gauge(metrics: RelayMetrics) -> float | None:
    return metrics.registry.get_sample_value("mailplane_relay_suppression_entries")


async def test_on_added_hears_of_new_and_changed_entries_not_of_those_at_start(
        sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    await sqlite.suppression_upsert("old@dest.test", "hard_bounce", "bounce", 1.0)
    heard: list[list[tuple[str, str]]] = []

    async def on_added(entries: list[tuple[str, str]]) -> None:
        heard.append(sorted(entries))

    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, on_added=on_added)
    await supp.start()
    try:
        assert heard == []  # present at start: not news
        await sqlite.suppression_upsert("new@dest.test", "complaint", "fbl", 2.0)
        await sqlite.suppression_upsert("old@dest.test", "complaint", "fbl", 2.0)
        assert await supp.refresh()
        assert heard == [[("new@dest.test", "complaint"), ("old@dest.test", "complaint")]]
        await sqlite.suppression_upsert("new@dest.test", "complaint", "cli", 3.0)  # same reason
        assert await sqlite.suppression_delete("old@dest.test")
        assert await supp.refresh()
        assert len(heard) == 1  # a same-reason rewrite and a removal are not additions
        assert await supp.refresh() is False
        assert len(heard) == 1
    finally:
        await supp.close()


async def test_a_full_reload_tells_only_what_is_new(sqlite: SqliteBackend,
                                                    metrics: RelayMetrics) -> None:
    await sqlite.suppression_upsert("old@dest.test", "hard_bounce", "bounce", 1.0)
    heard: list[tuple[str, str]] = []

    async def on_added(entries: list[tuple[str, str]]) -> None:
        heard.extend(entries)

    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, on_added=on_added,
                           delta_limit=1)
    await supp.start()
    try:
        for i in range(3):
            await sqlite.suppression_upsert(f"n{i}@dest.test", "complaint", "fbl", 2.0)
        assert await supp.refresh()
        assert supp.full_reloads == 2  # more changes than the delta limit: reloaded
        assert sorted(heard) == [(f"n{i}@dest.test", "complaint") for i in range(3)]
        assert len(supp) == 4 and gauge(metrics) == 4
    finally:
        await supp.close()


async def test_an_entry_the_store_did_not_take_is_kept_and_sent_later(
        sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    store = Wrapped(sqlite)
    supp = SuppressionList(store, metrics, refresh_interval=0.01)
    await supp.start()
    try:
        store.down = True
        with pytest.raises(ConnectionError):
            await supp.add(" Lost@Dest.TEST ", "hard_bounce", source="delivery")
        assert supp.is_suppressed("lost@dest.test") is not None  # at once, in this worker
        assert gauge(metrics) == 1
        await refreshed(supp)
        await refreshed(supp)
        assert await sqlite.suppression_list() == []
        assert supp.is_suppressed("lost@dest.test") is not None  # kept through failed passes
        store.down = False
        await refreshed(supp)
        await refreshed(supp)
        [entry] = await sqlite.suppression_list()
        assert (entry["address"], entry["reason"], entry["source"]) == (
            "lost@dest.test", "hard_bounce", "delivery")
        sent = len(store.upserts)
        await refreshed(supp)
        await refreshed(supp)
        assert len(store.upserts) == sent  # sent once, not on every pass
    finally:
        await supp.close()


async def test_an_unsent_entry_survives_a_full_reload(sqlite: SqliteBackend,
                                                      metrics: RelayMetrics) -> None:
    store = Wrapped(sqlite)
    supp = SuppressionList(store, metrics, refresh_interval=3600,
                           delta_limit=1)
    await supp.start()
    try:
        store.down = True
        with pytest.raises(ConnectionError):
            await supp.add("lost@dest.test", "hard_bounce", source="delivery")
        store.down = False
        for i in range(3):
            await sqlite.suppression_upsert(f"n{i}@dest.test", "complaint", "fbl", 2.0)
        assert await supp.refresh() and supp.full_reloads == 2
        assert supp.is_suppressed("lost@dest.test") is not None
        assert len(supp) == 4
        await supp.add("lost@dest.test", "hard_bounce", source="delivery")  # taken this time
        assert supp._unsent == {}
    finally:
        await supp.close()


async def test_remove_leaves_the_cache_and_the_store(sqlite: SqliteBackend,
                                                     metrics: RelayMetrics) -> None:
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600)
    await supp.start()
    try:
        await supp.add("a@dest.test", "manual", source="cli")
        await supp.add("b@dest.test", "manual", source="cli")
        assert gauge(metrics) == 2
        assert await supp.remove(" A@Dest.test ")
        assert supp.is_suppressed("a@dest.test") is None
        assert supp.is_suppressed("b@dest.test") is not None
        assert gauge(metrics) == 1 and len(supp) == 1
        assert [e["address"] for e in await sqlite.suppression_list()] == ["b@dest.test"]
        assert await supp.remove("a@dest.test") is False
    finally:
        await supp.close()


async def test_only_the_exporting_worker_sets_the_gauge(sqlite: SqliteBackend,
                                                        metrics: RelayMetrics) -> None:
    await sqlite.suppression_upsert("a@dest.test", "manual", "cli", 1.0)
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, export_gauge=False)
    await supp.start()
    try:
        await supp.add("b@dest.test", "manual", source="cli")
        assert gauge(metrics) == 0 and len(supp) == 2
    finally:
        await supp.close()


async def test_a_hashed_complaint_suppresses_without_the_key_lookup_when_not_keyed(
        sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    key = await sqlite.erasure_key()
    await sqlite.suppression_upsert(complaint_hash(key, "angry@dest.test"), "complaint", "fbl",
                                    1.0)
    keyed = SuppressionList(sqlite, metrics, refresh_interval=3600)
    plain = SuppressionList(sqlite, metrics, refresh_interval=3600, use_erasure_key=False)
    await keyed.start()
    await plain.start()
    try:
        assert keyed.is_suppressed(" ANGRY@dest.test") == ("complaint", 1.0)
        assert plain.is_suppressed("angry@dest.test") is None
    finally:
        await keyed.close()
        await plain.close()


async def test_the_refresher_reports_failure_once_and_recovery_to_health(
        sqlite: SqliteBackend, metrics: RelayMetrics, caplog: pytest.LogCaptureFixture) -> None:
    health = StoreHealth.create(CollectorRegistry(), "db")
    store = Wrapped(sqlite)
    supp = SuppressionList(store, metrics, refresh_interval=0.01,
                           health=health)
    await supp.start()
    try:
        with caplog.at_level(logging.INFO):
            store.down = True
            for _ in range(3):
                await refreshed(supp)
            assert health.up._value.get() == 0
            assert health.errors.labels("suppression")._value.get() >= 3
            store.down = False
            await sqlite.suppression_upsert("x@dest.test", "manual", "cli", 1.0)
            await refreshed(supp)
            await refreshed(supp)
        assert supp.is_suppressed("x@dest.test") is not None
        assert health.up._value.get() == 1
        texts = [r.getMessage() for r in caplog.records
                 if r.name == "mailplane_relay.store.suppression"]
        failed = [t for t in texts if "refresh from postgresql://db.test/mail failed" in t]
        assert len(failed) == 1 and "connection refused" in failed[0]
        assert texts.count("suppression list: the store answers again") == 1
        # The store health (readiness, its log) is told the cause too.
        assert any(r.name == "mailplane_relay.store.health"
                   and "suppression failed: connection refused" in r.getMessage()
                   for r in caplog.records)
    finally:
        await supp.close()


async def test_a_local_store_that_cannot_be_read_fails_the_start(sqlite: SqliteBackend,
                                                                 metrics: RelayMetrics) -> None:
    store = Wrapped(sqlite, shared=False)
    store.down = True
    supp = SuppressionList(store, metrics, refresh_interval=3600)
    with pytest.raises(ConnectionError):
        await supp.start()


async def test_a_pod_starts_on_its_cache_file_when_the_shared_store_is_down(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics,
        caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache" / "suppression.json"
    key = await sqlite.erasure_key()
    await sqlite.suppression_upsert("bounced@dest.test", "hard_bounce", "bounce", 1.0)
    await sqlite.suppression_upsert(complaint_hash(key, "angry@dest.test"), "complaint", "fbl",
                                    2.0)
    first = SuppressionList(sqlite, metrics, refresh_interval=0.01, cache_file=str(cache))
    await first.start()
    await refreshed(first)
    await first.close()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    assert not cache.with_suffix(".tmp").exists()
    data = json.loads(cache.read_text())
    assert data["key"] == key.hex()

    store = Wrapped(sqlite)
    store.down = True
    fresh = RelayMetrics.create(CollectorRegistry())
    supp = SuppressionList(store, fresh, refresh_interval=3600,
                           cache_file=str(cache))
    with caplog.at_level(logging.ERROR):
        await supp.start()
    try:
        assert supp.is_suppressed("bounced@dest.test") == ("hard_bounce", 1.0)
        assert supp.is_suppressed("Angry@dest.test") == ("complaint", 2.0)  # key from the file
        assert gauge(fresh) == 2
        assert any("the 2 entries cached on disk" in r.getMessage() for r in caplog.records)
    finally:
        await supp.close()


@pytest.mark.parametrize("content", [None, "not json", "[]", '{"entries": {"a": []}}',
                                     '{"key": "zz", "entries": {}}', '{"key": null}'])
async def test_a_missing_or_broken_cache_file_starts_empty_and_says_so(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics,
        caplog: pytest.LogCaptureFixture, content: str | None) -> None:
    cache = tmp_path / "suppression.json"
    if content is not None:
        cache.write_text(content)
    store = Wrapped(sqlite)
    store.down = True
    supp = SuppressionList(store, metrics, refresh_interval=3600,
                           cache_file=str(cache))
    with caplog.at_level(logging.ERROR):
        await supp.start()
    try:
        assert len(supp) == 0
        assert any("an EMPTY list (no cache on disk yet)" in r.getMessage()
                   for r in caplog.records)
        if content is not None and content.startswith("{"):  # JSON, not a cache: named
            assert any(f"the cache file {cache} is unreadable; ignoring it" in r.getMessage()
                       for r in caplog.records)
    finally:
        await supp.close()


async def test_the_cache_file_is_written_only_after_a_change(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    cache = tmp_path / "suppression.json"
    supp = SuppressionList(sqlite, metrics, refresh_interval=0.01, cache_file=str(cache))
    await supp.start()
    try:
        await refreshed(supp)
        assert json.loads(cache.read_text())["entries"] == {}
        cache.unlink()
        await refreshed(supp)
        await refreshed(supp)
        assert not cache.exists()  # nothing changed: not rewritten
        await supp.add("a@dest.test", "manual", source="cli")
        await refreshed(supp)
        await refreshed(supp)
        entries = json.loads(cache.read_text())["entries"]
        assert list(entries) == ["a@dest.test"] and entries["a@dest.test"][""][0] == "manual"
    finally:
        await supp.close()


async def test_close_writes_what_changed_since_the_last_pass(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    cache = tmp_path / "suppression.json"
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, cache_file=str(cache))
    await supp.start()
    await supp.add("a@dest.test", "manual", source="cli")
    await supp.close()
    assert list(json.loads(cache.read_text())["entries"]) == ["a@dest.test"]


async def test_a_cache_file_that_cannot_be_written_is_logged_not_fatal(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics,
        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600,
                           cache_file=str(blocker / "suppression.json"))
    await supp.start()
    await supp.add("a@dest.test", "manual", source="cli")
    with caplog.at_level(logging.ERROR):
        await supp.close()
    assert any("could not write the cache file "
               f"{blocker / 'suppression.json'}" in r.getMessage() for r in caplog.records)


async def test_wait_refreshed_waits_for_a_pass_that_starts_after_the_call(
        sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    supp = SuppressionList(sqlite, metrics, refresh_interval=0.01)
    await supp.start()
    try:
        await refreshed(supp)
        await sqlite.suppression_upsert("x@dest.test", "manual", "cli", 1.0)
        await asyncio.wait_for(supp.wait_refreshed(), 30)
        assert supp.is_suppressed("x@dest.test") is not None
    finally:
        await supp.close()


async def test_a_cache_file_without_a_key_still_gives_its_entries(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics,
        caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "suppression.json"
    cache.write_text(json.dumps({"key": None, "entries": {"a@dest.test": ["manual", 1.0]}}))
    store = Wrapped(sqlite)
    store.down = True
    supp = SuppressionList(store, metrics, refresh_interval=3600, cache_file=str(cache))
    with caplog.at_level(logging.ERROR):
        await supp.start()
    try:
        assert supp.is_suppressed("a@dest.test") == ("manual", 1.0)
        assert [r.getMessage() for r in caplog.records
                if r.name == "mailplane_relay.store.suppression"] == [
            "suppression list: the store (postgresql://db.test/mail) did not answer "
            "(connection refused); using the 1 entries cached on disk until it does"]
    finally:
        await supp.close()


async def test_the_cache_file_directory_is_made_with_its_parents(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    cache = tmp_path / "var" / "cache" / "mailplane" / "suppression.json"
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, cache_file=str(cache))
    await supp.start()
    await supp.add("a@dest.test", "manual", source="cli")
    await supp.close()
    assert list(json.loads(cache.read_text())["entries"]) == ["a@dest.test"]


async def test_closing_a_list_that_never_started(sqlite: SqliteBackend,
                                                 metrics: RelayMetrics) -> None:
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600)
    await supp.close()


async def test_a_failed_refresh_is_logged_with_its_cause(
        sqlite: SqliteBackend, metrics: RelayMetrics, caplog: pytest.LogCaptureFixture) -> None:
    store = Wrapped(sqlite)
    supp = SuppressionList(store, metrics, refresh_interval=0.01)
    await supp.start()
    try:
        store.down = True
        with caplog.at_level(logging.ERROR, logger="mailplane_relay.store.suppression"):
            await refreshed(supp)
            await refreshed(supp)
        store.down = False
    finally:
        await supp.close()
    assert [r.getMessage() for r in caplog.records][:1] == [
        "suppression list: refresh from postgresql://db.test/mail failed (connection refused); "
        "keeping the cached entries"]


async def test_a_pod_without_a_cache_file_says_it_starts_on_an_empty_list(
        sqlite: SqliteBackend, metrics: RelayMetrics, caplog: pytest.LogCaptureFixture) -> None:
    store = Wrapped(sqlite)
    store.down = True
    supp = SuppressionList(store, metrics, refresh_interval=3600)
    with caplog.at_level(logging.ERROR):
        await supp.start()
    try:
        assert [r.getMessage() for r in caplog.records
                if r.name == "mailplane_relay.store.suppression"] == [
            "suppression list: the store (postgresql://db.test/mail) did not answer "
            "(connection refused); using an EMPTY list (no cache on disk yet) until it does"]
    finally:
        await supp.close()


async def test_configured_keys_stay_out_of_the_cache_file_and_still_match_from_it(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    configured = bytes(range(32))
    sqlite.configured_keys = (configured,)
    await sqlite.suppression_upsert(complaint_hash(configured, "angry@dest.test"), "complaint",
                                    "fbl", 2.0)
    cache = tmp_path / "suppression.json"
    first = SuppressionList(sqlite, metrics, refresh_interval=3600, cache_file=str(cache))
    await first.start()
    await first.close()
    data = json.loads(cache.read_text())
    # The configured key is in its own file on every pod: the cache file does not copy it.
    assert data["key"] is None
    assert configured.hex() not in cache.read_text()
    store = Wrapped(sqlite)
    store.down = True
    supp = SuppressionList(store, metrics, refresh_interval=3600, cache_file=str(cache))
    await supp.start()
    try:
        assert supp.is_suppressed("Angry@dest.test") == ("complaint", 2.0)
    finally:
        await supp.close()


async def test_a_list_that_never_started_leaves_the_cache_file_alone(
        tmp_path: Path, sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    cache = tmp_path / "suppression.json"
    kept = json.dumps({"key": None, "entries": {"a@dest.test": ["manual", 1.0]}})
    cache.write_text(kept)
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, cache_file=str(cache))
    await supp.close()  # e.g. the relay failed to start before the list did
    assert cache.read_text() == kept


async def test_the_first_entry_of_a_store_empty_at_start_is_news(
        sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    heard: list[tuple[str, str]] = []

    async def on_added(entries: list[tuple[str, str]]) -> None:
        heard.extend(entries)

    supp = SuppressionList(sqlite, metrics, refresh_interval=3600, on_added=on_added)
    await supp.start()
    try:
        await sqlite.suppression_upsert("first@dest.test", "complaint", "fbl", 1.0)
        assert await supp.refresh()
        assert heard == [("first@dest.test", "complaint")]
    finally:
        await supp.close()


async def test_an_entry_added_and_removed_between_two_refreshes(
        sqlite: SqliteBackend, metrics: RelayMetrics) -> None:
    supp = SuppressionList(sqlite, metrics, refresh_interval=3600)
    await supp.start()
    try:
        await sqlite.suppression_upsert("brief@dest.test", "manual", "cli", 1.0)
        assert await sqlite.suppression_delete("brief@dest.test")
        await sqlite.suppression_upsert("stays@dest.test", "manual", "cli", 1.0)
        assert await supp.refresh()
        assert supp.is_suppressed("brief@dest.test") is None
        assert supp.is_suppressed("stays@dest.test") == ("manual", 1.0)
    finally:
        await supp.close()
