"""A real Postfix bounces mail the relay delivered, and its DSN comes back to the intake.

Postfix (as the recipient domain's MX) accepts the message from the relay with 250, then finds
the mailbox unknown (its error(8) transport) and sends a DSN to the return path — the relay's
VERP address, routed to the intake listener. The relay then suppresses the address and counts
the bounce against the credential that sent the message. Needs root (Postfix's master runs as
root and drops to the postfix user); Postfix missing is a failure."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.ports import free_port
from tests.helpers.relayproc import RelayProcess
from tests.relay.test_app_lifecycle import client, eventually, message
from tests.relay.test_intake import DOMAIN, VERP, suppression

POSTFIX = shutil.which("postfix")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master needs root")


@pytest.fixture(autouse=True)
def _postfix_installed() -> None:
    # A missing tool is a failure, not a skip: scripts/bootstrap installs Postfix.
    assert POSTFIX and Path("/usr/lib/postfix/sbin/master").exists(), (
        "Postfix is not installed: run scripts/bootstrap")

# The benchmark's Postfix services (one master.cf for both), {port} the smtpd's loopback port.
MASTER_CF = Path(__file__).parents[2] / "bench" / "relaybench" / "postfix-master.cf"
START_TRIES = 5
BANNER = b"220 mx.receiver.test ESMTP"


class Postfix:
    """A Postfix MX for dest.test on a loopback port. Postfix cannot bind port 0, so its port
    is picked free and, when the master finds it taken ("Address already in use"), Postfix is
    started again on another one (``port`` is the one it bound)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = 0
        self.etc = base / "etc"
        for d in (self.etc, base / "queue", base / "data"):
            d.mkdir(parents=True)
        shutil.chown(base / "data", "postfix")
        self.route_reports(None)
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.receiver.test
mydomain = receiver.test
mydestination =
relay_domains = dest.test
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_reject_unlisted_recipient = no
transport_maps = texthash:{self.etc}/transport
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
smtp_tls_security_level = none
maillog_file = /dev/stdout
""")
        self.log = base / "postfix.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def route_reports(self, intake_port: int | None) -> None:
        """Where DSNs to the VERP domain go (read by Postfix at start or reload)."""
        route = f"{DOMAIN} smtp:[127.0.0.1]:{intake_port}\n" if intake_port else ""
        (self.etc / "transport").write_text("dest.test error:5.1.1 unknown user\n" + route)

    def start(self) -> None:
        for _ in range(START_TRIES):
            self.port = free_port()
            (self.etc / "master.cf").write_text(MASTER_CF.read_text().format(port=self.port))
            offset = self.log.stat().st_size if self.log.exists() else 0
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen([str(POSTFIX), "-c", str(self.etc), "start-fg"],
                                             stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            if self.wait_ready():
                return
            if "Address already in use" not in self.log.read_text()[offset:]:
                raise AssertionError(f"Postfix did not start:\n{self.log.read_text()}")
            self.stop()
        raise AssertionError(f"Postfix found no free port in {START_TRIES} tries")

    def wait_ready(self) -> bool:
        """True once this Postfix's smtpd greets on ``port``; False if its master exited."""
        deadline = time.monotonic() + 20  # bounds a hang only
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    # Another program may have the port: only this Postfix's banner counts.
                    if s.recv(100).startswith(BANNER):
                        return True
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def reload(self) -> None:
        """``postfix reload``, returning once the master has re-read its configuration."""
        marks = self.log.read_text().count("reload -- version")
        subprocess.run([str(POSTFIX), "-c", str(self.etc), "reload"], check=True,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + 20  # bounds a hang only
        while self.log.read_text().count("reload -- version") == marks:
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run([str(POSTFIX), "-c", str(self.etc), "stop"], capture_output=True,
                       timeout=30)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def postfix_mx() -> Iterator[Callable[[], Postfix]]:
    # Not under pytest's tmp_path: Postfix's unprivileged processes must reach its directories.
    base = Path(tempfile.mkdtemp(prefix="mailplane-postfix-"))
    base.chmod(0o755)
    made: list[Postfix] = []

    def make() -> Postfix:
        pf = Postfix(base / str(len(made)))
        made.append(pf)
        pf.start()
        return pf

    yield make
    for pf in made:
        pf.stop()
    shutil.rmtree(base, ignore_errors=True)


async def test_a_postfix_dsn_after_delivery_suppresses_the_address(
        relay_factory: Callable[..., RelayProcess], postfix_mx: Callable[[], Postfix],
        tmp_path: Path) -> None:
    key = tmp_path / "verp-key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    postfix = await asyncio.to_thread(postfix_mx)
    relay = relay_factory(smarthost_port=postfix.port, extra={"intake": {
        "domain": DOMAIN, "keyFile": str(key), "address": "127.0.0.1", "port": 0}})
    await asyncio.to_thread(relay.start)
    # The intake's port is known once the relay has bound it: Postfix learns it before any
    # mail reaches it.
    postfix.route_reports(relay.intake_port)
    await asyncio.to_thread(postfix.reload)
    smtp = await client(relay)
    msg = message(1)
    del msg["To"]
    msg["To"] = "nobody@dest.test"
    await smtp.send_message(msg)
    await smtp.quit()

    # Postfix took it (the relay logs a delivery) ...
    await eventually(lambda: relay.metric("mailplane_relay_recipients_total",
                                          outcome="delivered", credential="app") == 1,
                     "the delivery to Postfix")
    # ... then bounced it to the relay's return path.
    await eventually(lambda: relay.metric("mailplane_relay_async_bounces_total",
                                          sender_domain="example.com", credential="app") == 1,
                     f"Postfix's DSN matched\n{postfix.log.read_text()}\n{relay.log()[-3000:]}",
                     timeout=30)
    log = postfix.log.read_text()
    assert VERP.search(log.split("from=<", 1)[1].split(">", 1)[0]), log
    assert "status=bounced (unknown user)" in log
    listed = await asyncio.to_thread(suppression, relay)
    assert "nobody@dest.test" in listed and "5.1.1" in listed
    assert relay.metric("mailplane_relay_intake_reports_total", kind="dsn",
                        result="matched") == 1
    # Postfix returned the whole message; the intake kept none of it.
    assert "body number" not in relay.log()
