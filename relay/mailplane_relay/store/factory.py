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


def backend_for(settings: RelaySettings, *, readonly: bool = False) -> StoreBackend:
    """The store a configuration names (not opened yet)."""
    if settings.store.backend == "postgresql":
        from .postgres import PostgresBackend  # noqa: PLC0415 - psycopg only when used

        assert settings.store.dsn_file is not None  # the config validator says so
        return PostgresBackend(read_dsn(settings.store.dsn_file))
    return SqliteBackend(settings.message_log.path, readonly=readonly)


def buffer_directory(settings: RelaySettings) -> Path:
    """Where a pod keeps what the store did not take yet, and its suppression cache."""
    if settings.store.buffer_directory:
        return Path(settings.store.buffer_directory)
    return Path(settings.message_log.path).parent / "store-buffer"
