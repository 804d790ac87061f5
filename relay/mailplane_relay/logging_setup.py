"""Process logging for the relay: one line per record, ``key=value`` (logfmt), on stderr."""

from __future__ import annotations

import logging
import sys
import time

# aiosmtpd's protocol logger writes every envelope address at INFO and more at DEBUG: the relay
# logs what it needs itself, so this one stays at WARNING whatever the level asked for.
_QUIET_LOGGERS = {"mail.log": logging.WARNING, "aiohttp.access": logging.WARNING,
                  "asyncio": logging.WARNING}


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\t'):
        return value
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\t", "\\t"))
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, static: dict[str, str] | None = None) -> None:
        super().__init__()
        self._static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in self._static.items()]
        parts.append(f"msg={_quote(record.getMessage())}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str = "info", *, worker: int | None = None) -> None:
    static = {"worker": str(worker)} if worker is not None else {}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(static))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, floor in _QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(floor, root.level))
