"""The `acepipe synth` and `acepipe tiny-models` commands, as the README runs them.

`acepipe inspect` has its own file (tests/test_inspect.py); generate_corpus itself is
tests/test_synth.py's; here is what the command line adds: directories created, the line it
prints, reproducibility through the command, and the twins building, loading and staying built."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from tasks.models import TINY_BUILDERS
from tasks.synth_lyrics import SONG_LYRICS

N = 3   # songs 0-2: a FLAC with vocals, an 8 kHz WAV instrumental, an OGG with vocals


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def files_under(root) -> dict[bytes, str]:
    """relative path (bytes: one name is not UTF-8) -> sha256 of every file under root."""
    root = os.fsencode(root)
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def listed_file(row: dict) -> bytes:
    return bytes.fromhex(row["file_hex"]) if "file_hex" in row else row["file"].encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """`acepipe synth <missing parent>/synth --n 3 --seed 0`: its directory and printed line."""
    out = tmp_path_factory.mktemp("cli") / "data" / "synth"
    with contextlib.redirect_stdout(io.StringIO()) as printed:   # capsys is per test; this runs once
        rc = main(["synth", str(out), "--n", str(N), "--seed", "0"])
    return {"dir": out, "rc": rc, "printed": printed.getvalue(),
            "truth": json.loads((out / "ground_truth.json").read_text())}


# ---- acepipe synth --------------------------------------------------------------------------

def test_synth_ground_truth_lists_exactly_the_audio_files_written(corpus):
    out, truth = corpus["dir"], corpus["truth"]
    on_disk = set(files_under(out / "audio"))
    assert {listed_file(s)[len(b"audio/"):] for s in truth["songs"]} == on_disk
    assert set(files_under(out)) == {b"ground_truth.json", b"lyrics.parquet"} | {b"audio/" + f for f in on_disk}
    songs = sorted(os.path.basename(s["file"])[:8] for s in truth["songs"] if s["kind"] == "song")
    assert songs == [f"song-{i:03d}" for i in range(N)]
    assert (truth["n"], truth["seed"]) == (N, 0)
    bad = sum(1 for f in on_disk if f.startswith(b"bad/"))
    assert corpus["rc"] == 0
    assert corpus["printed"] == (f"wrote {len(on_disk)} files ({bad} deliberately bad) "
                                 f"and the lyrics database to {out}\n")


def test_synth_same_seed_same_bytes_other_seed_other_songs(corpus, tmp_path, capsys):
    assert cli(capsys, "synth", tmp_path / "again", "--n", N, "--seed", 0)[0] == 0
    assert files_under(tmp_path / "again") == files_under(corpus["dir"])
    assert cli(capsys, "synth", tmp_path / "other", "--n", N, "--seed", 1)[0] == 0
    first, other = files_under(corpus["dir"]), files_under(tmp_path / "other")
    songs = [listed_file(s) for s in corpus["truth"]["songs"] if s["kind"] == "song"]
    assert len(songs) == N and all(first[f] != other[f] for f in songs)


def test_synth_again_into_its_own_directory_replaces_the_corpus_and_refuses_foreign_ones(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli(capsys, "synth", out, "--n", N, "--seed", 0)[0] == 0
    assert cli(capsys, "synth", out, "--n", 1, "--seed", 0)[0] == 0   # a smaller corpus over a larger one
    truth = json.loads((out / "ground_truth.json").read_text())
    listed = {listed_file(s) for s in truth["songs"]}
    on_disk = {b"audio/" + f for f in files_under(out / "audio")}
    assert on_disk == listed                          # no song of the first corpus is left over
    foreign = tmp_path / "mine"
    (foreign / "audio").mkdir(parents=True)
    (foreign / "audio" / "keep.flac").write_bytes(b"someone's file")
    rc = main(["synth", str(foreign), "--n", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a synthetic corpus" in err
    assert (foreign / "audio" / "keep.flac").read_bytes() == b"someone's file"


def test_synth_lyrics_database_holds_the_words_each_song_sings(corpus):
    truth = corpus["truth"]
    db = pq.read_table(corpus["dir"] / "lyrics.parquet").to_pylist()
    by_id = {r["lyric_id"]: r for r in db}
    assert len(by_id) == len(db)                      # lyric ids are unique
    sung = {s["lyric_id"]: s for s in truth["songs"] if s["lyric_id"]}
    if shutil.which("espeak-ng"):
        assert len(sung) == 2                         # songs 0 and 2 sing; 1 is instrumental
    assert {i for i in by_id if i.startswith("lyr-")} == set(sung)
    for lyric_id, song in sung.items():
        text = SONG_LYRICS[int(lyric_id[len("lyr-"):])]
        assert by_id[lyric_id]["lyrics"] == text.lyrics
        assert by_id[lyric_id]["language"] == song["language"] == text.language
        assert song["vocals"] is True
    assert all(s["vocals"] is False for s in truth["songs"] if s["kind"] == "song" and not s["lyric_id"])


# ---- acepipe tiny-models --------------------------------------------------------------------

def file_stats(root) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime_ns, inode) of every file under root."""
    return {os.path.relpath(os.path.join(d, f), root): (os.stat(os.path.join(d, f)).st_mtime_ns,
                                                         os.stat(os.path.join(d, f)).st_ino)
            for d, _, fs in os.walk(root) for f in fs}


def same_weights(loaded: dict, saved: dict, prefix: str = "") -> bool:
    return (set(loaded) == {k[len(prefix):] for k in saved}
            and all(torch.equal(loaded[k], saved[prefix + k]) for k in loaded))


def test_tiny_models_builds_every_twin_and_the_stage_loaders_read_them(tiny_models_dir, capsys, make_cfg):
    """Into the session's twin directory: the twins the other tests build on first use are built
    here once (the fresh-directory build, skip and --force are the next test's)."""
    from safetensors.torch import load_file

    from tasks import aesthetics, beat_model, transcribe
    from tasks.latents_models import load_dcae, load_ssl

    tiny = tiny_models_dir
    rc, out = cli(capsys, "tiny-models", tiny)
    assert rc == 0 and out.splitlines() == [str(tiny / name) for name in TINY_BUILDERS]
    assert set(TINY_BUILDERS) <= set(os.listdir(tiny))
    assert not [n for n in os.listdir(tiny) if n.startswith(".tmp-")]   # no half-built twin left behind
    for name in TINY_BUILDERS:
        assert any(os.path.getsize(os.path.join(d, f)) > 0 for d, _, fs in os.walk(tiny / name) for f in fs), name
    built = file_stats(tiny)

    # each loads through the code its stage uses, with the weights the builder saved (not a fresh init)
    model = aesthetics.load_model(str(tiny / "aesthetics"))
    saved = torch.load(tiny / "aesthetics" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert same_weights(model.state_dict(), saved["state_dict"], prefix="model.")
    model = transcribe.load_model(str(tiny / "whisper"))
    saved = torch.load(tiny / "whisper" / "model.pt", map_location="cpu", weights_only=False)
    assert (model.dims.n_audio_state, model.dims.n_audio_layer, model.dims.n_vocab) == (64, 2, 51865)
    assert same_weights(model.state_dict(), saved["model_state_dict"])
    model = beat_model.load_model(str(tiny / "beat_this"))
    saved = torch.load(tiny / "beat_this" / "beat_this-tiny.ckpt", map_location="cpu", weights_only=False)
    assert same_weights(model.state_dict(), saved["state_dict"], prefix="model.")

    cfg = make_cfg().latents
    dcae = load_dcae(cfg, tiny)
    assert (dcae.dcae.config.in_channels, dcae.dcae.config.latent_channels) == (2, 8)
    saved = load_file(tiny / "dcae" / "music_dcae_f8c8" / "diffusion_pytorch_model.safetensors")
    assert same_weights(dcae.dcae.state_dict(), saved)
    for name, rate in (("mhubert", 16000), ("mert", 24000)):   # the rates the profile's comments give
        ssl = load_ssl(name, getattr(cfg, name), tiny)
        assert ssl.sample_rate == rate
        assert same_weights(ssl.model.state_dict(), load_file(tiny / name / "model.safetensors"))
    assert file_stats(tiny) == built        # loading a `tiny:` reference found the twin: nothing rebuilt


def test_tiny_models_named_twins_only_a_second_call_keeps_them_and_force_rebuilds(tmp_path, capsys):
    from tasks import beat_model

    tiny = tmp_path / "tiny-models"
    names = ["beat_this", "lyric_tokenizer"]     # two cheap twins
    rc, out = cli(capsys, "tiny-models", tiny, *names)
    assert rc == 0 and out.splitlines() == [str(tiny / n) for n in names]
    assert sorted(os.listdir(tiny)) == names     # the named ones only, no temporary directory left
    old_ns = 1_000_000_000 * 10**9      # 2001: any rebuild writes a later mtime
    for d, _, fs in os.walk(tiny):
        for f in fs:
            os.utime(os.path.join(d, f), ns=(old_ns, old_ns))
    before = file_stats(tiny)
    weights = beat_model.load_checkpoint(str(tiny / "beat_this"))["state_dict"]

    rc, out = cli(capsys, "tiny-models", tiny, *names)
    assert rc == 0 and out.splitlines() == [str(tiny / n) for n in names]
    assert file_stats(tiny) == before

    rc, out = cli(capsys, "tiny-models", tiny, "beat_this", "--force")
    after = file_stats(tiny)
    assert rc == 0 and out.splitlines() == [str(tiny / "beat_this")]
    rebuilt = {p for p in after if p.startswith("beat_this")}
    assert rebuilt == {p for p in before if p.startswith("beat_this")}
    assert all(after[p][0] > old_ns for p in rebuilt)
    assert all(after[p] == before[p] for p in after if p not in rebuilt)   # the tokenizer is left alone
    # the rebuilt twin is the same seeded twin: same weights as before
    assert same_weights(beat_model.load_checkpoint(str(tiny / "beat_this"))["state_dict"], weights)


def test_tiny_models_with_an_unknown_name_builds_nothing_and_says_which(tmp_path, capsys):
    rc = main(["tiny-models", str(tmp_path / "twins"), "aesthetics", "nosuch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("acepipe: error: no tiny twin named 'nosuch'; known: ")
    assert all(name in err[0] for name in TINY_BUILDERS)
    assert not (tmp_path / "twins").exists() or not any((tmp_path / "twins").iterdir())
