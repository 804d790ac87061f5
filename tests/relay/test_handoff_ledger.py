"""The hand-off ledger: which hand-offs a spool took, across restarts and cut writes."""

from __future__ import annotations

from pathlib import Path

from mailplane_relay.drain import LEDGER_KEEP, HandoffLedger, first_peer
from mailplane_relay.spool import adopt, new_queue_id

NOW = 1_800_000_000.0


def _ledger(tmp_path: Path, spooled: list[str], now: float = NOW) -> HandoffLedger:
    ledger = HandoffLedger(tmp_path, fsync=False, clock=lambda: now)
    ledger.open(spooled)
    return ledger


def test_a_taken_hand_off_is_known_after_a_restart(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, [])
    ledger.intend("SENDER1", "LOCAL1")
    assert ledger.taken("SENDER1") is None  # not stored yet
    ledger.record("SENDER1", "LOCAL1")
    assert ledger.taken("SENDER1") == "LOCAL1"
    ledger.close()
    # Delivered meanwhile (no longer spooled): still taken.
    assert _ledger(tmp_path, []).taken("SENDER1") == "LOCAL1"


def test_an_intent_counts_only_when_its_message_was_stored(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, [])
    ledger.intend("STORED", "LOCAL1")  # crash after the store, before the T line
    ledger.intend("NEVER", "LOCAL2")  # crash before the store finished
    ledger.close()
    with (tmp_path / "handoffs.log").open("a") as out:
        out.write("T CUT LOC")  # a line cut by the crash
    again = _ledger(tmp_path, ["LOCAL1"])
    assert again.taken("STORED") == "LOCAL1"
    assert again.taken("NEVER") is None
    assert again.taken("CUT") is None
    again.close()
    # The start rewrote the ledger: the intent that came true is a T line now.
    assert _ledger(tmp_path, []).taken("STORED") == "LOCAL1"


def test_old_hand_offs_are_forgotten(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, [])
    ledger.record("OLD", "LOCAL1")
    ledger.close()
    assert _ledger(tmp_path, [], now=NOW + LEDGER_KEEP - 60).taken("OLD") == "LOCAL1"
    assert _ledger(tmp_path, [], now=NOW + LEDGER_KEEP + 60).taken("OLD") is None


def test_a_message_starts_at_the_same_peer_every_time() -> None:
    starts = {first_peer(f"01M998RFPMVFW61P0C{n:02d}", 3) for n in range(30)}
    assert starts == {0, 1, 2}  # spread over the pool
    assert first_peer("01M998RFPMVFW61P0CWE", 3) == first_peer("01M998RFPMVFW61P0CWE", 3)


def test_an_adopted_spool_brings_the_hand_offs_it_took(tmp_path: Path) -> None:
    old, new = tmp_path / "w3", tmp_path / "w0"
    old.mkdir()
    new.mkdir()
    ledger = _ledger(old, [])
    ledger.record("SENDER1", "LOCAL1")
    ledger.close()
    local2 = new_queue_id()
    with (old / "handoffs.log").open("a") as out:
        out.write(f"P SENDER2 {local2} 1800000000")  # cut before its newline by a crash
    (old / f"{local2}.msg").write_bytes(b"")  # stands for the message it names (moved too)
    mine = _ledger(new, [])
    mine.record("SENDER3", "LOCAL3")
    mine.close()
    adopt(old, new, fsync=False, remove_source=True)
    assert not old.exists()
    assert (new / f"{local2}.msg").exists()
    after = _ledger(new, [local2])
    assert after.taken("SENDER1") == "LOCAL1"
    assert after.taken("SENDER2") == local2
    assert after.taken("SENDER3") == "LOCAL3"


def test_a_relay_that_runs_for_weeks_keeps_a_week_of_hand_offs_in_its_ledger(
        tmp_path: Path) -> None:
    """Expiry is not left to the next start: a relay taking hand-offs for weeks without a
    restart keeps its ledger (file and memory) to about a week, and an intent still open when
    the file is rewritten stays in it (a crash after its store is recognised at the start)."""
    now = [NOW]
    ledger = HandoffLedger(tmp_path, fsync=False, clock=lambda: now[0])
    ledger.open([])
    ledger.record("FIRST", "LOCAL0")
    path = tmp_path / "handoffs.log"
    for day in range(1, 29):  # four weeks, 200 hand-offs a day
        now[0] = NOW + day * 86400.0
        if day == 25:
            # Being stored while the ledger is rewritten (1600 lines follow): never finished.
            ledger.intend("OPEN", "LOCALX")
        for n in range(200):
            ledger.intend(f"S{day}-{n}", f"L{day}-{n}")
            ledger.record(f"S{day}-{n}", f"L{day}-{n}")
    assert ledger.taken("FIRST") is None  # four weeks old
    assert ledger.taken("S28-0") == "L28-0"
    assert ledger.taken("S22-0") == "L22-0"  # within the week
    lines = path.read_text().splitlines()
    # At most about eight days of two lines per hand-off, not four weeks of them.
    assert len(lines) <= 2 * 200 * 8 + 2048, len(lines)
    assert not any(" FIRST " in line for line in lines)
    ledger.close()
    assert _ledger(tmp_path, ["LOCALX"], now=now[0]).taken("OPEN") == "LOCALX"
