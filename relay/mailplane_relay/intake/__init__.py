"""Bounce and complaint intake: DSNs (RFC 3464) and ARF reports (RFC 5965) sent back to the
relay's VERP return paths, matched to the message and credential they are about."""
