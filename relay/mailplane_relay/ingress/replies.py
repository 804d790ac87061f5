"""The reply table: every fixed reply the ingress sends, in one place, each with an enhanced
status code (RFC 3463)."""

from __future__ import annotations

from dataclasses import dataclass

IDENT = "ESMTP Mailplane"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused step: the metrics reason (``metrics.REJECT_REASONS``) and the reply to send."""

    reason: str
    reply: str


class R:
    GREETING = "220 {host} " + IDENT
    CLOSING = "221 2.0.0 Bye"
    AUTH_OK = "235 2.7.0 Authentication successful"
    OK = "250 2.0.0 Ok"
    MAIL_OK = "250 2.1.0 Ok"
    RCPT_OK = "250 2.1.5 Ok"
    QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
    DATA_GO = "354 2.0.0 End data with <CR><LF>.<CR><LF>"
    HELP = "214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT"
    VRFY = "252 2.5.0 Cannot verify the address; send RCPT to attempt delivery"
    TOO_MANY_SESSIONS = "421 4.3.2 Too many connections, try again later"
    SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
    TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
    TOO_MANY_REFUSED = "421 4.7.0 Too many refused commands, closing connection"
    AUTH_DEADLINE = "421 4.7.0 Authentication not completed in time, closing connection"
    LIFETIME = "421 4.4.2 Maximum session duration reached, closing connection"
    INTERNAL = "451 4.3.0 Internal error, reference {ref}"
    RATE = "451 4.7.1 Rate limit of {limit} messages per minute exceeded for {user}"
    QUOTA = "452 4.7.1 Daily quota of {limit} messages exceeded for {user}"
    SPOOL = "452 4.3.1 Insufficient system storage, try again later"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients (at most {limit} per message)"
    AUTH_THROTTLED = "454 4.7.0 Too many failed authentication attempts, try again later"
    LINE_TOO_LONG = "500 5.5.2 Line too long"
    BARE_LF_COMMAND = "500 5.5.2 Commands must end with CRLF"
    BAD_SYNTAX = "500 5.5.2 Syntax error"
    UNKNOWN = "500 5.5.1 Command not recognized"
    NON_ASCII = ("500 5.5.2 Non-ASCII characters are allowed only in MAIL FROM and RCPT TO "
                 "addresses (with SMTPUTF8)")
    NOT_UTF8 = "500 5.5.2 Command is not valid UTF-8"
    CONTROL_CHARS = "501 5.5.2 Control characters are not allowed in commands"
    BAD_ADDRESS = "501 5.1.3 Bad address syntax: expected <local-part@domain>"
    AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    AUTH_NOT_BASE64 = "501 5.5.2 Malformed authentication data: not valid base64"
    AUTH_PLAIN_FIELDS = ("501 5.5.2 Malformed AUTH PLAIN data: expected base64 of "
                         "authzid NUL username NUL password")
    AUTH_NOT_UTF8 = "501 5.5.2 Malformed authentication data: username and password must be UTF-8"
    AUTH_AUTHZID = "501 5.5.2 Authorization identity must be empty or equal to the username"
    DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
    MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
    RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
    HELO_SYNTAX = "501 5.5.4 Syntax: HELO hostname"
    RSET_SYNTAX = "501 5.5.4 Syntax: RSET"
    BAD_SIZE = "501 5.5.4 SIZE takes a number of bytes"
    BAD_BODY = "501 5.5.4 BODY must be 7BIT or 8BITMIME"
    SMTPUTF8_VALUE = "501 5.5.4 SMTPUTF8 takes no value"
    STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
    QUIT_SYNTAX = "501 5.5.4 Syntax: QUIT"
    EHLO_FIRST = "503 5.5.1 Send EHLO first"
    EHLO_SYNTAX = "501 5.5.4 Syntax: EHLO hostname"
    ALREADY_AUTH = "503 5.5.1 Already authenticated"
    ALREADY_TLS = "503 5.5.1 TLS already active"
    NEED_RCPT = "503 5.5.1 Need RCPT command"
    NEED_MAIL = "503 5.5.1 Need MAIL command"
    NESTED_MAIL = "503 5.5.1 Sender already specified (RSET to start over)"
    EXPN = "502 5.5.1 EXPN is not supported"
    AUTH_MECH = "504 5.5.4 Unrecognized authentication mechanism"
    AUTH_REQUIRED = "530 5.7.0 Authentication required"
    TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
    AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
    AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
    SENDER_DOMAIN = "550 5.7.1 Sender domain {domain} is not enabled on this relay"
    SENDER_NOT_ALLOWED = "550 5.7.1 Credential {user} may not send from domain {domain}"
    HEADER_FROM_DOMAIN = "550 5.7.1 Header From: domain {domain} is not enabled on this relay"
    HEADER_FROM_NOT_ALLOWED = (
        "550 5.7.1 Credential {user} may not send as header From: domain {domain}")
    HEADER_FROM_MISSING = "550 5.7.1 Message has no From: header address"
    HEADER_FROM_MALFORMED = (
        "550 5.7.1 Header From: has a malformed address; write it as local-part@domain")
    SUPPRESSED = "550 5.1.1 Recipient {address} is on the suppression list ({reason})"
    TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size of {limit} bytes"
    NON_ASCII_ADDRESS = ("553 5.6.7 Non-ASCII address: send MAIL FROM with the SMTPUTF8 "
                         "parameter (RFC 6531)")
    DSN_PARAMETER = "501 5.5.4 {what} (RFC 3461)"
    UNKNOWN_PARAMETER = "555 5.5.4 {command} parameter {name} is not supported"
    PARAMETER_NEEDS_EHLO = ("555 5.5.4 {command} parameter {name} needs a session opened with "
                            "EHLO, not HELO (RFC 1869); send EHLO, then the command again")
    SUSPENDED = "554 5.7.1 Credential {user} is suspended: {reason}"
    CREDENTIAL_GONE = "554 5.7.1 Credential {user} is no longer valid"
    BARE_LF = "554 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"
    BARE_CR = "554 5.6.0 Message contains a bare CR; lines must end with CRLF or LF"
    DUPLICATE_HEADER = ("554 5.6.0 Message has more than one {name}: header "
                        "(RFC 5322 section 3.6 allows one)")
    NON_ASCII_HEADER = ("554 5.6.0 Message header has raw non-ASCII characters: send it with "
                        "SMTPUTF8 (RFC 6532) or encode them (RFC 2047)")
    SMUGGLING = "554 5.6.0 Malformed end-of-data sequence; message refused"
    NUL = "554 5.6.0 Message contains a NUL octet; binary content must be encoded (base64)"
    DATA_LINE_TOO_LONG = "554 5.6.0 Message has a line longer than {limit} characters"
