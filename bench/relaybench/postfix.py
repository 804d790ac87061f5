"""A private Postfix instance configured as a stock relay: the performance reference.

Its own config_directory, queue_directory and data_directory under the run's temp dir, an smtpd
on a loopback port and the default daemons it needs (no chroot), relaying everything from
127.0.0.0/8 to ``[127.0.0.1]:<sink>`` with no TLS, no DNS and no local delivery. Queue and
process settings stay at Postfix's defaults: a fair stock relay, with the durable queue Postfix
always has (cleanup fsyncs each queue file before smtpd answers 250). It never touches
/etc/postfix or the Debian package's default instance.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from relaybench.procstat import tree_snapshot

POSTFIX = "/usr/sbin/postfix"

# master.cf with ``{port}``: shared with the tests' Postfix (tests/relay/test_intake_postfix.py).
MASTER_CF = Path(__file__).with_name("postfix-master.cf")


def master_cf(port: int) -> str:
    """The master.cf of a private instance whose smtpd listens on 127.0.0.1:`port`."""
    return MASTER_CF.read_text().format(port=port)


_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtp_host_lookup = native
disable_dns_lookups = yes
smtputf8_enable = no
biff = no
# Log to a file through postlogd, as a container-style Postfix does (maillog_file=/dev/stdout):
# there is no syslog daemon on the bench machine.
maillog_file = {maillog}
maillog_file_prefixes = {base}
"""


class PostfixRelay:
    """``postfix -c DIR start`` / ``stop`` around a generated configuration."""

    name = "postfix"

    def __init__(self, base: Path, *, port: int, sink_port: int, extra_main_cf: str = "") -> None:
        self.base = base
        self.port = port
        self.config_dir = base / "etc"
        self.queue_dir = base / "spool"
        self.data_dir = base / "data"
        self.maillog = base / "maillog"
        self.sink_port = sink_port
        self._master_pid: int | None = None
        self.extra_main_cf = extra_main_cf  # appended to main.cf (later lines win)

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the Postfix reference needs root (postfix start runs as root)")
        # Postfix daemons run as user 'postfix' and must reach the queue through every parent.
        self.base.mkdir(parents=True, exist_ok=True)
        top = Path(tempfile.gettempdir())
        for d in (self.base, *self.base.parents):
            if d == top or d == Path("/"):
                break
            mode = d.stat().st_mode
            if not mode & 0o001:
                d.chmod(mode | 0o011)
        self.config_dir.mkdir(parents=True)
        self.queue_dir.mkdir()
        self.data_dir.mkdir()
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.maillog.touch()
        (self.config_dir / "master.cf").write_text(master_cf(self.port))
        (self.config_dir / "main.cf").write_text(_MAIN_CF.format(
            queue=self.queue_dir, data=self.data_dir, sink_port=self.sink_port,
            maillog=self.maillog, base=self.base,
        ) + self.extra_main_cf)
        # Creates the queue subdirectories with Postfix's owners and modes.
        done = self._postfix("set-permissions", "create-missing")
        if done.returncode != 0:
            raise RuntimeError(f"postfix set-permissions failed: {done.stderr.strip()}")
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stderr.strip()} "
                               f"{self.log_tail()}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self._master_pid = int(pid_file.read_text().split()[0])
                return
            except (FileNotFoundError, ValueError, IndexError):
                time.sleep(0.05)
        raise RuntimeError(f"postfix master did not write {pid_file}")

    def root_pids(self) -> list[int]:
        return [self._master_pid] if self._master_pid else []

    def stop(self) -> None:
        members = list(tree_snapshot(self._master_pid)) if self._master_pid else []
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop", timeout=30)
        deadline = time.monotonic() + 10
        while members and time.monotonic() < deadline:
            members = [p for p in members if _alive(p)]
            time.sleep(0.05)
        for pid in members:  # whatever outlived `postfix stop`
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def queue_size(self) -> int:
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            for _root, _dirs, files in os.walk(self.queue_dir / sub):
                n += len(files)
        return n


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
