"""`mailplane dev`: the whole platform on one machine, without Kubernetes.

It reads the example manifests (the YAML a platform team applies), runs the operator's own
reconcile code on them and writes what the operator would create into a state directory::

    STATE_DIR/secrets/<namespace>/<secret>.yaml   credential and DKIM key Secrets (manifests)
    STATE_DIR/relay/config/*.yaml                  the rendered relay configuration
    STATE_DIR/status/<namespace>/<kind>-<name>.yaml  what each resource's status would say
    STATE_DIR/relay/spool/                         the relay's spool
    STATE_DIR/relay/messagelog.sqlite3             the message log (`mailplane logs --state-dir`)
    STATE_DIR/tls/ca.crt, server.crt, server.key   a throwaway CA and a certificate for 127.0.0.1
    STATE_DIR/outbox/*.eml                         every delivered message, one file each

then starts a capture sink on a loopback port and the relay (delivering to that sink in
smarthost mode), prints how to send a first mail, and runs until SIGINT/SIGTERM, when the relay
drains and everything stops with exit status 0. Domains are treated as verified (no DNS on a
laptop). Re-running with the same state directory keeps the passwords, DKIM keys and CA.

Differences from a cluster, on purpose: one relay (the first SmtpRelay of the examples), listening
on 127.0.0.1 with the dev ports, TLS from the local CA, delivery to the capture sink.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import itertools
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailplane_operator.reconcile import credential as credential_mod
from mailplane_operator.reconcile import credential_state, models, render
from mailplane_operator.reconcile import domain as domain_mod
from mailplane_operator.reconcile import relay as relay_mod
from mailplane_operator.reconcile import retention as retention_mod
from mailplane_operator.reconcile.conditions import Event

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = ".mailplane-dev"
DEFAULT_SMTP_PORT = 2587
DEFAULT_SMTPS_PORT = 2465
DEFAULT_HTTP_PORT = 8080
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
DEFAULT_PORTAL_PORT = 8480

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "dev", help="run the whole platform locally (relay + capture sink) from example manifests",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--examples", metavar="DIR",
                   help="directory of manifests (default: ./examples, else the repository's)")
    p.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                   help=f"where generated state lives (default: ./{DEFAULT_STATE_DIR})")
    p.add_argument("--smtp-port", type=int, default=DEFAULT_SMTP_PORT, metavar="N",
                   help=f"STARTTLS submission port (default {DEFAULT_SMTP_PORT})")
    p.add_argument("--smtps-port", type=int, default=DEFAULT_SMTPS_PORT, metavar="N",
                   help=f"implicit TLS submission port (default {DEFAULT_SMTPS_PORT})")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, metavar="N",
                   help=f"metrics and health port (default {DEFAULT_HTTP_PORT})")
    p.add_argument("--store", metavar="URL",
                   help="share a PostgreSQL store (postgresql://USER:PASSWORD@HOST/DB) instead "
                        "of the SQLite file in the state directory; see docs/store.md")
    p.add_argument("--portal-port", type=int, default=DEFAULT_PORTAL_PORT, metavar="N",
                   help=f"customer portal port (default {DEFAULT_PORTAL_PORT}; 0: any free "
                        "port; -1: no portal)")
    p.set_defaults(func=run)


def default_examples_dir() -> Path:
    local = Path.cwd() / "examples"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "examples"


# --------------------------------------------------------------------------------------------
# Reading manifests, writing Secrets
# --------------------------------------------------------------------------------------------


@dataclass
class Manifests:
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    relays: list[models.SmtpRelay] = field(default_factory=list)
    domains: list[models.SendingDomain] = field(default_factory=list)
    credentials: list[models.SmtpCredential] = field(default_factory=list)
    policies: list[models.RetentionPolicy] = field(default_factory=list)


class DevError(Exception):
    """Something the user must fix (bad manifests, no relay); the message says what."""


def _with_uid(body: Mapping[str, Any]) -> dict[str, Any]:
    """The API server would add uid and generation; owner references need a uid."""
    doc = dict(body)
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("namespace", "default")
    meta.setdefault("uid", f"dev-{doc.get('kind', '').lower()}-{meta['namespace']}-"
                    f"{meta.get('name')}")
    meta.setdefault("generation", 1)
    doc["metadata"] = meta
    return doc


def load_manifests(directory: Path) -> Manifests:
    """Every manifest of ``directory/*.yaml`` (not subdirectories, so ``invalid/`` is skipped)."""
    if not directory.is_dir():
        raise DevError(f"{directory}: no such directory of manifests (use --examples DIR)")
    found = Manifests()
    for path in sorted(directory.glob("*.y*ml")):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except yaml.YAMLError as exc:
            raise DevError(f"{path}: not valid YAML: {exc}") from None
        for doc in docs:
            kind = doc.get("kind")
            if kind == "Namespace":
                md = doc.get("metadata") or {}
                found.namespaces[str(md.get("name"))] = dict(md.get("labels") or {})
                continue
            parser = models.PARSERS.get(str(kind))
            if parser is None or doc.get("apiVersion") != models.API_VERSION:
                continue
            try:
                parsed = parser(_with_uid(doc))
            except models.SpecError as exc:
                raise DevError(f"{path}: {exc}") from None
            getattr(found, {"SmtpRelay": "relays", "SendingDomain": "domains",
                            "SmtpCredential": "credentials",
                            "RetentionPolicy": "policies"}[str(kind)]).append(parsed)
    if not found.relays:
        raise DevError(f"{directory}: no SmtpRelay manifest found")
    return found


def secret_path(state: Path, secret: Mapping[str, Any]) -> Path:
    md = secret["metadata"]
    return state / "secrets" / str(md["namespace"]) / f"{md['name']}.yaml"


def read_secret(state: Path, namespace: str, name: str) -> dict[str, Any] | None:
    path = state / "secrets" / namespace / f"{name}.yaml"
    if not path.exists():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def write_private(path: Path, text: str) -> None:
    """Atomically, readable by the owner only: these files hold passwords and keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def write_secret(state: Path, secret: Mapping[str, Any]) -> Path:
    path = secret_path(state, secret)
    write_private(path, yaml.safe_dump(dict(secret), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Throwaway TLS
# --------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def ensure_tls(tls_dir: Path, now: dt.datetime) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key): kept across runs while the server certificate is valid."""
    ca_crt, crt, key = tls_dir / "ca.crt", tls_dir / "server.crt", tls_dir / "server.key"
    if ca_crt.exists() and crt.exists() and key.exists():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        if cert.not_valid_after_utc > now + dt.timedelta(days=1):
            return ca_crt, crt, key
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailplane dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=364))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls_dir.mkdir(parents=True, exist_ok=True)
    # The CA key is not kept: a new server certificate comes with a new CA.
    write_private(key, _pem_key(server_key))
    crt.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_crt, crt, key


# --------------------------------------------------------------------------------------------
# Reconcile, as the operator would
# --------------------------------------------------------------------------------------------


@dataclass
class DevState:
    state_dir: Path
    relay: models.SmtpRelay
    config_dir: Path
    ca_file: Path
    credential_files: dict[str, Path]
    """``namespace/name`` of each SmtpCredential -> its Secret manifest file."""
    ready_credentials: list[models.SmtpCredential]
    result: render.RenderResult
    events: list[tuple[str, Event]]
    ignored_relays: list[str]


def prepare(
    manifests: Manifests,
    state_dir: Path,
    *,
    smtp_port: int,
    smtps_port: int,
    http_port: int,
    sink_port: int,
    now: dt.datetime | None = None,
    store: str | None = None,
) -> DevState:
    """Run the reconcile code and write Secrets, TLS files and the relay configuration."""
    now = now or dt.datetime.now(dt.UTC)
    relays = sorted(manifests.relays, key=lambda r: r.meta.key)
    relay = relays[0]
    # Deliver everything to the local capture sink instead of the Internet.
    dev_delivery = models.DeliverySpec(
        mode="smarthost", smarthost=models.SmarthostSpec(host=HOST, port=sink_port, tls="none"))
    # No DNS on a laptop: every namespace may skip verification (on a cluster only the
    # namespaces the relay's spec.tenancy.verificationSkipNamespaces selects may).
    dev_tenancy = relay.spec.tenancy.model_copy(update={
        "verification_skip_namespaces": models.LabelSelector()})
    dev_relay = models.SmtpRelay(
        relay.meta, relay.spec.model_copy(update={"delivery": dev_delivery,
                                                  "tenancy": dev_tenancy}), relay.status)
    ca_crt, crt, key = ensure_tls(state_dir / "tls", now)
    events: list[tuple[str, Event]] = []

    domain_inputs = []
    # No DNS on a laptop: every domain counts as verified.
    dev_domains = [models.SendingDomain(d.meta, d.spec.model_copy(update={
        "verification": models.VerificationSpec(skip=True)}), d.status)
        for d in sorted(manifests.domains, key=lambda d: d.meta.key)]
    for dom in dev_domains:
        existing = read_secret(state_dir, dom.meta.namespace, domain_mod.secret_name(dom))
        dom_result = domain_mod.reconcile_domain(
            dom, relay=dev_relay if render.refers_to(dom, relay) else None,
            namespace_labels=manifests.namespaces.get(dom.meta.namespace),
            existing_secret=existing, observed=None, now=now,
            claims=[d for d in dev_domains if render.refers_to(d, relay)],
            claim_labels=manifests.namespaces)
        write_secret(state_dir, dom_result.secret)
        write_status(state_dir, dom, dom_result.status)
        events += [(f"SendingDomain {dom.meta.key}", e) for e in dom_result.events]
        domain_inputs.append(render.DomainInput(
            models.SendingDomain(dom.meta, dom.spec, dom_result.status), dom_result.secret))

    included, _ = render.attached_domains(dev_relay, domain_inputs, manifests.namespaces)
    # Grants are evaluated as on a cluster: with the labels of examples/namespaces.yaml.
    attached = render.owners_of(included)
    endpoint = credential_mod.Endpoint(
        HOST,
        smtp_port if relay.spec.listeners.submission.enabled else None,
        smtps_port if relay.spec.listeners.submissions.enabled else None,
    )
    cred_inputs = []
    files: dict[str, Path] = {}
    ready: list[models.SmtpCredential] = []
    for cred in sorted(manifests.credentials, key=lambda c: c.meta.key):
        existing = read_secret(state_dir, cred.meta.namespace, cred.secret_name)
        stored = read_secret(state_dir, relay.meta.namespace,
                             credential_state.state_secret_name(cred))
        cred_result = credential_mod.reconcile_credential(
            cred, relay=relay if render.refers_to(cred, relay) else None,
            namespace_labels=manifests.namespaces.get(cred.meta.namespace),
            attached_domains=attached, existing_secret=existing, stored_state=stored, now=now,
            endpoint=endpoint)
        if cred_result.state_secret is not None:
            write_secret(state_dir, cred_result.state_secret)
        events += [(f"SmtpCredential {cred.meta.key}", e) for e in cred_result.events]
        write_status(state_dir, cred, cred_result.status)
        if cred_result.secret is not None:
            files[cred.meta.key] = write_secret(state_dir, cred_result.secret)
            cred_inputs.append(render.CredentialInput(cred, cred_result.secret,
                                                      cred_result.state_secret))
            if cred_result.admission.allowed and not cred_result.status.get("suspendedBy"):
                ready.append(cred)

    relay_dir = state_dir / "relay"
    extra: dict[str, Any] = {}
    if store is not None:
        if not store.startswith(("postgresql://", "postgres://")):
            raise DevError(f"--store {store.split('@')[-1]!r}: give a PostgreSQL URL such as "
                           "postgresql://mailplane:PASSWORD@localhost/mailplane")
        # As in a pod: the connection string in a private file, only its path in the config.
        dsn_file = relay_dir / "store-dsn"
        write_private(dsn_file, store + "\n")
        extra["store"] = {"backend": "postgresql", "dsnFile": str(dsn_file.resolve())}
    paths = render.RuntimePaths(
        tls_cert=str(crt.resolve()), tls_key=str(key.resolve()),
        spool=str((relay_dir / "spool").resolve()),
        message_log=str((relay_dir / "messagelog.sqlite3").resolve()),
        listen_address=HOST, submission_port=smtp_port, submissions_port=smtps_port,
        http_address=HOST, http_port=http_port, hostname="localhost", extra_settings=extra,
    )
    result = render.render_relay_config(
        dev_relay, domains=domain_inputs, credentials=cred_inputs,
        policies=manifests.policies, namespace_labels=manifests.namespaces, now=now,
        paths=paths)
    config_dir = relay_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, text in result.files.items():
        write_private(config_dir / name, text)
    for stale in config_dir.glob("*.yaml"):
        if stale.name not in result.files:
            stale.unlink()
    write_status(state_dir, relay, relay_mod.relay_status(
        relay, statefulset_status={"replicas": 1, "readyReplicas": 1},
        config_hash=result.config_hash, config_secrets=result.secret_names,
        domains=list(result.domains), credentials=len(result.credentials),
        excluded=len(result.excluded), retention_policies=list(result.retention.policies),
        now=now))
    for policy in manifests.policies:
        write_status(state_dir, policy, retention_mod.retention_status(policy, [relay], now))
    return DevState(state_dir, relay, config_dir, ca_crt, files, ready, result, events,
                    [r.meta.key for r in relays[1:]])


def write_status(state: Path, obj: models.SmtpRelay | models.SendingDomain
                 | models.SmtpCredential | models.RetentionPolicy,
                 status: Mapping[str, Any]) -> None:
    """What ``kubectl get <kind> -o yaml`` would show under ``status`` (no secret in it)."""
    path = state / "status" / obj.meta.namespace / f"{obj.kind.lower()}-{obj.meta.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in status.items() if v is not None}
    path.write_text(yaml.safe_dump({"kind": obj.kind, "metadata": {
        "name": obj.meta.name, "namespace": obj.meta.namespace}, "status": clean},
        sort_keys=False))


# --------------------------------------------------------------------------------------------
# The capture sink
# --------------------------------------------------------------------------------------------


class OutboxHandler:
    """aiosmtpd handler: each delivered message becomes one ``.eml`` file in the outbox."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self._counter = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{os.getpid()}-{next(self._counter):06d}.eml"
        await asyncio.to_thread(self._write, name, data)
        return "250 2.0.0 Ok: captured"

    def _write(self, name: str, data: bytes) -> None:
        # Written under a temporary name and renamed, so a reader never sees half a message.
        tmp = self.outbox / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.outbox / name)


async def start_sink(outbox: Path) -> asyncio.Server:
    await asyncio.to_thread(outbox.mkdir, parents=True, exist_ok=True)
    handler = OutboxHandler(outbox)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, hostname="mailplane-dev-sink", ident="mailplane dev sink"),
        host=HOST, port=0)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _store_option(dev: DevState) -> str:
    dsn_file = dev.state_dir / "relay" / "store-dsn"
    if dev.result.config.settings.store.backend == "postgresql":
        return f"--store @{dsn_file}"  # the file, so the password is not printed
    return f"--state-dir {dev.state_dir}"


def instructions(dev: DevState, smtp_port: int, smtps_port: int, http_port: int,
                 portal_port: int | None = None) -> str:
    state = dev.state_dir
    lines = [
        "",
        "mailplane dev is running: the relay renders the example manifests as the operator would.",
        f"  relay               SmtpRelay {dev.relay.meta.key}",
        f"  SMTP (STARTTLS)     {HOST}:{smtp_port}",
        f"  SMTPS (implicit)    {HOST}:{smtps_port}",
        f"  metrics and health  http://{HOST}:{http_port}/metrics  /livez  /readyz",
        f"  CA certificate      {dev.ca_file}",
        f"  relay configuration {dev.config_dir}/",
        f"  resource status     {state / 'status'}/ (conditions, DNS records to publish)",
        f"  delivered mail      {state / 'outbox'}/ (one .eml file per message)",
        f"  message log         mailplane logs {_store_option(dev)}",
        *([f"  portal              http://localhost:{portal_port}/  (log in with the token "
            f"in {state / 'portal-token'})"] if portal_port is not None else []),
        "  domains             treated as verified (no DNS checks on a laptop): "
        + (", ".join(dev.result.domains) or "none"),
    ]
    if dev.ignored_relays:
        lines.append("  ignored relays      " + ", ".join(dev.ignored_relays)
                     + " (mailplane dev runs the first SmtpRelay only)")
    lines.append("  credentials (Kubernetes Secret manifests, values base64 in data):")
    for key, path in sorted(dev.credential_files.items()):
        excluded = dev.result.exclusion("SmtpCredential", key)
        note = f"  NOT ACCEPTED: {excluded.reason}: {excluded.message}" if excluded else ""
        lines.append(f"    {key:<28} {path}{note}")
    if dev.ready_credentials:
        cred = dev.ready_credentials[0]
        path = dev.credential_files[cred.meta.key]
        sender = cred.spec.allowed_senders[0]
        sender = sender if "@" in sender else f"dev@{sender}"
        lines += [
            "",
            "Send a first mail (STARTTLS, certificate verified against the dev CA):",
            f"  swaks --server {HOST}:{smtp_port} --tls --tls-verify \\",
            f"    --tls-ca-path {dev.ca_file} \\",
            f"    --auth PLAIN --auth-user {credential_mod.username_for(cred)} \\",
            f"    --auth-password \"$(sed -n 's/^  password: //p' {path} | base64 -d)\" \\",
            f"    --from {sender} --to someone@example.net",
            f"then look in {state / 'outbox'}/ and run: mailplane logs {_store_option(dev)}",
        ]
    lines += ["", "Ctrl-C stops (the relay drains first)."]
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    from mailplane_relay.app import RelayApp  # noqa: PLC0415 - only `dev` needs the relay

    state_dir = Path(args.state_dir)
    examples = Path(args.examples) if args.examples else default_examples_dir()
    manifests = load_manifests(examples)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Until the relay installs its own handlers, a signal only means "do not start".
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sink = await start_sink(state_dir / "outbox")
    try:
        sink_port = int(sink.sockets[0].getsockname()[1])
        dev = prepare(manifests, state_dir, smtp_port=args.smtp_port,
                      smtps_port=args.smtps_port, http_port=args.http_port, sink_port=sink_port,
                      store=args.store)
        for what, event in dev.events:
            log.info("%s: %s: %s", what, event.reason, event.message)
        if stop.is_set():
            return 0
        app = RelayApp(str(dev.config_dir))
        relay_task = asyncio.create_task(app.run(), name="relay")
        deadline = loop.time() + READY_TIMEOUT
        while not app.readiness.ready and not relay_task.done():
            if loop.time() > deadline:
                app.request_stop()
                break
            await asyncio.sleep(0.05)
        portal = None
        if app.readiness.ready and args.portal_port >= 0:
            portal = await _start_portal(dev, manifests, args.portal_port)
        if app.readiness.ready:
            print(instructions(dev, args.smtp_port, args.smtps_port, args.http_port,
                               portal[1] if portal is not None else None), flush=True)
        try:
            await relay_task
        finally:
            if portal is not None:
                await portal[0]()
        return 0
    finally:
        sink.close()
        await sink.wait_closed()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _start_portal(dev: DevState, manifests: Manifests, port: int
                        ) -> tuple[Callable[[], Awaitable[None]], int]:
    """The customer portal beside the relay, on the relay's store, with a dev login: a token
    written to state-dir/portal-token that stands for a user who may see every namespace."""
    from mailplane_portal.cli import start_site, store_for  # noqa: PLC0415
    from mailplane_portal.devkube import DevKube  # noqa: PLC0415
    from mailplane_portal.web import Portal  # noqa: PLC0415

    token_file = dev.state_dir / "portal-token"
    if not token_file.is_file():
        write_private(token_file, secrets.token_urlsafe(32) + "\n")
    specs: dict[tuple[str, str, str], Any] = {}
    for plural, objs in (("smtpcredentials", manifests.credentials),
                         ("sendingdomains", manifests.domains)):
        for obj in objs:
            specs[(plural, obj.meta.namespace, obj.meta.name)] = obj.spec.model_dump(
                by_alias=True, exclude_none=True, mode="json")
    kube = DevKube(dev.state_dir, token_file.read_text().strip(), specs)
    store, records = store_for(dev.result.config.settings)
    await store.open()
    await records.open()
    await records.fail_interrupted()
    runner, bound = await start_site(Portal(store, kube, records), HOST, port)

    async def stop() -> None:
        await runner.cleanup()
        await records.close()
        await store.close()

    return stop, bound


def run(args: argparse.Namespace) -> int:
    from mailplane_relay.config import ConfigError  # noqa: PLC0415
    from mailplane_relay.logging_setup import setup_logging  # noqa: PLC0415

    setup_logging("info")
    try:
        return asyncio.run(_run(args))
    except (DevError, render.RenderError, ConfigError) as exc:
        print(f"mailplane dev: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mailplane dev: {exc} (is another mailplane dev running? pick other ports "
              "with --smtp-port/--smtps-port/--http-port)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m mailplane_cli.dev``: the same as ``mailplane dev``."""
    parser = argparse.ArgumentParser(prog="mailplane")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dev", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
