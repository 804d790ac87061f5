"""The `mailplane` command: one entry point for relay, operator and the local dev platform.

Each subcommand lives with the component it runs and registers itself here; imports are lazy so
that `mailplane relay` never loads kopf or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# (subcommand, module with `register(subparsers)`)
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("relay", "mailplane_relay.cli"),
    ("logs", "mailplane_relay.cli"),
    ("suppression", "mailplane_relay.cli"),
    ("hash-password", "mailplane_relay.cli"),
    ("check-config", "mailplane_relay.cli"),
    ("erase", "mailplane_relay.cli"),
    ("queue", "mailplane_relay.cli"),
    ("operator", "mailplane_operator.cli"),
    ("portal", "mailplane_portal.cli"),
    ("dev", "mailplane_cli.dev"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (fast start, and
    `mailplane relay` never loads kopf or the Kubernetes client)."""
    parser = argparse.ArgumentParser(
        prog="mailplane",
        description="Mailplane: Kubernetes-native email sending (relay, operator, dev platform).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registered: set[str] = set()
    for name, module in _COMMANDS:
        if (only is not None and name != only) or module in registered:
            continue
        registered.add(module)
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = (
            importlib.import_module(module).register
        )
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = args_list[0] if args_list else None
    known = {name for name, _ in _COMMANDS}
    parser = build_parser(first if first in known else None)
    args = parser.parse_args(args_list)
    handler: Callable[[argparse.Namespace], int] = args.func
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
