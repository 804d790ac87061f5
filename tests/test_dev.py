"""`mailplane dev` as a user runs it: a subprocess on free loopback ports, a mail sent with swaks
over STARTTLS (certificate verified against the printed CA) with the credentials from the
generated Secret, the delivered .eml in the outbox (DKIM-signed, the signature verified with
dkimpy against the key in the generated DKIM Secret), a clean exit on SIGINT, and the same
password after a restart."""

from __future__ import annotations

import base64
import email
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml

from mailplane_operator.reconcile import domain as domain_mod
from mailplane_relay.store.sync import query_log
from tests.helpers import dkimverify
from tests.helpers.dns import running_dns_server
from tests.helpers.ports import free_port
from tests.helpers.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
# scripts/bootstrap installs swaks: a missing one is a failure, not a reason to skip.
assert shutil.which("swaks"), "swaks is missing: scripts/bootstrap installs it"


def _command() -> list[str]:
    # `mailplane` loads every subcommand's module; while the operator CLI is not there yet the
    # same code runs through the module entry point.
    if importlib.util.find_spec("mailplane_operator.cli") is not None:
        return [str(Path(sys.executable).with_name("mailplane")), "dev"]
    return [sys.executable, "-m", "mailplane_cli.dev"]


PORT_RETRIES = 5
START_TIMEOUT = 60.0


class DevProcess:
    """``mailplane dev`` as a subprocess, waited for until it prints its instructions. Its
    ports are picked free before it binds them; if another process took one in between, it
    exits saying so and is started again on new ports."""

    def __init__(self, state: Path, log: Path, *extra_args: str) -> None:
        self.state = state
        self._log_path = log
        self._log = log.open("ab")
        self.output: list[str] = []
        for _ in range(PORT_RETRIES):
            self.ports = {"smtp": free_port(), "smtps": free_port(), "http": free_port()}
            offset = log.stat().st_size
            self._spawn(extra_args)
            # The first line on stdout comes once the relay listens (or never, if it exits).
            first = self.lines.get(timeout=START_TIMEOUT)
            if first is not None:
                self._first: list[str] = [first]
                return
            self.proc.wait()
            self._log.flush()
            if "pick other ports" not in log.read_bytes()[offset:].decode(errors="replace"):
                raise AssertionError(f"mailplane dev exited ({self.proc.returncode}):\n"
                                     + log.read_text(errors="replace"))
        raise AssertionError(f"mailplane dev found no free ports in {PORT_RETRIES} tries")

    def _spawn(self, extra_args: tuple[str, ...]) -> None:
        self.proc = subprocess.Popen(
            [*_command(), "--examples", str(ROOT / "examples"), "--state-dir", str(self.state),
             "--smtp-port", str(self.ports["smtp"]), "--smtps-port", str(self.ports["smtps"]),
             "--http-port", str(self.ports["http"]), "--portal-port", "0", *extra_args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                str(ROOT / p) for p in ("relay", "operator", "cli"))},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line matching {pattern!r} in:\n{''.join(self.output)}"
            line = self._first.pop() if self._first else self.lines.get(timeout=remaining)
            assert line is not None, f"exited ({self.proc.wait()}):\n{''.join(self.output)}"
            self.output.append(line)
            if re.search(pattern, line):
                return line

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def dev_state(tmp_path: Path) -> Iterator[tuple[Path, list[DevProcess]]]:
    started: list[DevProcess] = []
    yield tmp_path / "state", started
    for p in started:
        p.kill()


def _secret(path: Path) -> dict[str, str]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}


def _check_dkim(raw: bytes, state: Path) -> None:
    dkim_secret = yaml.safe_load(
        (state / "secrets" / "mailplane-system" / "example-com-dkim.yaml").read_text())
    signing = domain_mod.signing_from_secret(dkim_secret)
    assert signing is not None
    txt = domain_mod.dkim_txt_value(signing.pem).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name.decode().rstrip(".") == f"{signing.selector}._domainkey.example.com"
        return txt

    assert dkim.verify(raw, dnsfunc=dnsfunc)
    # The record users are told to publish, served by a real DNS server, verifies the
    # delivered mail with the verifiers receivers run too.
    with running_dns_server(standard_port=True) as dns_server:
        dns_server.add_txt(f"{signing.selector}._domainkey.example.com", txt.decode())
        verdict = dkimverify.opendkim(raw, dns_server)
        assert verdict.ok, verdict.detail
        verdict = dkimverify.mail_dkim(raw, dns_server)
        assert verdict.ok, verdict.detail


def _wait_for_file(directory: Path, pattern: str, timeout: float = 30.0,
                   count: int = 1) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(directory.glob(pattern))
        if len(found) >= count:
            return found[0]
        time.sleep(0.05)  # another process writes it: nothing to await across processes
    raise AssertionError(f"nothing matching {pattern} in {directory} after {timeout}s")


@pytest.mark.slow
def test_dev_sends_a_first_mail_and_restarts_with_the_same_credentials(
    dev_state: tuple[Path, list[DevProcess]], tmp_path: Path
) -> None:
    state, started = dev_state
    dev = DevProcess(state, tmp_path / "dev.log")
    started.append(dev)
    dev.wait_for(r"Send a first mail")
    ca_line = dev.wait_for(r"--tls-ca-path ")
    ca_file = ca_line.split("--tls-ca-path ")[1].split()[0]
    assert Path(ca_file) == state / "tls" / "ca.crt"
    dev.wait_for(r"Ctrl-C stops")
    printed = "".join(dev.output)
    assert f"127.0.0.1:{dev.ports['smtp']}" in printed
    assert "treated as verified" in printed
    assert f"mailplane logs --state-dir {state}" in printed

    secret_file = state / "secrets" / "shop" / "shop-orders-smtp.yaml"
    secret = _secret(secret_file)
    assert secret["host"] == "127.0.0.1" and secret["port"] == str(dev.ports["smtp"])
    assert secret["password"] not in printed  # the password stays in the Secret file
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600"

    swaks = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{dev.ports['smtp']}", "--tls", "--tls-verify",
         "--tls-ca-path", ca_file, "--auth", "PLAIN", "--auth-user", secret["username"],
         "--auth-password", secret["password"], "--from", "orders@example.com",
         "--to", "someone@example.net", "--header", "Subject: first mail"],
        capture_output=True, text=True, timeout=30, check=False)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert "250 2.0.0 Ok: queued as" in swaks.stdout

    eml = _wait_for_file(state / "outbox", "*.eml")
    raw = eml.read_bytes()
    _check_dkim(raw, state)

    # The printed command works as pasted (it reads the password from the Secret file).
    start = next(i for i, line in enumerate(dev.output) if line.lstrip().startswith("swaks "))
    command = "".join(dev.output[start:start + 5]).replace("\\\n", " ")
    pasted = subprocess.run(["bash", "-c", command.strip() + " --header 'Subject: pasted'"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    # And implicit TLS on the other port.
    smtps = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{dev.ports['smtps']}", "--tls-on-connect",
         "--tls-verify", "--tls-ca-path", ca_file, "--auth", "PLAIN",
         "--auth-user", secret["username"], "--auth-password", secret["password"],
         "--from", "noreply@example.com", "--to", "someone@example.net"],
        capture_output=True, text=True, timeout=30, check=False)
    assert smtps.returncode == 0, smtps.stdout + smtps.stderr
    _wait_for_file(state / "outbox", "*.eml", count=3)
    message = email.message_from_bytes(raw)
    assert message["Subject"] == "first mail"
    assert message["DKIM-Signature"] is not None
    assert "d=example.com" in message["DKIM-Signature"]
    dkim_secret = yaml.safe_load(
        (state / "secrets" / "mailplane-system" / "example-com-dkim.yaml").read_text())

    # What the resources' status would say in a cluster, with no secret in it.
    domain_status = yaml.safe_load(
        (state / "status" / "mailplane-system" / "sendingdomain-example-com.yaml").read_text())
    signing = domain_mod.signing_from_secret(dkim_secret)
    assert signing is not None
    [dkim_record] = [r for r in domain_status["status"]["dnsRecords"] if r["purpose"] == "dkim"]
    assert dkim_record["value"] == domain_mod.dkim_txt_value(signing.pem)
    cred_status = yaml.safe_load(
        (state / "status" / "shop" / "smtpcredential-orders.yaml").read_text())["status"]
    assert [(c["type"], c["status"]) for c in cred_status["conditions"]] == [
        ("Ready", "True"), ("LimitsCapped", "False")]
    every_status = "".join(p.read_text() for p in (state / "status").rglob("*.yaml"))
    assert secret["password"] not in every_status and "PRIVATE KEY" not in every_status

    assert dev.stop() == 0
    password = secret["password"]
    # `mailplane logs --state-dir` reads this file: one delivered record per message, metadata
    # only.
    delivered = query_log(str(state / "relay" / "messagelog.sqlite3"),
                                 status="delivered")
    assert len(delivered) == 3
    assert {r["sender"] for r in delivered} == {
        "orders@example.com", "noreply@example.com", "dev@news.example.org"}
    assert "first mail" not in json.dumps(delivered)

    again = DevProcess(state, tmp_path / "dev.log")
    started.append(again)
    again.wait_for(r"Ctrl-C stops")
    assert _secret(secret_file)["password"] == password
    assert yaml.safe_load(
        (state / "secrets" / "mailplane-system" / "example-com-dkim.yaml").read_text()
    )["data"] == dkim_secret["data"]
    assert (state / "tls" / "ca.crt").read_text() == Path(ca_file).read_text()
    assert again.stop(signal.SIGTERM) == 0


def test_dev_refuses_a_directory_without_a_relay(tmp_path: Path) -> None:
    empty = tmp_path / "manifests"
    empty.mkdir()
    (empty / "ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n")
    result = subprocess.run(
        [*_command(), "--examples", str(empty), "--state-dir", str(tmp_path / "state"),
         "--smtp-port", str(free_port()), "--smtps-port", str(free_port()),
         "--http-port", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 2
    assert "no SmtpRelay manifest found" in result.stderr


def test_dev_evaluates_grants_with_the_examples_namespace_labels(tmp_path: Path) -> None:
    """The quickstart works because the platform's domains grant the namespace labelled
    mailplane.io/smtp-access=true; without that grant (or that label) `mailplane dev` refuses
    the credential exactly as the operator would."""
    from mailplane_cli import dev

    def run(examples: Path, state: str) -> dev.DevState:
        return dev.prepare(dev.load_manifests(examples), tmp_path / state, smtp_port=1,
                           smtps_port=2, http_port=3, sink_port=4)

    ready = run(ROOT / "examples", "granted")
    assert {c.meta.key for c in ready.ready_credentials} == {"shop/orders", "shop/newsletter"}

    ungranted = tmp_path / "ungranted"
    shutil.copytree(ROOT / "examples", ungranted)
    domains = list(yaml.safe_load_all((ungranted / "domains.yaml").read_text()))
    del domains[0]["spec"]["allowedNamespaces"]  # example.com no longer granted to shop
    (ungranted / "domains.yaml").write_text(yaml.safe_dump_all(domains))
    refused = run(ungranted, "refused")
    assert {c.meta.key for c in refused.ready_credentials} == {"shop/newsletter"}
    assert refused.result.credentials == ("shop/newsletter",)
    status = yaml.safe_load(
        (tmp_path / "refused" / "status" / "shop" / "smtpcredential-orders.yaml").read_text())
    ready_cond = next(c for c in status["status"]["conditions"] if c["type"] == "Ready")
    assert ready_cond["reason"] == "SenderNotGranted"
    assert "SendingDomain mailplane-system/example-com" in ready_cond["message"]

    (ungranted / "namespaces.yaml").write_text(
        (ungranted / "namespaces.yaml").read_text().replace('mailplane.io/smtp-access: "true"',
                                                            'team: shop'))
    unlabelled = run(ungranted, "unlabelled")
    assert unlabelled.ready_credentials == []


@pytest.mark.slow
def test_dev_with_a_postgresql_store(
    dev_state: tuple[Path, list[DevProcess]], tmp_path: Path, pg_server: PostgresServer
) -> None:
    """`mailplane dev --store postgresql://…`: the relay logs into the database, the password
    in the URL is written to a private file and printed nowhere, `mailplane logs` reads it."""
    state, started = dev_state
    db = pg_server.create_database()
    url = pg_server.url(db).replace("@/", ":not-printed-s3cret@/")  # trust auth ignores it
    dev = DevProcess(state, tmp_path / "dev.log", "--store", url)
    started.append(dev)
    line = dev.wait_for(r"message log")
    dev.wait_for(r"Ctrl-C stops")
    dsn_file = state / "relay" / "store-dsn"
    assert f"mailplane logs --store @{dsn_file}" in line
    assert oct(dsn_file.stat().st_mode & 0o777) == "0o600"
    config = "".join(p.read_text() for p in (state / "relay" / "config").glob("*.yaml"))
    assert "not-printed-s3cret" not in "".join(dev.output) + config
    assert str(dsn_file.resolve()) in config

    secret = _secret(state / "secrets" / "shop" / "shop-orders-smtp.yaml")
    swaks = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{dev.ports['smtp']}", "--tls",
         "--tls-ca-path", str(state / "tls" / "ca.crt"), "--auth", "PLAIN",
         "--auth-user", secret["username"], "--auth-password", secret["password"],
         "--from", "orders@example.com", "--to", "someone@example.net"],
        capture_output=True, text=True, timeout=30, check=False)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    _wait_for_file(state / "outbox", "*.eml")
    assert dev.stop() == 0
    logs = subprocess.run(
        [str(Path(sys.executable).with_name("mailplane")), "logs", "--store", f"@{dsn_file}",
         "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [json.loads(line) for line in logs.splitlines()]
    assert {r["status"] for r in rows} == {"received", "delivered"}
    assert {r["namespace"] for r in rows} == {"shop"}
    assert not (state / "relay" / "messagelog.sqlite3").exists()
