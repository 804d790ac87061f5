"""The SMTP ingress."""
