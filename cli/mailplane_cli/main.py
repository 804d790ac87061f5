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
    ("operator", "mailplane_operator.cli"),
    ("dev", "mailplane_cli.dev"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailplane",
        description="Mailplane: Kubernetes-native email sending (relay, operator, dev platform).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registered: set[str] = set()
    for _name, module in _COMMANDS:
        if module in registered:
            continue
        registered.add(module)
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = (
            importlib.import_module(module).register
        )
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
