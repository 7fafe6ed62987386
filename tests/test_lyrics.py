"""Lyrics alignment: IPA for every script, MinHash LSH matching quality on ASR-like text,
database hygiene, persistence, Redis storage, and the stage on transcribe-shaped rows."""
from __future__ import annotations

import json
import random
import re
import shutil
import socket
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.common import reason_code
from schemas.lyrics import LyricsConfig
from tasks.lyrics import LyricsMatcher, LyricsStage, index_params, redis_storage
from tasks.lyrics_index import IndexParams, LyricsIndex, index_for, lyric_lines, read_lyrics_db, shingles
from tasks.lyrics_ipa import Phonemizer, normalise
from tasks.store import StageStore


def asr_corrupt(text: str, wer: float, vocab: list[str], rng: random.Random) -> str:
    """Substitutions (a letter changed, or another word), deletions and insertions at `wer`."""
    out = []
    for w in text.split():
        r = rng.random()
        if r < wer * 0.5:
            if len(w) > 3 and rng.random() < 0.5:
                i = rng.randrange(1, len(w) - 1)
                out.append(w[:i] + rng.choice("aeiou") + w[i + 1:])
            else:
                out.append(rng.choice(vocab))
        elif r < wer * 0.75:
            continue
        elif r < wer:
            out.extend([w, rng.choice(vocab)])
        else:
            out.append(w)
    return " ".join(out)


@pytest.fixture(scope="session")
def db_rows(synth_corpus):
    return read_lyrics_db(str(synth_corpus / "lyrics.parquet")).rows


@pytest.fixture(scope="session")
def matcher(db_rows):
    index, skipped = LyricsIndex.build(db_rows, IndexParams())
    assert skipped == []
    return LyricsMatcher(index, LyricsConfig())


def sung_lines(lyrics: str) -> list[str]:
    return [line for _, line in lyric_lines(lyrics)]


def test_cjk_lines_get_distinct_real_phonemes():
    ph = Phonemizer()
    texts = ["我在月光下走路", "城市安静地睡着", "よるのまちを ひとりで あるく", "つきのひかりが みちを てらす",
             "밤하늘 아래 혼자 걸어요", "바람이 불어 노래를 해요"]
    ipa = ph.ipa([normalise(t) for t in texts], ["zh", "zh", "ja", "ja", "ko", "ko"])
    assert len(set(ipa)) == len(ipa) and all(len(i) >= 8 for i in ipa)
    assert not any("letter" in i or "tʃaɪniːz" in i for i in ipa)  # espeak's "Chinese letter"
    assert ipa[0].startswith("wo")  # 我 -> wo


def test_normalise_drops_tags_and_punctuation():
    assert normalise("[Chorus]\nHello, World!!  \n(yeah)") == "hello world yeah"


def test_asr_like_transcripts_match_their_song(matcher, db_rows):
    rng = random.Random(7)
    sung = [r for r in db_rows if not r["lyric_id"].startswith("dis-")]
    hits = total = 0
    for r in sung:
        lines = sung_lines(r["lyrics"])
        for _ in range(3):
            start = rng.randrange(0, max(1, len(lines) - 2))
            part = " ".join(lines[start:start + rng.randint(2, len(lines))])
            if r["language"] not in ("zh", "ja", "ko"):  # ASR swaps in words of the same language
                vocab = [w for o in db_rows if o["language"] == r["language"] for w in normalise(o["lyrics"]).split()]
                part = asr_corrupt(part, 0.2, vocab, rng)
            lyric_id, _, _, _ = matcher.match(part, r["language"])
            total += 1
            # a near-miss variant shares the verse: either is a correct hit for verse-only text
            hits += lyric_id is not None and lyric_id.split("-")[-1] == r["lyric_id"].split("-")[-1]
    assert hits / total >= 0.9, (hits, total)


UNKNOWN_TEXTS = ["the engine of the harbour rolls beneath a copper moon tonight",
                 "seven tired sailors count the silver coins upon the table",
                 "quiero bailar contigo hasta que la noche se convierta en día",
                 "les enfants jouent au football dans la cour de l'école",
                 "我们明天早上去公园跑步然后吃早饭", "今日は雨が降っているので家にいます"]


def test_songs_not_in_the_database_do_not_match(matcher, db_rows):
    for text in UNKNOWN_TEXTS:   # nothing in the database sounds like these: the LSH offers no song
        lyric_id, score, why, _ = matcher.match(text, None)
        assert (lyric_id, score, reason_code(why)) == (None, 0.0, "no_candidate"), (text, why)
    # a new song quoting one line of a database song: the LSH offers that song, and its verified
    # score is what turns it down
    song = next(r for r in db_rows if r["language"] == "en" and r["lyric_id"].startswith("lyr"))
    quoting = " ".join([sung_lines(song["lyrics"])[2], UNKNOWN_TEXTS[0]])
    lyric_id, score, why, _ = matcher.match(quoting, "en")
    assert lyric_id is None and reason_code(why) == "below_threshold", why
    assert 0.0 < score < matcher.cfg.min_score
    assert matcher.match("", "en")[2].startswith("empty_transcript")
    assert matcher.match("la la", "en")[2].startswith("too_little_text")


def test_min_score_not_the_lsh_decides_a_match(matcher, db_rows):
    """A database song's chorus inside a longer text that is not in the database: the LSH offers
    the song, but it holds only a third of the text's phoneme shingles, under lyrics.min_score,
    so nothing matches; with min_score below that share the same text matches the song."""
    song = next(r for r in db_rows if r["language"] == "en" and r["lyric_id"].startswith("lyr"))
    text = " ".join(sung_lines(song["lyrics"])[2:4] + UNKNOWN_TEXTS[:2])
    ipa = matcher.phonemizer.ipa([normalise(text)], ["en"])[0]
    assert song["lyric_id"] in matcher.index.candidates(ipa)
    query = shingles(ipa, matcher.index.params.shingle_k)
    share = len(query & set(matcher.index.songs[song["lyric_id"]]["shingles"])) / len(query)
    assert 0.2 < share < matcher.cfg.min_score == 0.5

    lyric_id, score, why, used = matcher.match(text, "en")
    assert (lyric_id, used) == (None, "en") and score == pytest.approx(share)
    below = re.fullmatch(r"below_threshold: best (\S+) scored (\d\.\d\d) < (\S+)", why)
    assert below, why
    assert (below[1], float(below[2]), float(below[3])) == (song["lyric_id"], round(share, 2), 0.5)

    lowered = LyricsConfig(min_score=share - 0.05)
    index = LyricsIndex(index_params(lowered), pa.Table.from_pylist(list(matcher.index.songs.values())),
                        matcher.index.signatures)
    lyric_id, score, why, _ = LyricsMatcher(index, lowered).match(text, "en")
    assert (lyric_id, why) == (song["lyric_id"], "matched") and score == pytest.approx(share)


def test_wrong_language_tag_still_matches(matcher, db_rows):
    es = next(r for r in db_rows if r["language"] == "es" and r["lyric_id"].startswith("lyr"))
    lyric_id, _, _, used = matcher.match(" ".join(sung_lines(es["lyrics"])), "en")
    assert lyric_id == es["lyric_id"] and used == "es"


def test_huge_transcript_is_bounded(matcher):
    text = " ".join(["word"] * 50_000)
    started = time.perf_counter()
    lyric_id, _, _, _ = matcher.match(text, "en")
    assert lyric_id is None and time.perf_counter() - started < 20


def test_database_problems_are_reported(tmp_path):
    path = tmp_path / "db.jsonl"
    rows = [{"lyric_id": "a", "language": "en", "lyrics": "[verse]\nhello there my old friend\nit is good to see you"},
            {"lyric_id": "a", "language": "en", "lyrics": "duplicate id"},
            {"lyric_id": None, "language": "en", "lyrics": "no id"},
            {"lyric_id": "b", "language": "en", "lyrics": "  "},
            {"lyric_id": "c", "language": "bo", "lyrics": "བཀྲ་ཤིས་བདེ་ལེགས། བཀྲ་ཤིས་བདེ་ལེགས།"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{not json\n")
    report = read_lyrics_db(str(path))
    reasons = {s["lyric_id"]: s["reason"].split(":")[0] for s in report.skipped}
    assert [r["lyric_id"] for r in report.rows] == ["a", "c"]
    assert reasons == {"a": "duplicate_lyric_id", "None": "malformed_row", "b": "empty_lyrics",
                       "line 6": "malformed_row"}
    _, unphonemisable = LyricsIndex.build(report.rows, IndexParams())
    assert [u["lyric_id"] for u in unphonemisable] == ["c"]


def test_index_is_persisted_and_reloaded(synth_corpus, tmp_path, monkeypatch):
    store = StageStore(tmp_path / "work")
    db = str(synth_corpus / "lyrics.parquet")
    first, _ = index_for(db, store, IndexParams())

    def no_rebuild(*a, **k):
        raise AssertionError("the index was rebuilt instead of loaded")

    monkeypatch.setattr(LyricsIndex, "build", no_rebuild)
    second, _ = index_for(db, store, IndexParams())
    assert second.songs.keys() == first.songs.keys()
    q = normalise(" ".join(sung_lines(next(iter(first.songs.values()))["lyrics"])))
    ipa = Phonemizer().ipa([q], [next(iter(first.songs.values()))["language"]])[0]
    assert first.match(ipa)[0] == second.match(ipa)[0] is not None


@pytest.fixture
def redis_url():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_storage_round_trip(db_rows, redis_url):
    storage = redis_storage(redis_url, "acepipe-test")
    built, _ = LyricsIndex.build(db_rows, IndexParams(), storage=storage)
    # a second process attaches to the same Redis keys: no insertion, same answers
    attached = LyricsIndex(built.params, pa.Table.from_pylist(list(built.songs.values())),
                           built.signatures.slice(0, 0), storage)
    song = next(r for r in db_rows if r["language"] == "fr")
    ipa = Phonemizer().ipa([normalise(" ".join(sung_lines(song["lyrics"])))], ["fr"])[0]
    assert built.match(ipa)[0] == attached.match(ipa)[0] == song["lyric_id"]


def test_index_for_keeps_its_lsh_in_redis_and_refills_an_empty_one(synth_corpus, db_rows, redis_url, tmp_path):
    """Another process needs only Redis and the songs; a Redis that comes back empty (it keeps
    nothing on restart) is refilled from the persisted index, not left empty."""
    db, store = str(synth_corpus / "lyrics.parquet"), StageStore(tmp_path / "work")
    song = next(r for r in db_rows if r["language"] == "fr")
    ipa = Phonemizer().ipa([normalise(" ".join(sung_lines(song["lyrics"])))], ["fr"])[0]

    def attached(storage: dict) -> str | None:   # a process holding no signatures of its own
        index = LyricsIndex(built.params, pa.Table.from_pylist(list(built.songs.values())),
                            built.signatures.slice(0, 0), storage)
        return index.match(ipa)[0]

    first = redis_storage(redis_url, "acepipe-test-first")
    built, _ = index_for(db, store, IndexParams(), first)
    assert attached(first) == song["lyric_id"]
    assert attached(redis_storage(redis_url, "acepipe-test-never-filled")) is None
    restarted = redis_storage(redis_url, "acepipe-test-restarted")
    index_for(db, store, IndexParams(), restarted)   # loaded from the store this time
    assert attached(restarted) == song["lyric_id"]


def test_stage_matches_and_aligns_transcribe_rows(synth_corpus, make_cfg, db_rows):
    cfg = make_cfg(f"lyrics_db={synth_corpus / 'lyrics.parquet'}")
    stage = LyricsStage(cfg)
    stage.setup()
    song = next(r for r in db_rows if r["language"] == "en" and r["lyric_id"].startswith("lyr"))
    lines = sung_lines(song["lyrics"])
    segments = [{"start": 5.0 + 4 * i, "end": 8.5 + 4 * i, "text": line} for i, line in enumerate(lines)]
    tracks = [
        {"track_id": "sung", "transcribe": {"text": " ".join(lines), "language": "en",
                                            "segments": segments, "instrumental": False}},
        {"track_id": "inst", "transcribe": {"text": "", "language": None, "segments": [], "instrumental": True}},
        {"track_id": "noise", "transcribe": {"text": "purl purl purl purl purl purl", "language": "en",
                                             "segments": [], "instrumental": False}},
    ]
    rows = {r["track_id"]: r for r in stage.process(tracks)}
    pa.Table.from_pylist(list(rows.values()), schema=LyricsStage.schema)  # rows fit the schema
    sung = rows["sung"]
    assert sung["lyric_id"] == song["lyric_id"] and sung["score"] > 0.9 and "[chorus]" in sung["lyrics"]
    starts = [a["start"] for a in sung["alignment"]]
    assert starts == [s["start"] for s in segments]
    assert {a["section"] for a in sung["alignment"]} == {"verse", "chorus"}
    assert rows["inst"]["lyric_id"] is None and rows["inst"]["match_reason"].startswith("instrumental")
    assert rows["noise"]["lyric_id"] is None and rows["noise"]["status"] == "ok"


def test_cli_index(synth_corpus, tmp_path, capsys):
    from flows.cli import main

    assert main(["lyrics", "index", "--db", str(synth_corpus / "lyrics.parquet"), "--out", str(tmp_path / "idx"),
                 "--config", "tiny"]) == 0
    assert "indexed" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "idx" / "signatures.parquet").num_rows > 0


# -- `acepipe lyrics match` ------------------------------------------------------------------
def _match(capsys, *args: str) -> tuple[int, list[dict], str]:
    """Run `acepipe lyrics match ... --config tiny`: exit code, parsed stdout lines, stderr."""
    from flows.cli import main

    capsys.readouterr()
    code = main(["lyrics", "match", *args, "--config", "tiny"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def _index(db: str, out) -> None:
    from flows.cli import main

    assert main(["lyrics", "index", "--db", db, "--out", str(out), "--config", "tiny"]) == 0


@pytest.fixture(scope="module")
def cli_index_dir(synth_corpus, tmp_path_factory):
    """An index of the synthetic database built by the CLI, shared by the match tests that only read it."""
    out = tmp_path_factory.mktemp("lyrics-index") / "idx"
    _index(str(synth_corpus / "lyrics.parquet"), out)
    return out


def test_lyrics_match_finds_a_database_song_by_its_text(cli_index_dir, db_rows, capsys):
    from schemas.config import load_config

    song = next(r for r in db_rows if r["language"] == "en" and r["lyric_id"].startswith("lyr"))
    code, lines, err = _match(capsys, "--index", str(cli_index_dir), "--text", song["lyrics"],
                              "--language", "en", "--id", "q1")
    assert code == 0 and err == ""
    assert lines == [{"id": "q1", "lyric_id": song["lyric_id"], "score": lines[0]["score"],
                      "reason": "matched", "language": "en"}]
    assert lines[0]["score"] >= load_config("tiny").lyrics.min_score


def test_lyrics_match_text_not_in_the_database_matches_nothing(cli_index_dir, capsys):
    code, lines, _ = _match(capsys, "--index", str(cli_index_dir),
                            "--text", "the engine of the harbour rolls beneath a copper moon tonight",
                            "--language", "en")
    assert code == 0 and len(lines) == 1
    assert lines[0]["id"] == "text" and lines[0]["lyric_id"] is None and lines[0]["reason"] != "matched"
    assert lines[0]["language"] == "en"  # the retries found nothing better: report the language given


def test_lyrics_match_jsonl_answers_every_line_in_order(cli_index_dir, db_rows, tmp_path, capsys):
    es = next(r for r in db_rows if r["language"] == "es" and r["lyric_id"].startswith("lyr"))
    en = next(r for r in db_rows if r["language"] == "en" and r["lyric_id"].startswith("lyr"))
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join([
        json.dumps({"id": "es", "text": " ".join(sung_lines(es["lyrics"])), "language": "es"}, ensure_ascii=False),
        "{not json",
        json.dumps({"id": "no-text", "language": "en"}),
        json.dumps({"id": 7, "text": "seven tired sailors count the silver coins upon the table"}),
        json.dumps({"id": "en", "text": " ".join(sung_lines(en["lyrics"]))}),
    ]) + "\n")
    code, lines, _ = _match(capsys, "--index", str(cli_index_dir), "--jsonl", str(queries))
    assert code == 0
    assert [line["id"] for line in lines] == ["es", None, "no-text", 7, "en"]
    assert [line["lyric_id"] for line in lines] == [es["lyric_id"], None, None, None, en["lyric_id"]]
    assert lines[1]["reason"].startswith("bad_query: line 2") and lines[2]["reason"].startswith("bad_query")
    assert not lines[3]["reason"].startswith("bad_query")


def test_lyrics_match_without_an_index_says_how_to_build_one(tmp_path, capsys):
    code, lines, err = _match(capsys, "--index", str(tmp_path / "nowhere"), "--text", "hello")
    assert code == 2 and lines == []
    assert f"no lyrics index at {tmp_path / 'nowhere'}" in err and "acepipe lyrics index" in err
    assert "Traceback" not in err


def test_lyrics_match_refuses_an_index_built_with_other_params(cli_index_dir, capsys):
    code, lines, err = _match(capsys, "--index", str(cli_index_dir), "--text", "hello",
                              "--set", "lyrics.num_perm=64")
    assert code == 2 and lines == []
    assert "stale" in err and "num_perm" in err and "shingle_k" not in err


def test_lyrics_match_refuses_an_index_of_another_format_version(cli_index_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(cli_index_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "version": "0"}))
    code, _, err = _match(capsys, "--index", str(old), "--text", "hello")
    assert code == 2 and "stale" in err and "version" in err


def test_lyrics_match_notices_a_changed_database(synth_corpus, db_rows, tmp_path, capsys):
    db = tmp_path / "lyrics.parquet"
    shutil.copy(synth_corpus / "lyrics.parquet", db)
    _index(str(db), tmp_path / "idx")
    text = db_rows[0]["lyrics"]
    assert _match(capsys, "--index", str(tmp_path / "idx"), "--text", text)[0] == 0

    table = pq.read_table(db)
    edited = [{**r, "lyrics": r["lyrics"] + "\none more line"} if i == 0 else r
              for i, r in enumerate(table.to_pylist())]
    pq.write_table(pa.Table.from_pylist(edited, schema=table.schema), db)
    code, lines, err = _match(capsys, "--index", str(tmp_path / "idx"), "--text", text)
    assert code == 2 and lines == [] and "stale" in err and str(db) in err

    db.unlink()  # a database that is gone cannot be checked: the index still answers, with a warning
    code, lines, err = _match(capsys, "--index", str(tmp_path / "idx"), "--text", text)
    assert code == 0 and lines[0]["lyric_id"] == db_rows[0]["lyric_id"] and "no longer exists" in err


def test_lyrics_match_warns_on_an_index_without_its_source_record(cli_index_dir, db_rows, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(cli_index_dir, old)
    (old / "source.json").unlink()  # as `lyrics index` wrote it before it recorded its database
    code, lines, err = _match(capsys, "--index", str(old), "--text", db_rows[0]["lyrics"])
    assert code == 0 and lines[0]["lyric_id"] == db_rows[0]["lyric_id"]
    assert "warning" in err and "source.json" in err
