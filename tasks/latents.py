"""Stage 8, latents: DCAE latents (and REPA targets) of a packed dataset, one latent shard per
audio shard.

Reads the pack stage's `shards/<dataset>/` (index.parquet and shard-NNNNNN.tar with
<track_id>.flac/.json/.txt), decodes each FLAC, resamples to 44.1 kHz stereo, and encodes tracks
in batches of similar duration with ACE-Step's music DCAE (tasks/latents_models.py). Writes

    latents/<dataset>/shard-NNNNNN.tar            __key__ = track_id: latent.npy (8, 16, T) float16,
                                                  json (valid_length, latent_fps, sample_rate,
                                                  encoder_id, revision, audio_sha, duration, and the
                                                  conditions: caption, tags, lyrics, language,
                                                  instrumental, bpm, key, scale), mert.npy / mhubert.npy
                                                  (valid_length, d) float16 pooled to latent frames
    latents/<dataset>/records/shard-NNNNNN.parquet  every track of the audio shard, ok or rejected
    latents/<dataset>/rejects.parquet, index.parquet  (ok tracks only; written last)

A shard's tar is renamed into place before its record, and a record carries the shard's
fingerprint (latents config, encoders, the audio shard's tracks) and the tar's size and blake2b
as written, so a rerun skips every shard whose record matches and whose tar has that size (a
stat; acepipe verify compares checksums); a shard whose tar or record is gone, or whose record
does not read, is encoded again. T = ceil(samples / 4096); valid_length = floor(samples / 4096),
the frames wholly covered by audio (ACE-Step's latent_lengths). Batches are padded to their longest track;
the DCAE's linear attention spans the whole mel, so padding moves a latent slightly (ACE-Step
trains on batch-padded latents too); sorting by duration keeps the padding small.

Pack appends: a tombstoned sample (the audio index's `removed`) stays in its latent shard, which
is not encoded again, and is left out of index.parquet and rejects.parquet, so the trainer never
reads it.

Reason codes added here (beside the audio loader's: unreadable, empty, non_finite, silent, ...):
  missing_audio   the audio shard has no .flac (or .json) for a track its index lists
  bad_latent      the latent has the wrong shape or non-finite values ("bad_latent: shape ...")
  too_short       fewer samples than one latent frame (4096 at 44.1 kHz)
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tarfile
import time
import uuid
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from schemas.common import STATUS_OK, reason_code
from schemas.config import Config
from schemas.latents import (LATENT_INDEX_SCHEMA, LATENT_RECORD_SCHEMA, LATENT_REJECTS_SCHEMA,
                             output_config)
from tasks.latents_batch import batches, decode_sample, encode_batch, encoders, sample_files
# The model adapters live in latents_models.py; tasks/models.py and model/images.py find them here.
from tasks.latents_models import build_tiny_dcae, build_tiny_mert, build_tiny_mhubert, load_dcae  # noqa: F401
from tasks.pack import check_dataset_name
from tasks.shards import TMP_PREFIX, DigestingWriter, damaged_shards, ordered_map, tar_header
from tasks.store import StageStore

log = logging.getLogger("acepipe.latents")
VERSION = "1"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")


# -- the plan: which audio shards, with what fingerprint ----------------------------------------
def latent_dir(store: StageStore, dataset: str) -> str:
    return store.path("latents", dataset)


def read_audio_index(store: StageStore, dataset: str) -> pa.Table:
    path = posixpath.join(store.path("shards", dataset), "index.parquet")
    if not store.exists(path):
        raise FileNotFoundError(f"{path} not found: run `acepipe pack --dataset {dataset}` first")
    return store.read_table(path)


def shard_fingerprint(cfg: Config, tracks: list[dict], tar_bytes: int) -> str:
    """What decides a latent shard: the stage version, the latents output config, the pack's audio
    format and guards, and the audio shard's tracks (ids and sample sizes) and tar size."""
    blob = json.dumps({"version": VERSION, "latents": output_config(cfg.latents),
                       "pack": {"sample_rate": cfg.pack.sample_rate, "channels": cfg.pack.channels},
                       "silence_dbfs": cfg.audio.silence_dbfs, "tar_bytes": tar_bytes,
                       "tracks": [[t["track_id"], t["bytes"]] for t in tracks]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan(cfg: Config, dataset: str, store: StageStore, tracks_for: set[str] | None = None) -> dict:
    """The audio shards of `dataset`, each with its fingerprint and, for the shards in
    `tracks_for` (default: all), its tracks (index order). Read column by column: a flow plans
    without tracks and gives them only to the shards it encodes."""
    check_dataset_name(dataset)
    audio_index = read_audio_index(store, dataset)
    ids, sizes = audio_index.column("track_id").to_pylist(), audio_index.column("bytes").to_pylist()
    removed_col = (audio_index.column("removed").to_pylist() if "removed" in audio_index.column_names
                   else [None] * audio_index.num_rows)
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(audio_index.column("shard").to_pylist()):
        by_shard.setdefault(shard, []).append(i)
    # tombstoned samples: encoded with their shard, left out of the index
    removed = sorted([shard, ids[i]] for shard, rows in by_shard.items() for i in rows if removed_col[i] is not None)
    audio_dir = store.path("shards", dataset)
    shards = []
    for name in sorted(by_shard):
        path = posixpath.join(audio_dir, name)
        if not store.exists(path):
            raise FileNotFoundError(f"{path} is listed in the audio index but missing: re-run "
                                    f"`acepipe pack --dataset {dataset}`")
        rows = by_shard[name]
        entry = {"shard": name, "fingerprint": shard_fingerprint(
            cfg, [{"track_id": ids[i], "bytes": sizes[i]} for i in rows], store.fs.size(path))}
        if tracks_for is None or name in tracks_for:
            entry["tracks"] = audio_index.take(rows).to_pylist()
        shards.append(entry)
    overall = hashlib.sha256("".join(s["fingerprint"] for s in shards).encode() +
                             json.dumps(removed).encode()).hexdigest()[:16]
    pack_meta = audio_index.schema.metadata or {}
    return {"dataset": dataset, "shards": shards, "fingerprint": overall, "removed": removed,
            "pack_fingerprint": pack_meta.get(b"fingerprint", b"").decode()}


def prepare(cfg: Config, the_plan: dict, store: StageStore) -> bool:
    """Before any shard changes: drop an index that no longer describes the plan (and temporaries
    a killed run left). Returns True when the index on disk is already the plan's."""
    out = latent_dir(store, the_plan["dataset"])
    index_path = posixpath.join(out, "index.parquet")
    index = store.read_table_or_quarantine(index_path)   # one that does not read is rewritten
    if index is not None:
        if (index.schema.metadata or {}).get(b"fingerprint", b"").decode() == the_plan["fingerprint"]:
            return True
        store.fs.rm(index_path)
    for directory in (out, posixpath.join(out, "records")):
        for name in store.listdir(directory):
            if name.startswith(TMP_PREFIX):
                store.fs.rm(posixpath.join(directory, name))
    return False


def record_path(store: StageStore, dataset: str, shard: str) -> str:
    return posixpath.join(latent_dir(store, dataset), "records", shard.replace(".tar", ".parquet"))


# -- reading the audio shard --------------------------------------------------------------------
def _read_samples(store: StageStore, path: str, tracks: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(index row, {ext: bytes}) per track, in the order given; read on the calling thread."""
    with store.fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in tar.getmembers():
            if m.isfile() and "." in m.name:
                key, ext = posixpath.basename(m.name).split(".", 1)
                members.setdefault(key, {})[ext] = m
        for row in tracks:
            found = members.get(row["track_id"], {})
            yield row, {ext: tar.extractfile(m).read() for ext, m in found.items()
                        if ext in ("flac", "json", "txt")}


def skipped_result(dataset: str, shard_plan: dict, store: StageStore) -> dict | None:
    """The shard's counts when its latent shard is done (its record has the plan's fingerprint and
    its tar the recorded size), else None. The flow asks this before it creates a task run, so an
    unchanged shard costs a footer read and a stat, not a Prefect task run."""
    started = time.perf_counter()
    shard = shard_plan["shard"]
    out_dir = latent_dir(store, dataset)
    rec_path, tar_path = record_path(store, dataset, shard), posixpath.join(out_dir, shard)
    record = store.read_table_or_quarantine(rec_path) if store.exists(tar_path) else None
    if record is None:
        return None
    meta = record.schema.metadata or {}
    recorded = {shard: int(meta[b"tar_bytes"])} if b"tar_bytes" in meta else {}
    damaged = damaged_shards(store, out_dir, recorded)
    if damaged:
        log.warning("latents: %s is damaged (%s); encoding it again", tar_path, damaged[shard])
        return None
    if meta.get(b"fingerprint", b"").decode() != shard_plan["fingerprint"]:
        return None
    return _counts(shard, record.to_pylist(), skipped=True, seconds=time.perf_counter() - started)


def encode_shard(cfg: Config, dataset: str, shard_plan: dict, store: StageStore | None = None) -> dict:
    """Encode one audio shard into its latent shard and record; skipped when the record on disk
    has the plan's fingerprint. Returns the shard's counts."""
    started = time.perf_counter()
    store = store or StageStore(cfg.work_root)
    done = skipped_result(dataset, shard_plan, store)
    if done is not None:
        return done
    shard, fingerprint = shard_plan["shard"], shard_plan["fingerprint"]
    out_dir = latent_dir(store, dataset)
    rec_path, tar_path = record_path(store, dataset, shard), posixpath.join(out_dir, shard)

    dcae, ssl = encoders(cfg)
    lc = cfg.latents
    groups = batches(shard_plan["tracks"], lc.batch_size, lc.max_batch_frames, 1.0 / dcae.latent_fps)
    audio_path = posixpath.join(store.path("shards", dataset), shard)
    rows: list[dict] = []
    store.fs.makedirs(out_dir, exist_ok=True)
    tmp = posixpath.join(out_dir, f"{TMP_PREFIX}{uuid.uuid4().hex}-{shard}")
    try:
        with store.fs.open(tmp, "wb") as raw:
            fh = DigestingWriter(raw)   # the tar's size and blake2b, for its record
            samples = _read_samples(store, audio_path, [t for g in groups for t in g])
            sizes = [len(g) for g in groups]

            def decode_group(group: list[tuple[dict, dict]]) -> list[dict]:
                return [decode_sample(item, cfg) for item in group]

            for decoded in ordered_map(decode_group, _chunks(samples, sizes), lc.decode_workers):
                rejected = [d for d in decoded if "audio" not in d]
                results = rejected + encode_batch(dcae, ssl, [d for d in decoded if "audio" in d], cfg)
                for r in results:
                    if r["status"] == STATUS_OK:
                        for ext, data in sorted(sample_files(r, dcae, ssl).items()):
                            fh.write(tar_header(f"{r['track_id']}.{ext}", len(data)))
                            fh.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
                    rows.append(_record_row(r, shard))
            fh.write(bytes(2 * tarfile.BLOCKSIZE))   # end of archive
        store.fs.mv(tmp, tar_path)
    finally:
        if store.exists(tmp):
            store.fs.rm(tmp)
    rows.sort(key=lambda r: r["track_id"])
    record = pa.Table.from_pylist(rows, schema=LATENT_RECORD_SCHEMA).replace_schema_metadata(
        {"fingerprint": fingerprint, "encoder_id": dcae.encoder_id, "revision": dcae.revision,
         "tar_bytes": str(fh.size), "tar_blake2b": fh.checksum})
    store.write_table(rec_path, record)   # the shard's completion mark: after its tar
    return _counts(shard, rows, skipped=False, seconds=time.perf_counter() - started)


def _record_row(result: dict, shard: str) -> dict:
    ok = result["status"] == STATUS_OK
    return {"track_id": result["track_id"], "status": result["status"], "reason": result.get("reason"),
            "shard": shard, **{k: result.get(k) for k in ("frames", "valid_length", "duration", "audio_sha")},
            "targets": sorted(result["features"]) if ok else None}


def _chunks(items: Iterator, sizes: list[int]) -> Iterator[list]:
    for n in sizes:
        yield [next(items) for _ in range(n)]


def _counts(shard: str, rows: list[dict], skipped: bool, seconds: float) -> dict:
    ok = [r for r in rows if r["status"] == STATUS_OK]
    return {"shard": shard, "skipped": skipped, "ok": len(ok), "rejected": len(rows) - len(ok),
            "reasons": dict(Counter(reason_code(r["reason"]) for r in rows if r["status"] != STATUS_OK)),
            "audio_seconds": round(sum(r["duration"] or 0.0 for r in ok), 2),
            "frames": int(sum(r["valid_length"] or 0 for r in ok)), "seconds": round(seconds, 2)}


# -- the index, last ----------------------------------------------------------------------------
def write_index(cfg: Config, the_plan: dict, results: list[dict], store: StageStore | None = None,
                index_current: bool = False) -> dict:
    """Check every planned shard's record, drop stale shards, write rejects and the index (or,
    when the index on disk is already the plan's, read it back for the summary). Column by
    column: no dict per track."""
    store = store or StageStore(cfg.work_root)
    dataset = the_plan["dataset"]
    out = latent_dir(store, dataset)
    rejects = store.read_table_or_quarantine(posixpath.join(out, "rejects.parquet")) if index_current else None
    if rejects is not None:
        index = read_latent_index(store, dataset)
    else:
        index_current = False
        index, rejects = _index_from_records(store, the_plan, out)
    planned = {s["shard"] for s in the_plan["shards"]}
    for name in store.listdir(out):
        if SHARD_RE.match(name) and name not in planned:
            store.fs.rm(posixpath.join(out, name))
            if store.exists(record_path(store, dataset, name)):
                store.fs.rm(record_path(store, dataset, name))
    if not index_current:
        store.write_table(posixpath.join(out, "rejects.parquet"), rejects)
        meta = {"fingerprint": the_plan["fingerprint"], "dataset": dataset, "version": VERSION,
                "pack_fingerprint": the_plan["pack_fingerprint"],
                "latents_config": json.dumps(output_config(cfg.latents), sort_keys=True)}
        store.write_table(posixpath.join(out, "index.parquet"), index.replace_schema_metadata(meta))
    run = [r for r in results if not r["skipped"]]
    reasons = Counter(reason_code(r) for r in rejects.column("reason").to_pylist())
    run_audio, run_secs = sum(r["audio_seconds"] for r in run), sum(r["seconds"] for r in run)
    return {"dataset": dataset, "work_root": cfg.work_root, "latents": out,
            "fingerprint": the_plan["fingerprint"], "shards": len(the_plan["shards"]), "shards_run": len(run),
            "shards_skipped": len(results) - len(run), "tracks": index.num_rows, "rejected": rejects.num_rows,
            "by_reason": dict(sorted(reasons.items())),
            "audio_hours": round((pc.sum(index["duration"]).as_py() or 0.0) / 3600, 4),
            "latent_frames": int(pc.sum(index["valid_length"]).as_py() or 0),
            "encode_seconds": round(run_secs, 2),
            "audio_seconds_per_second": round(run_audio / run_secs, 1) if run_secs > 0 else None,
            "index_unchanged": index_current, "per_shard": results}


def _index_from_records(store: StageStore, the_plan: dict, out: str) -> tuple[pa.Table, pa.Table]:
    """(index, rejects) from every planned shard's record, less the samples pack tombstoned."""
    dataset = the_plan["dataset"]
    removed: dict[str, list[str]] = {}
    for shard, track_id in the_plan.get("removed", []):
        removed.setdefault(shard, []).append(track_id)
    oks, bads = [LATENT_INDEX_SCHEMA.empty_table()], [LATENT_REJECTS_SCHEMA.empty_table()]
    for s in the_plan["shards"]:
        path = record_path(store, dataset, s["shard"])
        record = store.read_table(path) if store.exists(path) else None
        done = record is not None and store.exists(posixpath.join(out, s["shard"])) and \
            (record.schema.metadata or {}).get(b"fingerprint", b"").decode() == s["fingerprint"]
        if not done:
            raise RuntimeError(f"latent shard {s['shard']} of dataset {dataset} is not complete; run the "
                               "latents flow again (completed shards are skipped)")
        if s["shard"] in removed:   # tombstoned by pack
            record = record.filter(pc.invert(pc.is_in(record["track_id"],
                                                      value_set=pa.array(removed[s["shard"]], pa.string()))))
        ok = pc.equal(record["status"], STATUS_OK)
        oks.append(record.filter(ok).select(LATENT_INDEX_SCHEMA.names).cast(LATENT_INDEX_SCHEMA))
        bads.append(record.filter(pc.invert(ok)).select(LATENT_REJECTS_SCHEMA.names).cast(LATENT_REJECTS_SCHEMA))
    return pa.concat_tables(oks), pa.concat_tables(bads)


def read_latent_index(store: StageStore, dataset: str) -> pa.Table:
    path = posixpath.join(latent_dir(store, dataset), "index.parquet")
    if not store.exists(path):
        raise FileNotFoundError(f"{path} not found: run `acepipe latents --dataset {dataset}` first")
    return store.read_table(path)
