"""The Mailplane relay under test: a generated configuration and ``mailplane relay --config``.

Smarthost mode to the sink (no TLS to the sink, like Postfix's relayhost), durable spool with
fsync on, one worker per core, 127.0.0.0/8 trusted so smtp-source relays without AUTH, a
throwaway trustme certificate (the configuration requires TLS), and two sending domains:
``plain.test`` without DKIM for the plain figure and ``dkim.test`` with an RSA-2048 key for the
authenticated STARTTLS figure.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailplane_relay.config import API_VERSION, hash_password, load_config

PLAIN_DOMAIN = "plain.test"
DKIM_DOMAIN = "dkim.test"
DKIM_SELECTOR = "bench"
USERNAME = "bench-app"


_LISTENING = re.compile(r'msg="(?:supervisor: \d+ workers, )?listening: ([^"]*)"')


class MailplaneRelay:
    name = "mailplane"

    def __init__(
        self, base: Path, *, sink_port: int, workers: int, port: int = 0, http_port: int = 0,
        extra_env: dict[str, str] | None = None, delivery: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.store = store  # the relay config's `store` section; None: the SQLite default
        self.port = port
        self.http_port = http_port
        self.sink_port = sink_port
        self.workers = workers
        self.password = secrets.token_urlsafe(32)
        self.cafile = base / "ca.pem"
        self.dkim_public_b64 = ""
        self.config_path = base / "relay.yaml"
        self.stdout_path = base / "relay.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env = extra_env or {}
        # The delivery section (default: smarthost mode to the sink).
        self.delivery = delivery or {
            "mode": "smarthost",
            "smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "none"},
        }

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(self.cafile))
        cert.cert_chain_pems[0].write_to_path(str(self.base / "cert.pem"))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(self.base / "cert.pem"), append=True)
        cert.private_key_pem.write_to_path(str(self.base / "key.pem"))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.base / "dkim.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        (self.base / "dkim.pem").chmod(0o600)
        self.dkim_public_b64 = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo,
        )).decode()
        spec = {
            "hostname": "mailplane-bench.test",
            "listeners": [
                {"name": "submission", "address": "127.0.0.1", "port": self.port,
                 "tls": "starttls"},
            ],
            "tls": {"certFile": str(self.base / "cert.pem"), "keyFile": str(self.base / "key.pem")},
            "http": {"address": "127.0.0.1", "port": self.http_port},
            "spool": {"directory": str(self.base / "spool"), "fsync": True},
            "delivery": self.delivery,
            "messageLog": {"path": str(self.base / "messagelog.sqlite3")},
            **({"store": self.store} if self.store else {}),
            "trustedNetworks": ["127.0.0.0/8"],
            "workers": self.workers,
            "shutdownGrace": "5s",
            "domains": [
                {"name": PLAIN_DOMAIN},
                {"name": DKIM_DOMAIN, "dkim": {
                    "selector": DKIM_SELECTOR, "algorithm": "rsa-sha256",
                    "privateKeyFile": str(self.base / "dkim.pem"),
                }},
            ],
            "credentials": [
                {"username": USERNAME, "passwordHash": hash_password(self.password),
                 "allowedSenders": [DKIM_DOMAIN]},
            ],
        }
        doc = {"apiVersion": API_VERSION, "kind": "RelayConfig", "spec": spec}
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        load_config(self.config_path)  # fail here, with the contract's message, not in the relay

    def dkim_txt(self) -> bytes:
        return f"v=DKIM1; k=rsa; p={self.dkim_public_b64}".encode()

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, **self.extra_env}
        with self.stdout_path.open("wb") as out:
            # The relay's own entry point (what `mailplane relay` runs, without loading the
            # operator's or dev tooling's commands).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailplane_relay.cli", "relay",
                 "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mailplane relay exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self._bound() and self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"mailplane relay not ready after {timeout}s:\n{self.log_tail()}")

    def _bound(self) -> bool:
        """Reads the ports the relay bound (port 0: any free port) from its 'listening:' line
        (the supervisor's with several workers)."""
        found = _LISTENING.search(self.stdout_path.read_text(errors="replace"))
        if found is None:
            return False
        bound = dict(item.split("=", 1) for item in found.group(1).split())
        self.port, self.http_port = int(bound["submission"]), int(bound["http"])
        return True

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/readyz", timeout=1
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics_text(self) -> str:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/metrics", timeout=5
            ) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, OSError):
            return ""

    def root_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
