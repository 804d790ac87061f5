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


def test_a_record_of_some_mutants_keeps_the_rest_of_the_record(tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    """A full run split in parts (or its survivors run again after new tests) is recorded part
    by part: the entries of the mutants not run stay, those run are replaced."""
    module = _script()
    monkeypatch.setattr(module, "STAGE", tmp_path / "stage")
    monkeypatch.setattr(module, "RATCHET", tmp_path / "killed")
    entry = module.Module("toy", "relay/mailplane_relay/toy.py", ("tests/x.py",))
    mutated = tmp_path / "stage" / "mutants" / "src" / "mailplane_relay" / "toy.py"
    mutated.parent.mkdir(parents=True)

    def write(bodies: dict[str, str]) -> None:
        mutated.write_text("".join(f"def x_f__mutmut_{n}():\n    return {body}\n"
                                   for n, body in bodies.items()))

    name = "mailplane_relay.toy.x_f__mutmut_{}".format
    write({"1": "1", "2": "2", "3": "3"})
    module.record_ratchet(entry, [name(1), name(2)])  # the full run killed 1 and 2
    first = module.load_ratchet(entry)
    assert sorted(first) == [name(1), name(2)]
    # 3 and 2 run again: 3 is killed now, 2 survives; 1 was not run and is kept.
    module.record_ratchet(entry, [name(3)], ran=[name(2), name(3)])
    assert sorted(module.load_ratchet(entry)) == [name(1), name(3)]
    # A kept entry whose function changed since is dropped (its name means another change).
    write({"1": "10", "2": "2", "3": "3"})
    module.record_ratchet(entry, [], ran=[name(2)])
    assert sorted(module.load_ratchet(entry)) == [name(3)]
