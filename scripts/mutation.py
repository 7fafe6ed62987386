"""`make mutation`: mutation testing with mutmut over the modules where a silent bug costs most,
against the fast tests; prints the score per module and the surviving mutants.

Each module runs in its own scratch copy of the tracked files (mutmut reads its settings from
setup.cfg there and writes `mutants/` there, never in the checkout): only that module is
mutated, and only its own test files run (mutmut then picks, per mutant, the tests that called
the mutated function). A mutant is killed when a test fails; `no tests` means no listed test
reaches that function, and counts against the score like a survivor. Not part of CI (minutes per
module on 2 cores): run it before closing an issue that touches these modules. The goal is at
least 80% of mutants killed in each module; survivors that are equivalent mutants (no behaviour
can tell them apart) are named as such in the issue's note.

    python scripts/mutation.py                      # every module below
    python scripts/mutation.py model/flow.py        # one module
    python scripts/mutation.py --show               # with each survivor's diff
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "model", "schemas", "flows")   # mutmut copies these from the scratch copy
ALSO_COPY = ("configs", "bench", "scripts", "prefect.yaml", "Makefile", "README.md")

# module -> its own fast tests (the ones that exist to check it)
MODULES = {
    "tasks/stage.py": ["tests/test_stage.py", "tests/test_store.py", "tests/test_summary.py"],
    "tasks/store.py": ["tests/test_store.py", "tests/test_verify.py"],
    # the pack test in test_ingest.py builds a curated work root (14 s per mutant): pack's, not ingest's
    "tasks/ingest.py": ["tests/test_ingest.py", "--deselect",
                        "tests/test_ingest.py::test_pack_leaves_out_the_tracks_ingest_marked"],
    "tasks/manifest.py": ["tests/test_manifest.py"],   # the pack filter and the manifest join
    "tasks/pack.py": ["tests/test_pack.py"],           # shards: its tests pack real audio (slow per mutant)
    "tasks/lyrics_index.py": ["tests/test_lyrics_index.py", "tests/test_lyrics.py"],
    "model/flow.py": ["tests/test_flow_matching.py"],
    "model/repa.py": ["tests/test_repa.py"],
    # test_lit.py asserts the module's steps directly; the two end-to-end training runs (a minute
    # per mutant on 2 cores) stay in the test pass but not in the mutation run
    "model/lit.py": ["tests/test_lit.py", "tests/test_repa.py", "tests/test_train.py",
                     "--deselect", "tests/test_train.py::test_overfits_four_tracks", "--deselect",
                     "tests/test_train.py::test_a_run_past_val_every_logs_validation_and_writes_sample_images"],
}
KILLED = {"killed"}
RESULT_LINE = re.compile(r"^\s+(\S+): (.+)$")


def scratch_copy(dest: Path) -> None:
    """The tracked files of the checkout (what a clean clone holds), as they are on disk now."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def write_settings(work: Path, module: str, tests: list[str]) -> None:
    """mutmut 3.8's [mutmut] section: the packages are copied into mutants/, only `module` is
    mutated, and pytest runs the fast tests of `tests`."""
    lines = ["[mutmut]", "source_paths=", *[f"  {p}/" for p in PACKAGES],
             "only_mutate=", f"  {module}",
             "also_copy=", *[f"  {p}" for p in ALSO_COPY],
             "pytest_add_cli_args=", "  -m", "  not slow", "  -p", "  no:cacheprovider",
             "pytest_add_cli_args_test_selection=", *[f"  {t}" for t in tests]]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


def run_module(module: str, tests: list[str], root: Path, children: int, timeout: int, show: bool) -> dict:
    work = root / module.replace("/", "__")
    work.mkdir(parents=True)
    scratch_copy(work)
    write_settings(work, module, tests)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    # the console script, not `python -m mutmut`: the mutants' trampolines import mutmut.__main__,
    # which must not be a second copy of the running __main__
    mutmut = [str(Path(sys.executable).parent / "mutmut")]
    started = time.perf_counter()
    run = subprocess.run([*mutmut, "run", "--max-children", str(children)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    listed = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env,
                            capture_output=True, text=True, check=True).stdout
    status = {m.group(1): m.group(2) for m in map(RESULT_LINE.match, listed.splitlines()) if m}
    if not status:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
        raise RuntimeError(f"{module}: mutmut produced no results (exit {run.returncode}):\n{tail}")
    counts = Counter(status.values())
    survivors = sorted(name for name, s in status.items() if s not in KILLED)
    diffs = {}
    if show:
        for name in survivors:
            diffs[name] = subprocess.run([*mutmut, "show", name], cwd=work, env=env,
                                         capture_output=True, text=True).stdout
    return {"module": module, "total": len(status), "killed": sum(counts[k] for k in KILLED),
            "counts": counts, "survivors": [(n, status[n]) for n in survivors], "diffs": diffs,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"modules to mutate (default: {', '.join(MODULES)})")
    ap.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per module")
    ap.add_argument("--show", action="store_true", help="print each surviving mutant's diff")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies (mutmut browse there)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"not in the mutation set: {', '.join(unknown)}; known: {', '.join(MODULES)}")
    root = Path(tempfile.mkdtemp(prefix="acepipe-mutation-"))
    rows = []
    try:
        for module in args.modules or list(MODULES):
            row = run_module(module, MODULES[module], root, args.children, args.timeout, args.show)
            rows.append(row)
            print(f"{module}: {row['killed']}/{row['total']} killed in {row['seconds']:.0f} s", flush=True)
    finally:
        if args.keep:
            print(f"scratch copies kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'module':<24} {'mutants':>8} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6} "
          f"{'score':>7} {'time':>7}")
    for r in rows:
        c = r["counts"]
        other = r["total"] - r["killed"] - c["survived"] - c["no tests"]
        print(f"{r['module']:<24} {r['total']:>8} {r['killed']:>7} {c['survived']:>9} {c['no tests']:>9} "
              f"{other:>6} {r['killed'] / r['total']:>7.1%} {r['seconds']:>6.0f}s")
    below = [r["module"] for r in rows if r["killed"] / r["total"] < 0.8]
    for r in rows:
        if r["survivors"]:
            print(f"\n{r['module']}: {len(r['survivors'])} not killed")
            for name, state in r["survivors"]:
                print(f"  {name}: {state}")
                if r["diffs"].get(name):
                    print("    " + r["diffs"][name].strip().replace("\n", "\n    "))
    print(f"\nbelow 80%: {', '.join(below) if below else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
