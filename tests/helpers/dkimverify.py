"""Independent DKIM verifiers: what receivers run, not the library the signer uses.

- ``opendkim``: libopendkim through ``opendkim-testmsg`` (Debian ``opendkim-tools``), the
  milter many MTAs run. It takes keys only from the system resolver, so it runs in a private
  mount namespace whose ``/etc/resolv.conf`` names a loopback DNS server on port 53.
- ``mail_dkim``: Perl's Mail::DKIM (Debian ``libmail-dkim-perl``), used by SpamAssassin and
  amavis. Debian 12's version has no Ed25519.
- ``mailauth``: the Node.js mailauth package, with its own canonicalisation and crypto,
  for rsa-sha256 and ed25519-sha256.

Each returns a `Verdict`; a missing tool is a failure, never a skip (bootstrap installs them).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.dns import LoopbackDNS

HELPERS = Path(__file__).parent
NODE_DIR = HELPERS / "node"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    assert path, f"{name} is missing: scripts/bootstrap --test installs it"
    return path


def opendkim(message: bytes, dns: LoopbackDNS) -> Verdict:
    """opendkim-testmsg verifies every signature; silent with exit 0 means all passed."""
    assert dns.port == 53, "libopendkim asks port 53: use LoopbackDNS(standard_port=True)"
    testmsg = _tool("opendkim-testmsg")
    with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf") as resolv:
        resolv.write(f"nameserver {dns.address}\noptions timeout:2 attempts:2\n")
        resolv.flush()
        r = subprocess.run(
            ["unshare", "--mount", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec "$1"', resolv.name, testmsg],
            input=message, capture_output=True, timeout=60)
    detail = (r.stdout + r.stderr).decode(errors="replace").strip()
    return Verdict(r.returncode == 0 and not detail, detail or f"exit {r.returncode}")


def mail_dkim(message: bytes, dns: LoopbackDNS) -> Verdict:
    """Mail::DKIM's overall result is 'pass' when at least one signature verifies; ``ok`` here
    demands that every signature it knows passes."""
    _tool("perl")
    r = subprocess.run(["perl", str(HELPERS / "dkim_verify.pl"), dns.address, str(dns.port)],
                       input=message, capture_output=True, timeout=60)
    out = r.stdout.decode(errors="replace")
    lines = out.splitlines()
    sigs = [line for line in lines if line.startswith("signature ")]
    ok = (r.returncode == 0 and bool(sigs) and "overall pass" in lines
          and all(line.split()[2] == "pass" for line in sigs))
    return Verdict(ok, out + r.stderr.decode(errors="replace"))


def node_verifier() -> Path:
    """tests/helpers/node with mailauth installed from its lock file (on first use)."""
    npm = shutil.which("npm")
    assert npm and shutil.which("node"), "node and npm are needed (apt-get install nodejs npm)"
    with (NODE_DIR / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (NODE_DIR / "node_modules" / "mailauth").is_dir():
            r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                               cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
    return NODE_DIR


def mailauth(message: bytes, dns: LoopbackDNS) -> list[dict[str, str]]:
    """One result per signature: status ('pass', 'fail', 'neutral', ...), algo, domain."""
    node_dir = node_verifier()
    r = subprocess.run(["node", str(node_dir / "dkim-verify.cjs"), dns.address, str(dns.port)],
                       input=message, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return [json.loads(line) for line in r.stdout.decode().splitlines() if line.strip()]
