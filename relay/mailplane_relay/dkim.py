"""DKIM signing at delivery time: dkimpy canonicalises, OpenSSL signs.

dkimpy computes RSA signatures in pure Python (about 8 ms for RSA-2048), which caps a core at
roughly 120 messages per second. The signer below keeps dkimpy for everything that is easy to
get subtly wrong (message parsing, relaxed canonicalisation, header selection bottom-up, folding,
the ``b=`` stripping rule) and hands only the final private-key operation to ``cryptography``.

Keys are parsed once per configuration version and cached by the hash of their material, so a
reload that leaves a key unchanged does not parse it again, and a rotated key applies to mail
already in the queue (signing happens on the spooled bytes, right before each attempt).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import CanonicalizationPolicy

from .config import DKIMKey, RelayConfig
from .metrics import RelayMetrics

log = logging.getLogger(__name__)

_HEADER_NAME = b"DKIM-Signature"
_CANONICALIZATION = b"relaxed/relaxed"
_POLICY = CanonicalizationPolicy.from_c_value(_CANONICALIZATION)
_MIN_RSA_BITS = 1024
_MAX_RSA_BITS = 4096
# Room that forces b= onto its own line, so that the folding of every tag before it is the same
# in the hashed (empty b=) and the final header.
_B_PLACEHOLDER = b"0" * 60

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DKIMKeyError(Exception):
    """A configured DKIM key cannot be used (the message never includes key material)."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    headers: tuple[bytes, ...]
    private_key: PrivateKey


def parse_private_key(pem: bytes, algorithm: str) -> PrivateKey:
    """Load a PEM private key and check it matches the configured algorithm."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DKIMKeyError(f"not a PEM private key without passphrase ({type(exc).__name__})") \
            from None
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DKIMKeyError("algorithm rsa-sha256 needs an RSA private key")
        if key.key_size < _MIN_RSA_BITS:
            raise DKIMKeyError(f"RSA key of {key.key_size} bits is too short (min 1024)")
        if key.key_size > _MAX_RSA_BITS:
            raise DKIMKeyError(f"RSA key of {key.key_size} bits is too long (max 4096: "
                               "receivers need not verify longer keys, RFC 8301)")
        return key
    if algorithm == "ed25519-sha256":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DKIMKeyError("algorithm ed25519-sha256 needs an Ed25519 private key")
        return key
    raise DKIMKeyError(f"unknown DKIM algorithm {algorithm!r}")


def public_key_record(pem: bytes) -> str:
    """The DNS TXT value (``v=DKIM1; k=...; p=...``) that publishes the key's public half."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    raise DKIMKeyError("only RSA and Ed25519 keys can be published for DKIM")


class _Collect:
    """dkimpy feeds the canonical header data to a hasher; this one keeps the bytes, because
    OpenSSL hashes and signs in one call."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def update(self, data: bytes) -> None:
        self.parts.append(data)


def _join_tags(tags: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(name + b"=" + value for name, value in tags)


# Oversigned: listed once more than the message has them (RFC 6376 §5.4.2, §8.15), so that a
# copy added in transit — a second Subject or To prepended to replay a signed message, or a
# Reply-To that was not there — makes the signature fail. Other configured headers are signed
# as often as they appear.
OVERSIGNED = frozenset({
    b"from", b"sender", b"reply-to", b"to", b"cc", b"subject", b"date", b"message-id",
    b"in-reply-to", b"references", b"mime-version", b"content-type",
    b"content-transfer-encoding", b"list-unsubscribe", b"list-unsubscribe-post", b"list-id",
})


def signed_header_names(headers: list[tuple[bytes, bytes]],
                        configured: tuple[bytes, ...]) -> list[bytes]:
    """The ``h=`` list: every configured header as many times as the message has it (From
    always), plus once more for the oversigned ones, so none can be added afterwards."""
    counts: dict[bytes, int] = {}
    for name, _ in headers:
        lower = name.lower()
        counts[lower] = counts.get(lower, 0) + 1
    names = [b"from", *(h for h in dict.fromkeys(configured) if h != b"from")]
    include: list[bytes] = []
    for name in names:
        include += [name] * (counts.get(name, 0) + (1 if name in OVERSIGNED else 0))
    return include


def sign_message(message: bytes, key: SigningKey, *, now: float) -> bytes:
    """The message with a DKIM-Signature header (relaxed/relaxed) prepended."""
    headers, body = dkimpy.rfc822_parse(message)
    include = signed_header_names(headers, key.headers)
    body_hash = base64.b64encode(hashlib.sha256(_POLICY.canonicalize_body(body)).digest())
    tags = [
        (b"v", b"1"),
        (b"a", key.algorithm.encode()),
        (b"c", _CANONICALIZATION),
        (b"d", key.domain.encode()),
        (b"s", key.selector.encode()),
        (b"t", str(int(now)).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", _B_PLACEHOLDER),
    ]
    unsigned: bytes = dkimpy.fold(_join_tags(tags), namelen=len(_HEADER_NAME))
    unsigned = dkimpy.RE_BTAG.sub(rb"\1", unsigned)
    collected = _Collect()
    dkimpy.hash_headers(collected, _POLICY, _POLICY.canonicalize_headers(headers), include,
                        (_HEADER_NAME, b" " + unsigned), {})
    signed_data = b"".join(collected.parts)
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        signature = key.private_key.sign(signed_data, padding.PKCS1v15(), hashes.SHA256())
    else:
        # RFC 8463: Ed25519 signs the SHA-256 digest of the header data, not the data itself.
        signature = key.private_key.sign(hashlib.sha256(signed_data).digest())
    tags[-1] = (b"b", base64.b64encode(signature))
    value: bytes = dkimpy.fold(_join_tags(tags) + b"\r\n", namelen=len(_HEADER_NAME))
    return _HEADER_NAME + b": " + value + message


_FROM_FIELD = re.compile(rb"^from:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)
_ADDR = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?)"
# The everyday forms: "Name <local@domain>" (a display name without quotes, comments or
# specials) and a bare "local@domain". Anything else goes to the full parser.
_SIMPLE_FROM = re.compile(rf"[^\"<>()\\,;:@]*<{_ADDR}>|{_ADDR}")


def header_from_domain(message: bytes) -> str | None:
    """The domain of the RFC 5322 From address, lower case, or None."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    fields = _FROM_FIELD.findall(head)
    if len(fields) == 1 and not message.startswith(b"\r\n"):
        # A scan instead of dkimpy's header parser and the email package's address parser
        # (together about 3 % of the relay's time per message).
        value = fields[0].replace(b"\r\n", b"").strip().decode("utf-8", "replace")
        simple = _SIMPLE_FROM.fullmatch(value)
        if simple is not None:
            return (simple.group(1) or simple.group(2)).lower().rstrip(".") or None
    try:
        headers, _ = dkimpy.rfc822_parse(head + b"\r\n")
    except dkimpy.MessageFormatError:
        return None
    values = [v.decode("utf-8", "replace") for n, v in headers if n.lower() == b"from"]
    for _name, addr in getaddresses(values):
        if "@" in addr:
            return addr.rpartition("@")[2].strip().lower().rstrip(".") or None
    return None


class DKIMSigner:
    """Per-domain signers from the configuration in force.

    Keys load lazily, at the first message of their domain under a configuration version: a
    pool with thousands of domains does not stall the event loop parsing every key at a
    reload. A key whose material did not change since the previous version is reused as is."""

    def __init__(self, *, metrics: RelayMetrics, clock: Callable[[], float] = time.time,
                 key_base: Path | None = None) -> None:
        self._metrics = metrics
        self._clock = clock
        self._key_base = key_base
        self._config: RelayConfig | None = None
        self._specs: dict[str, tuple[DKIMKey, ...]] = {}
        self._keys: dict[str, tuple[SigningKey, ...]] = {}  # unusable keys left out
        # sha256(algorithm + PEM) -> parsed key, for this version and the one before it
        self._parsed: dict[str, PrivateKey] = {}
        self._previous: dict[str, PrivateKey] = {}
        self._lock = threading.Lock()

    def _refresh(self, config: RelayConfig) -> None:
        # Keys of the version before stay reusable; older ones (retired keys) leave memory.
        self._previous, self._parsed = self._parsed, {}
        self._specs = {d.name: d.dkim_keys for d in config.settings.domains if d.dkim_keys}
        self._keys = {}
        self._config = config

    def _load(self, domain: str, spec: DKIMKey) -> SigningKey:
        try:
            pem = spec.load_pem(self._key_base)
        except OSError as exc:
            raise DKIMKeyError(f"cannot read the key file: {exc.strerror}") from None
        digest = hashlib.sha256(spec.algorithm.encode() + b"\0" + pem).hexdigest()
        private_key = self._parsed.get(digest) or self._previous.get(digest)
        if private_key is None:
            private_key = parse_private_key(pem, spec.algorithm)
        self._parsed[digest] = private_key
        return SigningKey(
            domain=domain, selector=spec.selector, algorithm=spec.algorithm,
            headers=tuple(h.lower().encode() for h in spec.headers), private_key=private_key,
        )

    def _domain_keys(self, domain: str) -> tuple[SigningKey, ...]:
        if domain in self._keys:
            return self._keys[domain]
        loaded: list[SigningKey] = []
        for spec in self._specs.get(domain, ()):
            try:
                loaded.append(self._load(domain, spec))
            except DKIMKeyError as exc:
                log.error("DKIM key for %s (selector %s) unusable, its mail goes out without "
                          "this signature: %s", domain, spec.selector, exc)
        keys = self._keys[domain] = tuple(loaded)
        return keys

    @property
    def parsed_keys(self) -> int:
        """How many distinct private keys the configuration in force has loaded."""
        return len(self._parsed)

    def key_for(self, config: RelayConfig, message: bytes, sender_domain: str) -> SigningKey | None:
        """The first key that signs this message (see ``keys_for``), or None."""
        keys = self.keys_for(config, message, sender_domain)
        return keys[0] if keys else None

    def keys_for(self, config: RelayConfig, message: bytes,
                 sender_domain: str) -> tuple[SigningKey, ...]:
        """The keys that sign this message: those of the From header's domain or its closest
        configured parent (DMARC relaxed alignment), else of the envelope sender's domain; two
        for a dual-signing domain (RFC 8463), in signing order."""
        # Large messages are signed in a worker thread: the lock keeps a reload seen by the
        # loop and a key load in that thread from interleaving.
        with self._lock:
            if config is not self._config:
                self._refresh(config)
            if not self._specs:
                return ()  # spares parsing the From header of every message
        candidates: list[str] = []
        from_domain = header_from_domain(message)
        if from_domain:
            labels = from_domain.split(".")
            candidates.extend(".".join(labels[i:]) for i in range(len(labels) - 1))
        candidates.append(sender_domain.lower())
        with self._lock:
            for name in candidates:
                keys = self._domain_keys(name)
                if keys:
                    return keys
        return ()

    def sign(self, config: RelayConfig, message: bytes, sender_domain: str) -> bytes:
        """The message signed by each key that applies (the last one's header on top), or
        unchanged when none applies or signing fails (a delivery is not held back by a broken
        key; the metric and the log say so). Each signature covers the message as it was
        before any of them, so the order does not matter to a verifier."""
        now = self._clock()
        fields: list[bytes] = []
        for key in self.keys_for(config, message, sender_domain):
            try:
                signed = sign_message(message, key, now=now)
            except (dkimpy.DKIMException, ValueError) as exc:
                self._metrics.dkim_signatures.labels(key.algorithm, "error").inc()
                log.warning("DKIM signing for %s (%s) failed, sending without this signature: "
                            "%s", key.domain, key.algorithm, type(exc).__name__)
                continue
            self._metrics.dkim_signatures.labels(key.algorithm, "ok").inc()
            fields.append(signed[:len(signed) - len(message)])
        if not fields:
            return message
        return b"".join(reversed(fields)) + message
