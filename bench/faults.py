"""Fault injection, as an operator meets faults: each on its own copy of a work root, through the
CLI (`acepipe run / pack / verify`), compared with a clean reference run. Prints the fault table.

    .venv/bin/python bench/faults.py [--n 6] [--keep DIR]

Faults: a stage output truncated to half and another filled with random bytes; a shard truncated;
the disk filling during curate (a tmpfs with room for about half the stage outputs; needs root
to mount, skipped otherwise); a source
deleted and another replaced after ingest; two `acepipe run` on one work root, 1 s apart.
Tests assert each behaviour (tests/test_store.py, test_curate.py, test_pack.py, test_verify.py,
test_ingest.py); this prints what a person would see, with the figures. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
ACEPIPE = str(Path(sys.executable).parent / "acepipe")


def acepipe(args: list[str], env: dict, background: bool = False):
    cmd = [ACEPIPE, *args]
    if background:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)


def summary_of(stdout: str) -> dict | None:
    found = re.search(r"(?m)^\{", stdout)
    return json.loads(stdout[found.start():]) if found else None


def stage_tables(work: Path) -> dict[str, list]:
    """Every stage output's rows (sorted by track_id), by path under stages/."""
    return {str(p.relative_to(work)): sorted(pq.read_table(p).to_pylist(), key=lambda r: r["track_id"])
            for p in sorted((work / "stages").rglob("part-*.parquet"))}


def ran(summary: dict) -> dict[str, str]:
    return {s["stage"]: s["ran"] for s in summary["stages"] if s["ran"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6, help="songs in the synthetic corpus")
    p.add_argument("--keep", help="work in this directory and keep it")
    args = p.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="acepipe-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "OMP_NUM_THREADS": "1"}
    src = root / "corpus"
    subprocess.run([ACEPIPE, "synth", str(src), "--n", str(args.n)], check=True, capture_output=True)
    base = ["--config", "tiny", "--set", "ingest.partition_size=4", "--set", f"lyrics_db={src / 'lyrics.parquet'}",
            "--set", f"models.tiny_dir={root / 'tiny-models'}"]

    def run(work: Path, *extra: str, background=False):
        return acepipe(["run", *base, "--source", str(src / "audio"), "--work", str(work), "--json", *extra],
                       env, background)

    rows = []
    t0 = time.perf_counter()
    ref = root / "ref"
    out = run(ref)
    ref_summary = summary_of(out.stdout)
    acepipe(["pack", *base, "--work", str(ref)], env)
    ref_tables = stage_tables(ref)
    print(f"reference: {ref_summary['tracks']} tracks, {ref_summary['ok']} kept, {ref_summary['rejected']} "
          f"rejected, {len(ref_tables)} stage outputs, {time.perf_counter() - t0:.0f} s", flush=True)

    # 1. damaged stage outputs
    work = root / "damaged-outputs"
    shutil.copytree(ref, work)
    a = sorted((work / "stages" / "aesthetics").rglob("part-*.parquet"))[0]
    r = sorted((work / "stages" / "rhythm").rglob("part-*.parquet"))[-1]
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    r.write_bytes(os.urandom(r.stat().st_size))
    out = run(work)
    s = summary_of(out.stdout)
    moved = len(list((work / "quarantine").rglob("*.parquet.*")))
    pk = acepipe(["pack", *base, "--work", str(work)], env)
    rows.append(("stage output truncated to half + another filled with random bytes",
                 f"run rc={out.returncode}, {moved} file(s) quarantined, recomputed {ran(s)}; stage outputs "
                 f"{'equal' if stage_tables(work) == ref_tables else 'DIFFER from'} the reference; pack rc={pk.returncode}"))
    print(rows[-1], flush=True)

    # 2. a truncated shard
    work = root / "damaged-shard"
    shutil.copytree(ref, work)
    shards = sorted((work / "shards" / "default").glob("shard-*.tar"))
    victim = shards[min(1, len(shards) - 1)]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = acepipe(["verify", *base, "--work", str(work)], env)
    pk = acepipe(["pack", *base, "--work", str(work)], env)
    same = [s.name for s in shards if s.read_bytes() == (ref / "shards" / "default" / s.name).read_bytes()]
    after = acepipe(["verify", *base, "--work", str(work)], env)
    rows.append(("a shard truncated",
                 f"verify rc={before.returncode} ({before.stdout.strip().splitlines()[-1]}); pack rc={pk.returncode}: "
                 f"{len(same)}/{len(shards)} shards byte-identical to the reference; verify after rc={after.returncode}"))
    print(rows[-1], flush=True)

    # 3. the disk fills during curate
    work = root / "full-disk"
    work.mkdir()
    # A disk with room for the catalog and about half the stage outputs (tmpfs counts 4 KB pages).
    pages = lambda files: sum(-(-f.stat().st_size // 4096) for f in files)  # noqa: E731
    size_kb = 4 * (pages((ref / "catalog").rglob("*.parquet")) + pages((ref / "stages").rglob("*.parquet")) // 2 + 4)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(work)],
                             capture_output=True).returncode == 0
    if mounted:
        try:
            out = run(work)
            s = summary_of(out.stdout) or {}
            err = next((line for line in out.stderr.splitlines() if line.startswith("acepipe: error")), "none")
            rescued = root / "full-disk-rerun"
            shutil.copytree(work, rescued)
        finally:
            subprocess.run(["umount", str(work)])
        again = run(rescued)
        s2 = summary_of(again.stdout)
        rows.append((f"the disk fills during curate ({size_kb} KB tmpfs)",
                     f"rc={out.returncode}, kept {s.get('ok')} rejected {s.get('rejected')} error {s.get('error')} "
                     f"not yet processed {s.get('pending')}; error line: {err[:200]}; rerun with space: "
                     f"rc={again.returncode}, kept {s2['ok']} rejected {s2['rejected']} "
                     f"(reference {ref_summary['ok']}/{ref_summary['rejected']})"))
    else:
        rows.append(("the disk fills during curate", "not measured: mounting a tmpfs needs root"))
    print(rows[-1], flush=True)

    # 4. two runs on one work root, 1 s apart
    work = root / "two-runs"
    first = run(work, background=True)
    time.sleep(1)
    second = run(work, background=True)
    (o1, e1), (o2, e2) = first.communicate(), second.communicate()
    s1, s2 = summary_of(o1), summary_of(o2)
    twice = {st: sorted(set(s1["stages"][i]["ran"].split(",")) & set(s2["stages"][i]["ran"].split(",")) - {""})
             for i, st in enumerate(x["stage"] for x in s1["stages"]) if st != "ingest"}
    waited = [line for line in (e1 + e2).splitlines() if "waiting for the" in line]
    rows.append(("two `acepipe run` on one work root, 1 s apart",
                 f"rc={first.returncode}/{second.returncode}; partitions computed by both: "
                 f"{ {k: v for k, v in twice.items() if v} or 'none'}; kept {s1['ok']}/{s2['ok']} "
                 f"(reference {ref_summary['ok']}); lock messages: {waited[:1] or 'none'}"))
    print(rows[-1], flush=True)

    # 5. a source deleted, another replaced, after ingest (last: it changes the corpus)
    work = root / "changed-sources"
    shutil.copytree(ref, work)
    import numpy as np
    import soundfile as sf

    # Songs without an exact duplicate: a duplicate still holding the old bytes rightly keeps its track ok.
    names = [q.name for q in (src / "audio").iterdir()]
    singles = sorted(p for p in (src / "audio").glob("song-*.*")
                     if "duplicate" not in p.name and not any(n.startswith(p.stem + "-") for n in names))
    replaced = next(p for p in singles if p.suffix in (".flac", ".wav"))
    gone = next(p for p in singles if p != replaced)
    gone.unlink()
    tone = 0.3 * np.sin(2 * np.pi * 330 * np.arange(3 * 44100) / 44100)
    sf.write(replaced, np.stack([tone, tone], 1), 44100)        # other audio under the same name
    out = run(work)
    s = summary_of(out.stdout)
    cat = [r for p in sorted((work / "catalog").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    marks = {Path(r["uri"]).name: (r["reason"] or "")[:14] for r in cat
             if (r["reason"] or "").startswith(("source_missing", "source_changed"))}
    pk = acepipe(["pack", *base, "--work", str(work)], env)
    rows.append(("a source deleted, another replaced after ingest",
                 f"run rc={out.returncode}: catalog marks {marks}; by reason {s['by_reason']}; pack rc={pk.returncode}"))
    print(rows[-1], flush=True)

    print("\n| fault | measured |\n|---|---|")
    for fault, what in rows:
        print(f"| {fault} | {what} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; work under {root}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
