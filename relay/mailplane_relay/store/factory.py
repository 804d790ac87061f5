"""Build the backend a relay configuration names."""

from __future__ import annotations

from pathlib import Path

from ..config import RelaySettings
from .backend import StoreBackend, StoreError
from .sqlite import SqliteBackend


def read_dsn(path: str) -> str:
    try:
        dsn = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StoreError(f"store.dsnFile {path}: cannot read it ({exc.strerror}); mount the "
                         "Secret holding the connection string there") from None
    if not dsn:
        raise StoreError(f"store.dsnFile {path} is empty: it must hold a connection string "
                         "such as 'postgresql://mailplane:PASSWORD@db:5432/mailplane'")
    return dsn


MIN_ERASURE_KEY_BYTES = 32


def read_erasure_key(path: str) -> bytes:
    """A key file: 64 or more hex digits (``openssl rand -hex 32``), or 32 or more raw bytes."""
    try:
        raw = Path(path).read_bytes().strip()
    except OSError as exc:
        raise StoreError(f"store.erasureKeyFiles {path}: cannot read it ({exc.strerror}); "
                         "mount the Secret holding the key there") from None
    try:
        key = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < MIN_ERASURE_KEY_BYTES:
        raise StoreError(f"store.erasureKeyFiles {path}: the key is shorter than "
                         f"{MIN_ERASURE_KEY_BYTES} bytes; make one with `openssl rand -hex 32`")
    return key


def backend_for(settings: RelaySettings, *, readonly: bool = False) -> StoreBackend:
    """The store a configuration names (not opened yet)."""
    backend: StoreBackend
    if settings.store.backend == "postgresql":
        from .postgres import PostgresBackend  # noqa: PLC0415 - psycopg only when used

        assert settings.store.dsn_file is not None  # the config validator says so
        backend = PostgresBackend(read_dsn(settings.store.dsn_file))
    else:
        backend = SqliteBackend(settings.message_log.path, readonly=readonly)
    backend.configured_keys = tuple(read_erasure_key(p) for p in settings.store.erasure_key_files)
    return backend


def buffer_directory(settings: RelaySettings) -> Path:
    """Where a pod keeps what the store did not take yet, and its suppression cache."""
    if settings.store.buffer_directory:
        return Path(settings.store.buffer_directory)
    return Path(settings.message_log.path).parent / "store-buffer"
