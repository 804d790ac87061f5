"""The syntax of ``MAIL FROM`` and ``RCPT TO``: the path and its parameters (RFC 5321 §4.1.2,
SIZE RFC 1870, BODY RFC 6152, SMTPUTF8 RFC 6531, AUTH RFC 4954, and the DSN parameters of
RFC 3461: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, with xtext decoding).

Pure functions on the command argument; each answers the parsed command or a :class:`Refusal`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

from .replies import R, Refusal

# Non-ASCII is allowed in atoms and labels only where SMTPUTF8 is in force (checked apart).
_U = "\u0080-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]+"
_LABEL = rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9{_U}-]{{0,61}}[A-Za-z0-9{_U}])?"
# The everyday "<dot-atom@host.name> [params]" form, parsed without the email package's
# general RFC 5322 parser (about 60 us per address).
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>(\s.*)?\Z", re.S)
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


@dataclass(frozen=True, slots=True)
class MailFrom:
    address: str  # "" for the null reverse-path <>
    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME" when the client declared it
    smtputf8: bool = False
    options: list[str] = field(default_factory=list)
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 ENVID, xtext-decoded


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str
    options: list[str] = field(default_factory=list)
    # RFC 3461 NOTIFY: ("NEVER",) or some of SUCCESS, FAILURE, DELAY; None when not given.
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None  # RFC 3461 ORCPT: "<addr-type>;<address>", xtext-decoded


# RFC 3461 §4.4 and §4.2: the longest ENVID and ORCPT values a server must accept.
MAX_ENVID = 100
MAX_ORCPT = 500
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")


def xtext_decode(value: str) -> str | None:
    """RFC 3461 §4: ``+XX`` (two upper-case hex digits) stands for one byte; every other
    character is itself, from ``!`` to ``~`` except ``+`` and ``=``. None when ``value`` is not
    xtext or decodes to something other than printable ASCII."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            hexpair = value[i + 1:i + 3]
            if len(hexpair) != 2 or hexpair.strip("0123456789ABCDEF"):
                return None
            out.append(chr(int(hexpair, 16)))
            i += 3
            continue
        if not "!" <= ch <= "~" or ch == "=":
            return None
        out.append(ch)
        i += 1
    decoded = "".join(out)
    if any(not " " <= c <= "~" for c in decoded):
        return None
    return decoded


def parse_mail(arg: str | None, extended: bool = True) -> MailFrom | Refusal:
    """``extended`` is False in a session greeted with HELO: it may not use parameters."""
    rest = _strip_keyword(arg, "FROM:")
    if rest is None:
        return Refusal("bad_syntax", R.MAIL_SYNTAX)
    if rest.startswith("<>"):
        address, params = "", rest[2:]
        if params and not params[:1].isspace():
            return Refusal("bad_syntax", R.MAIL_SYNTAX)
    else:
        parsed = _path(rest)
        if parsed is None:
            return Refusal("bad_syntax", R.BAD_ADDRESS)
        address, params = parsed
    options = params.split()
    if options and not extended:
        return _needs_ehlo("MAIL FROM", options[0])
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    for option in options:
        match = _PARAM.match(option)
        if match is None:
            return Refusal("bad_syntax", R.MAIL_SYNTAX)
        name, value = match.group(1).upper(), match.group(2)
        if name == "SIZE":
            if value is None or not value.isdigit():
                return Refusal("bad_syntax", R.BAD_SIZE)
            size = int(value)
        elif name == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                return Refusal("bad_syntax", R.BAD_BODY)
        elif name == "SMTPUTF8":
            if value is not None:
                return Refusal("bad_syntax", R.SMTPUTF8_VALUE)
            smtputf8 = True
        elif name == "AUTH":
            pass  # RFC 4954 §5: the submitter's identity is ours to decide (the session's)
        elif name == "RET":
            if ret is not None or (value or "").upper() not in ("FULL", "HDRS"):
                return Refusal("bad_syntax", R.DSN_PARAMETER.format(
                    what="RET must be given once, as RET=FULL or RET=HDRS"))
            ret = (value or "").upper()
        elif name == "ENVID":
            envid_value = xtext_decode(value or "")
            if envid is not None or not envid_value or len(value or "") > MAX_ENVID:
                return Refusal("bad_syntax", R.DSN_PARAMETER.format(
                    what=f"ENVID must be given once, as xtext of at most {MAX_ENVID} "
                         "characters (printable ASCII; '+', '=' and spaces as +2B, +3D, +20)"))
            envid = envid_value
        else:
            return Refusal("bad_syntax", R.UNKNOWN_PARAMETER.format(command="MAIL FROM",
                                                                     name=name))
    if not address.isascii() and not smtputf8:
        return Refusal("bad_syntax", R.NON_ASCII_ADDRESS)
    return MailFrom(address, size, body, smtputf8, options, ret, envid)


def parse_rcpt(arg: str | None, smtputf8: bool, extended: bool = True) -> RcptTo | Refusal:
    rest = _strip_keyword(arg, "TO:")
    if rest is None:
        return Refusal("bad_syntax", R.RCPT_SYNTAX)
    parsed = _path(rest)
    if parsed is None:
        return Refusal("bad_syntax", R.BAD_ADDRESS)
    address, params = parsed
    options = params.split()
    if options and not extended:
        return _needs_ehlo("RCPT TO", options[0])
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for option in options:
        match = _PARAM.match(option)
        if match is None:
            return Refusal("bad_syntax", R.RCPT_SYNTAX)
        name, value = match.group(1).upper(), match.group(2) or ""
        if name == "NOTIFY":
            words = tuple(value.upper().split(","))
            if notify is not None or not (
                    words == ("NEVER",) or (set(words) <= set(_NOTIFY)
                                            and len(set(words)) == len(words))):
                return Refusal("bad_syntax", R.DSN_PARAMETER.format(
                    what="NOTIFY must be given once, as NOTIFY=NEVER or a comma-separated "
                         "list of SUCCESS, FAILURE and DELAY"))
            notify = tuple(w for w in _NOTIFY if w in words) or ("NEVER",)
        elif name == "ORCPT":
            addr_type, semi, raw = value.partition(";")
            decoded = xtext_decode(raw) if semi else None
            if (orcpt is not None or not decoded or len(value) > MAX_ORCPT
                    or not _ADDR_TYPE.match(addr_type)):
                return Refusal("bad_syntax", R.DSN_PARAMETER.format(
                    what="ORCPT must be given once, as ORCPT=rfc822;<address in xtext> "
                         f"(at most {MAX_ORCPT} characters)"))
            orcpt = f"{addr_type.lower()};{decoded}"
        else:
            return Refusal("bad_syntax", R.UNKNOWN_PARAMETER.format(command="RCPT TO",
                                                                     name=name))
    if not address.isascii() and not smtputf8:
        return Refusal("bad_syntax", R.NON_ASCII_ADDRESS)
    return RcptTo(address, options, notify, orcpt)


def _needs_ehlo(command: str, option: str) -> Refusal:
    """RFC 1869 §4.4 (and RFC 3461 §4 for the DSN parameters): MAIL and RCPT parameters are
    service extensions, which only a session opened with EHLO may use."""
    name = option.partition("=")[0].upper()
    return Refusal("bad_syntax", R.PARAMETER_NEEDS_EHLO.format(command=command, name=name))


def valid_mailbox(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and " " not in domain


def _strip_keyword(arg: str | None, keyword: str) -> str | None:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def _path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of ``<address> params``, or None when it is not a mailbox."""
    match = _PLAIN_PATH.match(arg)
    if match is not None:
        address, params = match.group(1), match.group(2) or ""
    else:
        if _unquoted_space_in_path(arg):
            # The email package's lenient parser would quote "a b@x" into '"a b"@x'.
            return None
        try:
            # Without angle brackets (RFC 5321 wants them; common clients omit them).
            spec, params = get_angle_addr(arg) if arg.startswith("<") else get_addr_spec(arg)
        except HeaderParseError:
            return None
        address = spec.addr_spec
        if params and not params[:1].isspace():
            return None
    if not valid_mailbox(address):
        return None
    return address, params


def _unquoted_space_in_path(arg: str) -> bool:
    if not arg.startswith("<"):
        return False
    quoted = escaped = False
    for ch in arg:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return False
        elif ch in " \t" and not quoted:
            return True
    return False
