"""The pack stage's samples (see tasks/pack.py): what a track becomes in a WebDataset shard (its
FLAC, its metadata .json and lyrics .txt), the check that its source still holds the bytes it was
ingested as, and the rewrite of a damaged shard from its own tracks.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath

import numpy as np
import soundfile as sf

from schemas.config import Config
from tasks.audio import load_track
from tasks.ingest import content_hash
from tasks.shards import ordered_map, rewrite_shard
from tasks.store import StageStore

log = logging.getLogger("acepipe.pack")

# Manifest columns that say where a file lies or which shard holds it, not what it is:
# kept out of the sample's JSON so a copy of the corpus packs to the same bytes.
NOT_IN_SAMPLE = ("uri", "partition", "shard", "flac_bytes")

def sample_lyrics(row: dict) -> str:
    """Canonical lyrics if matched, else the transcript, else ''."""
    return row.get("lyrics") or row.get("transcript") or ""


def sample_metadata(row: dict, sample_rate: int, channels: int) -> dict:
    """The sample's JSON: the manifest row less NOT_IN_SAMPLE, and the audio format."""
    meta = {k: v for k, v in row.items() if k not in NOT_IN_SAMPLE}
    meta.update(sample_rate=sample_rate, channels=channels, lyrics_text=sample_lyrics(row))
    return meta


def encode_flac(audio: np.ndarray, sr: int, subtype: str) -> bytes:
    """(channels, samples) float32 -> FLAC bytes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.T, -1.0, 1.0), sr, format="FLAC", subtype=subtype)
    return buf.getvalue()


def source_problem(track: dict) -> str | None:
    """Why the file at the track's URI is not the one ingested as it, or None."""
    try:
        digest = content_hash(track["uri_raw"])
    except FileNotFoundError:
        return (f"source_missing: {track['uri']} no longer exists (deleted since the last curate run); "
                "restore it, or run `acepipe run`: curate marks the track source_missing in the catalog")
    except OSError as exc:
        return f"source_missing: {track['uri']} cannot be read ({exc})"
    if digest != track["track_id"]:
        return (f"source_changed: {track['uri']} now holds other audio than this track (replaced since "
                "the last curate run); run `acepipe run`: curate catalogues the new audio as a new track "
                "and marks this one source_changed")
    return None


def metadata_files(row: dict, cfg: Config) -> dict[str, bytes]:
    """The sample's .json and .txt: what derives from its manifest row."""
    meta = sample_metadata(row, cfg.pack.sample_rate, cfg.pack.channels)
    return {"json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=float).encode(),
            "txt": sample_lyrics(row).encode()}


def encode_sample(pair: tuple[dict, dict], cfg: Config) -> tuple[dict, dict[str, bytes] | None, str | None]:
    """Decode the source at the pack rate, encode FLAC; (row, files, None) or (row, None, reason)."""
    row, track = pair
    pc = cfg.pack
    # Pack reads each file once: keeping its decodes would only evict the curate stages' ones.
    audio_cfg = cfg.audio.model_copy(update={"cache_mb": 0})
    try:
        problem = source_problem(track) if pc.verify_source else None
        if problem:
            return row, None, problem
        audio = load_track(track, pc.sample_rate, pc.channels, audio_cfg)
        flac = encode_flac(audio, pc.sample_rate, pc.flac_subtype)
    except Exception as exc:  # noqa: BLE001 - one bad file is a reject row, not a failed pack
        return row, None, getattr(exc, "reason", None) or f"exception: {type(exc).__name__}: {exc}"[:300]
    return row, {"flac": flac, **metadata_files(row, cfg)}, None


def rewrite_damaged(cfg: Config, store: StageStore, shard_dir: str, damaged: dict[str, str],
                    index_rows: list[dict], by_id: dict[str, tuple[dict, dict]]) -> str | None:
    """Write each damaged shard again from its own tracks (`index_rows`: the index rows of the
    damaged shards, in index order; `by_id`: their candidates); None when each came out with the
    size and checksum the index recorded, else why the dataset must be packed again."""
    for shard, why in damaged.items():
        log.warning("pack: %s is damaged (%s); writing it again from its tracks",
                    posixpath.join(shard_dir, shard), why)
        rows = [r for r in index_rows if r["shard"] == shard]
        if any(r["track_id"] not in by_id for r in rows):
            return f"{shard} cannot be written again alone (some of its tracks are no longer candidates)"
        failed: list[str] = []

        def samples(rows=rows, failed=failed):
            for row, files, reason in ordered_map(lambda p: encode_sample(p, cfg),
                                                  [by_id[r["track_id"]] for r in rows], cfg.pack.workers):
                if reason:
                    failed.append(f"track {row['track_id']} now fails: {reason}")
                    return
                yield row["track_id"], files

        problem = rewrite_shard(store, shard_dir, shard, cfg.pack.shard_bytes, samples(),
                                (rows[0]["shard_bytes"], rows[0]["shard_blake2b"]))
        if failed or problem:
            return f"{shard} cannot be written again alone ({(failed or [problem])[0]})"
        log.warning("pack: rewrote %s with its recorded size and checksum", posixpath.join(shard_dir, shard))
    return None
