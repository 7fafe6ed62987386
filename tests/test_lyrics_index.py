"""The lyrics index on its own (tasks/lyrics_index.py): database hygiene, section tags, windows
and signatures, candidates and verification, persistence, and line alignment.

Most tests phonemise with `LetterPhonemizer`, which returns each normalised line as its own
"IPA", so every shingle, window and score has a value the test can work out by hand; the
lyrics are random letter strings, so songs share no shingles unless a test makes them.
"""
from __future__ import annotations

import json
import random
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash

from tasks.lyrics_index import (INDEX_VERSION, IndexParams, LyricsIndex, _windows_of_text, align_lines, db_fingerprint,
                                index_for, lyric_lines, read_lyrics_db)
from tasks.lyrics_ipa import Phonemizer
from tasks.store import StageStore

LINE_CHARS = 16   # every generated line has this many letters: windows of two lines are 32 long


class LetterPhonemizer:
    """A stand-in for espeak: a normalised line is its own IPA; remembers what it was asked."""

    def __init__(self):
        self.calls: list[tuple[list[str], list]] = []

    def ipa(self, texts: list[str], languages: list) -> list[str]:
        self.calls.append((list(texts), list(languages)))
        return list(texts)


def kgrams(text: str, k: int = 4) -> set[str]:
    """Character k-grams with spaces removed, written out here rather than taken from the module."""
    s = text.replace(" ", "")
    return {s[i:i + k] for i in range(len(s) - k + 1)}


def random_lines(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(LINE_CHARS)) for _ in range(n)]


def song(lyric_id: str, lines: list[str], language: str | None = "en", **extra) -> dict:
    return {"lyric_id": lyric_id, "title": None, "artist": None, "language": language,
            "lyrics": "\n".join(lines), **extra}


def build(rows: list[dict], **params) -> tuple[LyricsIndex, list[dict]]:
    return LyricsIndex.build(rows, IndexParams(**params), phonemizer=LetterPhonemizer())


@pytest.fixture(scope="module")
def two_songs():
    """Songs A (8 lines) and B (6 lines) of unrelated random letters, and their index."""
    rng = random.Random(3)
    a, b = random_lines(rng, 8), random_lines(rng, 6)
    index, skipped = build([song("A", a), song("B", b)])
    assert skipped == []
    return index, a, b, rng


# -- the database ----------------------------------------------------------------------------
def test_jsonl_database_reports_every_bad_row_and_keeps_the_good_ones(tmp_path):
    lines = [json.dumps({"lyric_id": "ok1", "title": "First", "artist": "Someone", "language": "en",
                         "lyrics": "hello there", "genre": "pop"}).encode(),
             b"",                                                    # a blank line is not a row
             json.dumps([1, 2]).encode(),                            # JSON, but not an object
             json.dumps({"lyric_id": 5, "lyrics": "numeric id"}).encode(),
             json.dumps({"lyric_id": "", "lyrics": "empty id"}).encode(),
             json.dumps({"lyric_id": "list", "lyrics": ["not", "text"]}).encode(),
             json.dumps({"lyric_id": "punct", "lyrics": "[Chorus]\n!!! ... ?"}).encode(),
             b"{broken",
             '{"lyric_id": "latin1", "lyrics": "caf\u00e9 au lait"}'.encode("latin-1"),   # not UTF-8
             json.dumps({"lyric_id": "ok2", "lyrics": "second song"}).encode()]
    path = tmp_path / "db.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = read_lyrics_db(str(path))
    assert report.rows == [
        {"lyric_id": "ok1", "title": "First", "artist": "Someone", "language": "en", "lyrics": "hello there"},
        {"lyric_id": "latin1", "title": None, "artist": None, "language": None, "lyrics": "caf\ufffd au lait"},
        {"lyric_id": "ok2", "title": None, "artist": None, "language": None, "lyrics": "second song"}]
    assert [(s["lyric_id"], s["reason"].split(":")[0]) for s in report.skipped] == [
        ("line 8", "malformed_row"), ("None", "malformed_row"), ("5", "malformed_row"), ("", "malformed_row"),
        ("list", "empty_lyrics"), ("punct", "empty_lyrics")]
    assert report.skipped[0]["reason"].startswith("malformed_row: not JSON (")
    assert report.skipped[1]["reason"] == "malformed_row: missing lyric_id"
    assert report.skipped[-1]["reason"] == "empty_lyrics: no words to match"


def test_a_json_named_database_is_read_as_json_lines(tmp_path):
    path = tmp_path / "db.json"
    path.write_text(json.dumps(song("x", ["one line"])) + "\n" + json.dumps(song("x", ["again"])) + "\n")
    report = read_lyrics_db(str(path))
    assert [r["lyric_id"] for r in report.rows] == ["x"]
    assert report.skipped == [{"lyric_id": "x", "reason": "duplicate_lyric_id: kept the first row"}]


def test_parquet_database_gets_the_same_checks(tmp_path):
    path = tmp_path / "db.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"lyric_id": "p1", "title": "T", "artist": "A", "language": "fr", "lyrics": "bonjour"},
        {"lyric_id": None, "title": None, "artist": None, "language": "fr", "lyrics": "sans id"},
        {"lyric_id": "p2", "title": None, "artist": None, "language": "fr", "lyrics": None}]), path)
    report = read_lyrics_db(str(path))
    assert report.rows == [{"lyric_id": "p1", "title": "T", "artist": "A", "language": "fr", "lyrics": "bonjour"}]
    assert [(s["lyric_id"], s["reason"].split(":")[0]) for s in report.skipped] == [
        ("None", "malformed_row"), ("p2", "empty_lyrics")]


def test_lyric_lines_carry_the_last_section_tag():
    lyrics = "before any tag\n  [Chorus] \n\n   la la la  \nand again\n[Verse 2]\nnext line\n[REMIX]\nlast"
    assert lyric_lines(lyrics) == [("", "before any tag"), ("chorus", "la la la"), ("chorus", "and again"),
                                   ("verse 2", "next line"), ("remix", "last")]


# -- building: phonemes, windows, signatures ------------------------------------------------
def test_each_line_is_phonemised_normalised_in_its_song_language():
    ph = LetterPhonemizer()
    rows = [song("en", ["Hello, World!", "[Chorus]", "again  and again"], "en"),
            song("es", ["Hola, mundo", "otra vez otra vez"], "es"), song("none", ["no language tag here"], None)]
    LyricsIndex.build(rows, IndexParams(min_shingles=1), phonemizer=ph)
    texts = [t for call in ph.calls for t in call[0]]
    langs = [lang for call in ph.calls for lang in call[1]]
    assert texts == ["hello world", "again and again", "hola mundo", "otra vez otra vez", "no language tag here"]
    assert langs == ["en", "en", "es", "es", None]


def test_songs_without_a_language_use_the_fallback_voice():
    lines = ["the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore"]
    index, _ = LyricsIndex.build([song("x", lines, None)], IndexParams(fallback_voice="es"))
    assert index.songs["x"]["ipa_lines"] == Phonemizer().ipa(lines, ["es", "es"])
    assert index.songs["x"]["ipa_lines"] != Phonemizer().ipa(lines, ["en", "en"])


def test_a_song_keeps_its_sections_lines_phonemes_and_shingles():
    lines = ["[Verse]", "abcdefgh ijkl", "mnopqrst", "[Chorus]", "uvwxyzab"]
    index, _ = build([song("s", lines, title="Title", artist="Artist")])
    s = index.songs["s"]
    assert (s["title"], s["artist"], s["language"]) == ("Title", "Artist", "en")
    assert s["sections"] == ["verse", "verse", "chorus"]
    assert s["lines"] == s["ipa_lines"] == ["abcdefgh ijkl", "mnopqrst", "uvwxyzab"]
    assert s["shingles"] == sorted(kgrams("abcdefghijklmnopqrstuvwxyzab"))


def test_windows_are_runs_of_consecutive_lines():
    rng = random.Random(1)
    five, one = random_lines(rng, 5), random_lines(rng, 1)
    index, _ = build([song("five", five), song("one", one)], min_shingles=1)
    windows = [(r["lyric_id"], r["window"], r["window_ipa"]) for r in index.signatures.to_pylist()]
    assert windows == [("five", w, five[w] + five[w + 1]) for w in range(4)] + [("one", 0, one[0])]

    index, _ = build([song("five", five)], window_lines=3)
    assert index.signatures.column("window_ipa").to_pylist() == [five[w] + five[w + 1] + five[w + 2]
                                                                  for w in range(3)]
    index, _ = build([song("five", five)], window_lines=9)   # a song shorter than a window: one window
    assert index.signatures.column("window_ipa").to_pylist() == ["".join(five)]


def test_lines_without_phonemes_do_not_make_windows():
    class SilentLine(LetterPhonemizer):
        def ipa(self, texts, languages):
            return ["" if t == "unsayable" else t for t in super().ipa(texts, languages)]

    rng = random.Random(2)
    a, b = random_lines(rng, 2)
    index, _ = LyricsIndex.build([song("s", [a, "unsayable", b])], IndexParams(), phonemizer=SilentLine())
    assert index.signatures.column("window_ipa").to_pylist() == [a + b]
    assert index.songs["s"]["ipa_lines"] == [a, "", b]


def test_signatures_are_datasketch_minhashes_of_the_window_under_the_params():
    """Stored hash values are a datasketch MinHash of the window's shingles with the index's
    num_perm, seed and scheme: what any other reader of signatures.parquet must recompute."""
    rng = random.Random(4)
    lines = random_lines(rng, 3)
    params = dict(num_perm=32, seed=7, scheme="affine64", shingle_k=3)
    index, _ = build([song("s", lines)], **params)
    for row in index.signatures.to_pylist():
        expected = MinHash(num_perm=32, seed=7, scheme="affine64")
        expected.update_batch([g.encode() for g in kgrams(row["window_ipa"], 3)])
        assert row["hashvalues"] == expected.hashvalues.tolist()
    query = lines[0] + lines[1]
    assert index.match(query)[0] == "s"   # queries are hashed the same way


def test_lyrics_past_max_chars_are_not_indexed():
    rng = random.Random(5)
    lines = random_lines(rng, 4)
    index, _ = build([song("s", lines)], max_chars=2 * (LINE_CHARS + 1))   # two lines and their newlines
    assert index.songs["s"]["lines"] == lines[:2]


def test_a_song_with_fewer_shingles_than_min_shingles_is_skipped_with_the_count():
    exactly = "abcdefghijklmno"                    # 15 letters: 12 shingles of 4
    index, skipped = build([song("short", [exactly[:-1]], "sw"), song("tags only", ["[Intro]", "[Outro]"]),
                            song("kept", [exactly])], min_shingles=12)
    assert list(index.songs) == ["kept"]
    assert skipped == [
        {"lyric_id": "short", "reason": "unphonemisable: too few phonemes (11 shingles) from language 'sw'"},
        {"lyric_id": "tags only", "reason": "unphonemisable: too few phonemes (0 shingles) from language 'en'"}]
    assert index.signatures.column("lyric_id").to_pylist() == ["kept"]


# -- querying ----------------------------------------------------------------------------------
def test_a_query_is_cut_into_half_overlapping_windows_without_word_breaks():
    assert _windows_of_text("ab cd ef gh", 4) == ["abcd", "cdef", "efgh"]
    assert _windows_of_text("abc de", 3) == ["abc", "bcd", "cde"]           # step 1, never 0
    assert _windows_of_text("abcdefghijk", 6) == ["abcdef", "defghi", "ghijk"]   # the tail is covered
    assert _windows_of_text("a b c", 4) == ["abc"]


def test_score_is_the_share_of_the_query_found_in_the_song(two_songs):
    index, a, _, _ = two_songs
    inside, outside = a[0][:4], "0000"
    assert index.score({inside}, "A") == 1.0
    assert index.score({inside, outside}, "A") == 0.5
    assert index.score(set(), "A") == 0.0


def test_a_query_needs_min_shingles_shingles(two_songs):
    index, a, _, _ = two_songs
    text = "".join(a)
    assert index.match(text[:index.params.min_shingles + 3])[0] == "A"   # exactly min_shingles shingles
    lyric_id, score, why = index.match(text[:index.params.min_shingles + 2])
    assert (lyric_id, score) == (None, 0.0)
    assert why == f"too_little_text: 11 phoneme shingles < {index.params.min_shingles}"


def test_text_unlike_any_song_has_no_candidate(two_songs):
    index, _, _, rng = two_songs
    unknown = "".join(random_lines(rng, 4))
    assert index.candidates(unknown) == []
    assert index.match(unknown) == (None, 0.0, "no_candidate: no database song shares enough phonemes")


def test_candidates_are_ranked_by_votes_and_capped(two_songs):
    """Two lines of A then four of B: more of the query's windows find B, so B ranks first
    although A comes first in the text and in the alphabet."""
    index, a, b, _ = two_songs
    query = "".join(a[:2] + b[:4])
    assert index.candidates(query) == ["B", "A"]
    capped = LyricsIndex(IndexParams(max_candidates=1), pa.Table.from_pylist(list(index.songs.values())),
                         index.signatures)
    assert capped.candidates(query) == ["B"]


def test_any_lyric_id_string_is_found_again():
    """Ids come from the database as they are: spaces and control characters included."""
    rng = random.Random(12)
    lines = {lid: random_lines(rng, 4) for lid in ("my song", "tab\tsep", "unit\x1fsep", "ends in a space ", "plain")}
    index, _ = build([song(lid, text) for lid, text in lines.items()])
    for lid, text in lines.items():
        assert index.match("".join(text[1:3]))[:2] == (lid, 1.0)


def test_the_best_verified_candidate_wins(two_songs):
    """B leads the query but A holds most of it: verification, not order, picks A."""
    index, a, b, _ = two_songs
    query = "".join(b[:2] + a[:5])
    q = kgrams(query)
    share_a = len(q & kgrams("".join(a))) / len(q)
    assert set(index.candidates(query)) == {"A", "B"}
    assert index.match(query) == ("A", pytest.approx(share_a), "matched")
    assert index.brute_force(query) == ("A", pytest.approx(share_a))


def test_min_score_is_inclusive(two_songs):
    """A query half of song A, half unknown: it matches at min_score equal to its share, not above."""
    index, a, _, rng = two_songs
    query = "".join(a[:3] + random_lines(rng, 3))
    q = kgrams(query)
    share = len(q & kgrams("".join(a))) / len(q)
    assert 0.3 < share < 0.7

    def with_min_score(min_score: float) -> LyricsIndex:
        return LyricsIndex(IndexParams(min_score=min_score), pa.Table.from_pylist(list(index.songs.values())),
                           index.signatures)

    assert with_min_score(share).match(query) == ("A", share, "matched")
    assert with_min_score(share).brute_force(query) == ("A", share)
    above = share + 1e-9
    assert with_min_score(above).match(query) == (None, share, f"below_threshold: best A scored {share:.2f} < {above}")
    assert with_min_score(above).brute_force(query) == (None, share)


def test_brute_force_on_nothing_matches_nothing(two_songs):
    index, a, _, _ = two_songs
    anything = LyricsIndex(IndexParams(min_score=0.0), pa.Table.from_pylist(list(index.songs.values())),
                           index.signatures)
    assert anything.brute_force("") == (None, 0.0)   # even when any score would pass
    empty, _ = build([])
    assert empty.brute_force("".join(a)) == (None, 0.0)
    assert empty.match("".join(a))[0] is None


# -- persistence -------------------------------------------------------------------------------
def test_a_saved_index_reloads_with_its_params_and_answers(tmp_path):
    rng = random.Random(6)
    a, b = random_lines(rng, 5), random_lines(rng, 4)
    params = IndexParams(num_perm=64, seed=3, window_lines=3, min_score=0.6, max_candidates=4)
    built, _ = LyricsIndex.build([song("A", a), song("B", b)], params, phonemizer=LetterPhonemizer())
    store = StageStore(tmp_path / "work")
    built.save(store, store.path("idx"))
    meta = json.loads((tmp_path / "work" / "idx" / "meta.json").read_text())
    assert (meta["version"], meta["songs"], meta["windows"]) == (INDEX_VERSION, 2, (5 - 2) + (4 - 2))
    loaded = LyricsIndex.load(store, store.path("idx"))
    assert loaded.params == params
    assert loaded.songs == built.songs
    assert loaded.signatures.equals(built.signatures)
    for query in ("".join(a[1:4]), "".join(b)):
        assert loaded.match(query) == built.match(query) != (None, 0.0)


def test_db_fingerprint_follows_the_database_bytes_and_the_params(tmp_path):
    db = tmp_path / "db.jsonl"
    db.write_text(json.dumps(song("a", ["one"])) + "\n")
    first = db_fingerprint(str(db), IndexParams())
    assert db_fingerprint(str(db), IndexParams()) == first
    assert db_fingerprint(str(db), IndexParams(shingle_k=3)) != first
    db.write_text(json.dumps(song("a", ["two"])) + "\n")
    assert db_fingerprint(str(db), IndexParams()) != first


def test_index_for_builds_once_and_records_what_it_skipped(tmp_path, monkeypatch):
    rng = random.Random(8)
    words = [" ".join(rng.choice(["river", "moon", "light", "stone", "night", "open", "door", "window"])
                      for _ in range(6)) for _ in range(4)]
    db = tmp_path / "db.jsonl"
    db.write_text("\n".join([json.dumps(song("café", words)), "{broken",
                             json.dumps(song("très-court", ["hi"]), ensure_ascii=False)]) + "\n", encoding="utf-8")
    store = StageStore(tmp_path / "work")
    index, skipped = index_for(str(db), store, IndexParams())
    assert list(index.songs) == ["café"]
    assert [(s["lyric_id"], s["reason"].split(":")[0]) for s in skipped] == [
        ("line 2", "malformed_row"), ("très-court", "unphonemisable")]
    directory = tmp_path / "work" / "lyrics_index" / db_fingerprint(str(db), IndexParams())
    assert json.loads((directory / "skipped.json").read_text(encoding="utf-8")) == skipped
    assert "très-court".encode() in (directory / "skipped.json").read_bytes()   # readable, not \u-escaped

    def no_rebuild(*a, **k):
        raise AssertionError("the index was rebuilt instead of loaded")

    monkeypatch.setattr(LyricsIndex, "build", no_rebuild)
    again, _ = index_for(str(db), store, IndexParams())
    assert again.songs == index.songs
    with pytest.raises(AssertionError, match="rebuilt"):   # other params: another index
        index_for(str(db), store, IndexParams(min_score=0.7))


# -- alignment ---------------------------------------------------------------------------------
def aligned_song(lines: list[str], sections: list[str] | None = None) -> dict:
    return {"sections": sections or ["verse"] * len(lines), "lines": lines, "ipa_lines": lines}


def test_lines_are_placed_in_time_order_and_a_repeat_at_its_next_occurrence():
    rng = random.Random(9)
    chorus, verse = random_lines(rng, 2)
    segments = [{"start": 1, "end": 2, "text": chorus}, {"start": 3, "end": 4, "text": verse},
                {"start": 5, "end": 6, "text": chorus}]
    out = align_lines(aligned_song([chorus, verse, chorus], ["chorus", "verse", "chorus"]), segments,
                      LetterPhonemizer(), "en", 4)
    assert [(a["section"], a["start"], a["end"], a["score"]) for a in out] == [
        ("chorus", 1.0, 2.0, 1.0), ("verse", 3.0, 4.0, 1.0), ("chorus", 5.0, 6.0, 1.0)]
    assert all(isinstance(a["start"], float) and isinstance(a["end"], float) for a in out)
    assert [a["line"] for a in out] == [chorus, verse, chorus]


def test_a_line_is_placed_from_half_of_its_shingles():
    half = "abcde"          # shingles abcd, bcde: the segment holds one of two
    third = "fghijk"        # shingles fghi, ghij, hijk: the segment holds one of three
    two_thirds = "lmnopq"   # shingles lmno, mnop, nopq: the segment holds two of three
    segments = [{"start": 0, "end": 1, "text": "abcdz fghiz lmnopz"}]
    out = align_lines(aligned_song([half, third, two_thirds], ["verse", "verse", "chorus"]), segments,
                      LetterPhonemizer(), None, 4)
    assert out == [{"line": half, "section": "verse", "start": 0.0, "end": 1.0, "score": 0.5},
                   {"line": third, "section": "verse", "start": None, "end": None, "score": 0.333},
                   {"line": two_thirds, "section": "chorus", "start": 0.0, "end": 1.0, "score": 0.667}]


def test_a_line_without_phonemes_is_left_unplaced():
    rng = random.Random(11)
    line = random_lines(rng, 1)[0]
    segments = [{"start": 0, "end": 1, "text": "something sung"}, {"start": 1, "end": 2, "text": line}]
    out = align_lines({"sections": ["intro", "verse"], "lines": ["(breath)", line], "ipa_lines": ["", line]},
                      segments, LetterPhonemizer(), "en", 4)
    assert out == [{"line": "(breath)", "section": "intro", "start": None, "end": None, "score": 0.0},
                   {"line": line, "section": "verse", "start": 1.0, "end": 2.0, "score": 1.0}]


def test_segments_without_text_are_passed_over_in_the_transcript_language():
    ph = LetterPhonemizer()
    rng = random.Random(10)
    line = random_lines(rng, 1)[0]
    segments = [{"start": 0, "end": 1}, {"start": 1, "end": 2, "text": None},
                {"start": 2, "end": 3, "text": line.upper() + "!"}]
    out = align_lines(aligned_song([line, "nothing like it"]), segments, ph, "fr", 4)
    assert ph.calls == [(["", "", line], ["fr", "fr", "fr"])]
    assert [(a["start"], a["score"]) for a in out] == [(2.0, 1.0), (None, 0.0)]
