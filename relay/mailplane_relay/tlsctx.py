"""One server-side TLS context, re-loaded in place when its certificate or key files change.

Both listeners hold the same ``ssl.SSLContext`` object (the implicit-TLS server was created with
it, STARTTLS sessions wrap with it), so loading a renewed pair into that object is enough for
every new handshake to present it, with no restart and no dropped session.

A pair is first read once from disk into anonymous memory files and checked on a scratch
context; only a pair that loads cleanly is then loaded into the live context, from those same
bytes. Loading straight from the paths could leave the live context with a new certificate and no
key (OpenSSL drops a key that no longer matches) when a renewal is caught half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .aiotasks import cancel_and_wait
from .config import RelayConfig, TLSSettings

log = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSError(Exception):
    """The certificate or key cannot be used."""


class _FileState(NamedTuple):
    path: str
    inode: int
    size: int
    mtime_ns: int


def _fingerprint(settings: TLSSettings) -> tuple[_FileState, _FileState, str]:
    out = []
    for path in (settings.cert_file, settings.key_file):
        st = os.stat(path)
        out.append(_FileState(path, st.st_ino, st.st_size, st.st_mtime_ns))
    return out[0], out[1], settings.min_version


@contextlib.contextmanager
def _memory_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths to anonymous in-memory copies: key material never touches a disk here."""
    fds: list[int] = []
    try:
        for blob in blobs:
            fd = os.memfd_create("mailplane-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, blob)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def new_server_context(min_version: str = "1.2") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # SMTP clients seldom present certificates; a request would only confuse some of them.
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with _memory_files(cert_pem, key_pem) as (cert_path, key_path):
        scratch = new_server_context()
        scratch.load_cert_chain(cert_path, key_path)
        ctx.load_cert_chain(cert_path, key_path)


class ReloadingTLS:
    def __init__(self, config: Callable[[], RelayConfig]) -> None:
        self._config = config
        self._settings = self._tls_settings()
        self.context = new_server_context(self._settings.min_version)
        self._loaded: tuple[_FileState, _FileState, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    def _tls_settings(self) -> TLSSettings:
        tls = self._config().settings.tls
        if tls is None:  # the config contract refuses this; kept for type narrowing
            raise TLSError("tls settings are missing")
        return tls

    async def start(self) -> None:
        """Load the pair (raises TLSError if it is unusable) and start watching the files."""
        if not self.check():
            raise TLSError(
                f"cannot load tls.certFile {self._settings.cert_file!r} with tls.keyFile "
                f"{self._settings.key_file!r}"
            )
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="tls-reload")

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await cancel_and_wait(task)

    async def reload(self) -> bool:
        """Check the files now (the configuration may name new ones); True if in force."""
        return self.check()

    def check(self) -> bool:
        """Load the pair into the live context if the files changed. False if the pair in the
        files is broken (the previous one, if any, stays in force)."""
        settings = self._tls_settings()
        try:
            current = _fingerprint(settings)
        except OSError as exc:
            log.error("tls: cannot stat %s: %s; keeping the certificate in force",
                      exc.filename, exc.strerror)
            return False
        if current == self._loaded:
            return True
        try:
            with open(settings.cert_file, "rb") as f:
                cert_pem = f.read()
            with open(settings.key_file, "rb") as f:
                key_pem = f.read()
            _load_pair(self.context, cert_pem, key_pem)
        except (OSError, ssl.SSLError) as exc:
            # Never log the exception's arguments wholesale: they can quote file content.
            log.error("tls: certificate %s / key %s not loaded (%s); keeping the one in force",
                      settings.cert_file, settings.key_file, type(exc).__name__)
            return False
        self.context.minimum_version = _VERSIONS[settings.min_version]
        first = self._loaded is None
        self._loaded = current
        self._settings = settings
        if not first:
            self.reloads += 1
            log.info("tls: certificate reloaded from %s", settings.cert_file)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(max(self._tls_settings().reload_interval, 0.05))
            try:
                self.check()
            except Exception:
                log.exception("tls: reload check failed; retrying at the next interval")
