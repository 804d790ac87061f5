"""Protocol robustness with byte-exact input over real TLS: bare CR/LF and every SMTP-smuggling
end-of-data variant, control characters in commands, overlong lines, STARTTLS command
injection, failed handshakes, internal errors, spool failures."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import ssl

import pytest

from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_support import RawSMTP, Relay, message, ready_session

relay = support.relay

SMUGGLED = b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"

SMUGGLING_VARIANTS = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\r.\n", b"\n.\r",
    b"\r\n.\r\r\n", b"\r\n.\n\r\n",
]


async def _open_data(c: RawSMTP) -> None:
    assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    assert (await c.cmd("RCPT TO:<x@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354


@pytest.mark.parametrize("eod", SMUGGLING_VARIANTS, ids=lambda b: repr(b)[2:-1])
async def test_smuggling_end_of_data_variants_are_refused(relay: Relay, eod: bytes) -> None:
    c = await ready_session(relay)
    try:
        await _open_data(c)
        payload = (b"From: a@example.com\r\nSubject: x\r\n\r\nfirst" + eod + SMUGGLED
                   + b"From: ceo@example.com\r\n\r\nsmuggled\r\n.\r\n")
        await c.send(payload)
        code, text = await c.reply()
        assert code == 554 and text.startswith("554 5.6.0"), text
        # In sync: the next reply answers the next command, not a smuggled one.
        assert (await c.cmd("NOOP"))[1] == "250 2.0.0 Ok"
    finally:
        await c.close()
    assert relay.queue.submitted == []
    assert list(relay.spool.directory.glob("*.msg")) == []
    assert relay.rejected("smuggling") == 1


@pytest.mark.parametrize("body", [b"line one\nline two\r\n", b"line one\rline two\r\n",
                                  b"trailing bare lf\n"])
async def test_bare_cr_or_lf_in_data_is_refused_in_strict_mode(relay: Relay,
                                                                body: bytes) -> None:
    relay.reconfigure(lambda d: d["limits"].update(bareNewline="reject"))
    c = await ready_session(relay)
    try:
        await _open_data(c)
        await c.send(b"From: a@example.com\r\n\r\n" + body + b"\r\n.\r\n")
        _, text = await c.reply()
        assert text == "554 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"
    finally:
        await c.close()
    assert relay.rejected("bare_lf") == 1
    assert relay.queue.submitted == []


@pytest.mark.parametrize("body", [
    b"first\r\n\x00.\r\n" + SMUGGLED + b"From: ceo@example.com\r\n\r\nsmuggled\r\n",
    b"first\r\n.\x00\r\n" + SMUGGLED + b"From: ceo@example.com\r\n\r\nsmuggled\r\n",
    b"text with a \x00 in the middle\r\n",
])
async def test_a_nul_octet_in_data_is_refused(relay: Relay, body: bytes) -> None:
    """A NUL is not text (RFC 5321 section 2.3.8; 8BITMIME excludes it too, RFC 6152), and
    a next hop that drops NULs would read ``<CRLF><NUL>.<CRLF>`` as the end of data: the
    relay must never pass one on."""
    c = await ready_session(relay)
    try:
        await _open_data(c)
        await c.send(b"From: a@example.com\r\nSubject: x\r\n\r\n" + body + b".\r\n")
        _, text = await c.reply()
        assert text == ("554 5.6.0 Message contains a NUL octet; binary content must be "
                        "encoded (base64)")
        assert (await c.cmd("NOOP"))[1] == "250 2.0.0 Ok"
    finally:
        await c.close()
    assert relay.queue.submitted == []
    assert relay.rejected("nul") == 1


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a\x00b@example.com>", b"MAIL FROM:<a\rb@example.com>",
    b"MAIL FROM:<a@example.com>\x1b[31m", b"MAIL FROM:<a@exa\x7fmple.com>",
])
async def test_control_characters_in_addresses_are_501(relay: Relay, line: bytes) -> None:
    c = await ready_session(relay)
    try:
        _, text = await c.cmd(line)
        assert text == "501 5.5.2 Control characters are not allowed in commands"
        assert (await c.cmd("RCPT TO:<x@example.net>"))[0] == 503  # no MAIL was taken
    finally:
        await c.close()


async def test_bare_lf_splitting_a_command_is_refused(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        await c.send(b"MAIL FROM:<a@example.com>\nRCPT TO:<x@example.net>\r\n")
        assert (await c.reply())[1] == "500 5.5.2 Commands must end with CRLF"
        assert (await c.reply())[0] == 503  # the RCPT half found no transaction
    finally:
        await c.close()


@pytest.mark.parametrize("size", [2_000, 300_000])
async def test_overlong_command_line_500_and_session_continues(relay: Relay, size: int) -> None:
    c = await ready_session(relay)
    try:
        _, text = await c.cmd(b"MAIL FROM:<" + b"a" * size + b"@example.com>")
        assert text == "500 5.5.2 Line too long"
        assert (await c.cmd("NOOP"))[0] == 250
    finally:
        await c.close()
    assert relay.rejected("line_too_long") == 1


async def test_overlong_data_line_refused(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        await _open_data(c)
        await c.send(b"From: a@example.com\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")
        assert (await c.reply())[1] == "554 5.6.0 Message has a line longer than 998 characters"
        await _open_data(c)
        # 998 characters is the RFC 5322 limit and passes, as does a stuffed dot before it.
        await c.send(b"From: a@example.com\r\n\r\n" + b"x" * 998 + b"\r\n." + b"." * 998
                     + b"\r\n.\r\n")
        code, text = await c.reply()
        assert code == 250, text
    finally:
        await c.close()
    stored = relay.spool.read(relay.queue.submitted[0].queue_id)
    assert stored.endswith(b"\r\n" + b"." * 998 + b"\r\n")


async def test_starttls_pipelined_commands_are_discarded(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.starttls_port)
    try:
        await c.reply()
        await c.cmd("EHLO client.test")
        # A man in the middle appends plaintext commands behind STARTTLS (CVE-2011-0411).
        await c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nNOOP\r\n")
        assert (await c.reply())[0] == 220
        await c.writer.start_tls(relay.client_tls(), server_hostname="localhost")
        code, text = await c.cmd("EHLO client.test")
        assert code == 250 and text.startswith("250-relay.test"), text
        assert (await c.login())[0] == 235
        # No MAIL is pending: a nested MAIL would be 503.
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    finally:
        await c.close()
    assert relay.rejected("tls_required") == 0
    assert not [e for e in relay.log.events if e.sender == "injected@example.com"]


async def test_commands_after_a_failed_handshake_are_not_processed(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.starttls_port)
    try:
        await c.reply()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("STARTTLS"))[0] == 220
        await c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nQUIT\r\n")
        # The server sees garbage where a ClientHello should be and hangs up.
        rest = await asyncio.wait_for(c.reader.read(), 5)
        assert b"250" not in rest and b"530" not in rest and b"221" not in rest
        assert relay.server.active_sessions == 0  # and the session is not leaked
    finally:
        await c.close()
    assert relay.rejected("auth_required") == 0 and relay.rejected("tls_required") == 0


async def test_second_starttls_and_starttls_on_implicit_are_refused(relay: Relay) -> None:
    c = await ready_session(relay, implicit=False)
    d = await ready_session(relay, implicit=True)
    try:
        assert (await c.cmd("STARTTLS"))[1] == "503 5.5.1 TLS already active"
        assert (await d.cmd("STARTTLS"))[1] == "503 5.5.1 TLS already active"
    finally:
        await c.close()
        await d.close()


async def test_internal_error_is_451_with_reference_and_no_exception_text(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.suppression.fail_with = RuntimeError("database exploded at /secret/path")
    c = await ready_session(relay)
    try:
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
        _, text = await c.cmd("RCPT TO:<x@example.net>")
        match = re.fullmatch(r"451 4\.3\.0 Internal error, reference ([0-9a-f]{12})", text)
        assert match, text
        assert "exploded" not in text and "RuntimeError" not in text
        relay.suppression.fail_with = None
        assert (await c.cmd("NOOP"))[0] == 250
    finally:
        await c.close()
    record = next(r for r in caplog.records if match.group(1) in r.getMessage())
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert relay.rejected("internal_error") == 1


async def test_unknown_commands_then_goodbye(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxRefusedCommands=10))
    c = await ready_session(relay)
    try:
        for _ in range(9):
            assert (await c.cmd("XYZZY"))[1] == "500 5.5.1 Command not recognized"
        assert (await c.cmd("XYZZY"))[0] == 500
        assert (await c.reply())[1] == "421 4.7.0 Too many refused commands, closing connection"
        assert await asyncio.wait_for(c.reader.read(), 5) == b""
    finally:
        await c.close()


async def test_spool_failure_is_452_and_nothing_half_accepted(relay: Relay) -> None:
    directory = relay.spool.directory
    c = await ready_session(relay)
    try:
        shutil.rmtree(directory)
        directory.write_text("a file where the spool directory should be")
        await _open_data(c)
        await c.send(message("a@example.com") + b".\r\n")
        assert (await c.reply())[1] == "452 4.3.1 Insufficient system storage, try again later"
        assert (await c.cmd("NOOP"))[0] == 250
    finally:
        await c.close()
        directory.unlink()
        directory.mkdir()
    assert relay.queue.submitted == []
    assert [e.status for e in relay.log.events] == ["rejected"]
    assert relay.rejected("spool_error") == 1


async def test_aiosmtpd_address_logging_is_silenced(relay: Relay) -> None:
    assert logging.getLogger("mail.log").getEffectiveLevel() >= logging.WARNING


async def test_tls_handshake_failure_on_implicit_listener_keeps_serving(relay: Relay) -> None:
    ctx = ssl.create_default_context()  # does not trust the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await RawSMTP.connect(relay.implicit_port, ctx)
    c = await ready_session(relay)
    await c.close()


async def test_pipelined_commands_are_answered_in_order_in_one_write(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.net>\r\n"
                     b"RCPT TO:<y@example.net>\r\nDATA\r\n")
        first = await asyncio.wait_for(c.reader.read(4096), 5)
        assert first == (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                         b"354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n")
        await c.send(message("a@example.com") + b".\r\nRSET\r\nNOOP\r\n")
        assert (await c.reply())[1].startswith("250 2.0.0 Ok: queued as ")
        assert (await c.reply())[0] == 250 and (await c.reply())[0] == 250
        _, text = await c.cmd("EHLO again.test")
        assert text.split("\n")[1:] == ["250-SIZE 20000", "250-8BITMIME", "250-SMTPUTF8",
                                        "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                                        "250-DSN", "250 AUTH LOGIN PLAIN"]
    finally:
        await c.close()
