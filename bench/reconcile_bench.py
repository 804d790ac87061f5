"""Reconcile benchmark: 1,000 SmtpCredentials and 100 SendingDomains against the emulator.

The real operator (kopf + mailplane_operator.handlers, production timings except DNS: the
domains skip verification) runs against the kmock-based Kubernetes API emulator of the tests.
The benchmark creates one SmtpRelay, the domains and the credentials as fast as it can (as a
`kubectl apply -f` of a large directory would), then measures the time until the relay's
configuration Secrets hold every credential and the relay status agrees.

    .venv/bin/python bench/reconcile_bench.py [--credentials 1000] [--domains 100] [--rsa]

Prints one line per figure; the last line is the headline number.
"""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "operator", ROOT / "relay", ROOT / "cli"):
    sys.path.insert(0, str(path))

from tests.helpers.kube import (  # noqa: E402
    KubeApi,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    running_emulator,
    start_operator,
)

from mailplane_operator import kube as k  # noqa: E402


def _config_usernames(api: KubeApi) -> set[str]:
    """Usernames in the relay's config Secrets, read the way the relay would (all files)."""
    names: set[str] = set()
    for secret in api.list(k.SECRETS, "mail", {"mailplane.io/relay": "main"}):
        for value in (secret.get("data") or {}).values():
            for doc in yaml.load_all(base64.b64decode(value), Loader=yaml.CSafeLoader):
                if doc and doc.get("kind") == "RelayCredentials":
                    names.update(c["username"] for c in doc["spec"]["credentials"])
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--rsa", action="store_true", help="RSA-2048 DKIM keys (default Ed25519)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    with running_emulator() as api:
        operator = start_operator(api, debug_logs=False, rotation_check_interval=10.0,
                                  render_debounce=0.2, relay_resync_interval=300.0)
        try:
            api.create(k.NAMESPACES, namespace_body("mail"))
            apps = [f"app-{i}" for i in range(args.namespaces)]
            for ns in apps:
                api.create(k.NAMESPACES, namespace_body(ns, **{"mailplane.io/smtp-access": "true"}))
            domains = [f"d{i}.example.com" for i in range(args.domains)]

            started = time.monotonic()
            api.create(k.SMTP_RELAYS, relay_body(replicas=2))
            algorithm = "rsa-2048" if args.rsa else "ed25519"
            for i, domain in enumerate(domains):
                api.create(k.SENDING_DOMAINS, domain_body(
                    f"d{i}", domain, dkim={"selector": "mp", "algorithm": algorithm}))
            expected = set()
            for i in range(args.credentials):
                ns = apps[i % len(apps)]
                api.create(k.SMTP_CREDENTIALS, credential_body(
                    f"cred-{i}", [f"app{i}@{domains[i % len(domains)]}"], namespace=ns))
                expected.add(f"{ns}.cred-{i}")
            created = time.monotonic() - started

            def complete() -> bool:
                relay = api.get(k.SMTP_RELAYS, "mail", "main") or {}
                status = relay.get("status") or {}
                return (status.get("credentialCount") == len(expected)
                        and status.get("domainCount") == len(domains)
                        and _config_usernames(api) >= expected)

            api.wait_until(complete, timeout=args.timeout, what="the full relay configuration",
                           poll=0.5)
            rendered = time.monotonic() - started
            worker = operator.runtime[0].workers[("mail", "main")]
            secrets = api.list(k.SECRETS, "mail", {"mailplane.io/relay": "main",
                                                   "mailplane.io/component": "config"})
            sizes = [len(json.dumps(s)) for s in secrets]
        finally:
            operator.stop()

    print(f"objects created: 1 relay, {len(domains)} domains ({algorithm}), "
          f"{len(expected)} credentials in {len(apps)} namespaces, in {created:.1f} s")
    print(f"renders of the relay configuration: {worker.renders}, "
          f"{worker.render_seconds:.1f} s in total")
    print(f"config Secrets: {len(secrets)}, sizes {sizes} bytes (limit 1 MiB)")
    print(f"API writes seen by the emulator: {api.emulator.writes}")
    print(f"time to a fully rendered configuration: {rendered:.1f} s "
          f"(from the first create; {len(expected)} credentials, {len(domains)} domains)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
