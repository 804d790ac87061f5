"""Shared fixtures: each real peer (CA, DNS, SMTP sink, relay process, Kubernetes emulator)
lives in its own module under tests/helpers and is loaded here as a pytest plugin."""

import importlib.util

pytest_plugins = [
    name
    for name in (
        "tests.helpers.pki",
        "tests.helpers.ports",
        "tests.helpers.sink",
        "tests.helpers.dns",
        "tests.helpers.relayproc",
        "tests.helpers.postgres",
        "tests.helpers.kube",
    )
    if importlib.util.find_spec(name) is not None
]
