"""Mutation testing of the modules that carry Mailplane's promises (mutmut).

Usage (through ``scripts/mutation``, which installs what it needs first):

    scripts/mutation                     # every promise module, every mutant
    scripts/mutation dkim spool          # some modules (names below, or a source path)
    scripts/mutation --sample 30 --gate  # CI: 30 mutants per module, fail under the target

Each module is mutated in a staging copy of the tree (``.mutation/``, git-ignored) laid out as
mutmut expects (``src/<package>``), and only the tests named for it are run against each
mutant: in-process tests, since a relay started as a subprocess would import the unmutated code.
A mutant that no test kills either gets a test, or is listed in ``tests/mutation/equivalent.toml``
with the reason it cannot change behaviour. The score is killed / (mutants - equivalent).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".mutation"
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent.toml"
PACKAGES = {"relay": "mailplane_relay", "operator": "mailplane_operator", "cli": "mailplane_cli"}
TARGET = 0.85
CI_MODULES = 2
CI_MUTANTS = 10


@dataclass(frozen=True)
class Module:
    name: str
    source: str  # path in the repository
    tests: tuple[str, ...]


# The modules that carry the promises, and the in-process tests that guard each one.
MODULES = (
    Module("dkim", "relay/mailplane_relay/dkim.py",
           ("tests/relay/test_dkim_signer.py", "tests/relay/test_dkim_header_from.py",
            "tests/relay/test_dkim_independent.py")),
    Module("passwords", "relay/mailplane_relay/config.py",
           ("tests/relay/test_config.py", "tests/relay/test_ingress_auth.py")),
    Module("authentication", "relay/mailplane_relay/ingress/auth.py",
           ("tests/relay/test_ingress_auth.py", "tests/relay/test_ingress_abuse.py")),
    Module("auth-throttle", "relay/mailplane_relay/ingress/throttle.py",
           ("tests/relay/test_ingress_throttle.py", "tests/relay/test_ingress_abuse.py")),
    Module("sender-policy", "relay/mailplane_relay/ingress/policy.py",
           ("tests/relay/test_ingress_policy.py", "tests/relay/test_ingress_ratelimit.py")),
    Module("limits", "relay/mailplane_relay/ratelimit.py",
           ("tests/relay/test_ingress_ratelimit.py",)),
    Module("reputation", "relay/mailplane_relay/reputation.py",
           ("tests/relay/test_reputation.py",)),
    Module("spool", "relay/mailplane_relay/spool.py",
           ("tests/relay/test_spool.py", "tests/relay/test_spool_privacy.py",
            "tests/relay/test_spool_erasure.py")),
    Module("suppression", "relay/mailplane_relay/store/suppression.py",
           ("tests/relay/test_store.py",)),
    Module("credential-reconciler", "operator/mailplane_operator/reconcile/credential.py",
           ("tests/operator/test_reconcile_credential.py",)),
    Module("domain-reconciler", "operator/mailplane_operator/reconcile/domain.py",
           ("tests/operator/test_reconcile_domain.py",)),
)

STATUS_BY_EXIT = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
                  34: "skipped", 35: "suspicious", 36: "timeout", 24: "timeout", 152: "timeout",
                  255: "timeout", -24: "timeout", 37: "type check", None: "not checked"}


def staged_source(module: Module) -> str:
    top, _, rest = module.source.partition("/")
    return f"src/{rest}" if top in PACKAGES else module.source


def stage(module: Module) -> Path:
    """A copy of the tree where the packages live under src/ and pytest imports them there."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "src").mkdir(parents=True)
    for top, package in PACKAGES.items():
        shutil.copytree(ROOT / top / package, STAGE / "src" / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for extra in ("tests", "bench", "crds", "examples", "charts", "monitoring", "docs",
                  "README.md"):
        src = ROOT / extra
        if src.is_dir():
            shutil.copytree(src, STAGE / extra,
                            ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        elif src.exists():
            shutil.copy2(src, STAGE / extra)
    for node_dir in ROOT.glob("tests/**/node/node_modules"):
        target = STAGE / node_dir.relative_to(ROOT)
        target.symlink_to(node_dir, target_is_directory=True)
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject, count = re.subn(r'(?m)^pythonpath = \[.*\]$', 'pythonpath = ["src", "."]',
                               pyproject)
    assert count == 1, "pyproject.toml: [tool.pytest.ini_options] pythonpath not found"
    tests = ", ".join(json.dumps(t) for t in module.tests)
    pyproject += (
        "\n[tool.mutmut]\n"
        f"source_paths = [{json.dumps(staged_source(module))}]\n"
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        'also_copy = ["src", "bench", "crds", "examples", "charts", "monitoring", "docs", '
        '"README.md"]\n'
    )
    (STAGE / "pyproject.toml").write_text(pyproject)
    return STAGE


def mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], cwd=STAGE, capture_output=True, text=True,
                          check=False)


def results(module: Module) -> dict[str, str]:
    meta = STAGE / "mutants" / (staged_source(module) + ".meta")
    if not meta.exists():
        return {}
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    return {key: STATUS_BY_EXIT.get(code, f"exit {code}") for key, code in codes.items()}


def load_equivalent() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    doc = tomllib.loads(EQUIVALENT.read_text())
    return {str(k): str(v) for k, v in doc.get("equivalent", {}).items()}


@dataclass
class Score:
    module: str
    mutants: int
    killed: int
    equivalent: int
    survivors: list[str]

    @property
    def score(self) -> float:
        counted = self.mutants - self.equivalent
        return self.killed / counted if counted else 1.0


def run_module(module: Module, *, sample: int | None, seed: int, workers: int) -> Score:
    stage(module)
    # Generate every mutant and collect which tests reach which function, running none yet:
    # a name that matches no mutant makes mutmut stop after generation and stats.
    mutmut("run", "--max-children", str(workers), "no-such-mutant")
    names = sorted(results(module))
    if not names:
        raise SystemExit(f"{module.name}: mutmut generated no mutants for {module.source} "
                         "(does the path exist, and do its tests run?)")
    chosen = names if sample is None else sorted(
        random.Random(seed).sample(names, min(sample, len(names))))
    done = mutmut("run", "--max-children", str(workers), *chosen)
    status = results(module)
    checked = {k: status.get(k, "not checked") for k in chosen}
    if all(v == "not checked" for v in checked.values()):
        raise SystemExit(f"{module.name}: mutmut ran no mutant:\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    equivalent = load_equivalent()
    killed = sum(1 for v in checked.values() if v == "killed")
    equiv = [k for k, v in checked.items() if v != "killed" and k in equivalent]
    survivors = [k for k, v in checked.items() if v != "killed" and k not in equivalent]
    return Score(module.name, len(checked), killed, len(equiv), survivors)


def _head_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    return out if re.fullmatch(r"[0-9a-f]{40}", out) else "0" * 40


def pick(names: list[str]) -> list[Module]:
    if not names:
        return list(MODULES)
    by_name = {m.name: m for m in MODULES} | {m.source: m for m in MODULES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; known: {[m.name for m in MODULES]}")
    return [by_name[n] for n in names]


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutation", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="module names (default: all)")
    parser.add_argument("--sample", type=int, help="mutants per module, chosen at random")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sample")
    parser.add_argument("--gate", action="store_true",
                        help=f"exit 1 when a module scores under {TARGET:.0%}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show", type=int, default=5, help="diffs of survivors to print")
    parser.add_argument("--ci", action="store_true",
                        help="the bounded sample CI runs: CI_MUTANTS mutants of CI_MODULES "
                             "modules chosen from the commit, reported (the gate is the full run)")
    args = parser.parse_args()
    if args.ci:
        seed = int(_head_commit()[:8], 16)
        chosen = random.Random(seed).sample(MODULES, CI_MODULES)
        args.modules, args.sample, args.seed = [m.name for m in chosen], CI_MUTANTS, seed
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if args.sample:
        print(f"sample of {args.sample} mutants per module, seed {seed} "
              f"(rerun with --seed {seed})")
    scores = []
    for module in pick(args.modules):
        score = run_module(module, sample=args.sample, seed=seed, workers=args.workers)
        scores.append(score)
        print(f"{module.name:24} {module.source:55} mutants {score.mutants:4}  killed "
              f"{score.killed:4}  equivalent {score.equivalent:3}  score {score.score:6.1%}",
              flush=True)
        for name in score.survivors[: args.show]:
            print(mutmut("show", name).stdout.rstrip())
        if len(score.survivors) > args.show:
            print(f"  ... and {len(score.survivors) - args.show} more survivors: "
                  + " ".join(score.survivors[args.show:]))
    total = sum(s.mutants - s.equivalent for s in scores)
    killed = sum(s.killed for s in scores)
    print(f"overall: {killed}/{total} non-equivalent mutants killed "
          f"({killed / total if total else 1:.1%}); target {TARGET:.0%}")
    failing = [s.module for s in scores if s.score < TARGET]
    if args.gate and failing:
        print(f"under the target: {', '.join(failing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
