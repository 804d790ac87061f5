"""The real `mailplane` command: logs, logs forget, suppression, hash-password, check-config."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mailplane_relay.config import API_VERSION, verify_password
from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import MessageLog, SqliteBackend
from mailplane_relay.store.sync import add_suppression, list_suppression, query_log

MAILPLANE = (sys.executable, "-m", "mailplane_cli.main")


def mailplane(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAILPLANE, *args], input=stdin, capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONWARNINGS="error"))


NOW = time.time()


def fill(path: str) -> None:
    async def write() -> None:
        store = SqliteBackend(path)
        await store.open()
        ml = MessageLog(store, flush_interval=3600,
                        metrics=RelayMetrics.create(CollectorRegistry()),
                        tenant_of=lambda _credential: "team-a")
        await ml.start()
        rows = [
            (NOW - 3 * 86400, "received", "Q1", "a@example.com", "x@dest.test", None),
            (NOW - 2 * 3600, "delivered", "Q1", "a@example.com", "x@dest.test", "250 ok"),
            (NOW - 1800, "bounced", "Q2", "b@example.com", "gone@dest.test", "550 5.1.1 no"),
            (NOW - 60, "deferred", "Q3", "a@example.com", "y@other.test", "451 later"),
        ]
        for ts, status, qid, sender, rcpt, resp in rows:
            ml.record(LogEvent(ts=ts, status=status, queue_id=qid,  # type: ignore[arg-type]
                               message_id=None, credential="app", sender=sender,
                               recipient=rcpt, response=resp, size=100, attempt=1))
        await ml.close()
        await store.close()

    asyncio.run(write())


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "messagelog.sqlite3")
    fill(path)
    return path


def qids(out: str) -> list[str]:
    return [json.loads(line)["queue_id"] + ":" + json.loads(line)["status"]
            for line in out.splitlines()]


def test_logs_filters_and_json(db: str) -> None:
    r = mailplane("logs", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    assert qids(r.stdout) == ["Q1:received", "Q1:delivered", "Q2:bounced", "Q3:deferred"]
    r = mailplane("logs", "--db", db, "--json", "--since", "1h")
    assert qids(r.stdout) == ["Q2:bounced", "Q3:deferred"]
    r = mailplane("logs", "--db", db, "--json", "--sender", "A@example.com", "--status",
                  "delivered")
    assert qids(r.stdout) == ["Q1:delivered"]
    r = mailplane("logs", "--db", db, "--json", "--recipient", "@dest.test", "--limit", "2")
    assert qids(r.stdout) == ["Q1:delivered", "Q2:bounced"]
    r = mailplane("logs", "--db", db, "--json", "--queue-id", "Q3")
    [row] = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["response"] == "451 later"
    assert row["time"].endswith("Z")
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 86400))
    r = mailplane("logs", "--db", db, "--json", "--until", until)
    assert qids(r.stdout) == ["Q1:received"]


def test_logs_table(db: str) -> None:
    r = mailplane("logs", "--db", db, "--status", "bounced")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split()[:4] == ["TIME", "STATUS", "QUEUE", "ID"]
    assert "bounced" in row and "gone@dest.test" in row and "550 5.1.1 no" in row


def test_logs_state_dir_and_config(tmp_path: Path, db: str) -> None:
    state = tmp_path / "dev"
    (state / "relay").mkdir(parents=True)
    os.link(db, state / "relay" / "messagelog.sqlite3")
    r = mailplane("logs", "--state-dir", str(state), "--json", "--queue-id", "Q2")
    assert qids(r.stdout) == ["Q2:bounced"], r.stderr

    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": API_VERSION, "kind": "RelayConfig",
        "spec": {"tls": {"certFile": "/x.crt", "keyFile": "/x.key"},
                 "messageLog": {"path": db}},
    }))
    r = mailplane("logs", "--config", str(config), "--json", "--queue-id", "Q3")
    assert qids(r.stdout) == ["Q3:deferred"], r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday"), "--since: 'yesterday' is not a time; use ISO 8601"),
        (("--status", "sent"), "invalid choice: 'sent'"),
        (("--limit", "0"), "--limit must be at least 1"),
        (("frobnicate",), "use `mailplane logs [filters]` or `mailplane erase ADDRESS`"),
    ],
)
def test_logs_bad_input_names_the_fix(db: str, args: tuple[str, ...], message: str) -> None:
    r = mailplane("logs", "--db", db, *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_logs_needs_a_database(tmp_path: Path) -> None:
    r = mailplane("logs")
    assert r.returncode == 2
    assert "--config PATH" in r.stderr and "--state-dir DIR" in r.stderr
    r = mailplane("logs", "--db", str(tmp_path / "none.sqlite3"))
    assert r.returncode == 1
    assert "no message log there" in r.stderr


def test_erase_reports_what_it_removed(db: str) -> None:
    add_suppression(db, "a@example.com", "complaint")
    add_suppression(db, "b@example.com", "hard_bounce")
    r = mailplane("erase", "A@example.com", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    # No relay running: nothing to wait for, the request is complete at once.
    assert json.loads(r.stdout) == {"address": "a@example.com", "request": 1, "complete": True,
                                    "removed": {"message_log": 3, "suppression": 1,
                                                "suppression_kept_as_hash": 1, "workers": 0}}
    assert [row["queue_id"] for row in query_log(db)] == ["Q2"]
    # The complaint still suppresses, as a keyed hash: the address itself is gone.
    kept = [e["address"] for e in list_suppression(db)]
    assert len(kept) == 2 and kept[0] == "b@example.com" and kept[1].startswith("hmac-sha256:")
    assert "a@example.com" not in str(list_suppression(db))

    r = mailplane("logs", "forget", "B@example.com", "--db", db)  # the older spelling
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "erased b@example.com: 1 message log, 1 suppression"
    assert len(list_suppression(db)) == 1
    r = mailplane("erase", "not-an-address", "--db", db)
    assert r.returncode == 2
    assert "is not an email address" in r.stderr


def test_logs_by_tenant(db: str) -> None:
    r = mailplane("logs", "--db", db, "--namespace", "team-a", "--json")
    assert len(qids(r.stdout)) == 4, r.stderr
    r = mailplane("logs", "--db", db, "--namespace", "team-b", "--json")
    assert qids(r.stdout) == [], r.stderr


def test_suppression_add_list_remove(tmp_path: Path) -> None:
    db = str(tmp_path / "m.sqlite3")
    r = mailplane("suppression", "add", "User@Dest.test", "--reason", "complaint", "--db", db)
    assert r.returncode == 0, r.stderr
    r = mailplane("suppression", "list", "--db", db, "--json")
    [entry] = [json.loads(line) for line in r.stdout.splitlines()]
    assert (entry["address"], entry["reason"], entry["source"]) == (
        "user@dest.test", "complaint", "cli")
    r = mailplane("suppression", "list", "--db", db)
    assert "user@dest.test" in r.stdout and "complaint" in r.stdout
    assert mailplane("suppression", "remove", "user@dest.test", "--db", db).returncode == 0
    r = mailplane("suppression", "remove", "user@dest.test", "--db", db)
    assert r.returncode == 1 and "not on the suppression list" in r.stderr
    r = mailplane("suppression", "add", "--db", db)
    assert r.returncode == 2 and "needs an ADDRESS" in r.stderr


@pytest.mark.parametrize("scheme", ["sha256", "scrypt"])
def test_hash_password(scheme: str) -> None:
    r = mailplane("hash-password", "--scheme", scheme, stdin="correct horse\n")
    assert r.returncode == 0, r.stderr
    encoded = r.stdout.strip()
    assert encoded.startswith(scheme + "$")
    assert verify_password("correct horse", encoded)
    assert "correct horse" not in r.stdout
    assert mailplane("hash-password", stdin="").returncode == 2


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "relay.yaml").write_text(yaml.safe_dump({
        "apiVersion": API_VERSION, "kind": "RelayConfig",
        "spec": {"tls": {"certFile": "/x.crt", "keyFile": "/x.key"}, "workers": 2,
                 "domains": [{"name": "example.com"}]},
    }))
    r = mailplane("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("configuration OK (hash ")
    assert "workers:       2" in r.stdout and "domains:       1 (0 with DKIM)" in r.stdout

    (good / "relay.yaml").write_text(yaml.safe_dump({
        "apiVersion": API_VERSION, "kind": "RelayConfig", "spec": {"workers": 2}}))
    r = mailplane("check-config", str(good))
    assert r.returncode == 2
    assert "tls is missing" in r.stderr
