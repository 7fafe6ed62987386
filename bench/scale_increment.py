"""What a 1% increment costs against a full run, with real bytes (issue 12): `bench/scale.py --increment`.

Writes `--tracks` distinct short WAV files (a few KB each, streamed to disk), then runs, in this
process, on a temporary Prefect home and the tiny profile with the probe stage only:

    full       curate -> pack -> latents over every file
    direct     the same curate work (ingest + the probe stage per partition) as a plain loop, on a
               second work root: the flow's overhead is full curate / direct
    increment  `--new-percent` more files -> curate -> pack -> latents
    empty      the same three again with nothing new

and prints, per phase and flow: wall seconds, the Prefect task runs it created, the peak RSS
(sampled every 20 ms), and for the increment the bytes it wrote under shards/ and latents/
(new or changed files, the index/manifest tables apart), each as a share of the full run's,
plus the figures per track; then, each alone in a fresh process (its peak RSS is its own), the
pack and latents of another 1% increment and a full pack (`--rebuild`). With `--profile N`, the
empty night's flows are profiled. Asserts nothing.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf


class PeakRSS:
    """The process's peak resident memory while the block runs (sampled from /proc)."""

    def __enter__(self):
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_songs(directory: Path, first: int, count: int, seconds: float = 0.3, sr: int = 16000) -> int:
    """`count` distinct mono WAVs (a tone and noise seeded by number); returns the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    total = 0
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        audio = 0.3 * np.sin(2 * np.pi * (110 + i % 880) * t) + 0.05 * rng.standard_normal(t.size)
        sub = directory / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        path = sub / f"song-{i:07d}.wav"
        sf.write(path, audio.astype(np.float32), sr, subtype="PCM_16")
        total += path.stat().st_size
    return total


def files_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def written(before: dict, after: dict, tables: bool) -> int:
    """Bytes of files new or changed since `before` (only the index/manifest/rejects tables, or
    only the rest)."""
    def is_table(name: str) -> bool:
        return name.endswith(("index.parquet", "rejects.parquet")) or name.startswith("manifest")
    return sum(size for name, (size, mtime) in after.items()
               if is_table(name) == tables and before.get(name) != (size, mtime))


def task_runs(flow_run_id) -> int:
    """Task runs of the flow run and its subflows, paged through Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(f.id for f in subflows)]
        count, offset = 0, 0
        while True:
            page = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
                any_=ids)), limit=200, offset=offset)
            count += len(page)
            offset += 200
            if len(page) < 200:
                return count


def run_flow(fn, params, profile: int = 0) -> dict:
    import cProfile
    import pstats

    profiler = cProfile.Profile() if profile else None
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        state = fn(params, return_state=True)
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - t0
    if profiler:
        print(f"--- {fn.name}: the {profile} calls with the most cumulative time")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(profile)
    result = state.result()
    return {"seconds": wall, "task_runs": task_runs(state.state_details.flow_run_id), "rss": rss.peak,
            "result": result}


def direct_curate(cfg, sources: list[str]) -> float:
    """Ingest and the configured stages per partition, no Prefect: the flow's work alone."""
    from tasks.ingest import ingest
    from tasks.stage import dag_order, run_partition, stage_keys
    from tasks.store import StageStore

    store = StageStore(cfg.work_root)
    t0 = time.perf_counter()
    result = ingest(cfg, store, sources)
    order = dag_order(cfg.stages)
    keys = stage_keys(cfg, order)
    for p in result.partitions:
        for name in order:
            run_partition(store, cfg, name, p, keys)
    return time.perf_counter() - t0


def run(top: Path, tracks: int, new_percent: float, partition_size: int, shard_mb: int, tiny_dir: Path,
        repa: bool, profile: int = 0) -> None:
    from flows.curate import curate
    from flows.latents import latents
    from flows.pack import pack
    from flows.params import DatasetParams, PackParams, RunParams
    from schemas.config import load_config
    from tasks.synth import generate_corpus

    generate_corpus(top / "synth", n=1, seed=0)   # only for its lyrics database
    overrides = [f"lyrics_db={top / 'synth' / 'lyrics.parquet'}", f"models.tiny_dir={tiny_dir}", "stages=[probe]",
                 f"ingest.partition_size={partition_size}", "audio.min_duration_s=0.1", "device=cpu",
                 "pack.filter.min_duration_s=null", f"pack.shard_bytes={shard_mb * 1_000_000}", "latents.batch_size=32",
                 *([] if repa else ["latents.mert.enabled=false", "latents.mhubert.enabled=false"])]
    src, new = top / "audio", int(round(tracks * new_percent / 100))
    t0 = time.perf_counter()
    size = write_songs(src, 0, tracks)
    print(f"wrote {tracks} files ({size / tracks / 1e3:.1f} KB each) in {time.perf_counter() - t0:.0f} s")

    def params(work: Path, cls=RunParams, **kw):
        return cls(config="tiny", work_root=str(work), sources=[str(src)], overrides=overrides, **kw)

    warm = top / "warm-src"   # starts Prefect's server and loads every model before the timed runs
    write_songs(warm, 10**6, 4)
    wparams = RunParams(config="tiny", work_root=str(top / "warm"), sources=[str(warm)], overrides=overrides)
    t0 = time.perf_counter()
    curate(wparams)
    pack(PackParams(**wparams.model_dump()))
    latents(DatasetParams(**wparams.model_dump()))
    print(f"warm-up (server start, model loads): {time.perf_counter() - t0:.0f} s")

    work = top / "work"
    phases: dict[str, dict[str, dict]] = {}

    def night(name: str, profile: int = 0) -> None:
        before = {d: files_state(work / d) if (work / d).exists() else {} for d in ("shards", "latents", "manifest")}
        phases[name] = {"curate": run_flow(curate, params(work), profile),
                        "pack": run_flow(pack, params(work, PackParams), profile),
                        "latents": run_flow(latents, params(work, DatasetParams), profile)}
        after = {d: files_state(work / d) for d in ("shards", "latents", "manifest")}
        phases[name]["bytes"] = {kind: sum(written(before[d], after[d], kind == "tables") for d in after)
                                 for kind in ("data", "tables")}

    night("full")
    cfg = load_config("tiny", [f"work_root={top / 'direct'}", *overrides], environ={})
    direct = direct_curate(cfg, [str(src)])
    write_songs(src, tracks, new)
    night("increment")
    night("empty", profile)
    # Memory of the work alone, each in a fresh process: another 1% curated in the flow, then
    # pack's and latents' increments, then a full pack (--rebuild), as plain function calls.
    write_songs(src, tracks + new, new)
    curate(params(work))
    cfg = load_config("tiny", [f"work_root={work}", *overrides], environ={})
    isolated = {what: in_child(what, cfg) for what in ("pack", "latents", "rebuild")}

    full = phases["full"]
    print(f"\n{tracks} tracks (+{new} = {new_percent}%), partitions of {partition_size}, shards of {shard_mb} MB, "
          f"probe stage; pack {full['pack']['result']['shards']} shards, latents {full['latents']['result']['shards']} "
          f"({'DCAE and REPA targets' if repa else 'DCAE only'})")
    print(f"{'phase':10s} {'flow':8s} {'seconds':>9s} {'% of full':>9s} {'task runs':>9s} {'peak RSS MiB':>12s}")
    for name, phase in phases.items():
        for flow in ("curate", "pack", "latents"):
            r = phase[flow]
            share = 100 * r["seconds"] / full[flow]["seconds"]
            print(f"{name:10s} {flow:8s} {r['seconds']:9.1f} {share:8.1f}% {r['task_runs']:9d} {r['rss']:12.0f}")
        total = sum(phase[f]["seconds"] for f in ("curate", "pack", "latents"))
        full_total = sum(full[f]["seconds"] for f in ("curate", "pack", "latents"))
        print(f"{name:10s} {'all':8s} {total:9.1f} {100 * total / full_total:8.1f}%")
    for name in ("increment", "empty"):
        b, f = phases[name]["bytes"], full["bytes"]
        print(f"{name}: wrote {b['data'] / 1e6:.1f} MB of shards/latents ({100 * b['data'] / max(f['data'], 1):.2f}% "
              f"of the full run's {f['data'] / 1e6:.1f} MB) and {b['tables'] / 1e6:.1f} MB of index/manifest "
              f"tables ({100 * b['tables'] / max(f['tables'], 1):.0f}% of the full run's)")
    print(f"curate in a flow / plain loop: {full['curate']['seconds']:.1f} / {direct:.1f} s = "
          f"{full['curate']['seconds'] / direct:.2f}")
    for flow in ("curate", "pack", "latents"):
        r = full[flow]
        print(f"per track, full {flow}: {1e3 * r['seconds'] / tracks:.2f} ms, peak RSS {r['rss']:.0f} MiB")
    for what, (seconds, rss, base) in isolated.items():
        print(f"alone in a fresh process: {what:8s} {seconds:6.1f} s, peak RSS {rss:6.0f} MiB "
              f"({rss - base:.0f} MiB over the {base:.0f} MiB of the process after its imports)")


def _child(what: str, cfg_json: str, out) -> None:
    from schemas.config import Config
    from tasks.latents import encode_shard, plan, prepare, write_index
    from tasks.pack import pack
    from tasks.store import StageStore

    cfg = Config.model_validate_json(cfg_json)
    # Sampled, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's high-water mark.
    base = _rss_mib()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        if what == "latents":
            store = StageStore(cfg.work_root)
            the_plan = plan(cfg, "default", store)
            current = prepare(cfg, the_plan, store)
            write_index(cfg, the_plan, [encode_shard(cfg, "default", s, store) for s in the_plan["shards"]],
                        store, current)
        else:
            pack(cfg, "default", rebuild=what == "rebuild")
    out.put((time.perf_counter() - t0, rss.peak, base))


def in_child(what: str, cfg) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB, RSS MiB after imports) of one step run alone in a fresh process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_child, args=(what, cfg.model_dump_json(), out))
    child.start()
    result = out.get()
    child.join()
    return result


def main(args) -> int:
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="acepipe-increment-", dir=args.dir))
    os.environ["PREFECT_HOME"] = str(top / "prefect-home")
    try:
        run(top, args.tracks, args.new_percent, args.partition_size, args.shard_mb, Path(args.tiny_dir).absolute(),
            args.repa, args.profile)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0
