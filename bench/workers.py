"""Partitions per second of a CPU-bound stage at 1 and 2 workers (issue 12).

    .venv/bin/python bench/workers.py [--songs 16] [--partition-size 2] [--runner dask] [--workers 1 2]

Generates `--songs` synthetic songs (tasks/synth.py), then for each worker count runs the real
curate flow on a fresh work root with the probe and rhythm stages (rhythm.beat_tracker=onset:
the stage's CPU path that needs no weights) and `runner.kind` / `runner.max_workers` set, after a
warm-up run on a one-partition root (server start, imports). Prints the flow's wall seconds, the
rhythm partitions it ran and partitions/s, and the speed-up over one worker. Each Dask worker
is its own process with one torch thread (OMP_NUM_THREADS=1), so on a machine with N idle
cores N workers can approach N times the partitions/s. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=16)
    ap.add_argument("--partition-size", type=int, default=2)
    ap.add_argument("--runner", default="dask", choices=["dask", "threads"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiny-dir", default=".cache/tiny-models")
    args = ap.parse_args()

    top = Path(tempfile.mkdtemp(prefix="acepipe-workers-"))
    os.environ["PREFECT_HOME"] = str(top / "prefect-home")
    try:
        from flows.curate import curate
        from flows.params import RunParams
        from tasks.synth import generate_corpus

        generate_corpus(top / "synth", n=args.songs, seed=0)
        audio = top / "synth" / "audio"
        warm = top / "warm-audio"
        warm.mkdir()
        first = sorted(p for p in audio.iterdir() if p.is_file())[0]
        shutil.copy(first, warm / first.name)

        def params(work: Path, source: Path, workers: int) -> RunParams:
            return RunParams(config="tiny", work_root=str(work), sources=[str(source)], overrides=[
                f"models.tiny_dir={Path(args.tiny_dir).absolute()}", f"lyrics_db={top / 'synth' / 'lyrics.parquet'}",
                "stages=[probe,rhythm]", "rhythm.beat_tracker=onset", "device=cpu",
                f"ingest.partition_size={args.partition_size}", f"runner.kind={args.runner}",
                f"runner.max_workers={workers}"])

        t0 = time.perf_counter()
        curate(params(top / "warm", warm, 1))
        print(f"warm-up: {time.perf_counter() - t0:.1f} s")
        base = None
        for workers in args.workers:
            t0 = time.perf_counter()
            summary = curate(params(top / f"work-{workers}", audio, workers))
            wall = time.perf_counter() - t0
            rhythm = next(s for s in summary["stages"] if s["stage"] == "rhythm")
            parts = rhythm.get("partitions_run", 0)
            rate = parts / wall
            base = base or rate
            print(f"{args.runner} x {workers}: {wall:6.1f} s, {parts} rhythm partitions "
                  f"({args.partition_size} songs each), {rate:.3f} partitions/s, x{rate / base:.2f} over 1 worker")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
