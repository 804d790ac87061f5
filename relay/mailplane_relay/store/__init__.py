"""The relay's store: message log, suppression list, shared sending state, erasure.

Two backends behind one interface (``backend.StoreBackend``, described in docs/store.md):
SQLite, a file per pod (the embedded default and ``mailplane dev``), and PostgreSQL, shared by
every pod of a pool.
"""

from __future__ import annotations

from .backend import (
    EraseReport,
    LogQuery,
    StoreBackend,
    StoreError,
    StoreUnavailable,
    SuppressionDelta,
    complaint_hash,
)
from .messagelog import MessageLog
from .sqlite import SqliteBackend
from .suppression import SuppressionList

MessageLogError = StoreError  # the name callers and tests used before the store package

__all__ = [
    "EraseReport",
    "LogQuery",
    "MessageLog",
    "MessageLogError",
    "SqliteBackend",
    "StoreBackend",
    "StoreError",
    "StoreUnavailable",
    "SuppressionDelta",
    "SuppressionList",
    "complaint_hash",
]
