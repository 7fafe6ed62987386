"""Test helper for the pack and latents tests: a work root with a real catalog and probe
output (ingest and the probe stage on the synthetic corpus) and the other stages' outputs
written straight into the store, in their own schemas, with values derived from track_id.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa

from schemas.config import Config, load_config
from tasks.ingest import ingest
from tasks.stage import dag_order, run_partition, stage_class, stage_keys
from tasks.store import StageStore

STAGES = ["probe", "aesthetics", "transcribe", "lyrics", "rhythm", "caption"]
LANGS = ["en", "fr", "ja", None]   # None: instrumental
KEYS = ["C", "D", "Eb", "F#", "A"]


def _u(track_id: str, salt: str) -> float:
    """A stable number in [0, 1) from a track id."""
    return int(hashlib.sha1(f"{salt}:{track_id}".encode()).hexdigest()[:8], 16) / 2**32


def stage_row(name: str, track: dict) -> dict:
    tid = track["track_id"]
    row = {"track_id": tid, "status": "ok", "reason": None}
    lang = LANGS[int(_u(tid, "lang") * len(LANGS))]
    if name == "aesthetics":
        row.update({k: round(2 + 7 * _u(tid, k), 3) for k in ("ce", "cu", "pc", "pq")}, windows=1)
    elif name == "transcribe":
        row.update(language=lang or "en", language_prob=0.9, text="" if lang is None else f"words of {tid[:6]}",
                   segments=[], words=[], instrumental=lang is None, windows=1)
    elif name == "lyrics":
        matched = lang is not None and _u(tid, "match") < 0.7
        row.update(lyric_id=f"lyr-{tid[:4]}" if matched else None, score=0.9 if matched else None,
                   language=lang if matched else None, title="A Song" if matched else None,
                   artist="Synth" if matched else None,
                   lyrics=f"[verse]\nline of {tid[:6]}\n[chorus]\nla la la ñ" if matched else None)
    elif name == "rhythm":
        row.update(bpm=round(70 + 100 * _u(tid, "bpm"), 1), key=KEYS[int(_u(tid, "key") * len(KEYS))],
                   scale="major" if _u(tid, "scale") < 0.5 else "minor",
                   segments=[{"start": 0.0, "end": 4.0, "label": "intro"},
                             {"start": 4.0, "end": 8.0, "label": "verse"}])
    elif name == "caption":
        row.update(description=f"a synthetic song {tid[:6]}", tags=["pop", "synthesizer"])
    return row


def fixture_overrides(tiny_dir: Path, lyrics_db: Path) -> list[str]:
    """The `key=value` overrides of the tiny profile these work roots are built with (for
    tests that go through DatasetParams or the CLI)."""
    return [f"models.tiny_dir={tiny_dir}", f"lyrics_db={lyrics_db}", f"stages=[{','.join(STAGES)}]",
            "ingest.partition_size=4", "pack.shard_bytes=4000000"]


def tiny_config(work: Path, tiny_dir: Path, lyrics_db: Path, *overrides: str) -> Config:
    return load_config("tiny", [f"work_root={work}", *fixture_overrides(tiny_dir, lyrics_db), *overrides],
                       environ={})


def build_work(root: Path, synth_corpus: Path, tiny_dir: Path, *overrides: str) -> Config:
    """Copy the corpus audio under root, ingest it, run probe, write the other stages."""
    audio = root / "audio"
    shutil.copytree(synth_corpus / "audio", audio)
    cfg = tiny_config(root / "work", tiny_dir, synth_corpus / "lyrics.parquet", *overrides)
    store = StageStore(cfg.work_root)
    result = ingest(cfg, store, [str(audio)])
    write_stages(cfg, store, result.partitions)
    return cfg


def write_stages(cfg: Config, store: StageStore, partitions: list[int]) -> None:
    """Probe (the real stage) and the other stages' rows for each partition whose output is
    missing: what `acepipe run` would compute, for a work root this helper built."""
    keys = stage_keys(cfg, dag_order(cfg.stages))
    for p in partitions:
        run_partition(store, cfg, "probe", p, keys)
        for name in STAGES[1:]:
            if store.exists(store.stage_path(name, keys[name], p)):
                continue
            cls = stage_class(name)
            tracks = store.joined_rows(p, {u: keys[u] for u in cls.inputs if u == "probe"})
            rows = [stage_row(name, t) for t in tracks]
            if name == "aesthetics" and p == 0 and rows:   # one track rejected upstream
                rows[0].update(status="rejected", reason="low_quality: pq below threshold")
            store.write_table(store.stage_path(name, keys[name], p),
                              pa.Table.from_pylist(rows, schema=cls.schema))
