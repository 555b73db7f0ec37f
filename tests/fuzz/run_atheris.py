"""Coverage-guided fuzzing of the targets in targets.py with atheris (libFuzzer for Python).

    .venv/bin/python tests/fuzz/run_atheris.py --target link_server --seconds 60
    .venv/bin/python tests/fuzz/run_atheris.py --all --seconds 300 --jobs 2
    .venv/bin/python tests/fuzz/run_atheris.py --target privsep --reproduce FILE

Each target keeps its corpus in `test-artifacts/fuzz/<target>/corpus` (gitignored), seeded with
the small valid inputs that targets.py builds in code, so every run starts from inputs that reach
deep into the parser and later runs continue from what earlier ones found. A crash (any
exception but the module's own error type, or a failed property) stops the run with exit
status 1 and leaves its input in `test-artifacts/fuzz/<target>/crashes/`; `--reproduce` runs
one such file through the target without atheris, showing the traceback.

One target runs in this process (atheris.Fuzz() never returns); `--all` runs each target in a
child process of its own, `--jobs` at a time, and exits non-zero if any of them crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

TESTS_DIR: Final = Path(__file__).resolve().parents[1]
REPO_ROOT: Final = TESTS_DIR.parent
DEFAULT_ARTIFACTS: Final = REPO_ROOT / "test-artifacts" / "fuzz"
# libFuzzer's per-input time limit: every parser here answers in milliseconds, so an input that
# takes 10 s is a denial-of-service bug and is saved as a "timeout-" reproducer.
INPUT_TIMEOUT_S: Final = 10
# How much longer than its budget a child may run (start-up, seeding, the final report) before
# `--all` gives up on it.
CHILD_GRACE_S: Final = 120
# Lines of a crashed child's output worth showing: the traceback and libFuzzer's summary.
REPORT_TAIL_LINES: Final = 40
# What atheris prints before the traceback of a crash.
_CRASH_MARK: Final = "Uncaught Python exception"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How one target's run ended; `reproducers` are the crash files it left."""

    target: str
    returncode: int
    seconds: float
    executions: int | None
    reproducers: tuple[Path, ...]
    output_tail: str

    @property
    def crashed(self) -> bool:
        return self.returncode != 0


def target_dirs(artifacts: Path, target: str) -> tuple[Path, Path]:
    """(corpus, crashes) for `target` under `artifacts`."""
    return artifacts / target / "corpus", artifacts / target / "crashes"


def write_seeds(corpus: Path, seeds: list[bytes]) -> None:
    """Put each seed in the corpus under its content hash (idempotent across runs)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()}"  # a name, not security
        if not path.exists():
            path.write_bytes(seed)


def libfuzzer_args(
    *,
    corpus: Path,
    crashes: Path,
    max_len: int,
    seconds: int | None,
    runs: int | None,
    seed: int | None = None,
) -> list[str]:
    args = [
        str(corpus),
        f"-artifact_prefix={crashes}/",
        f"-max_len={max_len}",
        f"-timeout={INPUT_TIMEOUT_S}",
        "-print_final_stats=1",
    ]
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    if runs is not None:
        args.append(f"-atheris_runs={runs}")
    if seed is not None:
        args.append(f"-seed={seed}")
    return args


def fuzz_in_this_process(args: argparse.Namespace) -> None:
    """Instrument reflector, import the target, and hand over to libFuzzer (does not return)."""
    import atheris  # type: ignore[import-untyped,unused-ignore]

    sys.path.insert(0, str(TESTS_DIR))
    with atheris.instrument_imports(include=["reflector"]):
        from fuzz import targets
    targets.set_strict(args.strict)
    target = {**targets.TARGETS, **targets.SELFTEST_TARGETS}[args.target]
    corpus, crashes = target_dirs(args.artifacts, target.name)
    write_seeds(corpus, target.seeds())
    crashes.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], *libfuzzer_args(
        corpus=corpus, crashes=crashes, max_len=target.max_len, seconds=args.seconds,
        runs=args.runs, seed=args.seed,
    )]  # fmt: skip
    print(f"fuzz: {target.name}: corpus {corpus}, crashes to {crashes}", flush=True)
    atheris.Setup(argv, target)
    atheris.Fuzz()


def reproduce(args: argparse.Namespace) -> int:
    """Run one input through a target, without atheris; the traceback shows what broke."""
    sys.path.insert(0, str(TESTS_DIR))
    from fuzz import targets

    targets.set_strict(args.strict)
    target = {**targets.TARGETS, **targets.SELFTEST_TARGETS}[args.target]
    data = Path(args.reproduce).read_bytes()
    target(data)
    print(f"fuzz: {target.name}: {args.reproduce} ({len(data)} bytes) passes")
    return 0


def _excerpt(output: str) -> str:
    """The part of a run's output worth reading: from the uncaught exception on, else the end."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if _CRASH_MARK in line), None)
    if start is None:
        return "\n".join(lines[-REPORT_TAIL_LINES:])
    return "\n".join(lines[start : start + REPORT_TAIL_LINES])


def _executions(output: str) -> int | None:
    """libFuzzer's final `stat::number_of_executed_units: N`."""
    for line in output.splitlines():
        if line.startswith("stat::number_of_executed_units:"):
            return int(line.rsplit(":", 1)[1])
    return None


def run_child(
    target: str,
    *,
    artifacts: Path,
    seconds: int | None,
    runs: int | None,
    strict: bool,
    seed: int | None = None,
) -> Outcome:
    """Fuzz one target in a child process and describe how it ended."""
    _, crashes = target_dirs(artifacts, target)
    before = set(crashes.glob("*")) if crashes.exists() else set()
    command = [sys.executable, str(Path(__file__).resolve()), "--target", target]
    command += ["--artifacts", str(artifacts)]
    if seconds is not None:
        command += ["--seconds", str(seconds)]
    if runs is not None:
        command += ["--runs", str(runs)]
    if strict:
        command.append("--strict")
    env = dict(os.environ)
    if seed is not None:
        # The same inputs in the same order on every run: a fixed libFuzzer seed, and a fixed
        # hash seed so that set and dict orders (hence coverage feedback) do not vary either.
        command += ["--seed", str(seed)]
        env["PYTHONHASHSEED"] = "0"
    budget = (seconds or 0) + CHILD_GRACE_S if runs is None else None
    started = time.monotonic()
    proc = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=budget,
        check=False,
        env=env,
    )
    output = proc.stdout
    after = set(crashes.glob("*")) if crashes.exists() else set()
    return Outcome(
        target=target,
        returncode=proc.returncode,
        seconds=time.monotonic() - started,
        executions=_executions(output),
        reproducers=tuple(sorted(after - before)),
        output_tail=_excerpt(output),
    )


def run_targets(
    names: list[str],
    *,
    artifacts: Path,
    seconds: int | None,
    runs: int | None,
    strict: bool = False,
    jobs: int = 1,
    seed: int | None = None,
) -> list[Outcome]:
    """Fuzz each named target in a child process, `jobs` at a time."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(
            pool.map(
                lambda name: run_child(
                    name, artifacts=artifacts, seconds=seconds, runs=runs, strict=strict, seed=seed
                ),
                names,
            )
        )


def format_report(outcomes: list[Outcome]) -> str:
    """A table of the runs, then the tail of every crashed run's output."""
    lines = [f"{'target':<16} {'result':<8} {'executions':>11} {'seconds':>8}  reproducers"]
    for o in outcomes:
        result = "CRASH" if o.crashed else "ok"
        runs = "?" if o.executions is None else str(o.executions)
        files = " ".join(str(p) for p in o.reproducers)
        lines.append(f"{o.target:<16} {result:<8} {runs:>11} {o.seconds:>8.1f}  {files}")
    for o in outcomes:
        if o.crashed:
            lines.append(f"\n--- {o.target} (exit {o.returncode}) ---\n{o.output_tail}")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(TESTS_DIR))
    from fuzz import targets

    outcomes = run_targets(
        list(targets.TARGETS),
        artifacts=args.artifacts,
        seconds=args.seconds,
        runs=args.runs,
        strict=args.strict,
        jobs=args.jobs,
        seed=args.seed,
    )
    print(format_report(outcomes))
    return 1 if any(o.crashed for o in outcomes) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", help="one target from tests/fuzz/targets.py")
    which.add_argument("--all", action="store_true", help="every target, one child each")
    parser.add_argument("--seconds", type=int, help="time budget per target")
    parser.add_argument("--runs", type=int, help="number of inputs per target")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (--all)")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS)
    parser.add_argument("--strict", action="store_true", help="known bugs crash too")
    parser.add_argument("--reproduce", metavar="FILE", help="run one input, without atheris")
    args = parser.parse_args(argv)
    if args.reproduce is None and args.seconds is None and args.runs is None:
        parser.error("give --seconds or --runs (an unbounded run never ends)")
    if args.reproduce is not None and args.target is None:
        parser.error("--reproduce needs --target")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.artifacts = args.artifacts.resolve()
    if args.reproduce is not None:
        return reproduce(args)
    if args.all:
        return run_all(args)
    os.chdir(REPO_ROOT)
    fuzz_in_this_process(args)
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
