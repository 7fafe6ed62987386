"""Lyrics stage (DAG step 4): match Whisper transcripts to a canonical lyrics database.

transcript -> IPA (tasks/lyrics_ipa.py) -> LSH candidates -> verified containment score
(tasks/lyrics_index.py) -> the canonical lyrics with section tags, and each canonical
line placed at the transcript segment where it is sung.

A track without a match is not a bad track: it stays `ok` with `lyric_id` null and a
`match_reason`: `instrumental` (transcribe flagged no vocals), `empty_transcript`,
`too_little_text`, `no_candidate` or `below_threshold` (with the best score). Training
decides what to do with those (pack's require-lyrics filter).

`acepipe lyrics index` and `acepipe lyrics match` (the end of this file) build the index of
a database once and query it with the same matcher, outside any flow.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator

from schemas.common import STATUS_OK
from schemas.lyrics import LYRICS_SCHEMA, LyricsConfig
from tasks.lyrics_index import INDEX_VERSION, IndexParams, LyricsIndex, align_lines, db_fingerprint, index_for
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
            if score > best[1] or not best[2]:  # a tie keeps the first (tagged) language
                best = (None, score, reason, lang)
        return best

    def align(self, lyric_id: str, segments: list[dict], language: str | None) -> list[dict]:
        return align_lines(self.index.songs[lyric_id], segments, self.phonemizer, language,
                           self.index.params.shingle_k)


def open_matcher(db_path: str, work_root: str, cfg: LyricsConfig) -> tuple[LyricsMatcher, list[dict]]:
    store = StageStore(work_root)
    params = index_params(cfg)
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


# -- command line: `acepipe lyrics index` and `acepipe lyrics match` -------------------------
SOURCE_FILE = "source.json"   # {"db", "fingerprint"}: what the index was built from, to detect staleness


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _absolute(db_path: str) -> str:
    """A local path made absolute, so `lyrics match` finds the database from any directory."""
    import os

    return db_path if "://" in db_path else os.path.abspath(db_path)


def cli_index(args) -> int:
    """`acepipe lyrics index --db DB --out DIR`: build and persist the index."""
    import time

    from schemas.config import ConfigError, load_config
    from tasks.lyrics_index import read_lyrics_db

    cfg = load_config(args.config, args.overrides)
    if not _exists(args.db):
        raise ConfigError(f"lyrics database {args.db} does not exist (a Parquet or JSONL file)")
    started = time.perf_counter()
    store = StageStore(args.out)
    params = index_params(cfg.lyrics)
    # Fingerprint before reading: a database edited while we index then reads as stale, not current.
    source = {"db": _absolute(args.db), "fingerprint": db_fingerprint(args.db, params)}
    report = read_lyrics_db(args.db)
    index, unphonemisable = LyricsIndex.build(report.rows, params)
    index.save(store, store.root)
    store.write_bytes(store.path(SOURCE_FILE), json.dumps(source, ensure_ascii=False).encode())
    skipped = report.skipped + unphonemisable
    store.write_bytes(store.path("skipped.json"), json.dumps(skipped, ensure_ascii=False).encode())
    print(f"indexed {len(index.songs)} songs ({len(index.signatures)} windows) in "
          f"{time.perf_counter() - started:.1f} s -> {args.out}")
    for s in skipped:
        print(f"  skipped {s['lyric_id']}: {s['reason']}")
    return 0


def _rebuild(directory: str, db: str = "DB") -> str:
    return f"rebuild it with `acepipe lyrics index --db {db} --out {directory}` (the same --config/--set as the match)"


def _warn(message: str) -> None:
    print(f"acepipe: warning: {message}", file=sys.stderr)


def check_index_dir(store: StageStore, params: IndexParams) -> None:
    """Raise ConfigError when the index under `store` is missing or stale against `params` and its database."""
    from schemas.config import ConfigError

    directory = store.url
    if not store.exists(f"{store.root}/meta.json"):
        raise ConfigError(f"no lyrics index at {directory}: build it with "
                          f"`acepipe lyrics index --db DB --out {directory}`")
    meta = json.loads(store.read_bytes(f"{store.root}/meta.json"))
    rebuild = _rebuild(directory)
    if meta.get("version") != INDEX_VERSION:
        raise ConfigError(f"stale lyrics index at {directory}: format version {meta.get('version')!r}, "
                          f"this acepipe reads version {INDEX_VERSION!r}; {rebuild}")
    built, wanted = meta.get("params", {}), params.__dict__
    differ = [f"{k} (index {built.get(k)!r}, config {wanted.get(k)!r})"
              for k in sorted(set(built) | set(wanted)) if built.get(k) != wanted.get(k)]
    if differ:
        raise ConfigError(f"stale lyrics index at {directory}: built with other lyrics params: "
                          f"{', '.join(differ)}; {rebuild}")
    if not store.exists(f"{store.root}/{SOURCE_FILE}"):
        _warn(f"{directory} has no {SOURCE_FILE} (built by an older acepipe): cannot tell whether its "
              f"database changed since; {rebuild} to be sure")
        return
    source = json.loads(store.read_bytes(f"{store.root}/{SOURCE_FILE}"))
    if not _exists(source["db"]):
        # The index stands on its own; only the check is lost.
        _warn(f"the lyrics database {source['db']} that {directory} was built from no longer exists: "
              "cannot tell whether the index is current")
    elif db_fingerprint(source["db"], params) != source["fingerprint"]:
        raise ConfigError(f"stale lyrics index at {directory}: the lyrics database {source['db']} changed "
                          f"since the index was built; {_rebuild(directory, source['db'])}")


def _parse_query(line: str, n: int, language: str | None) -> dict:
    """{"id", "text", "language"} of one --jsonl line, or {"id", "problem"} saying what is wrong with it."""
    try:
        query = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"id": None, "problem": f"line {n} is not JSON ({exc.msg})"}
    if not isinstance(query, dict):
        return {"id": None, "problem": f"line {n} is not a JSON object"}
    qid = query.get("id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        return {"id": None, "problem": f'line {n} has no "id" (a string or an integer)'}
    if not isinstance(query.get("text"), str):
        return {"id": qid, "problem": f'line {n} has no "text" string'}
    if not isinstance(query.get("language", language), (str, type(None))):
        return {"id": qid, "problem": f'line {n}: "language" must be a string or null'}
    return {"id": qid, "text": query["text"], "language": query.get("language", language)}


def _queries(args) -> Iterator[dict]:
    """The queries of --text or --jsonl, in input order; blank --jsonl lines are not queries."""
    if args.jsonl is None:
        yield {"id": args.id, "text": args.text, "language": args.language}
        return
    import fsspec

    with fsspec.open(args.jsonl, "rt", encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                yield _parse_query(line, n, args.language)


def match_query(matcher: LyricsMatcher, query: dict) -> dict:
    """One output line: what the stage would record for this text."""
    if "problem" in query:
        return {"id": query["id"], "lyric_id": None, "score": 0.0, "reason": f"bad_query: {query['problem']}",
                "language": None}
    lyric_id, score, reason, language = matcher.match(query["text"], query["language"])
    return {"id": query["id"], "lyric_id": lyric_id, "score": round(score, 4), "reason": reason,
            "language": language}


def cli_match(args) -> int:
    """`acepipe lyrics match --index DIR (--text T | --jsonl F)`: one JSON line per query on stdout."""
    from schemas.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    if args.jsonl is not None and not _exists(args.jsonl):
        raise ConfigError(f"queries file {args.jsonl} does not exist")
    store = StageStore(args.index)
    check_index_dir(store, index_params(cfg.lyrics))
    matcher = LyricsMatcher(LyricsIndex.load(store, store.root), cfg.lyrics)
    for query in _queries(args):
        print(json.dumps(match_query(matcher, query), ensure_ascii=False), flush=True)
    return 0
