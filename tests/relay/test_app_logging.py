"""The relay's log lines: one logfmt line per record, whatever the message holds."""

from __future__ import annotations

import logging
import shlex
import sys

import pytest

from mailplane_relay.logging_setup import LogfmtFormatter, setup_logging


def fields(line: str) -> dict[str, str]:
    # logfmt quoting is close enough to POSIX shell quoting for the values tested here.
    return dict(part.split("=", 1) for part in shlex.split(line))


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("mailplane_relay.app", logging.ERROR, __file__, 1, msg, args,
                             exc_info)


def test_a_record_is_one_line_with_quoted_values() -> None:
    line = LogfmtFormatter({"worker": "1"}).format(
        record('reload rejected: %s', 'relay.yaml: bad\n"value"\there'))
    assert "\n" not in line
    got = fields(line)
    assert got["level"] == "error"
    assert got["logger"] == "mailplane_relay.app"
    assert got["worker"] == "1"
    assert got["ts"].endswith("Z")
    assert got["msg"] == 'reload rejected: relay.yaml: bad\\n"value"\\there'


def test_a_traceback_stays_on_the_line() -> None:
    line = LogfmtFormatter().format(record("relay failed", exc=True))
    assert "\n" not in line
    assert "ValueError: boom" in fields(line)["exc"]


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("mail.log").level)
    yield None
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("mail.log").setLevel(saved[2])


@pytest.mark.usefixtures("restore_logging")
def test_debug_level_keeps_aiosmtpd_address_logging_quiet() -> None:
    setup_logging("debug", worker=0)
    assert logging.getLogger().level == logging.DEBUG
    assert not logging.getLogger("mail.log").isEnabledFor(logging.INFO)
