"""A throwaway CA and server certificates for loopback TLS (trustme), as fixtures and functions.

Keys are generated per test session and written only under pytest's temporary directories.
Plain functions (``make_ca``, ``write_server_pair``, ``client_context``) serve benchmarks and
other helpers that are not tests.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class ServerPair:
    cert_file: Path
    key_file: Path
    cert: trustme.LeafCert

    @property
    def serial(self) -> int:
        from cryptography import x509

        pem = self.cert.cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).serial_number


def make_ca() -> trustme.CA:
    return trustme.CA()


def write_server_pair(ca: trustme.CA, directory: Path, *, names: tuple[str, ...] = SERVER_NAMES,
                      stem: str = "tls") -> ServerPair:
    """Issue a server certificate and write ``<stem>.crt`` (chain) and ``<stem>.key``."""
    leaf = ca.issue_cert(*names)
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / f"{stem}.crt"
    key_file = directory / f"{stem}.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    key_file.chmod(0o600)
    return ServerPair(cert_file, key_file, leaf)


def write_ca_file(ca: trustme.CA, directory: Path) -> Path:
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts only this CA and checks host names."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


def peer_serial(sock: ssl.SSLSocket | ssl.SSLObject) -> int:
    from cryptography import x509

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return make_ca()


@pytest.fixture
def tls_server_pair(tls_ca: trustme.CA, tmp_path: Path) -> ServerPair:
    return write_server_pair(tls_ca, tmp_path / "tls")


@pytest.fixture
def tls_ca_file(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    return write_ca_file(tls_ca, tmp_path)


@pytest.fixture
def tls_client_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    return client_context(tls_ca)
