"""Drain: a real relay process hands its queue to another over the authenticated admin port
(HTTPS with the relay's serving certificate; peers verified against a CA and a fixed name).

Two `mailplane relay` processes deliver to one sink that defers everything (451), so mail stays
queued. Relay B is told to drain toward A: it stops being ready and stops accepting, and hands
every message to A, which stores it (same recipients, attempts, reception time) before B removes
its copy. When the upstream recovers, every message arrives once, from A. Calling the drain off
opens B's listeners again."""

from __future__ import annotations

import email
import email.policy
import http.client
import http.server
import json
import smtplib
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailplane_relay.delivery.queue import LOST_REPLY
from mailplane_relay.drain import handoff_order, token_sha256
from tests.helpers.pki import client_context, write_server_pair
from tests.helpers.ports import refusing_port
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import running_sink_in_thread
from tests.relay.test_delivery_torn import tear

TOKEN = "drain-test-token-0123456789"


SERVER_NAME = "relay.test"  # in every test relay's certificate (tests/helpers/relayproc.py)


def _admin_port(relay: RelayProcess) -> int:
    return relay.admin_port


def _peer(relay: RelayProcess) -> str:
    return f"https://127.0.0.1:{_admin_port(relay)}"


def _admin(relay: RelayProcess, method: str, path: str, body: Any = None,
           token: str | None = TOKEN, headers: dict[str, str] | None = None,
           data: bytes | None = None) -> tuple[int, Any]:
    payload = data if data is not None else (
        json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        _peer(relay) + path, data=payload, method=method,
        headers={**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10,
                                    context=client_context(relay.ca)) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _send(relay: RelayProcess, count: int, tag: str) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=relay.client_tls())
        smtp.login("app", "app-password")
        for i in range(count):
            msg = EmailMessage()
            msg["From"] = "app@example.com"
            msg["To"] = f"rcpt{i}@dest.example"
            msg["Subject"] = f"{tag} {i}"
            msg["Message-ID"] = f"<{tag}-{i}@example.com>"
            msg.set_content("queued while the upstream defers\n")
            smtp.send_message(msg)
            ids.append(f"<{tag}-{i}@example.com>")
    return ids


def _wait(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _message_id(data: bytes) -> str:
    return str(email.message_from_bytes(data)["Message-ID"])


def _admin_settings(ca: trustme.CA, base: Path) -> dict[str, Any]:
    ca_file = base / "admin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {"admin": {"tokenSHA256": token_sha256(TOKEN), "address": "127.0.0.1",
                      "port": 0, "caFile": str(ca_file), "serverName": SERVER_NAME}}


@pytest.fixture
def pair(relay_factory: Callable[..., RelayProcess], tls_ca: trustme.CA, tmp_path: Path) -> Any:
    with running_sink_in_thread(data_reply="451 4.3.0 not now") as sink:
        a = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path))
        b = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path))
        a.start()
        b.start()
        yield a, b, sink


def test_a_draining_relay_hands_every_message_to_its_peer_before_removing_it(pair: Any) -> None:
    a, b, sink = pair
    ids = _send(b, 6, "drain")
    _wait(lambda: b.metric("mailplane_relay_delivery_attempts_total", result="deferred") >= 6,
          "the upstream deferring B's mail")
    assert len(b.spooled_files()) == 6 and not a.spooled_files()

    status, doc = _admin(b, "POST", "/admin/drain",
                         {"peers": [_peer(a)], "token": TOKEN})
    assert status == 202 and doc["draining"] is True
    assert b.readyz() == (503, "draining\n")
    with pytest.raises((ConnectionRefusedError, smtplib.SMTPServerDisconnected)):
        _send(b, 1, "refused")
    _wait(lambda: _admin(b, "GET", "/admin/drain")[1]["queued"] == 0, "B's queue empty")
    assert b.spooled_files() == []
    assert len(a.spooled_files()) == 6
    assert b.metric("mailplane_relay_handoffs_total", direction="sent", result="ok") == 6
    assert a.metric("mailplane_relay_handoffs_total", direction="received", result="ok") == 6
    # A peer that drains itself takes nothing.
    status, text = _admin(b, "POST", "/admin/handoff", data=b"x",
                          headers={"X-Mailplane-Envelope": "e30="})
    assert status == 503 and "draining" in text

    sink.behaviour.data_reply = None  # the upstream recovers: A delivers all six, once each
    _wait(lambda: len(sink.messages) >= 6, "six deliveries")
    # A message leaves the spool once delivered: with A's spool empty no delivery can repeat.
    _wait(lambda: a.spooled_files() == [], "A's spool empty")
    got = sorted(_message_id(m.data) for m in sink.messages)
    assert got == sorted(ids)
    assert len(got) == len(set(got))

    # Called off: B accepts mail again.
    status, doc = _admin(b, "DELETE", "/admin/drain")
    assert status == 200 and doc["draining"] is False
    _wait(lambda: b.readyz()[0] == 200, "B ready again")
    _send(b, 1, "again")


def test_admin_endpoints_need_the_token(pair: Any) -> None:
    a, b, _sink = pair
    for token in (None, "wrong"):
        assert _admin(b, "GET", "/admin/drain", token=token)[0] == 401
        assert _admin(b, "POST", "/admin/drain", {"peers": [], "token": "x"}, token=token)[0] == 401
        assert _admin(a, "POST", "/admin/handoff", data=b"x", token=token,
                      headers={"X-Mailplane-Envelope": "e30="})[0] == 401
    assert b.readyz()[0] == 200  # nothing drained
    status, text = _admin(a, "POST", "/admin/handoff", data=b"x",
                          headers={"X-Mailplane-Envelope": "not base64!"})
    assert status == 400 and "X-Mailplane-Envelope" in text
    assert a.spooled_files() == []


def test_nothing_leaves_the_spool_until_a_peer_has_stored_it(pair: Any) -> None:
    a, b, _sink = pair
    _send(b, 3, "kept")
    # A is draining itself (it refuses hand-offs), the other peer does not listen.
    assert _admin(a, "POST", "/admin/drain", {"peers": [], "token": TOKEN})[0] == 202
    # A port bound but not listening for the whole test: connections are refused and no other
    # process on the machine can take it meanwhile.
    with refusing_port() as port:
        closed = f"https://127.0.0.1:{port}"
        assert _admin(b, "POST", "/admin/drain",
                      {"peers": [_peer(a), closed], "token": TOKEN})[0] == 202
        _wait(lambda: b.metric("mailplane_relay_handoffs_total", direction="sent",
                               result="failed") >= 6, "hand-offs refused")
        assert _admin(b, "GET", "/admin/drain")[1]["queued"] == 3
        assert len(b.spooled_files()) == 3 and a.spooled_files() == []
        # Once A takes mail again, B's queue moves there.
        assert _admin(a, "DELETE", "/admin/drain")[0] == 200
        _wait(lambda: len(a.spooled_files()) == 3 and not b.spooled_files(), "the hand-off")


def test_the_ops_port_serves_no_admin_route_and_the_admin_port_no_plain_http(pair: Any) -> None:
    _a, b, _sink = pair
    # The token and the drain orders never travel in clear: the ops port has no /admin route...
    for path in ("/admin/drain", "/admin/status", "/admin/handoff"):
        request = urllib.request.Request(f"http://127.0.0.1:{b.http_port}{path}",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code in (404, 405)
    # ...and the admin port does not speak plain HTTP.
    request = urllib.request.Request(f"http://127.0.0.1:{_admin_port(b)}/admin/status",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(request, timeout=10)
    assert b.readyz()[0] == 200


def test_a_drain_toward_a_plain_http_peer_is_refused(pair: Any) -> None:
    a, b, _sink = pair
    status, text = _admin(b, "POST", "/admin/drain",
                          {"peers": [f"http://127.0.0.1:{a.http_port}"], "token": TOKEN})
    assert status == 400 and "https://" in text
    assert b.readyz()[0] == 200


@pytest.mark.parametrize("impostor", ["wrong name", "other CA"])
def test_nothing_is_handed_to_a_peer_whose_certificate_does_not_verify(
        relay_factory: Callable[..., RelayProcess], tls_ca: trustme.CA, tmp_path: Path,
        impostor: str) -> None:
    with running_sink_in_thread(data_reply="451 4.3.0 not now") as sink:
        rogue = relay_factory(smarthost_port=sink.address[1],
                              extra=_admin_settings(tls_ca, tmp_path))
        if impostor == "wrong name":  # signed by the pool's CA, but not for the pool's name
            write_server_pair(tls_ca, rogue.tls_dir, names=("127.0.0.1", "elsewhere.test"))
        else:  # the pool's name, from a CA the pool does not trust
            write_server_pair(trustme.CA(), rogue.tls_dir,
                              names=("127.0.0.1", "localhost", SERVER_NAME))
        b = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path))
        rogue.start()
        b.start()
        _send(b, 2, "kept")
        assert _admin(b, "POST", "/admin/drain",
                      {"peers": [_peer(rogue)], "token": TOKEN})[0] == 202
        _wait(lambda: b.metric("mailplane_relay_handoffs_total", direction="sent",
                               result="failed") >= 2, "hand-offs refused")
        assert len(b.spooled_files()) == 2 and rogue.spooled_files() == []
        assert rogue.metric("mailplane_relay_handoffs_total", direction="received",
                            result="ok") == 0
        assert "certificate" in b.log_path.read_text().lower()


class _KillingFront:
    """A peer in front of relay A (TLS with a certificate for the pool's name): it passes the
    first hand-off on to A and, once A has answered 200 (the message is durable there), kills
    the draining relay with SIGKILL instead of passing the answer back. So the draining relay
    dies with A holding the message and its own copy still spooled: the crash between the
    peer's 200 and the removal."""

    def __init__(self, ca: trustme.CA, base: Path, target: str, victim: RelayProcess) -> None:
        pair = write_server_pair(ca, base / "front", names=("127.0.0.1", SERVER_NAME))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pair.cert_file, pair.key_file)
        self.answers: list[tuple[int, Any]] = []
        self.kills_left = 1
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(
                    target + self.path, data=body, method="POST",
                    headers={name: self.headers[name] for name in (
                        "Authorization", "X-Mailplane-Envelope", "Content-Type")})
                with urllib.request.urlopen(request, timeout=30,
                                            context=client_context(ca)) as resp:
                    status, answer = resp.status, resp.read()
                    front.answers.append((status, json.loads(answer)))
                if front.kills_left > 0:
                    front.kills_left -= 1
                    victim.kill()  # before answering: the relay never learns of the 200
                    self.close_connection = True
                    return
                self.send_response(status)  # later hand-offs pass through
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _KillingFront:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_a_message_handed_over_again_after_a_crash_is_not_stored_twice(
        pair: Any, tls_ca: trustme.CA, tmp_path: Path) -> None:
    a, b, sink = pair
    ids = _send(b, 3, "crash")
    assert len(b.spooled_files()) == 3
    with _KillingFront(tls_ca, tmp_path, _peer(a), b) as front:
        assert _admin(b, "POST", "/admin/drain", {"peers": [front.url], "token": TOKEN})[0] == 202
        _wait(lambda: not b.running, "the draining relay killed")
    # A took the first message and answered 200; B died before removing its copy.
    assert len(front.answers) == 1 and front.answers[0][0] == 200
    first = front.answers[0][1]["queueId"]
    assert front.answers[0][1]["duplicate"] is False
    assert [p.stem for p in a.spooled_files()] == [first]
    assert len(b.spooled_files()) == 3

    # B starts again on the same spool, still drained (it kept the order, not the token), and
    # is sent the order again toward A itself (the front, recorded first for each message,
    # is gone): the message A already holds is answered 200 and not stored again; the other
    # two move.
    b.spawn()
    b.wait_listening()
    assert b.readyz() == (503, "draining\n")
    assert _admin(b, "POST", "/admin/drain", {"peers": [_peer(a)], "token": TOKEN})[0] == 202
    _wait(lambda: _admin(b, "GET", "/admin/drain")[1]["queued"] == 0, "B's queue empty")
    assert b.spooled_files() == []
    assert len(a.spooled_files()) == 3
    assert a.metric("mailplane_relay_handoffs_total", direction="received",
                    result="duplicate") == 1
    # Taken: the first through the front, the other two now.
    assert a.metric("mailplane_relay_handoffs_total", direction="received", result="ok") == 3
    assert f"taken before as {first}" in a.log_path.read_text()

    # A restarted keeps what it took (the ledger is on its volume).
    assert a.stop() == 0
    a.start()
    assert (a.spool_dir / "handoffs.log").read_text().count(" " + first + " ") == 1

    sink.behaviour.data_reply = None  # the upstream recovers: each message arrives once
    _wait(lambda: len(sink.messages) >= 3 and not a.spooled_files(), "three deliveries")
    got = sorted(_message_id(m.data) for m in sink.messages)
    assert got == sorted(ids)


def test_a_relay_with_several_workers_hands_off_every_workers_spool(
        relay_factory: Callable[..., RelayProcess], tls_ca: trustme.CA, tmp_path: Path) -> None:
    with running_sink_in_thread(data_reply="451 4.3.0 not now") as sink:
        a = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path))
        b = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path),
                          workers=2)
        a.start()
        b.start()
        # The kernel spreads connections over the workers: one message per connection until
        # both workers' spools hold mail.
        ids: list[str] = []
        for n in range(64):
            ids += _send(b, 1, f"w{n}")
            if all(list((b.spool_dir / w).glob("*.msg")) for w in ("w0", "w1")):
                break
        assert all(list((b.spool_dir / w).glob("*.msg")) for w in ("w0", "w1"))

        status, doc = _admin(b, "GET", "/admin/status")
        assert status == 200 and doc["workers"] == 2 and doc["queued"] == len(ids)
        assert doc["draining"] is False
        status, doc = _admin(b, "POST", "/admin/drain", {"peers": [_peer(a)], "token": TOKEN})
        assert status == 202 and doc["draining"] is True and doc["workers"] == 2
        _wait(lambda: _admin(b, "GET", "/admin/drain")[1]["queued"] == 0, "B's queue empty")
        assert b.spooled_files() == []
        assert len(a.spooled_files()) == len(ids)
        assert b.readyz()[0] == 503  # no worker takes mail
        # Pushed revocations need a single process: refused, not half done.
        status, text = _admin(b, "POST", "/admin/revoke", {"username": "app"})
        assert status == 501 and "workers" in text
        status, text = _admin(b, "POST", "/admin/credential", {"username": "app"})
        assert status == 501 and "workers" in text

        sink.behaviour.data_reply = None  # A delivers every message of both workers, once
        _wait(lambda: len(sink.messages) >= len(ids) and not a.spooled_files(), "deliveries")
        got = sorted(_message_id(m.data) for m in sink.messages)
        assert got == sorted(ids)

        # Called off: every worker accepts mail again.
        status, doc = _admin(b, "DELETE", "/admin/drain")
        assert status == 200 and doc["draining"] is False
        _wait(lambda: b.readyz()[0] == 200, "B ready again")
        _wait(lambda: _admin(b, "GET", "/admin/status")[1]["draining"] is False, "undrained")


def test_a_relay_killed_while_draining_stays_drained_and_delivers_nothing_itself(
        relay_factory: Callable[..., RelayProcess], tls_ca: trustme.CA, tmp_path: Path) -> None:
    with running_sink_in_thread(data_reply="451 4.3.0 not now") as sink:
        a = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path))
        # B retries at once: restarted without its drain order it would deliver its copies
        # (one of them already at A) as soon as it recovers its spool.
        b = relay_factory(smarthost_port=sink.address[1], extra={
            **_admin_settings(tls_ca, tmp_path),
            "queue": {"retryInitial": 0.2, "retryMax": 0.2}})
        a.start()
        b.start()
        ids = _send(b, 3, "kept")
        _wait(lambda: b.metric("mailplane_relay_delivery_attempts_total",
                               result="deferred") >= 3, "the upstream deferring B's mail")
        with _KillingFront(tls_ca, tmp_path, _peer(a), b) as front:
            assert _admin(b, "POST", "/admin/drain",
                          {"peers": [front.url], "token": TOKEN})[0] == 202
            _wait(lambda: not b.running, "the draining relay killed after A's 200")
            assert (b.spool_dir / "drain-order.json").exists()
            assert len(front.answers) == 1 and front.answers[0][0] == 200
            assert len(b.spooled_files()) == 3 and len(a.spooled_files()) == 1

            sink.behaviour.data_reply = None  # the upstream recovers
            b.spawn()
            b.wait_listening()
            # Still drained: not ready, no SMTP, no delivery of its own; the token is not kept,
            # so it waits for the order again.
            assert b.readyz() == (503, "draining\n")
            status, doc = _admin(b, "GET", "/admin/status")
            assert status == 200 and doc["draining"] is True and doc["awaitingOrder"] is True
            with pytest.raises((ConnectionRefusedError, smtplib.SMTPServerDisconnected)):
                _send(b, 1, "refused")
            # A delivers the message it took; B, due at once, delivers none meanwhile.
            _wait(lambda: len(sink.messages) >= 1 and not a.spooled_files(), "A's delivery")
            assert b.metric("mailplane_relay_delivery_attempts_total", result="delivered") == 0

            # The operator sends the order again, toward the ready peers it sees now (A
            # itself): each message still goes first to the peer recorded for it (the front,
            # which passes hand-offs on now), so the one A took is answered as a duplicate.
            assert _admin(b, "POST", "/admin/drain",
                          {"peers": [_peer(a)], "token": TOKEN})[0] == 202
            _wait(lambda: _admin(b, "GET", "/admin/drain")[1]["queued"] == 0, "B's queue empty")
            assert len(front.answers) == 4
        assert a.metric("mailplane_relay_handoffs_total", direction="received",
                        result="duplicate") == 1
        _wait(lambda: len(sink.messages) >= 3 and not a.spooled_files(), "three deliveries")
        assert b.metric("mailplane_relay_delivery_attempts_total", result="delivered") == 0
        got = sorted(_message_id(m.data) for m in sink.messages)
        assert got == sorted(ids)  # each once

        # Called off: the order is gone, B accepts and delivers mail again.
        status, doc = _admin(b, "DELETE", "/admin/drain")
        assert status == 200 and doc["draining"] is False
        assert not (b.spool_dir / "drain-order.json").exists()
        _wait(lambda: b.readyz()[0] == 200, "B ready again")
        _send(b, 1, "again")
        _wait(lambda: len(sink.messages) >= 4, "B delivering again")


def test_a_message_goes_first_to_the_peer_recorded_for_it_whichever_peers_are_ready() -> None:
    recorded = [f"https://10.0.0.{n}:8443" for n in range(1, 4)]
    for n in range(200):
        qid = f"01M99CX4YH62E9GJJW{n:02d}"
        preferred = handoff_order(qid, recorded, recorded)[0]
        # Whichever subset the operator sees ready, in any order, the first offer is the same.
        for current in (recorded[:1], recorded[1:], recorded[::-1], []):
            order = handoff_order(qid, recorded, current)
            assert order[0] == preferred
            assert sorted(order) == sorted({preferred, *current})
    # Without a recorded order: the current peers, each once.
    assert sorted(handoff_order("x", [], recorded)) == sorted(recorded)


def test_a_torn_message_found_by_a_hand_off_is_final_and_its_sender_told(
        relay_factory: Callable[..., RelayProcess], tls_ca: trustme.CA, tmp_path: Path) -> None:
    """The drain reads a message whose spooled data is torn: it is not handed off (its files
    are gone), its recipient gets a final bounced record and its sender a failure DSN."""
    with running_sink_in_thread(data_reply="451 4.3.0 not now") as sink:
        a = relay_factory(smarthost_port=sink.address[1], extra=_admin_settings(tls_ca, tmp_path))
        # B retries in an hour: after the first deferral only the drain reads the message.
        b = relay_factory(smarthost_port=sink.address[1], extra={
            **_admin_settings(tls_ca, tmp_path),
            "queue": {"retryInitial": "1h", "retryMax": "2h", "retryJitter": 0.0}})
        a.start()
        b.start()
        with smtplib.SMTP("127.0.0.1", b.ports["submission"], timeout=10) as smtp:
            smtp.starttls(context=b.client_tls())
            smtp.login("app", "app-password")
            msg = EmailMessage()
            msg["From"] = "app@example.com"
            msg["To"] = "torn@dest.example"
            msg["Subject"] = "torn"
            msg["Message-ID"] = "<torn-drain@example.com>"
            msg.set_content("queued while the upstream defers\n" * 200)
            smtp.send_message(msg)
        _wait(lambda: b.metric("mailplane_relay_delivery_attempts_total",
                               result="deferred") >= 1, "the upstream deferring B's mail")
        [path] = b.spooled_files()
        qid = path.stem
        tear(path)
        sink.behaviour.data_reply = None  # the notice may go out (from B, or from A)

        assert _admin(b, "POST", "/admin/drain", {"peers": [_peer(a)], "token": TOKEN})[0] == 202
        _wait(lambda: any(m.mail_from == "" for m in sink.messages), "the sender's notice")
        [notice] = sink.messages
        assert notice.rcpt_tos == ["app@example.com"]
        assert b"Status: 5.3.0" in notice.data and b"torn-drain" not in notice.data
        # It says the message is lost (no header part: the headers were in the torn data).
        parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        parts = list(parsed.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status"]
        assert "lost this message" in parts[0].get_content()
        assert (b.spool_dir / "corrupt" / f"{qid}.torn").exists()

        def rows() -> list[Any]:
            with sqlite3.connect(b.message_log) as conn:
                return conn.execute("SELECT status, response FROM message_log WHERE "
                                    "queue_id = ? AND recipient = ?",
                                    (qid, "torn@dest.example")).fetchall()

        final = _wait(lambda: [r for r in rows() if r[0] == "bounced"], "the final record")
        assert final == [("bounced", LOST_REPLY)]
        assert "stays here for now" not in b.log()
        # The peer got nothing of the torn message (at most the notice).
        assert a.metric("mailplane_relay_handoffs_total", direction="received",
                        result="ok") <= 1
        assert b"torn-drain" not in b"".join(m.data for m in sink.messages)
        _wait(lambda: _admin(b, "GET", "/admin/drain")[1]["queued"] == 0, "B's queue empty")
        assert b.spooled_files() == []
