"""The hash-pinned lock files agree with pyproject.toml, and this venv was installed from them.

`scripts/lock` writes requirements/{runtime,test,build}.lock; `scripts/bootstrap` and the
Dockerfile install only from them (pip --require-hashes). These tests fail when a dependency is
added to pyproject.toml without relocking, when a lock entry carries no hash, when the image's
versions and the tested versions differ, or when bootstrap stops installing from the lock.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"


def parse_lock(path: Path) -> dict[str, tuple[str, Marker | None, int]]:
    """name -> (version, marker, number of hashes) for every pinned entry."""
    entries: dict[str, tuple[str, Marker | None, int]] = {}
    text = path.read_text()
    # One entry: `name==version [; marker] \` then `--hash=...` continuation lines.
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = block.splitlines()[0].rstrip(" \\")
        if not head or head.startswith("#"):
            continue
        req = Requirement(head)
        [spec] = list(req.specifier)
        assert spec.operator == "==", f"{path.name}: {head!r} is not pinned with =="
        entries[canonicalize_name(req.name)] = (
            spec.version, req.marker, block.count("--hash=sha256:"))
    return entries


def pyproject_requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


@pytest.mark.parametrize(("lock", "extras"), [
    ("runtime.lock", [None]), ("test.lock", [None, "test"])])
def test_every_dependency_is_locked_at_a_version_pyproject_allows(
        lock: str, extras: list[str | None]) -> None:
    pins = parse_lock(LOCKS / lock)
    problems = []
    for extra in extras:
        for req in pyproject_requirements(extra):
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"{req.name} is in pyproject.toml but not in {lock}")
            elif not req.specifier.contains(pins[name][0], prereleases=True):
                problems.append(f"{lock} pins {req.name}=={pins[name][0]}, "
                                f"outside pyproject.toml's {req.specifier}")
    assert not problems, "; ".join(problems) + ": run scripts/lock and commit requirements/"


def test_every_entry_carries_hashes() -> None:
    for lock in ("runtime.lock", "test.lock", "build.lock"):
        unhashed = [n for n, (_v, _m, hashes) in parse_lock(LOCKS / lock).items() if not hashes]
        assert unhashed == [], f"{lock}: entries without --hash: {unhashed}"


def test_image_and_tests_use_the_same_versions() -> None:
    runtime = parse_lock(LOCKS / "runtime.lock")
    test = parse_lock(LOCKS / "test.lock")
    differ = {n: (v, test[n][0]) for n, (v, _m, _h) in runtime.items()
              if n in test and test[n][0] != v}
    assert differ == {}, f"runtime.lock and test.lock disagree (runtime, test): {differ}"
    assert set(runtime) <= set(test), set(runtime) - set(test)


def test_this_venv_was_installed_from_the_lock() -> None:
    pins = parse_lock(LOCKS / "test.lock") | parse_lock(LOCKS / "build.lock")
    wrong = {}
    for name, (version, marker, _h) in pins.items():
        if marker is not None and not marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, f"locked vs installed: {wrong}; run scripts/bootstrap --test"
