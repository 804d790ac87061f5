"""A real Postfix bounces mail the relay delivered, and its DSN comes back to the intake.

Postfix (as the recipient domain's MX) accepts the message from the relay with 250, then finds
the mailbox unknown (its error(8) transport) and sends a DSN to the return path — the relay's
VERP address, routed to the intake listener. The relay then suppresses the address and counts
the bounce against the credential that sent the message. Needs Postfix and root (Postfix's
master runs as root and drops to the postfix user)."""

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
pytestmark = pytest.mark.skipif(
    POSTFIX is None or os.geteuid() != 0 or not Path("/usr/lib/postfix/sbin/master").exists(),
    reason="needs Postfix and root")

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
showq     unix  n - n - - showq
"""


class Postfix:
    def __init__(self, base: Path, intake_port: int) -> None:
        self.base = base
        self.port = free_port()
        self.etc = base / "etc"
        for d in (self.etc, base / "queue", base / "data"):
            d.mkdir(parents=True)
        shutil.chown(base / "data", "postfix")
        (self.etc / "transport").write_text(
            "dest.test error:5.1.1 unknown user\n"
            f"{DOMAIN} smtp:[127.0.0.1]:{intake_port}\n")
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
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self.log = base / "postfix.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([str(POSTFIX), "-c", str(self.etc), "start-fg"],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.1)

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
def postfix_mx() -> Iterator[Callable[[int], Postfix]]:
    # Not under pytest's tmp_path: Postfix's unprivileged processes must reach its directories.
    base = Path(tempfile.mkdtemp(prefix="mailplane-postfix-"))
    base.chmod(0o755)
    made: list[Postfix] = []

    def make(intake_port: int) -> Postfix:
        pf = Postfix(base / str(len(made)), intake_port)
        made.append(pf)
        pf.start()
        pf.wait_ready()
        return pf

    yield make
    for pf in made:
        pf.stop()
    shutil.rmtree(base, ignore_errors=True)


async def test_a_postfix_dsn_after_delivery_suppresses_the_address(
        relay_factory: Callable[..., RelayProcess], postfix_mx: Callable[[int], Postfix],
        tmp_path: Path) -> None:
    key = tmp_path / "verp-key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    intake_port = free_port()
    postfix = await asyncio.to_thread(postfix_mx, intake_port)
    relay = relay_factory(smarthost_port=postfix.port, extra={"intake": {
        "domain": DOMAIN, "keyFile": str(key), "address": "127.0.0.1", "port": intake_port}})
    await asyncio.to_thread(relay.start)
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
