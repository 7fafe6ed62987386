"""Scale benchmark: what an empty night costs over a large catalogued corpus (issue 12).

    .venv/bin/python bench/scale.py [--tracks 200000] [--partition-size 1000] [--new 0] [--dir /tmp]
    .venv/bin/python bench/scale.py --increment [--tracks 100000] [--new-percent 1] [--shard-mb 50]

`--increment` measures a 1% increment against a full run with real bytes (bench/scale_increment.py);
without it, this:

Builds, in a child process (so its memory does not count), a work root that looks like the
corpus after a full curate: `--tracks` catalogued tracks in partitions of `--partition-size`, the
ingest memo, and an output of every configured stage (tiny profile, six stages) for every
partition, under the stage keys the flow computes. The sources are a simulated filesystem
(`simsrc://`, registered here) that lists the same files with their sizes and mtimes and holds no
bytes: an empty night hashes nothing, so a source that cannot be read is enough. `--new N` adds N
files the memo does not know (they are then listed but unreadable: rejects in a new partition).

Then runs the real curate flow once in this process, on a temporary Prefect home, and prints:
wall time (with the flow's own phases from its summary), the Prefect task runs it created,
the peak RSS of this process, and each figure per 100k tracks and extrapolated (linearly) to
1.8M tracks. Asserts nothing.
"""
from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import pstats
import resource
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

from fsspec import AbstractFileSystem, register_implementation  # noqa: E402

REAL = 1_800_000
MTIME = 1_700_000_000   # whole seconds: the memo's mtime_ns is exact


class SimulatedSource(AbstractFileSystem):
    """`simsrc://corpus?N` ... a listing of N audio files that hold no bytes (see the module doc)."""
    protocol = "simsrc"
    root_marker = "/"

    @staticmethod
    def _count(path: str) -> int:
        return int(path.strip("/").split("/")[0].split("-")[1])

    @staticmethod
    def file_path(top: str, i: int) -> str:
        return f"/{top}/{i // 1000:05d}/track-{i:08d}.flac"

    def exists(self, path, **kwargs):
        return True

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        top = path.strip("/").split("/")[0]
        names = [self.file_path(top, i) for i in range(self._count(path))]
        if not detail:
            return names
        return {n: {"name": n, "size": 4_000_000 + i, "type": "file", "mtime": float(MTIME)}
                for i, n in enumerate(names)}

    def _open(self, path, mode="rb", **kwargs):
        raise OSError(f"{path}: a simulated file holds no bytes")


register_implementation("simsrc", SimulatedSource, clobber=True)


def config(work: Path, lyrics_db: Path, tiny_dir: Path, partition_size: int):
    from schemas.config import load_config

    return load_config("tiny", [f"work_root={work}", f"lyrics_db={lyrics_db}", f"models.tiny_dir={tiny_dir}",
                                f"ingest.partition_size={partition_size}"], environ={})


def build(work: Path, lyrics_db: Path, tiny_dir: Path, tracks: int, known: int, partition_size: int) -> None:
    """The work root of a corpus whose first `known` files are catalogued and done (child process)."""
    import pyarrow as pa

    from schemas.common import CATALOG_SCHEMA, SEEN_SCHEMA
    from tasks.stage import dag_order, stage_class, stage_keys
    from tasks.store import StageStore

    cfg = config(work, lyrics_db, tiny_dir, partition_size)
    order = dag_order(cfg.stages)
    keys = stage_keys(cfg, order)
    store = StageStore(str(work))
    fs = SimulatedSource()
    top = f"corpus-{tracks}"
    memo = []
    for part, start in enumerate(range(0, known, partition_size)):
        ids = [f"{i:032x}" for i in range(start, min(start + partition_size, known))]
        uris = [fs.unstrip_protocol(SimulatedSource.file_path(top, start + j)) for j in range(len(ids))]
        n = len(ids)
        catalog = {f.name: pa.nulls(n, f.type) for f in CATALOG_SCHEMA}
        catalog.update(track_id=pa.array(ids), status=pa.array(["ok"] * n), uri=pa.array(uris),
                       uri_raw=pa.array([u.encode() for u in uris], pa.binary()),
                       aliases=pa.array([[]] * n, pa.list_(pa.string())),
                       bytes=pa.array([4_000_000 + start + j for j in range(n)], pa.int64()),
                       duration=pa.array([180.0] * n), sample_rate=pa.array([44100] * n, pa.int32()),
                       channels=pa.array([2] * n, pa.int32()), codec=pa.array(["FLAC"] * n),
                       partition=pa.array([part] * n, pa.int32()))
        store.write_table(store.catalog_path(part), pa.table(catalog, schema=CATALOG_SCHEMA))
        for name in order:
            schema = stage_class(name).schema
            cols = {f.name: pa.nulls(n, f.type) for f in schema}
            cols.update(track_id=pa.array(ids), status=pa.array(["ok"] * n))
            store.write_table(store.stage_path(name, keys[name], part), pa.table(cols, schema=schema))
        memo.append(pa.table({"uri": pa.array(uris), "uri_raw": catalog["uri_raw"], "bytes": catalog["bytes"],
                              "mtime_ns": pa.array([MTIME * 10**9] * n, pa.int64()),
                              "track_id": pa.array(ids)}, schema=SEEN_SCHEMA))
    store.write_table(store.path("catalog", "seen.parquet"), pa.concat_tables(memo))


def task_runs(flow_run_id) -> int:
    """Task runs of the flow run and of its subflows, as Prefect's API lists them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id, *(f.id for f in subflows)])), limit=200)
    return len(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=200_000, help="catalogued tracks (the real corpus: 1.8M)")
    ap.add_argument("--partition-size", type=int, default=1000)
    ap.add_argument("--new", type=int, default=0, help="files added since the last run")
    ap.add_argument("--dir", default=None, help="where the work root goes (default: a temp dir)")
    ap.add_argument("--tiny-dir", default=".cache/tiny-models")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N functions of the measured run with the most cumulative time")
    ap.add_argument("--increment", action="store_true", help="a full run, a 1%% increment and an empty night "
                    "over real files (bench/scale_increment.py)")
    ap.add_argument("--new-percent", type=float, default=1.0, help="with --increment: files added, in %% of --tracks")
    ap.add_argument("--shard-mb", type=int, default=50, help="with --increment: pack.shard_bytes in MB")
    ap.add_argument("--repa", action="store_true", help="with --increment: latents also compute the MERT and "
                    "mHuBERT targets (default: the DCAE only)")
    args = ap.parse_args()
    if args.increment:
        from bench.scale_increment import main as increment

        return increment(args)

    top = Path(tempfile.mkdtemp(prefix="acepipe-scale-", dir=args.dir))
    os.environ["PREFECT_HOME"] = str(top / "prefect-home")
    try:
        from tasks.synth import generate_corpus

        generate_corpus(top / "synth", n=1, seed=0)   # only for its lyrics database
        total, lyrics_db, tiny_dir = args.tracks + args.new, top / "synth" / "lyrics.parquet", Path(args.tiny_dir).absolute()
        t0 = time.perf_counter()
        # the measured root, and a one-partition root whose run first starts Prefect's server and
        # imports every stage, so the measured run's time and memory are what its size costs
        for work, tracks, known in ((top / "work", total, args.tracks), (top / "warm", args.partition_size,
                                                                        args.partition_size)):
            child = mp.get_context("spawn").Process(target=build, args=(
                work, lyrics_db, tiny_dir, tracks, known, args.partition_size))
            child.start()
            child.join()
            if child.exitcode:
                raise SystemExit(f"building the work root failed (exit {child.exitcode})")
        work = top / "work"
        print(f"built {args.tracks} catalogued tracks in {-(-args.tracks // args.partition_size)} partitions "
              f"x {len(os.listdir(work / 'stages'))} stages in {time.perf_counter() - t0:.0f} s")

        from flows.curate import curate
        from flows.params import RunParams

        def params(work: Path, files: int) -> RunParams:
            return RunParams(config="tiny", work_root=str(work), sources=[f"simsrc:///corpus-{files}"],
                             overrides=[f"lyrics_db={lyrics_db}", f"models.tiny_dir={tiny_dir}",
                                        f"ingest.partition_size={args.partition_size}"])

        t0 = time.perf_counter()
        curate(params(top / "warm", args.partition_size))
        print(f"warm-up run (server start, imports, one partition): {time.perf_counter() - t0:.1f} s")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        state = curate(params(work, total), return_state=True)
        wall = time.perf_counter() - t0
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
        summary = state.result()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        runs = task_runs(state.state_details.flow_run_id)
        ingest = next((s for s in summary["stages"] if s["stage"] == "ingest"), {})
        scale = REAL / max(args.tracks, 1)
        print(f"\nempty night over {args.tracks} catalogued tracks ({args.new} new files):")
        print(f"  curate wall          {wall:8.1f} s   (ingest {ingest.get('seconds', 0):.1f} s)   "
              f"-> {wall * scale:8.0f} s at 1.8M")
        print(f"  Prefect task runs    {runs:8d}     new partitions {summary['new_partitions']}")
        print(f"  peak RSS             {rss:8.0f} MiB (before the run: {rss0:.0f} MiB)   "
              f"-> {rss0 + (rss - rss0) * scale:8.0f} MiB at 1.8M")
        print(f"  per 100k tracks      {wall / args.tracks * 1e5:8.2f} s, {(rss - rss0) / args.tracks * 1e5:.0f} MiB")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
