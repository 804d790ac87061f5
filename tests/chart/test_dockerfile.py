"""The Dockerfile cannot be built here (no Docker engine); a small lint checks what matters:
pinned base, multi-stage with a venv copied into a clean runtime, non-root user, no remote ADD,
no build tools in the final image, the `mailplane` entry point, and a build context that holds
everything the wheel needs."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field

from .conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with continuations joined, comments dropped; ARGs before the first FROM."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages:
            assert op == "ARG", f"{op} before FROM"
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


def resolve(base: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def test_base_image_is_pinned_and_slim() -> None:
    args, stages = parse(DOCKERFILE.read_text())
    assert len(stages) >= 2, "multi-stage build"
    for stage in stages:
        image = resolve(stage.base, args)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image


def test_runtime_stage_is_non_root_and_runs_mailplane() -> None:
    _args, stages = parse(DOCKERFILE.read_text())
    runtime = stages[-1]
    users = [v for op, v in runtime.instructions if op == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID (runAsNonRoot can check it)"
    [entrypoint] = [v for op, v in runtime.instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["mailplane"]
    copies = [v for op, v in runtime.instructions if op == "COPY"]
    assert any(c.startswith(f"--from={stages[0].name} /opt/mailplane ") for c in copies)
    assert not [v for op, v in runtime.instructions if op == "RUN"], (
        "the runtime stage installs nothing: no compilers, no package manager runs")


def test_no_remote_add_and_no_build_tools() -> None:
    _args, stages = parse(DOCKERFILE.read_text())
    for stage in stages:
        for op, value in stage.instructions:
            if op == "ADD":
                assert not re.search(r"https?://|git@", value), value
            if op == "RUN":
                assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", value), value
    text = DOCKERFILE.read_text()
    assert "--without-pip" in text, "the copied venv carries no pip"


def test_build_context_holds_what_the_wheel_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["packages"]["find"]["where"],
              "requirements/runtime.lock", "requirements/build.lock"]
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            pat = pattern[1:].rstrip("/") if negate else pattern.rstrip("/")
            if fnmatch.fnmatch(path, pat):
                keep = negate
        return keep

    assert [p for p in needed if not included(p)] == []
    assert not included(".venv") and not included(".git") and not included("tests")
    _args, stages = parse(DOCKERFILE.read_text())
    copied = " ".join(v for op, v in stages[0].instructions if op == "COPY")
    assert [p for p in needed if p not in copied] == []


def test_dependencies_come_from_the_hash_pinned_lock() -> None:
    """Every pip install in the image takes the lock with --require-hashes, or installs the
    package alone (--no-deps); nothing is resolved at build time."""
    _args, stages = parse(DOCKERFILE.read_text())
    runs = [v for op, v in stages[0].instructions if op == "RUN"]
    installs = [part.strip() for run in runs for part in run.split("&&")
                if re.search(r"\bpip\b.*\binstall\b", part)]
    assert installs, "the builder installs the dependencies"
    for cmd in installs:
        assert ("--require-hashes -r requirements/" in cmd) or ("--no-deps" in cmd), cmd
    assert any("requirements/runtime.lock" in cmd for cmd in installs)
    copied = " ".join(v for op, v in stages[0].instructions if op == "COPY")
    assert "requirements/runtime.lock" in copied and "requirements/build.lock" in copied
    wheel = [part for run in runs for part in run.split("&&") if "pip wheel" in part]
    assert wheel and all("--no-deps" in w and "--no-build-isolation" in w for w in wheel)
