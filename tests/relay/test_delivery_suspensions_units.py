"""The shared suspension file on its own: two workers (two objects on one file, a clock each
test sets) adopt each other's suspension, claim one probe between them, lift it for both, and
a new object (a restart) reads it back. The file never keeps an address a reply quoted."""

from __future__ import annotations

from pathlib import Path

from mailplane_relay.delivery.suspensions import FILE_NAME, SharedSuspensions

KEY = "smarthost:mx.example.net:25"


def test_two_workers_share_one_suspension_and_one_probe(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / FILE_NAME
    a = SharedSuspensions(path, owner="a", clock=lambda: now[0])
    b = SharedSuspensions(path, owner="b", clock=lambda: now[0])
    delays: list[int] = []

    def delay(step: int) -> float:
        delays.append(step)
        return 10.0 * step

    entry, new = a.suspend(KEY, failures=0, delay=delay, kind="throttled",
                           reason="451 4.4.1 421 4.7.0 <app@example.com> slow down, alice@x.org")
    assert new and entry.failures == 1 and entry.until == 1010.0
    assert "@" not in path.read_text() and "<address> slow down, <address>" in entry.reason
    # b failed too meanwhile: it adopts a's suspension, no second step.
    adopted, new = b.suspend(KEY, failures=0, delay=delay, kind="throttled", reason="other")
    assert not new and adopted.failures == 1 and adopted.until == 1010.0 and delays == [1]
    assert b.claim_probe(KEY, lease=60.0) is not None  # still suspended
    now[0] = 1011.0
    assert a.claim_probe(KEY, lease=60.0) is None  # a probes
    blocked = b.claim_probe(KEY, lease=60.0)
    assert blocked is not None and blocked.probe_by == "a"
    # a's probe fails: the next step, for both.
    entry, new = a.suspend(KEY, failures=1, delay=delay, kind="throttled", reason="again")
    assert new and entry.failures == 2 and entry.until == 1031.0
    # A restart: a new object reads the step and the end back.
    again = SharedSuspensions(path, owner="a2", clock=lambda: now[0])
    kept = again.get(KEY)
    assert kept is not None and (kept.failures, kept.until) == (2, 1031.0)
    # The probe after that works: lifted for everyone.
    now[0] = 1032.0
    assert b.claim_probe(KEY, lease=60.0) is None
    b.lift(KEY)
    assert SharedSuspensions(path, owner="c").get(KEY) is None
    # A claim whose worker stopped lapses after its lease.
    a.suspend(KEY, failures=0, delay=delay, kind="connect", reason="refused")
    now[0] = 1100.0
    assert a.claim_probe(KEY, lease=60.0) is None
    now[0] = 1161.0
    assert b.claim_probe(KEY, lease=60.0) is None


def test_a_damaged_file_lifts_its_suspensions_and_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("{not json")
    s = SharedSuspensions(path, owner="a", clock=lambda: 5.0)
    assert s.get(KEY) is None
    entry, new = s.suspend(KEY, failures=0, delay=lambda n: 1.0, kind="connect", reason="x")
    assert new and SharedSuspensions(path, owner="b").get(KEY) == entry


def test_quoted_local_parts_and_address_literals_are_not_kept(tmp_path: Path) -> None:
    """A reply may quote an address with a quoted local part (RFC 5321 Quoted-string, which
    may hold spaces) or an address literal for its domain: neither reaches the file."""
    path = tmp_path / FILE_NAME
    shared = SharedSuspensions(path, owner="a", clock=lambda: 1000.0)
    reply = ('451 4.4.1 421 4.7.0 <"jane doe"@example.com> and "j\\"o"@example.com, '
             'bob@[192.0.2.7] and <carol@[IPv6:2001:db8::1]> slow down')
    entry, new = shared.suspend(KEY, failures=0, delay=lambda step: 10.0, kind="throttled",
                                reason=reply)
    text = path.read_text()
    assert new and "@" not in text and "@" not in entry.reason
    for part in ("jane", "doe", "bob", "192.0.2.7", "carol", "2001"):
        assert part not in text, part
    assert entry.reason == ("451 4.4.1 421 4.7.0 <address> and <address>, <address> and "
                            "<address> slow down")


def test_the_file_keeps_at_most_max_entries_the_latest_ending(tmp_path: Path) -> None:
    """Mail to many dead domains cannot grow the file (rewritten whole at every change) without
    bound: beyond ``max_entries`` the suspensions that end first are left out of it."""
    now = [1000.0]
    path = tmp_path / FILE_NAME
    shared = SharedSuspensions(path, owner="a", clock=lambda: now[0], max_entries=3)
    for n in range(6):
        now[0] = 1000.0 + n
        shared.suspend(f"mx:dead{n}.example", failures=0, delay=lambda step: 60.0,
                       reason="451 4.4.1 refused", kind="connect")
    kept = SharedSuspensions(path, owner="b").view()
    assert sorted(kept) == ["mx:dead3.example", "mx:dead4.example", "mx:dead5.example"]
    # A suspension in force for longer outlives newer ones that end sooner.
    shared.suspend("mx:long.example", failures=0, delay=lambda step: 3600.0,
                   reason="451 4.4.1 refused", kind="connect")
    shared.suspend("mx:short.example", failures=0, delay=lambda step: 1.0,
                   reason="451 4.4.1 refused", kind="connect")
    kept = SharedSuspensions(path, owner="c").view()
    assert "mx:long.example" in kept and "mx:short.example" not in kept and len(kept) == 3
