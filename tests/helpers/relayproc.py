"""The real relay as a subprocess (`mailplane relay --config DIR`), for end-to-end tests.

``relay_factory`` writes a configuration directory (a server certificate from the session's
throwaway CA in tests/helpers/pki.py, free loopback ports, spool and message log under the test's
tmp dir, delivery to a smarthost such as the capture sink), starts the command, waits for
``/readyz``, and kills whatever is left at the end of the test::

    def test_x(relay_factory, ...):
        relay = relay_factory(smarthost_port=sink.port, credentials={"app": "secret"})
        relay.start()
        ... smtplib.SMTP("127.0.0.1", relay.ports["submission"]) with relay.client_tls() ...
        assert relay.stop() == 0

Every listener (SMTP, intake, ops HTTP, admin HTTPS) is configured on port 0 unless a test
sets a port: the relay binds a free port itself and logs the ports it bound in one
``listening:`` line, which ``start`` reads into ``ports``, ``http_port``, ``intake_port`` and
``admin_port``. No port is picked before the relay binds it, so no other process can take it in
between. A restarted relay listens on new ports: read them from the object after each start.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from mailplane_relay.config import API_VERSION, hash_password
from tests.helpers.pki import client_context, write_server_pair

# The real command; `python -m` so the test venv's interpreter runs it wherever PATH points.
RELAY_COMMAND = (sys.executable, "-m", "mailplane_cli.main", "relay")
START_TIMEOUT = 20.0
# The relay's (or with workers, the supervisor's) line naming every port it bound.
_LISTENING = re.compile(r'msg="(?:supervisor: \d+ workers, )?listening: ([^"]*)"')


def relay_command() -> tuple[str, ...]:
    return RELAY_COMMAND


class RelayProcess:
    def __init__(
        self,
        base: Path,
        *,
        ca: trustme.CA,
        smarthost_port: int,
        credentials: dict[str, str] | None = None,
        domains: tuple[str, ...] = ("example.com",),
        extra: dict[str, Any] | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        self.env = env  # added to the environment of the relay command
        self.ca = ca
        self.config_dir = base / "config"
        self.tls_dir = base / "tls"
        self.state_dir = base / "state"
        self.spool_dir = self.state_dir / "spool"
        self.message_log = self.state_dir / "messagelog.sqlite3"
        self.log_path = base / "relay.log"
        # Known once started (see start).
        self.ports: dict[str, int] = {}
        self.http_port = 0
        self.intake_port = 0
        self.admin_port = 0
        self.smarthost_port = smarthost_port
        self.credentials = dict(credentials or {"app": "app-password"})
        self.domains = domains
        self.extra = dict(extra or {})
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        for d in (self.config_dir, self.tls_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.tls_pair = write_server_pair(ca, self.tls_dir,
                                          names=("127.0.0.1", "localhost", "relay.test"))
        self.write_config()

    # ---- configuration ----------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "hostname": "relay.test",
            "listeners": [
                {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls"},
                {"name": "submissions", "address": "127.0.0.1", "port": 0, "tls": "implicit"},
            ],
            "tls": {"certFile": str(self.tls_pair.cert_file),
                    "keyFile": str(self.tls_pair.key_file)},
            "http": {"address": "127.0.0.1", "port": 0},
            "spool": {"directory": str(self.spool_dir)},
            "messageLog": {"path": str(self.message_log), "flushInterval": "50ms"},
            "delivery": {
                "mode": "smarthost",
                "smarthost": {"host": "127.0.0.1", "port": self.smarthost_port, "tls": "none"},
                "connectTimeout": "5s", "commandTimeout": "10s",
            },
            "queue": {"retryInitial": "1s", "retryMax": "2s", "retryJitter": 0.0},
            "limits": {"authFailureDelay": 0},
            "shutdownGrace": "10s",
            "workers": self.workers,
            "domains": [{"name": d} for d in self.domains],
            "credentials": [
                {"username": user, "passwordHash": hash_password(pw),
                 "allowedSenders": list(self.domains), "owner": f"team-{user}/{user}"}
                for user, pw in sorted(self.credentials.items())
            ],
        }
        spec.update(self.extra)
        return spec

    def write_config(self, spec: dict[str, Any] | None = None, *,
                     raw: str | None = None) -> None:
        """Write the configuration atomically (as a Secret volume update is)."""
        self._written = (spec, raw)
        text = raw if raw is not None else yaml.safe_dump(
            {"apiVersion": API_VERSION, "kind": "RelayConfig", "spec": spec or self.spec()},
            sort_keys=False)
        target = self.config_dir / "relay.yaml"
        tmp = self.config_dir / ".relay.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, target)

    # ---- process ----------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until ready; ``ports``, ``http_port``, ``intake_port`` and
        ``admin_port`` are then the ports this run of the relay bound."""
        assert self.proc is None or self.proc.poll() is not None, "relay already running"
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the command without waiting for it to be ready."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*relay_command(), "--config", str(self.config_dir), "--log-level", "debug"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the line naming the ports this run bound, and take them."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            found = _LISTENING.search(self.log_since_start())
            if found:
                bound = dict(item.split("=", 1) for item in found.group(1).split())
                ports = {name: int(port) for name, port in bound.items()}
                self.http_port = ports.pop("http")
                self.admin_port = ports.pop("admin", 0)
                self.intake_port = ports.pop("intake", 0)
                self.ports = ports
                return
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"relay exited with {rc} before ready:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"relay not ready (not listening) after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        self.wait_listening(timeout)
        while True:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"relay exited with {rc} before ready:\n{self.log()}")
            status, _ = self.readyz()
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (the supervisor and its workers)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- observation ------------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def readyz(self) -> tuple[int, str]:
        return self.http_get("/readyz")

    def metrics(self) -> str:
        status, text = self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return text

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (summed over samples that match the given labels)."""
        total, found = 0.0, False
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            if metric != name:
                continue
            have = dict(
                (p.split("=", 1)[0], p.split("=", 1)[1].strip('"'))
                for p in rest.rstrip("}").split(",") if "=" in p
            )
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(value)
                found = True
        return total if found else 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        return self.log()[self._log_offset:]

    def client_tls(self) -> ssl.SSLContext:
        return client_context(self.ca)

    def spooled_files(self) -> list[Path]:
        return sorted(self.spool_dir.rglob("*.msg"))


@pytest.fixture
def relay_factory(
    tmp_path: Path, tls_ca: trustme.CA
) -> Iterator[Callable[..., RelayProcess]]:
    made: list[RelayProcess] = []

    def make(**kw: Any) -> RelayProcess:
        relay = RelayProcess(tmp_path / f"relay{len(made)}", ca=tls_ca, **kw)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.kill()
