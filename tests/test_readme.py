"""The README stays true: it starts with the two commands, CI runs exactly its test command,
and every page it links to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def first_block() -> list[str]:
    block = README.split("```", 2)[1]
    return [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]


def test_readme_starts_with_the_two_commands() -> None:
    assert README.startswith("# Mailplane\n\n```sh\n")
    assert first_block() == ["scripts/dev", "scripts/test"]
    for command in first_block():
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} must be executable"


def test_ci_runs_the_readme_test_command_and_nothing_else() -> None:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] == f"exec {first_block()[1]}"
    assert all(line.startswith(("set ", "cd ", "exec ")) for line in lines)


def test_scripts_dev_runs_mailplane_dev() -> None:
    assert "mailplane dev" in (ROOT / "scripts" / "dev").read_text()


def test_every_linked_page_exists() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
