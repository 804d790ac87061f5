"""Mutation testing of the modules that carry Mailplane's promises (mutmut).

Usage (through ``scripts/mutation``, which installs what it needs first):

    scripts/mutation                     # every promise module, every mutant
    scripts/mutation dkim spool          # some modules (names below, or a source path)
    scripts/mutation --sample 30 --gate  # 30 mutants per module, fail under the target
    scripts/mutation limits --record     # full run; its killed mutants become the ratchet
    scripts/mutation limits --mutants NAME... --record  # a part of it: updates those entries
    scripts/mutation --ci                # CI: recorded killed mutants must stay killed

Each module is mutated in a staging copy of the tree (``.mutation/``, git-ignored) laid out as
mutmut expects (``src/<package>``), and only the tests named for it are run against each
mutant: in-process tests, since a relay started as a subprocess would import the unmutated code.
A mutant that no test kills either gets a test, or is listed in ``tests/mutation/equivalent.toml``
with the reason it cannot change behaviour. The score is killed / (mutants - equivalent).

The ratchet (``tests/mutation/killed/<module>.txt``, written by ``--record`` after a full run)
lists every mutant a full run killed, with a fingerprint of the mutated function. CI runs a
sample of them and fails if one survives: a test that lost its power shows up on the change
that weakened it. A mutant whose fingerprint no longer matches (its function was edited, so the
name may now mean another change) is left out of the sample, and reported.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
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
RATCHET = ROOT / "tests" / "mutation" / "killed"
PACKAGES = {"relay": "mailplane_relay", "operator": "mailplane_operator", "cli": "mailplane_cli"}
TARGET = 0.85
CI_MODULES = 2  # modules per CI run, besides those the last commit touched
CI_MUTANTS = 15  # recorded killed mutants per module that must stay killed


@dataclass(frozen=True)
class Module:
    name: str
    source: str  # path in the repository
    tests: tuple[str, ...]
    # Only the mutants of these functions (of a larger file), matched against mutmut's name of
    # the mutant (``x_<function>__mutmut_N``, ``xǁ<Class>ǁ<method>__mutmut_N``).
    functions: str = ""
    # More pytest arguments for this module's runs (e.g. one backend of a parametrized test).
    pytest_args: tuple[str, ...] = ()


# The modules that carry the promises, and the in-process tests that guard each one.
MODULES = (
    Module("dkim", "relay/mailplane_relay/dkim.py",
           ("tests/relay/test_dkim_signer.py", "tests/relay/test_dkim_header_from.py",
            "tests/relay/test_dkim_independent.py")),
    Module("passwords", "relay/mailplane_relay/config.py",
           ("tests/relay/test_config.py", "tests/relay/test_ingress_auth.py",
            "tests/relay/test_passwords_units.py"),
           functions=r"\.(x_hash_password|x_verify_password|x__check_hash|"
                     r"xǁCredentialǁ\w+)__mutmut_\d+$"),
    Module("authentication", "relay/mailplane_relay/ingress/auth.py",
           ("tests/relay/test_ingress_auth.py", "tests/relay/test_ingress_abuse.py",
            "tests/relay/test_auth_units.py")),
    Module("auth-throttle", "relay/mailplane_relay/ingress/throttle.py",
           ("tests/relay/test_ingress_throttle.py", "tests/relay/test_ingress_abuse.py",
            "tests/relay/test_throttle_units.py")),
    Module("sender-policy", "relay/mailplane_relay/ingress/policy.py",
           ("tests/relay/test_ingress_policy.py", "tests/relay/test_ingress_ratelimit.py",
            "tests/relay/test_policy_units.py")),
    Module("limits", "relay/mailplane_relay/ratelimit.py",
           ("tests/relay/test_ingress_ratelimit.py", "tests/relay/test_limits_pool.py",
            "tests/relay/test_limits_units.py")),
    Module("reputation", "relay/mailplane_relay/reputation.py",
           ("tests/relay/test_reputation.py", "tests/relay/test_reputation_units.py",
            "tests/relay/test_limits_pool.py")),
    # The in-process unit file covers what the slower spool tests (a relay, an SMTP sink,
    # crash subprocesses) check of this module, in a second or two.
    Module("spool", "relay/mailplane_relay/spool.py", ("tests/relay/test_spool_units.py",)),
    # The cache is the same code over either backend: its tests run on SQLite only here (a
    # PostgreSQL server per mutant would make the run ten times longer).
    Module("suppression", "relay/mailplane_relay/store/suppression.py",
           ("tests/relay/test_store.py", "tests/relay/test_suppression_units.py"),
           pytest_args=("-k", "not postgresql")),
    Module("credential-reconciler", "operator/mailplane_operator/reconcile/credential.py",
           ("tests/operator/test_reconcile_credential.py",
            "tests/operator/test_credential_units.py")),
    Module("domain-reconciler", "operator/mailplane_operator/reconcile/domain.py",
           ("tests/operator/test_reconcile_domain.py",
            "tests/operator/test_reconcile_domain_dual.py",
            "tests/operator/test_reconcile_ownership.py",
            "tests/operator/test_domain_units.py")),
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
    tests = ", ".join(json.dumps(t) for t in (*module.tests, *module.pytest_args))
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


def fingerprints(module: Module) -> dict[str, str]:
    """Mutant name -> a digest of its mutated function (name and decorators left out): the
    same name with another digest is another mutation."""
    path = STAGE / "mutants" / staged_source(module)
    if not path.exists():
        return {}
    prefix = staged_source(module).removeprefix("src/").removesuffix(".py").replace("/", ".")
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and re.search(
                r"__mutmut_\d+$", node.name):
            name = f"{prefix}.{node.name}"
            node.name, node.decorator_list = "", []
            found[name] = hashlib.sha256(ast.dump(node).encode()).hexdigest()[:16]
    return found


def ratchet_path(module: Module) -> Path:
    return RATCHET / f"{module.name}.txt"


def load_ratchet(module: Module) -> dict[str, str]:
    path = ratchet_path(module)
    if not path.exists():
        return {}
    lines = (line.split() for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {parts[0]: parts[1] for parts in lines}


def record_ratchet(module: Module, killed: list[str], *, ran: list[str] | None = None) -> None:
    """Write the killed mutants of a full run. ``ran``: only these mutants were run (a part of
    the full run, or its survivors again after new tests): the record keeps its other entries
    whose function is unchanged, and of these it keeps the killed ones."""
    prints = fingerprints(module)
    entries = {name: prints[name] for name in killed if name in prints}
    if ran is not None:
        done = set(ran)
        entries |= {name: digest for name, digest in load_ratchet(module).items()
                    if name not in done and prints.get(name) == digest}
    RATCHET.mkdir(parents=True, exist_ok=True)
    lines = [f"# {module.source}: mutants the full run killed (scripts/mutation "
             f"{module.name} --record); CI checks that a sample stays killed"]
    lines += [f"{name} {digest}" for name, digest in sorted(entries.items())]
    ratchet_path(module).write_text("\n".join(lines) + "\n")


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
    killed_names: list[str]
    status: dict[str, str]

    @property
    def score(self) -> float:
        counted = self.mutants - self.equivalent
        return self.killed / counted if counted else 1.0


def generate(module: Module, workers: int) -> list[str]:
    stage(module)
    # Generate every mutant and collect which tests reach which function, running none yet:
    # a name that matches no mutant makes mutmut stop after generation and stats.
    mutmut("run", "--max-children", str(workers), "no-such-mutant")
    names = sorted(n for n in results(module)
                   if not module.functions or re.search(module.functions, n))
    if not names:
        raise SystemExit(f"{module.name}: mutmut generated no mutants for {module.source} "
                         "(does the path exist, and do its tests run?)")
    return names


def run_module(module: Module, *, sample: int | None, seed: int, workers: int,
               only: list[str] | None = None) -> Score:
    names = generate(module, workers) if only is None else only
    chosen = names if sample is None or only is not None else sorted(
        random.Random(seed).sample(names, min(sample, len(names))))
    done = mutmut("run", "--max-children", str(workers), *chosen)
    status = results(module)
    checked = {k: status.get(k, "not checked") for k in chosen}
    if all(v == "not checked" for v in checked.values()):
        raise SystemExit(f"{module.name}: mutmut ran no mutant:\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    equivalent = load_equivalent()
    killed = [k for k, v in checked.items() if v == "killed"]
    equiv = [k for k, v in checked.items() if v != "killed" and k in equivalent]
    survivors = [k for k, v in checked.items() if v != "killed" and k not in equivalent]
    return Score(module.name, len(checked), len(killed), len(equiv), survivors, killed, checked)


def ratchet_module(module: Module, *, seed: int, workers: int) -> list[str]:
    """Run a sample of the mutants the recorded full run killed; the ones that survive now."""
    recorded = load_ratchet(module)
    if not recorded:
        print(f"{module.name:24} no ratchet recorded (scripts/mutation {module.name} --record)")
        return []
    names = generate(module, workers)
    current = fingerprints(module)
    valid = sorted(n for n, digest in recorded.items() if current.get(n) == digest)
    stale = len(recorded) - len(valid)
    chosen = sorted(random.Random(seed).sample(valid, min(CI_MUTANTS, len(valid))))
    new = len(set(names) - set(recorded) - set(load_equivalent()))
    if not chosen:
        print(f"{module.name:24} every recorded mutant changed: rerun "
              f"scripts/mutation {module.name} --record")
        return []
    score = run_module(module, sample=None, seed=seed, workers=workers, only=chosen)
    # A mutant that now makes the tests hang was caught too; one no test reaches any more was
    # not (the per-test mapping lost it), nor one that survives.
    lost = [n for n in chosen if score.status[n] not in ("killed", "timeout")]
    print(f"{module.name:24} {len(chosen)} of {len(valid)} recorded killed mutants checked, "
          f"{len(lost)} survive; {stale} recorded changed since, {new} not in the record",
          flush=True)
    if stale > len(recorded) // 2:
        print(f"  the record is stale: rerun scripts/mutation {module.name} --record")
    for name in lost:
        print(f"{name}: {score.status[name]}\n{mutmut('show', name).stdout.rstrip()}")
    return lost


def ci_modules(seed: int) -> list[Module]:
    """The modules the last commit touched (source or tests), then others by rotation."""
    out = subprocess.run(["git", "diff", "--name-only", "HEAD~1", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True, check=False).stdout.split()
    touched = [m for m in MODULES if m.source in out or any(t in out for t in m.tests)]
    rest = [m for m in MODULES if m not in touched]
    return touched + random.Random(seed).sample(rest, min(CI_MODULES, len(rest)))


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
    parser.add_argument("--mutants", nargs="+", default=None, metavar="NAME",
                        help="run only these mutants (e.g. the survivors of a full run, after "
                             "adding tests)")
    parser.add_argument("--record", action="store_true",
                        help="after a full run, write the killed mutants to the ratchet "
                             "(tests/mutation/killed/MODULE.txt); with --mutants, update the "
                             "entries of those mutants only (a full run split in parts, or "
                             "its survivors run again)")
    parser.add_argument("--ci", action="store_true",
                        help=f"the CI gate: {CI_MUTANTS} recorded killed mutants of each module "
                             f"the last commit touched and of {CI_MODULES} more (chosen from "
                             "the commit) must stay killed")
    args = parser.parse_args()
    if args.record and args.sample:
        parser.error("--record needs a full run, or a part of it named by --mutants "
                     "(no --sample)")
    if args.ci:
        seed = args.seed if args.seed is not None else int(_head_commit()[:8], 16)
        modules = pick(args.modules) if args.modules else ci_modules(seed)
        print(f"mutation ratchet: {', '.join(m.name for m in modules)}; seed {seed} "
              f"(rerun with scripts/mutation --ci --seed {seed} MODULE)", flush=True)
        lost: list[str] = []
        for module in modules:
            lost += ratchet_module(module, seed=seed, workers=args.workers)
        if lost:
            print(f"{len(lost)} mutant(s) the recorded full run killed survive now: a test "
                  "lost its power. Restore the test, or if the change is intended, rerun "
                  "the full run with --record.")
            return 1
        return 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if args.sample:
        print(f"sample of {args.sample} mutants per module, seed {seed} "
              f"(rerun with --seed {seed})")
    scores = []
    for module in pick(args.modules):
        if args.mutants:
            names = set(generate(module, args.workers))
            only = [n for n in args.mutants if n in names]
            if not only:
                continue
            score = run_module(module, sample=None, seed=seed, workers=args.workers, only=only)
        else:
            score = run_module(module, sample=args.sample, seed=seed, workers=args.workers)
        scores.append(score)
        if args.record:
            record_ratchet(module, score.killed_names,
                           ran=list(score.status) if args.mutants else None)
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
