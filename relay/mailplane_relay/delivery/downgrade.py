"""8BITMIME downgrade (RFC 6152 §3): an 8-bit body must not go to a server that did not offer
8BITMIME. The relay converts each 8-bit MIME leaf part to quoted-printable — on the message as
spooled, before DKIM signing, so the signature covers what is sent — and bounces the message
(``554 5.6.3``) when that is not possible: 8-bit bytes in headers (those need SMTPUTF8, RFC 6531,
see ``smtp._options``), in a multipart preamble or epilogue, in the headers of an attached
message, or in a part declared ``binary`` inside a ``message/*`` part."""

from __future__ import annotations

import email
import email.errors
import email.policy
import io
import quopri
from email.generator import BytesGenerator
from email.message import Message

_SEVEN_BIT_SAFE = {"7bit", "quoted-printable", "base64"}


def header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end]


def needs_smtputf8(data: bytes) -> bool:
    """Raw UTF-8 in the header section: the message can only travel with SMTPUTF8."""
    return not header_section(data).isascii()


def to_seven_bit(data: bytes) -> bytes | None:
    """The message with every 8-bit leaf part re-encoded as quoted-printable (CRLF line ends),
    or None when it cannot be made 7-bit that way."""
    if data.isascii():
        return data
    if needs_smtputf8(data):
        return None
    try:
        return _convert(data)
    except (ValueError, TypeError, LookupError, email.errors.MessageError):
        return None  # a message the parser cannot take apart is not converted: it bounces


def _convert(data: bytes) -> bytes | None:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    for part in msg.walk():
        if part.is_multipart():
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes) or (raw.isascii() and _encoded_ok(part)):
            continue
        if part.get_content_maintype() == "message":
            return None  # an attached message keeps its own encoding
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = "quoted-printable"
        text = raw.replace(b"\r\n", b"\n")
        part.set_payload(quopri.encodestring(text).decode("ascii"))
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=email.policy.compat32.clone(
        linesep="\r\n", max_line_length=0)).flatten(msg)
    converted = out.getvalue()
    return converted if converted.isascii() else None


def _encoded_ok(part: Message) -> bool:
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    return cte in _SEVEN_BIT_SAFE
