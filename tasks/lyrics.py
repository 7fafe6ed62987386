"""Lyrics stage (DAG step 4): match Whisper transcripts to a canonical lyrics database.

transcript -> IPA (tasks/lyrics_ipa.py) -> LSH candidates -> verified containment score
(tasks/lyrics_index.py) -> the canonical lyrics with section tags, and each canonical
line placed at the transcript segment where it is sung.

A track without a match is not a bad track: it stays `ok` with `lyric_id` null and a
`match_reason`: `instrumental` (transcribe flagged no vocals), `empty_transcript`,
`too_little_text`, `no_candidate` or `below_threshold` (with the best score). Training
decides what to do with those (pack's require-lyrics filter).
"""
from __future__ import annotations

import json
from collections import Counter

from schemas.common import STATUS_OK
from schemas.lyrics import LYRICS_SCHEMA, LyricsConfig
from tasks.lyrics_index import IndexParams, LyricsIndex, align_lines, index_for
from tasks.lyrics_ipa import Phonemizer, normalise, script_language
from tasks.stage import Stage
from tasks.store import StageStore


def index_params(cfg: LyricsConfig) -> IndexParams:
    return IndexParams(num_perm=cfg.num_perm, shingle_k=cfg.shingle_k, window_lines=cfg.window_lines,
                       lsh_threshold=cfg.lsh_threshold, min_score=cfg.min_score,
                       min_shingles=cfg.min_shingles, max_chars=cfg.max_chars,
                       fallback_voice=cfg.fallback_voice)


def redis_storage(url: str | None, basename: str) -> dict | None:
    if not url:
        return None
    from urllib.parse import urlparse

    u = urlparse(url)
    return {"type": "redis", "basename": basename.encode(),
            "redis": {"host": u.hostname or "127.0.0.1", "port": u.port or 6379}}


class LyricsMatcher:
    """The index plus the phonemizer: what the stage, the CLI and the benchmark share."""

    def __init__(self, index: LyricsIndex, cfg: LyricsConfig):
        self.index = index
        self.cfg = cfg
        self.phonemizer = Phonemizer(cfg.fallback_voice)
        langs = Counter(r.get("language") for r in index.songs.values())
        self.languages = [lang for lang, _ in langs.most_common()]

    def match(self, text: str, language: str | None) -> tuple[str | None, float, str, str | None]:
        """(lyric_id, score, reason, language used) for one transcript."""
        norm = normalise(text[: self.cfg.max_chars])
        if not norm:
            return None, 0.0, "empty_transcript: no words", language
        tried, best = [], (None, 0.0, "", language)
        lang0 = script_language(norm, language)
        retries = [lang for lang in self.languages if lang != lang0][: self.cfg.retry_languages]
        # A wrong language tag phonemises the words wrongly: retry with the database's languages.
        for lang in [lang0] + ([] if lang0 in ("zh", "ja", "ko") else retries):
            ipa = self.phonemizer.ipa([norm], [lang])[0]
            lyric_id, score, reason = self.index.match(ipa)
            tried.append(lang)
            if lyric_id is not None:
                return lyric_id, score, reason, lang
            if score >= best[1] or not best[2]:
                best = (None, score, reason, lang)
        return best

    def align(self, lyric_id: str, segments: list[dict], language: str | None) -> list[dict]:
        return align_lines(self.index.songs[lyric_id], segments, self.phonemizer, language,
                           self.index.params.shingle_k)


def open_matcher(db_path: str, work_root: str, cfg: LyricsConfig) -> tuple[LyricsMatcher, list[dict]]:
    store = StageStore(work_root)
    params = index_params(cfg)
    from tasks.lyrics_index import db_fingerprint

    storage = redis_storage(cfg.redis_url, f"acepipe-lyrics-{db_fingerprint(db_path, params)}")
    index, skipped = index_for(db_path, store, params, storage)
    return LyricsMatcher(index, cfg), skipped


class LyricsStage(Stage):
    name = "lyrics"
    version = "1"
    inputs = ("transcribe",)
    schema = LYRICS_SCHEMA

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["lyrics_db"] = self.cfg.lyrics_db
        return fp

    @classmethod
    def check(cls, cfg) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(cfg.lyrics_db or "")
        if not cfg.lyrics_db or not fs.exists(path):
            raise ValueError(f"lyrics_db {cfg.lyrics_db!r} does not exist: the lyrics stage needs a "
                             "Parquet/JSONL lyrics database (or remove 'lyrics' from stages)")

    def setup(self) -> None:
        if not self.cfg.lyrics_db:
            raise ValueError("the lyrics stage needs `lyrics_db` (a Parquet or JSONL lyrics database) "
                             "in the config, or remove `lyrics` from `stages`")
        self.matcher, self.skipped = open_matcher(self.cfg.lyrics_db, self.cfg.work_root, self.cfg.lyrics)

    def process(self, tracks: list[dict]) -> list[dict]:
        return [self.match_one(t) for t in tracks]

    def match_one(self, track: dict) -> dict:
        tr = track.get("transcribe") or {}
        row = {"track_id": track["track_id"], "status": STATUS_OK, "reason": None, "lyric_id": None,
               "score": 0.0, "alignment": []}
        if tr.get("instrumental"):
            return {**row, "match_reason": "instrumental: transcribe found no vocals"}
        lyric_id, score, why, lang = self.matcher.match(tr.get("text") or "", tr.get("language"))
        row.update(score=round(score, 4), match_reason=why)
        if lyric_id is None:
            return row
        song = self.matcher.index.songs[lyric_id]
        return {**row, "lyric_id": lyric_id, "title": song.get("title"), "artist": song.get("artist"),
                "language": song.get("language"), "lyrics": song["lyrics"],
                "alignment": self.matcher.align(lyric_id, tr.get("segments") or [], lang)}


STAGE = LyricsStage


def cli_index(args) -> int:
    """`acepipe lyrics index --db DB --out DIR`: build (or load) and persist the index."""
    import time

    from schemas.config import load_config

    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    store = StageStore(args.out)
    params = index_params(cfg.lyrics)
    from tasks.lyrics_index import LyricsIndex as _Index, read_lyrics_db

    report = read_lyrics_db(args.db)
    index, unphonemisable = _Index.build(report.rows, params)
    index.save(store, store.root)
    skipped = report.skipped + unphonemisable
    store.write_bytes(store.path("skipped.json"), json.dumps(skipped, ensure_ascii=False).encode())
    print(f"indexed {len(index.songs)} songs ({len(index.signatures)} windows) in "
          f"{time.perf_counter() - started:.1f} s -> {args.out}")
    for s in skipped:
        print(f"  skipped {s['lyric_id']}: {s['reason']}")
    return 0
