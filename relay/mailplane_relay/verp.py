"""VERP return paths (variable envelope return path) that say which message, and often which
recipient, a bounce or complaint is about, and that nobody without the relay's key can forge.

A delivered message's MAIL FROM becomes ``<localPart>+<queue id><kind><tag>@<intake domain>``:

- the queue id (20 Crockford base32 digits, written in lower case);
- ``kind`` ``r`` when the transaction had one recipient, whose address the tag covers, or
  ``m`` when it had several (the tag covers the message only, and a report must then name one
  of the message's recipients, as the message log knows them). The delivery queue gives every
  recipient its own transaction while the intake is on, so it makes ``r`` tokens only;
- ``tag``: the first 50 bits of HMAC-SHA256(key, kind, queue id, recipient) in base32.

Every part is lower case and survives receivers that change the case of a local part. A report
whose return path does not verify is counted and dropped: without the key, a forged report
cannot suppress an address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Literal

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_TAG_CHARS = 10  # 50 bits
Kind = Literal["r", "m"]
_TOKEN = re.compile(r"^([0-9a-hjkmnp-tv-z]{20})([rm])([0-9a-hjkmnp-tv-z]{10})$")
# The smallest key accepted: 128 bits.
MIN_KEY_BYTES = 16


class VERPKeyError(ValueError):
    """The key file is missing, unreadable or too short."""


@dataclass(frozen=True, slots=True)
class Token:
    queue_id: str  # upper case, as the spool writes it
    kind: Kind
    tag: str


def read_key(path: str) -> bytes:
    """The key from ``path`` (any bytes; surrounding whitespace is ignored)."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise VERPKeyError(f"intake.keyFile {path}: {exc.strerror or exc}; mount the Secret that "
                        "holds the return-path key there") from None
    if len(key) < MIN_KEY_BYTES:
        raise VERPKeyError(f"intake.keyFile {path} holds {len(key)} bytes; the return-path key "
                        f"needs at least {MIN_KEY_BYTES} (e.g. 32 random bytes)")
    return key


def _tag(key: bytes, kind: Kind, queue_id: str, recipient: str) -> str:
    mac = hmac.new(key, b"\0".join((
        b"mailplane-verp-1", kind.encode(), queue_id.upper().encode(),
        recipient.strip().lower().encode("utf-8"))), hashlib.sha256).digest()
    n = int.from_bytes(mac[:8], "big") >> (64 - 5 * _TAG_CHARS)
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(_TAG_CHARS)))


def return_path(key: bytes, local_part: str, domain: str, queue_id: str,
                recipients: list[str]) -> str:
    """The MAIL FROM address for one transaction of message ``queue_id``."""
    if len(recipients) == 1:
        kind: Kind = "r"
        covered = recipients[0]
    else:
        kind, covered = "m", ""
    tag = _tag(key, kind, queue_id, covered)
    return f"{local_part}+{queue_id.lower()}{kind}{tag}@{domain}"


def parse(address: str, local_part: str, domain: str) -> Token | None:
    """The token in a return path on ``domain``, or None when it is not one of ours in shape.
    The tag is not checked here (see :func:`verify`)."""
    address = address.strip().strip("<>").strip().lower()
    local, at, host = address.rpartition("@")
    if not at or host.rstrip(".") != domain:
        return None
    prefix, plus, token = local.partition("+")
    if not plus or prefix != local_part:
        return None
    m = _TOKEN.match(token)
    if m is None:
        return None
    kind: Kind = "r" if m.group(2) == "r" else "m"
    return Token(queue_id=m.group(1).upper(), kind=kind, tag=m.group(3))


def verify(key: bytes, token: Token, recipient: str | None) -> bool:
    """Whether the tag was made with ``key`` for this message (and, for an ``r`` token, for
    ``recipient``)."""
    if token.kind == "r":
        if not recipient:
            return False
        expected = _tag(key, "r", token.queue_id, recipient)
    else:
        expected = _tag(key, "m", token.queue_id, "")
    return hmac.compare_digest(expected, token.tag)


class KeyFile:
    """The key, read again when the file changes (a rotated Secret applies without a restart;
    return paths made with the old key then no longer verify)."""

    def __init__(self) -> None:
        self._cached: tuple[str, int, int, bytes] | None = None

    def get(self, path: str) -> bytes:
        try:
            st = os.stat(path)
        except OSError:
            return read_key(path)  # raises with the reason
        if self._cached is not None and self._cached[:3] == (path, st.st_mtime_ns, st.st_ino):
            return self._cached[3]
        key = read_key(path)
        self._cached = (path, st.st_mtime_ns, st.st_ino, key)
        return key
