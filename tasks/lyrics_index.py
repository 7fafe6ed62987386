"""The canonical-lyrics index: IPA shingles, MinHash signatures, LSH candidates, verification.

Each database song is cut into windows of a few lines; each window's IPA shingles get a
MinHash signature (datasketch), persisted as Parquet so the index is built once. At query
time the transcript's IPA is cut into windows of similar length, the LSH returns
candidate windows, votes pick candidate songs, and each candidate is verified exactly:
the share of the transcript's shingles found in the song (containment, so a partly sung
song or a repeated chorus still scores high). Windows make partial matches findable;
verification keeps false matches out. The LSH lives in memory, or in Redis (datasketch's
storage) for databases too large for one process.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import LeanMinHash, MinHash, MinHashLSH

from tasks.lyrics_ipa import SECTION_TAG, Phonemizer, normalise, shingles

INDEX_VERSION = "1"


@dataclass
class IndexParams:
    num_perm: int = 128
    shingle_k: int = 4
    window_lines: int = 2
    lsh_threshold: float = 0.3
    min_score: float = 0.5
    min_shingles: int = 12
    max_candidates: int = 8
    max_chars: int = 20000
    seed: int = 1
    scheme: str = "affine32"   # datasketch permutation scheme; stored hash values are only valid with it
    fallback_voice: str = "en-us"


@dataclass
class DbReport:
    rows: list[dict]
    skipped: list[dict] = field(default_factory=list)   # {"lyric_id", "reason"}


def read_lyrics_db(path: str) -> DbReport:
    """Rows of a Parquet or JSONL database; malformed rows are reported, never dropped silently."""
    import fsspec

    with fsspec.open(path, "rb") as fh:
        data = fh.read()
    if path.endswith((".jsonl", ".json")):
        raw, skipped = [], []
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                skipped.append({"lyric_id": f"line {n}", "reason": f"malformed_row: not JSON ({exc.msg})"})
    else:
        raw, skipped = pq.read_table(io.BytesIO(data)).to_pylist(), []
    rows, seen = [], set()
    for r in raw:
        lid = r.get("lyric_id") if isinstance(r, dict) else None
        if not lid or not isinstance(lid, str):
            skipped.append({"lyric_id": str(lid), "reason": "malformed_row: missing lyric_id"})
        elif not isinstance(r.get("lyrics"), str) or not normalise(r["lyrics"]):
            skipped.append({"lyric_id": lid, "reason": "empty_lyrics: no words to match"})
        elif lid in seen:
            skipped.append({"lyric_id": lid, "reason": "duplicate_lyric_id: kept the first row"})
        else:
            seen.add(lid)
            rows.append({k: r.get(k) for k in ("lyric_id", "title", "artist", "language", "lyrics")})
    return DbReport(rows, skipped)


def lyric_lines(lyrics: str) -> list[tuple[str, str]]:
    """(section, line) pairs of canonical lyrics; section from the last [tag]."""
    section, out = "", []
    for line in lyrics.splitlines():
        if SECTION_TAG.match(line):
            section = line.strip().strip("[]").lower()
        elif line.strip():
            out.append((section, line.strip()))
    return out


def _minhash(shingle_set: set[str], p: IndexParams) -> LeanMinHash:
    m = MinHash(num_perm=p.num_perm, seed=p.seed, scheme=p.scheme)
    m.update_batch([s.encode() for s in shingle_set])
    return LeanMinHash(m)


def _windows_of_lines(ipa_lines: list[str], n: int) -> list[str]:
    if len(ipa_lines) <= n:
        return [" ".join(ipa_lines)]
    return [" ".join(ipa_lines[i:i + n]) for i in range(len(ipa_lines) - n + 1)]


def _windows_of_text(ipa: str, size: int) -> list[str]:
    s = ipa.replace(" ", "")
    if len(s) <= size:
        return [s]
    step = max(1, size // 2)
    return [s[i:i + size] for i in range(0, len(s) - size + step, step)]


class LyricsIndex:
    def __init__(self, params: IndexParams, songs: pa.Table, signatures: pa.Table, storage: dict | None = None):
        self.params = params
        self.songs = {r["lyric_id"]: r for r in songs.to_pylist()}
        self.signatures = signatures
        self.song_shingles = {lid: set(r["shingles"]) for lid, r in self.songs.items()}
        ipa_lens = [len(w) for w in signatures.column("window_ipa").to_pylist()] or [40]
        self.window_chars = int(np.median(ipa_lens))
        self.lsh = MinHashLSH(threshold=params.lsh_threshold, num_perm=params.num_perm,
                              storage_config=storage)
        if self.lsh.is_empty():
            with self.lsh.insertion_session() as session:
                for lid, w, hv in zip(signatures.column("lyric_id").to_pylist(),
                                      signatures.column("window").to_pylist(),
                                      signatures.column("hashvalues").to_numpy(zero_copy_only=False)):
                    session.insert(f"{lid}\x1f{w}", LeanMinHash(seed=params.seed, hashvalues=np.asarray(hv), scheme=params.scheme))

    # -- build and persist -------------------------------------------------------------
    @classmethod
    def build(cls, rows: list[dict], params: IndexParams, phonemizer: Phonemizer | None = None,
              storage: dict | None = None) -> tuple["LyricsIndex", list[dict]]:
        ph = phonemizer or Phonemizer(params.fallback_voice)
        skipped = []
        lines_by_song = {r["lyric_id"]: lyric_lines(r["lyrics"][: params.max_chars]) for r in rows}
        flat, langs, owners = [], [], []
        for r in rows:
            for _, line in lines_by_song[r["lyric_id"]]:
                flat.append(normalise(line))
                langs.append(r.get("language"))
                owners.append(r["lyric_id"])
        ipa_flat = ph.ipa(flat, langs)
        ipa_by_song: dict[str, list[str]] = {}
        for lid, ipa in zip(owners, ipa_flat):
            ipa_by_song.setdefault(lid, []).append(ipa)
        song_rows, sig_rows = [], []
        for r in rows:
            ipa_lines = ipa_by_song.get(r["lyric_id"], [])
            full = shingles(" ".join(ipa_lines), params.shingle_k)
            if len(full) < params.min_shingles:
                skipped.append({"lyric_id": r["lyric_id"], "reason": "unphonemisable: too few phonemes "
                                f"({len(full)} shingles) from language {r.get('language')!r}"})
                continue
            song_rows.append({**r, "ipa_lines": ipa_lines, "sections": [s for s, _ in lines_by_song[r["lyric_id"]]],
                              "lines": [ln for _, ln in lines_by_song[r["lyric_id"]]],
                              "shingles": sorted(full)})
            for w, window in enumerate(_windows_of_lines([i for i in ipa_lines if i], params.window_lines)):
                sig_rows.append({"lyric_id": r["lyric_id"], "window": w, "window_ipa": window.replace(" ", ""),
                                 "hashvalues": _minhash(shingles(window, params.shingle_k), params).hashvalues})
        songs = pa.Table.from_pylist(song_rows)
        sigs = pa.Table.from_pylist(sig_rows, schema=pa.schema([
            ("lyric_id", pa.string()), ("window", pa.int32()), ("window_ipa", pa.string()),
            ("hashvalues", pa.list_(pa.uint64()))]))
        return cls(params, songs, sigs, storage), skipped

    def save(self, store, directory: str) -> None:
        """Atomic writes through the stage store (any fsspec root)."""
        def table_bytes(t: pa.Table) -> bytes:
            buf = io.BytesIO()
            pq.write_table(t, buf, compression="zstd")
            return buf.getvalue()

        store.write_bytes(f"{directory}/songs.parquet", table_bytes(pa.Table.from_pylist(list(self.songs.values()))))
        store.write_bytes(f"{directory}/signatures.parquet", table_bytes(self.signatures))
        store.write_bytes(f"{directory}/meta.json", json.dumps(
            {"version": INDEX_VERSION, "params": self.params.__dict__, "songs": len(self.songs),
             "windows": len(self.signatures)}).encode())

    @classmethod
    def load(cls, store, directory: str, storage: dict | None = None) -> "LyricsIndex":
        meta = json.loads(store.read_bytes(f"{directory}/meta.json"))
        params = IndexParams(**meta["params"])
        songs = pq.read_table(io.BytesIO(store.read_bytes(f"{directory}/songs.parquet")))
        sigs = pq.read_table(io.BytesIO(store.read_bytes(f"{directory}/signatures.parquet")))
        return cls(params, songs, sigs, storage)

    # -- query ---------------------------------------------------------------------------
    def candidates(self, query_ipa: str) -> list[str]:
        votes: dict[str, int] = {}
        for window in _windows_of_text(query_ipa, self.window_chars):
            sh = shingles(window, self.params.shingle_k)
            if not sh:
                continue
            for key in self.lsh.query(_minhash(sh, self.params)):
                lid = key.decode() if isinstance(key, bytes) else key
                lid = lid.rsplit("\x1f", 1)[0]   # from the right: a lyric_id may hold the separator
                votes[lid] = votes.get(lid, 0) + 1
        return [lid for lid, _ in sorted(votes.items(), key=lambda kv: -kv[1])[: self.params.max_candidates]]

    def score(self, query_shingles: set[str], lyric_id: str) -> float:
        return len(query_shingles & self.song_shingles[lyric_id]) / max(1, len(query_shingles))

    def match(self, query_ipa: str) -> tuple[str | None, float, str]:
        """(lyric_id or None, score, why): the best verified candidate."""
        q = shingles(query_ipa, self.params.shingle_k)
        if len(q) < self.params.min_shingles:
            return None, 0.0, f"too_little_text: {len(q)} phoneme shingles < {self.params.min_shingles}"
        cands = self.candidates(query_ipa)
        if not cands:
            return None, 0.0, "no_candidate: no database song shares enough phonemes"
        best = max(cands, key=lambda lid: self.score(q, lid))
        s = self.score(q, best)
        if s < self.params.min_score:
            return None, s, f"below_threshold: best {best} scored {s:.2f} < {self.params.min_score}"
        return best, s, "matched"

    def brute_force(self, query_ipa: str) -> tuple[str | None, float]:
        """The exact best song by containment over the whole database (the reference)."""
        q = shingles(query_ipa, self.params.shingle_k)
        if not q or not self.songs:
            return None, 0.0
        best = max(self.songs, key=lambda lid: self.score(q, lid))
        s = self.score(q, best)
        return (best if s >= self.params.min_score else None), s


def align_lines(song: dict, segments: list[dict], ph: Phonemizer, language: str | None, k: int) -> list[dict]:
    """Canonical lines -> transcript segment times, monotonic in time; unmatched lines get null times."""
    seg_ipa = ph.ipa([normalise(s.get("text") or "") for s in segments], [language] * len(segments))
    seg_sh = [shingles(i, k) for i in seg_ipa]
    out, cursor = [], 0
    for section, line, ipa in zip(song["sections"], song["lines"], song["ipa_lines"]):
        sh = shingles(ipa, k)
        best, best_score = None, 0.0
        for j in range(cursor, len(segments)):
            if not sh or not seg_sh[j]:
                continue
            score = len(sh & seg_sh[j]) / len(sh)
            if score > best_score:
                best, best_score = j, score
        if best is not None and best_score >= 0.5:
            cursor = best
            out.append({"line": line, "section": section, "start": float(segments[best]["start"]),
                        "end": float(segments[best]["end"]), "score": round(best_score, 3)})
        else:
            out.append({"line": line, "section": section, "start": None, "end": None,
                        "score": round(best_score, 3)})
    return out


def db_fingerprint(path: str, params: IndexParams) -> str:
    import fsspec

    digest = hashlib.blake2b(digest_size=8)
    with fsspec.open(path, "rb") as fh:
        while chunk := fh.read(4 * 2**20):
            digest.update(chunk)
    digest.update(json.dumps(params.__dict__, sort_keys=True).encode() + INDEX_VERSION.encode())
    return digest.hexdigest()


def index_for(db_path: str, store, params: IndexParams, storage: dict | None = None) -> tuple[LyricsIndex, list[dict]]:
    """Load the persisted index of this database and params, or build and persist it."""
    directory = store.path("lyrics_index", db_fingerprint(db_path, params))
    if store.exists(f"{directory}/meta.json"):
        return LyricsIndex.load(store, directory, storage), []
    report = read_lyrics_db(db_path)
    index, unphonemisable = LyricsIndex.build(report.rows, params, storage=storage)
    index.save(store, directory)
    skipped = report.skipped + unphonemisable
    store.write_bytes(f"{directory}/skipped.json", json.dumps(skipped, ensure_ascii=False).encode())
    return index, skipped
