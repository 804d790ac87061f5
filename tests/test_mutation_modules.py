"""scripts/mutation names the modules that carry the promises and the tests that guard them:
a module moved or a test renamed must fail here, not silently drop out of mutation testing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_and_test_named_for_mutation_exists() -> None:
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" /
                                                  "mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_script"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["mutation_script"]
    assert module.MODULES
    for entry in module.MODULES:
        assert (ROOT / entry.source).is_file(), entry
        assert entry.tests, entry
        for test in entry.tests:
            assert (ROOT / test).is_file(), (entry.name, test)
