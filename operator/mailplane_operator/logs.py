"""The operator's process logging: human-readable text, or one JSON object per line for log
collectors (``--log-format json``).

JSON lines carry ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the Kubernetes object a
record is about (``object``: apiVersion, kind, namespace, name, uid, from kopf's per-object
loggers) and ``exc`` with the traceback of a logged exception. Nothing else of the record is
copied: arguments and extras could hold data that must never reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_OBJECT_KEYS = ("apiVersion", "kind", "namespace", "name", "uid")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, Mapping):
            obj = {k: str(ref[k]) for k in _OBJECT_KEYS if ref.get(k)}
            if obj:
                out["object"] = obj
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def setup_logging(log_format: str = "text", *, verbose: bool = False) -> None:
    """Route every record to stderr in the chosen format (replacing earlier handlers)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # kopf logs every request attempt at DEBUG; keep that only when asked for.
    logging.getLogger("kopf").setLevel(logging.DEBUG if verbose else logging.INFO)
