"""The MAIL FROM and RCPT TO paths the delivery writes: every address the ingress accepts goes out
exactly as aiosmtplib's own quoting would send it, and nothing that could end the path early or
add a parameter goes out at all."""

from __future__ import annotations

import pytest
from aiosmtplib.email import quote_address

from mailplane_relay.delivery.smtp import _commands, smtp_path
from mailplane_relay.ingress.paths import RcptTo, parse_rcpt
from mailplane_relay.spool import Recipient

ACCEPTED_AT_INGRESS = [
    "<to@dest.test>",
    "<first.last+tag@sub.dest.test>",
    '<"john doe"@dest.test>',
    '<"quote\\"inside"@dest.test>',
    "<a!#$%&'*/=?^_`{|}~-b@dest.test>",
    "<user@[192.0.2.7]>",
    "<user@[IPv6:2001:db8::1]>",
    "<jörg@bücher.test>",
]


@pytest.mark.parametrize("path", ACCEPTED_AT_INGRESS)
def test_an_address_the_ingress_accepts_goes_out_as_aiosmtplib_quotes_it(path: str) -> None:
    parsed = parse_rcpt(f"TO:{path}", smtputf8=True)
    assert isinstance(parsed, RcptTo), parsed
    assert smtp_path(parsed.address) == quote_address(parsed.address) == path


def test_the_null_reverse_path() -> None:
    assert smtp_path("") == "<>"
    commands = _commands("", [Recipient("to@dest.test")], ["SIZE=10"], "ascii")
    assert commands == (b"MAIL FROM:<> SIZE=10", [b"RCPT TO:<to@dest.test>"])


@pytest.mark.parametrize("address", [
    "to@dest.test SIZE=1",  # a parameter smuggled in
    "to@dest.test> NOTIFY=NEVER",
    "<to@dest.test",
    'to"@dest.test',
    "to@dest.test\r\nRSET",
    "to@dest.test\tx",
    '"open@dest.test',
])
def test_an_address_that_would_break_the_command_is_never_sent(address: str) -> None:
    with pytest.raises(ValueError):
        smtp_path(address)
    # The transaction bounces such a recipient (553 5.1.3) instead of sending a command.
    assert _commands("from@src.test", [Recipient(address)], [], "ascii") is None
    assert _commands(address, [Recipient("to@dest.test")], [], "ascii") is None
