"""scripts/mutation names the modules that carry the promises and the tests that guard them:
a module moved or a test renamed must fail here, not silently drop out of mutation testing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" /
                                                  "mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_script"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["mutation_script"]
    return module


def test_every_module_and_test_named_for_mutation_exists() -> None:
    module = _script()
    assert module.MODULES
    for entry in module.MODULES:
        assert (ROOT / entry.source).is_file(), entry
        assert entry.tests, entry
        for test in entry.tests:
            assert (ROOT / test).is_file(), (entry.name, test)


def test_every_ratchet_record_names_a_module_and_no_killed_mutant_is_called_equivalent(
) -> None:
    module = _script()
    names = {m.name: m for m in module.MODULES}
    equivalent = module.load_equivalent()
    records = sorted((ROOT / "tests" / "mutation" / "killed").glob("*.txt"))
    assert records
    for path in records:
        assert path.stem in names, f"{path}: no module {path.stem!r} in scripts/mutation.py"
        recorded = module.load_ratchet(names[path.stem])
        assert recorded, path
        assert all(len(digest) == 16 for digest in recorded.values()), path
        both = sorted(set(recorded) & set(equivalent))
        assert not both, f"killed by the recorded run, yet listed as equivalent: {both}"
