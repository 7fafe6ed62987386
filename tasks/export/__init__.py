"""Stage 10, export: a packed dataset in the formats other trainers read (schemas/export.py).

Reads the manifest (what each track is) and the shard index (where its audio lies), takes each
track's FLAC from its shard (samples.py), and writes one layout (formats.py) into a staging
directory beside the output, renamed into place when complete: a reader never sees a half
export, and a re-export replaces the previous output whole. The pack lock is held throughout,
so a pack cannot rewrite the shards under an export. Every packed track ends up exported or in
the export's rejects.parquet with a `code: detail` reason (codes in samples.py). The output is
local (trainers open the files by path); by default `<work_root>/exports/<dataset>/<format>`.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import shutil
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.common import reason_code
from schemas.config import Config, ConfigError
from schemas.export import EXPORT_REJECTS_SCHEMA, FORMATS
from tasks.export.formats import LAYOUTS
from tasks.export.samples import read_index, read_shard, shard_groups
from tasks.pack import check_dataset_name, read_manifest
from tasks.store import StageStore, StoreError

log = logging.getLogger("acepipe.export")

MARKER = "export.json"      # written last into an export; marks a directory a re-export may replace
STAGING, OLD = ".tmp-export-", ".old-export-"


def output_dir(store: StageStore, dataset: str, fmt: str, out: str | None) -> Path:
    """The export directory: `out`, else <work_root>/exports/<dataset>/<format> on a local root."""
    if out:
        return Path(out).expanduser().absolute()
    if not store.local:
        raise ConfigError(f"work root {store.url} is not a local path and trainers read local files: "
                          "give the export a local directory (--out DIR)")
    return Path(store.root) / "exports" / dataset / fmt


def check_replaceable(out: Path) -> None:
    """Refuse to replace anything but an earlier export (or an empty directory)."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is a file: give --out a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise StoreError(f"{out} holds files that no acepipe export wrote (no {MARKER}); an export "
                         "replaces its directory whole: give --out a new or empty directory")


@contextmanager
def staging(out: Path):
    """A fresh directory beside `out`; renamed to `out` (replacing an earlier export) when the
    block completes, removed when it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    leftover = re.compile(f"({re.escape(STAGING)}|{re.escape(OLD)})[0-9a-f]{{32}}-{re.escape(out.name)}")
    for stale in out.parent.iterdir():   # left by a killed export (the pack lock keeps live ones out)
        if leftover.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{STAGING}{uuid.uuid4().hex}-{out.name}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f"{OLD}{uuid.uuid4().hex}-{out.name}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def require_pack(store: StageStore, dataset: str) -> None:
    for path in (store.path("manifest", f"{dataset}.parquet"), store.path("shards", dataset, "index.parquet")):
        if not store.exists(path):
            raise StoreError(f"{path} not found: run `acepipe pack --dataset {dataset}` first, then export")


def read_pack(store: StageStore, dataset: str) -> tuple[pa.Table, pa.Table]:
    """The manifest and the shard index of one pack (a pack may have replaced them since
    require_pack; the pack lock keeps them still from here on)."""
    try:
        manifest, index = read_manifest(store, dataset), read_index(store, dataset)
    except FileNotFoundError as exc:
        raise StoreError(str(exc)) from None
    made_by = [(t.schema.metadata or {}).get(b"fingerprint") for t in (manifest, index)]
    if made_by[0] != made_by[1]:
        raise StoreError(f"the manifest and shard index of {dataset} come from different packs "
                         f"(fingerprints {made_by[0]!r}, {made_by[1]!r}): run `acepipe pack --dataset "
                         f"{dataset}` again, then export")
    check_overrides_packed(store, dataset, manifest)
    return manifest, index


def check_overrides_packed(store: StageStore, dataset: str, manifest: pa.Table) -> None:
    """Refuse to export a manifest packed before the overrides table changed: a person's
    correction must reach the export, and only pack puts it in the manifest (and refilters)."""
    packed = (manifest.schema.metadata or {}).get(b"overrides")
    if packed is None:   # a manifest from before overrides existed: nothing to compare
        return
    from tasks.overrides import load_overrides

    if load_overrides(store, dataset)[1] != packed.decode():
        raise StoreError(f"the overrides of {dataset} changed since its last pack, so its manifest lacks "
                         f"them: run `acepipe pack --dataset {dataset}`, then export")


def export(cfg: Config, dataset: str, fmt: str, out: str | None = None,
           store: StageStore | None = None) -> dict:
    """Write `dataset` in format `fmt` to `out`; returns a summary dict."""
    check_dataset_name(dataset)
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    store = store or StageStore(cfg.work_root)
    target = output_dir(store, dataset, fmt, out)
    check_replaceable(target)
    require_pack(store, dataset)   # before the lock, which would create a work root that is not there
    with store.lock(f"pack-{dataset}"):
        manifest, index = read_pack(store, dataset)
        with staging(target) as tmp:
            summary = _write(store, dataset, fmt, manifest, index, tmp, target)
    log.info("export %s as %s: %d tracks to %s, %d rejected", dataset, fmt, summary["tracks"], target,
             summary["rejected"])
    return summary


def _write(store: StageStore, dataset: str, fmt: str, manifest: pa.Table, index: pa.Table,
           tmp: Path, target: Path) -> dict:
    started = time.perf_counter()
    layout = LAYOUTS[fmt](tmp, target, dataset)
    shard_dir = store.path("shards", dataset)
    rejects: list[dict] = []
    tracks, seconds = 0, 0.0
    for group in shard_groups(manifest, index, rejects):
        songs, failed = read_shard(store, shard_dir, group, layout.write_audio, layout.take_back)
        rejects.extend(failed)
        for row, audio in songs:
            layout.add(row, audio)
            tracks += 1
            seconds += audio.duration
    layout.close()
    rejects.sort(key=lambda r: r["track_id"])
    pq.write_table(pa.Table.from_pylist(rejects, schema=EXPORT_REJECTS_SCHEMA), tmp / "rejects.parquet")
    summary = {"dataset": dataset, "format": fmt, "out": str(target), "work_root": store.url,
               "pack_fingerprint": (manifest.schema.metadata or {}).get(b"fingerprint", b"").decode() or None,
               "tracks": tracks, "hours": round(seconds / 3600, 3), "rejected": len(rejects),
               "reasons": dict(Counter(reason_code(r["reason"]) for r in rejects)),
               "rejects_path": posixpath.join(str(target), "rejects.parquet")}
    (tmp / MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {**summary, "seconds": round(time.perf_counter() - started, 2)}
