"""Pack benchmark: shard-writing throughput against plain tar, read-back through webdataset,
and the whole pack (decode, resample, FLAC encode, write) on the synthetic corpus.

    .venv/bin/python bench/pack.py [--total-mb 1024] [--shard-mb 256] [--dir /tmp] [--repeats 3] [--no-e2e]

Writing: the same samples (FLAC payloads of generated stereo music, JSON, text; distinct keys)
go into shards of the same boundaries through (1) tasks.shards.ShardWriter, (2) Python's
tarfile, (3) GNU `tar -cf` over the same member files staged on disk (staging not timed), and
(4) one plain write of the same number of bytes (the disk's ceiling). Each is timed to the last
byte written (page cache) and to fsync of every file; the median of --repeats runs, alternating.
ShardWriter fsyncs each shard before renaming it, so its "written" figure already includes that:
compare the "to fsync" columns.
Reading: the shards through webdataset with a torch DataLoader of 2 workers, bytes only and
with the FLAC decoded by soundfile (page cache warm: this measures our pipeline, not the disk).
Prints figures and the ours/tar ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from tasks.shards import ShardWriter, tar_header  # noqa: E402
from tasks.store import StageStore  # noqa: E402


def payloads(n_distinct: int = 6, seed: int = 0) -> list[bytes]:
    """FLAC bytes of 60-200 s of stereo 44.1 kHz 'music' (chords, a beat, some noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_distinct):
        seconds = int(rng.uniform(60, 200))
        t = np.arange(seconds * 44100) / 44100
        f0 = rng.uniform(110, 330)
        tone = sum(np.sin(2 * np.pi * f0 * r * t + rng.uniform(0, 6)) for r in (1, 1.25, 1.5, 2))
        beat = np.exp(-((t * 2) % 1) * 30) * rng.standard_normal(len(t))
        mono = 0.15 * tone / 4 + 0.2 * beat + 0.01 * rng.standard_normal(len(t))
        stereo = np.stack([mono, np.roll(mono, 300)], axis=1).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, stereo, 44100, format="FLAC", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


def make_samples(total_bytes: int, flacs: list[bytes]) -> list[tuple[str, dict[str, bytes]]]:
    samples, size, i = [], 0, 0
    while size < total_bytes:
        key = f"{i:032x}"
        flac = flacs[i % len(flacs)]
        meta = json.dumps({"track_id": key, "caption": "a song " * 20, "tags": ["pop"] * 8}).encode()
        files = {"flac": flac, "json": meta, "txt": ("la la la\n" * 80).encode()}
        samples.append((key, files))
        size += sum(len(b) for b in files.values())
        i += 1
    return samples


def fsync_all(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_ours(out: Path, samples, target: int) -> list[str]:
    with ShardWriter(StageStore(out), str(out), target) as writer:
        assignment = [writer.add(key, files) for key, files in samples]
    return assignment


def write_tarfile(out: Path, samples, assignment) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tar, current = None, None
    for (key, files), shard in zip(samples, assignment):
        if shard != current:
            if tar:
                tar.close()
            tar, current = tarfile.open(out / shard, "w", format=tarfile.USTAR_FORMAT), shard
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(files[ext]), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(files[ext]))
    tar.close()


def stage_members(stage: Path, samples, assignment) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for (key, files), shard in zip(samples, assignment):
        d = stage / shard
        d.mkdir(parents=True, exist_ok=True)
        for ext in sorted(files):
            (d / f"{key}.{ext}").write_bytes(files[ext])
            members.setdefault(shard, []).append(f"{key}.{ext}")
    return members


def write_tar_cmd(out: Path, stage: Path, members: dict[str, list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for shard, names in members.items():
        subprocess.run(["tar", "--format=ustar", "--owner=0", "--group=0", "--mtime=@0", "-cf",
                        str(out / shard), "-C", str(stage / shard), *names], check=True)


def write_plain(out: Path, samples) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "plain.bin", "wb") as fh:
        for _, files in samples:
            for ext in sorted(files):
                fh.write(tar_header(f"x.{ext}", len(files[ext])))
                fh.write(files[ext])


def timed(fn, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"])
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    fsync_all(sorted(p for p in out.iterdir() if p.is_file()))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def bench_write(root: Path, total_mb: int, shard_mb: int, repeats: int) -> Path:
    flacs = payloads()
    samples = make_samples(total_mb * 2**20, flacs)
    nbytes = sum(len(b) for _, f in samples for b in f.values())
    print(f"write: {len(samples)} samples, {nbytes / 1e6:.0f} MB payload, shards of {shard_mb} MB, in {root}")
    target = shard_mb * 2**20
    assignment = write_ours(root / "probe-run", samples, target)
    shutil.rmtree(root / "probe-run")
    members = stage_members(root / "stage", samples, assignment)
    methods = {
        "ours (ShardWriter)": (lambda: write_ours(root / "ours", samples, target), root / "ours"),
        "python tarfile": (lambda: write_tarfile(root / "tarfile", samples, assignment), root / "tarfile"),
        "tar -cf (files staged)": (lambda: write_tar_cmd(root / "tarcmd", root / "stage", members), root / "tarcmd"),
        "plain write (ceiling)": (lambda: write_plain(root / "plain", samples), root / "plain"),
    }
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for _ in range(repeats):
        for name, (fn, out) in methods.items():
            times[name].append(timed(fn, out))
    ours_bytes = [(root / "ours" / s).read_bytes() for s in sorted(set(assignment))]
    same = all(b == (root / "tarfile" / s).read_bytes() for b, s in zip(ours_bytes, sorted(set(assignment))))
    shard_bytes = sum(len(b) for b in ours_bytes)
    rates = {}
    print(f"{'method':<26}{'MB/s written':>14}{'MB/s to fsync':>16}")
    for name, runs in times.items():
        buffered = shard_bytes / statistics.median(t for t, _ in runs) / 1e6
        synced = shard_bytes / statistics.median(t for _, t in runs) / 1e6
        rates[name] = (buffered, synced)
        print(f"{name:<26}{buffered:>14.0f}{synced:>16.0f}")
    ours = rates["ours (ShardWriter)"]
    for ref in ("python tarfile", "tar -cf (files staged)"):
        print(f"ratio ours / {ref}: {ours[0] / rates[ref][0]:.2f} written, {ours[1] / rates[ref][1]:.2f} to fsync")
    print(f"ours byte-identical to tarfile's archives: {same}")
    for name in ("tarfile", "tarcmd", "plain", "stage"):
        shutil.rmtree(root / name, ignore_errors=True)
    return root / "ours"


def _decode(sample: dict) -> dict:
    audio, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
    return {"seconds": len(audio) / sr, "bytes": sum(len(v) for k, v in sample.items() if isinstance(v, bytes))}


def _nbytes(sample: dict) -> dict:
    return {"seconds": 0.0, "bytes": sum(len(v) for k, v in sample.items() if isinstance(v, bytes))}


def bench_read(shard_dir: Path, workers: int = 2) -> None:
    import torch
    import webdataset as wds

    urls = [str(p) for p in sorted(shard_dir.glob("shard-*.tar"))]
    print(f"read: {len(urls)} shards through webdataset, DataLoader num_workers={workers}")
    for label, fn in (("bytes only", _nbytes), ("FLAC decoded", _decode)):
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(fn)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        t0 = time.perf_counter()
        n, nbytes, seconds = 0, 0, 0.0
        for item in loader:
            n, nbytes, seconds = n + 1, nbytes + item["bytes"], seconds + float(item["seconds"])
        dt = time.perf_counter() - t0
        extra = f", {seconds / dt:.0f} s of audio per s" if seconds else ""
        print(f"  {label:<13} {n} samples in {dt:.2f} s: {nbytes / dt / 1e6:.0f} MB/s, {n / dt:.1f} samples/s{extra}")


def bench_pack(root: Path) -> None:
    """The whole stage on the synthetic corpus: where the time goes at 1 and 2 workers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from pack_fixtures import build_work, tiny_config

    from tasks import audio
    from tasks.pack import pack
    from tasks.synth import generate_corpus

    generate_corpus(root / "synth", n=12, seed=1)
    cfg = build_work(root / "e2e", root / "synth", root / "tiny")
    print("whole pack (decode + resample to 44.1 kHz stereo + FLAC + write), synthetic corpus:")
    for workers in (1, 2):
        audio.DECODE_CACHE.clear()
        run_cfg = tiny_config(Path(cfg.work_root), root / "tiny", root / "synth" / "lyrics.parquet",
                              f"pack.workers={workers}")
        s = pack(run_cfg, f"w{workers}")
        audio_s = s["hours"] * 3600
        print(f"  workers={workers}: {s['packed']} tracks, {audio_s:.0f} s of audio in {s['seconds']:.2f} s "
              f"({audio_s / s['seconds']:.0f}x real time, {s['bytes'] / s['seconds'] / 1e6:.1f} MB/s of shards)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mb", type=int, default=1024)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the whole-pack run on the synthetic corpus")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-pack-", dir=args.dir))
    try:
        shards = bench_write(root, args.total_mb, args.shard_mb, args.repeats)
        bench_read(shards)
        if not args.no_e2e:
            bench_pack(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
