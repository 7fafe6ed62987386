"""The export stage on a packed work root (ingest + probe on the synthetic corpus, the other stages'
outputs written into the store, then pack): each format read back the way its trainer reads it,
a damaged shard and an undecodable sample turned into rejects, a manifest with and without the
issue 15 columns, re-exports, the flow, the deployment and the CLI."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pack_fixtures import build_work, fixture_overrides, tiny_config  # noqa: E402

from schemas.common import reason_code  # noqa: E402
from schemas.export import JSONL_FIELDS  # noqa: E402
from tasks.export import export  # noqa: E402
from tasks.pack import pack  # noqa: E402
from tasks.shards import ShardWriter  # noqa: E402
from tasks.store import StageStore, StoreError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECAPTION = ("simplified", "expanded", "descriptive", "synonyms", "use_cases")
# Columns issue 15 adds to the manifest: a manifest written before them must still export.
NEW_COLUMNS = ("recaption", "lyrics_lines", "meter", "bpm_confidence", "key_confidence", "language_prob",
               "caption_finish_reason", "overridden")


@pytest.fixture(scope="module")
def packed(tmp_path_factory, synth_corpus, tiny_models_dir):
    root = tmp_path_factory.mktemp("export")
    cfg = build_work(root, synth_corpus, tiny_models_dir)
    summary = pack(cfg)
    assert summary["shards"] >= 2
    store = StageStore(cfg.work_root)
    manifest = pq.read_table(store.path("manifest", "default.parquet")).to_pylist()
    index = pq.read_table(store.path("shards", "default", "index.parquet")).to_pylist()
    return SimpleNamespace(root=root, cfg=cfg, store=store, manifest={r["track_id"]: r for r in manifest},
                           index=index)


def copy_work(packed, tmp_path: Path):
    """A copy of the packed work root to damage; its config."""
    shutil.copytree(packed.cfg.work_root, tmp_path / "work")
    cfg = tiny_config(tmp_path / "work", Path(packed.cfg.models.tiny_dir), Path(packed.cfg.lyrics_db))
    return cfg, StageStore(cfg.work_root)


def expected_lyrics(row: dict) -> str:
    """What a trainer should get as lyrics: the canonical ones, else the transcript."""
    return row["lyrics"] or row["transcript"] or ""


def assert_audio(path: Path, row: dict) -> None:
    """The file decodes at the pack rate and lasts as long as the track."""
    audio, sr = sf.read(path, always_2d=True)
    assert sr == 44100 and audio.shape[1] == 2
    assert abs(audio.shape[0] / sr - row["duration"]) < 0.05, (path, audio.shape[0] / sr, row["duration"])


def rejects_of(out: Path) -> dict[str, str]:
    return {r["track_id"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}


# -- each format, read back as its trainer reads it -------------------------------------------------
def test_acestep_v1_loads_with_datasets_as_the_trainer_reads_it(packed, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "v1"
    summary = export(packed.cfg, "default", "acestep-v1", str(out))
    assert summary["tracks"] == len(packed.manifest) and summary["rejected"] == 0 and rejects_of(out) == {}
    ds = load_from_disk(str(out / "dataset"))          # Text2MusicDataset.setup_full
    assert len(ds) == len(packed.manifest)
    assert sorted(ds["keys"]) == sorted(packed.manifest)
    for item in ds:
        row = packed.manifest[item["keys"]]
        # Text2MusicDataset.process: tags shuffled and joined, recaption values that are non-empty
        # strings, norm_lyrics split into lines, torchaudio.load(filename).
        assert isinstance(item["tags"], list) and item["tags"] == row["tags"]
        assert isinstance(item["recaption"], dict) and set(item["recaption"]) == set(RECAPTION)
        assert all(isinstance(v, str) for v in item["recaption"].values())
        assert item["norm_lyrics"] == expected_lyrics(row)
        assert item["speaker_emb_path"] == ""
        filename = Path(item["filename"])
        assert filename.is_absolute() and filename.parent == out / "data"
        assert_audio(filename, row)
        # The data folder convert2hf_dataset.py reads: <stem>_prompt.txt split on ", ", <stem>_lyrics.txt.
        stem = str(filename.with_suffix(""))
        assert Path(stem + "_prompt.txt").read_text(encoding="utf-8").strip().split(", ") == row["tags"]
        assert Path(stem + "_lyrics.txt").read_text(encoding="utf-8").strip() == expected_lyrics(row).strip()
    # ACE-Step v1 pins datasets 3.4.1, which has no `List` feature type (datasets >= 4 writes one
    # for a plain list column): every feature type recorded must be one 3.4.1 knows.
    info = json.loads((out / "dataset" / "dataset_info.json").read_text())
    types = set()

    def walk(feature):
        if isinstance(feature, dict):
            if "_type" in feature:
                types.add(feature["_type"])
            for value in feature.values():
                walk(value)

    walk(info["features"])
    assert types <= {"Value", "LargeList", "Sequence"}, types


def test_acestep_15_folder_walk_finds_every_song_with_its_files(packed, tmp_path):
    out = tmp_path / "v15"
    summary = export(packed.cfg, "default", "acestep-1.5", str(out))
    assert summary["tracks"] == len(packed.manifest) and rejects_of(out) == {}
    # ACE-Step 1.5's dataset builder: walk for audio, read <base>.caption.txt and <base>.lyrics.txt
    # (an empty file counts as none), and bpm / key / caption from the CSV files of the folder.
    audio_files = sorted(Path(root) / f for root, _, files in os.walk(out) for f in files
                         if os.path.splitext(f)[1].lower() in {".wav", ".mp3", ".flac", ".ogg", ".opus"})
    assert len(audio_files) == len(packed.manifest)
    csv_meta = {}
    with open(out / "metadata.csv", encoding="utf-8") as fh:
        dialect = csv.Sniffer().sniff(fh.read(4096), delimiters=",;\t")
        fh.seek(0)
        for line in csv.DictReader(fh, dialect=dialect):
            csv_meta[line["file"]] = line
    for path in audio_files:
        row = packed.manifest[path.stem]
        base = str(path.with_suffix(""))
        assert_audio(path, row)
        meta = json.loads(Path(base + ".json").read_text(encoding="utf-8"))
        assert Path(base + ".caption.txt").read_text(encoding="utf-8").strip() == row["caption"] == meta["caption"]
        lyrics = Path(base + ".lyrics.txt").read_text(encoding="utf-8").strip()
        if row["instrumental"] or not expected_lyrics(row):
            assert lyrics == "" and meta["is_instrumental"] and meta["lyrics"] == "[Instrumental]"
        else:
            assert lyrics == expected_lyrics(row).strip() == meta["lyrics"]
        assert meta["bpm"] == round(row["bpm"]) == int(float(csv_meta[path.name]["bpm"]))
        assert meta["keyscale"] == f"{row['key']} {row['scale']}" == csv_meta[path.name]["key"]
        assert meta["keyscale"].split()[1] in ("major", "minor")
        assert meta["language"] == row["language"] and meta["audio_path"] == str(path)
        assert meta["timesignature"] in ("", "2", "3", "4", "6")
    builder = json.loads((out / "dataset.json").read_text(encoding="utf-8"))   # the builder's load_dataset
    assert builder["metadata"]["num_samples"] == len(builder["samples"]) == len(packed.manifest)
    assert all(Path(s["audio_path"]).is_file() for s in builder["samples"])


def test_jsonl_lines_point_at_decodable_audio_with_every_label(packed, tmp_path):
    out = tmp_path / "jsonl"
    export(packed.cfg, "default", "jsonl", str(out))
    lines = [json.loads(line) for line in (out / "dataset.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(line["track_id"] for line in lines) == sorted(packed.manifest)
    for line in lines:
        row = packed.manifest[line["track_id"]]
        assert set(line) == set(JSONL_FIELDS)
        assert_audio(out / line["audio_path"], row)
        assert abs(line["duration"] - row["duration"]) < 0.05
        for field in ("caption", "tags", "bpm", "key", "scale", "language", "structure", "lyric_id"):
            assert line[field] == row[field], field
        assert line["lyrics"] == expected_lyrics(row)
        assert line["aesthetics"]["pq"] == pytest.approx(row["pq"], abs=1e-4)
        if row["lyrics_score"] is None:
            assert line["confidence"]["lyrics"] is None
        else:
            assert line["confidence"]["lyrics"] == pytest.approx(row["lyrics_score"], abs=1e-6)


# -- the issue 15 columns: carried when present, null when an older manifest lacks them ---------------
def set_manifest_columns(store: StageStore, columns: dict[str, pa.Array] | None) -> list[str]:
    """Replace the manifest's issue 15 columns with `columns` (None: drop them all); track ids in order."""
    path = store.path("manifest", "default.parquet")
    table = pq.read_table(path)
    for name in NEW_COLUMNS:
        if name in table.column_names:
            table = table.drop_columns([name])
    for name, values in (columns or {}).items():
        table = table.append_column(name, values)
    pq.write_table(table, path)
    return table["track_id"].to_pylist()


def test_recaption_lyric_lines_and_confidences_reach_every_format(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    ids = pq.read_table(store.path("manifest", "default.parquet"))["track_id"].to_pylist()
    n = len(ids)
    recaption = [{"simplified": "pop", "expanded": f"synth pop {i}", "descriptive": None, "synonyms": "",
                  "use_cases": None} for i in range(n)]
    lines = [[{"start": 1.5, "end": 3.0, "section": "verse", "text": f"line {i}"}] for i in range(n)]
    set_manifest_columns(store, {
        "recaption": pa.array(recaption, pa.struct([(k, pa.string()) for k in RECAPTION])),
        "lyrics_lines": pa.array(lines, pa.list_(pa.struct([("start", pa.float64()), ("end", pa.float64()),
                                                           ("section", pa.string()), ("text", pa.string())]))),
        "meter": pa.array([3] * n, pa.int32()), "bpm_confidence": pa.array([0.25] * n, pa.float64()),
        "key_confidence": pa.array([0.75] * n, pa.float64())})
    from datasets import load_from_disk

    export(cfg, "default", "acestep-v1", str(tmp_path / "v1"))
    for item in load_from_disk(str(tmp_path / "v1" / "dataset")):
        i = ids.index(item["keys"])
        assert item["recaption"] == {"simplified": "pop", "expanded": f"synth pop {i}", "descriptive": "",
                                     "synonyms": "", "use_cases": ""}
        # What the trainer picks from: the non-empty recaptions plus the joined tags.
        valid = [v for v in item["recaption"].values() if isinstance(v, str) and len(v) > 0]
        assert valid == ["pop", f"synth pop {i}"]
    export(cfg, "default", "jsonl", str(tmp_path / "jsonl"))
    for line in map(json.loads, (tmp_path / "jsonl" / "dataset.jsonl").read_text().splitlines()):
        i = ids.index(line["track_id"])
        assert line["lyrics_lines"] == lines[i] and line["recaption"] == recaption[i]
        assert line["meter"] == 3 and line["confidence"]["bpm"] == 0.25 and line["confidence"]["key"] == 0.75
    export(cfg, "default", "acestep-1.5", str(tmp_path / "v15"))
    for path in (tmp_path / "v15" / "data").glob("*.json"):
        assert json.loads(path.read_text())["timesignature"] == "3"


def test_a_manifest_without_the_new_columns_exports_nulls(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    set_manifest_columns(store, None)
    from datasets import load_from_disk

    assert export(cfg, "default", "acestep-v1", str(tmp_path / "v1"))["tracks"] == len(packed.manifest)
    for item in load_from_disk(str(tmp_path / "v1" / "dataset")):
        assert item["recaption"] == {k: "" for k in RECAPTION}
    export(cfg, "default", "jsonl", str(tmp_path / "jsonl"))
    for line in map(json.loads, (tmp_path / "jsonl" / "dataset.jsonl").read_text().splitlines()):
        assert line["recaption"] is None and line["lyrics_lines"] is None and line["meter"] is None
        assert line["confidence"]["bpm"] is None and line["overridden"] is None
    export(cfg, "default", "acestep-1.5", str(tmp_path / "v15"))
    assert {json.loads(p.read_text())["timesignature"] for p in (tmp_path / "v15" / "data").glob("*.json")} == {""}


def test_an_instrumental_is_exported_as_each_trainer_marks_one(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    path = store.path("manifest", "default.parquet")
    table = pq.read_table(path)
    rows = table.to_pylist()
    tid = rows[0]["track_id"]
    rows[0].update(instrumental=True, lyrics=None, lyric_id=None, transcript="")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    from datasets import load_from_disk

    export(cfg, "default", "acestep-v1", str(tmp_path / "v1"))
    item = next(i for i in load_from_disk(str(tmp_path / "v1" / "dataset")) if i["keys"] == tid)
    assert item["norm_lyrics"] == "" and (tmp_path / "v1" / "data" / f"{tid}_lyrics.txt").read_text() == ""
    export(cfg, "default", "acestep-1.5", str(tmp_path / "v15"))
    # ACE-Step 1.5's scan: an empty .lyrics.txt counts as no lyrics file, so the song stays
    # "[Instrumental]"; a file holding the word would read as sung lyrics.
    assert (tmp_path / "v15" / "data" / f"{tid}.lyrics.txt").read_text() == ""
    meta = json.loads((tmp_path / "v15" / "data" / f"{tid}.json").read_text())
    assert meta["is_instrumental"] is True and meta["lyrics"] == "[Instrumental]" and meta["raw_lyrics"] == ""
    sung = [json.loads(p.read_text()) for p in (tmp_path / "v15" / "data").glob("*.json") if p.stem != tid]
    assert sung and not any(m["is_instrumental"] for m in sung)


def test_an_override_reaches_the_export_through_pack_and_a_stale_pack_is_refused(packed, tmp_path):
    overrides = pytest.importorskip("tasks.overrides")
    cfg, store = copy_work(packed, tmp_path)
    if b"overrides" not in (pq.read_schema(store.path("manifest", "default.parquet")).metadata or {}):
        pytest.skip("this pack does not record the overrides it applied")
    tid, other = sorted(packed.manifest)[:2]
    overrides.set_override(store, "default", tid, "bpm", 97.0, "tester")
    with pytest.raises(StoreError, match="overrides of default changed since its last pack"):
        export(cfg, "default", "jsonl", str(tmp_path / "stale"))
    assert not (tmp_path / "stale").exists()
    pack(cfg)
    export(cfg, "default", "jsonl", str(tmp_path / "out"))
    lines = {line["track_id"]: line for line in
             map(json.loads, (tmp_path / "out" / "dataset.jsonl").read_text().splitlines())}
    assert lines[tid]["bpm"] == 97.0 and lines[tid]["overridden"] == ["bpm"]
    assert lines[other]["bpm"] == packed.manifest[other]["bpm"] and lines[other]["overridden"] == []


# -- what cannot be exported becomes a reject; the rest is exported ----------------------------------
def tracks_by_shard(packed) -> dict[str, list[str]]:
    shards: dict[str, list[str]] = {}
    for r in packed.index:
        shards.setdefault(r["shard"], []).append(r["track_id"])
    return shards


def test_a_damaged_and_a_missing_shard_give_rejects_and_the_rest_exports(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    shards = tracks_by_shard(packed)
    assert len(shards) >= 3
    damaged, missing = sorted(shards)[0], sorted(shards)[-1]
    path = Path(store.path("shards", "default", damaged))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF          # one byte inside the audio: same size, other bytes
    path.write_bytes(bytes(data))
    Path(store.path("shards", "default", missing)).unlink()
    out = tmp_path / "out"
    summary = export(cfg, "default", "jsonl", str(out))
    rejects = rejects_of(out)
    assert {t: reason_code(r) for t, r in rejects.items()} == \
        {**{t: "shard_damaged" for t in shards[damaged]}, **{t: "shard_missing" for t in shards[missing]}}
    assert all(damaged in rejects[t] for t in shards[damaged])
    exported = [json.loads(line)["track_id"] for line in (out / "dataset.jsonl").read_text().splitlines()]
    assert sorted(exported) == sorted(set(packed.manifest) - set(rejects))
    assert summary["tracks"] == len(exported) and summary["reasons"] == {
        "shard_damaged": len(shards[damaged]), "shard_missing": len(shards[missing])}
    # Nothing of a rejected track is left in the export (its audio was written, then taken back).
    assert sorted(p.stem for p in (out / "data").iterdir()) == sorted(exported)


def test_an_undecodable_sample_is_a_reject_and_its_shard_mates_export(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    shard = next(s for s, ids in sorted(tracks_by_shard(packed).items()) if len(ids) >= 2)
    shard_dir = store.path("shards", "default")
    members = []
    with tarfile.open(Path(shard_dir) / shard) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    broken = members[0][0].split(".")[0]
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = b"fLaC but not really audio" if (key, ext) == (broken, "flac") else data
    # The shard written again as pack writes shards, and its new size and checksum in the index:
    # a shard that is intact as a file but holds a sample that does not decode.
    scratch = Path(shard_dir) / "scratch"
    with ShardWriter(store, str(scratch), 10**12, first=int(shard[6:12])) as writer:
        for key, files in samples.items():
            writer.add(key, files)
    (scratch / shard).replace(Path(shard_dir) / shard)
    scratch.rmdir()
    size, blake2b = writer.digests[shard]
    index_path = Path(shard_dir) / "index.parquet"
    index = pq.read_table(index_path).to_pylist()
    for r in index:
        if r["shard"] == shard:
            r["shard_bytes"], r["shard_blake2b"] = size, blake2b
    pq.write_table(pa.Table.from_pylist(index, schema=pq.read_schema(index_path)), index_path)
    out = tmp_path / "out"
    summary = export(cfg, "default", "acestep-1.5", str(out))
    rejects = rejects_of(out)
    assert list(rejects) == [broken] and reason_code(rejects[broken]) == "audio_undecodable"
    assert summary["tracks"] == len(packed.manifest) - 1
    assert sorted(p.stem for p in (out / "data").glob("*.flac")) == sorted(set(packed.manifest) - {broken})


# -- the output directory ------------------------------------------------------------------------
def test_a_reexport_replaces_the_previous_output_whole(packed, tmp_path):
    out = tmp_path / "exports" / "v15"
    export(packed.cfg, "default", "acestep-1.5", str(out))
    (out / "data" / "stray.flac").write_bytes(b"left from an earlier export")
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    killed = out.parent / f".tmp-export-{'0' * 32}-v15"             # what a killed export leaves
    other = out.parent / f".tmp-export-{'0' * 32}-x-v15"            # another export's, not ours
    for d in (killed, other):
        (d / "data").mkdir(parents=True)
    export(packed.cfg, "default", "acestep-1.5", str(out))
    again = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert Path("data/stray.flac") not in again and set(again) == set(first) - {Path("data/stray.flac")}
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([other.name, "v15"])


def test_a_manifest_and_index_of_different_packs_are_refused(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    path = store.path("shards", "default", "index.parquet")
    index = pq.read_table(path)
    pq.write_table(index.replace_schema_metadata({"fingerprint": "0123456789abcdef"}), path)
    with pytest.raises(StoreError, match="different packs"):
        export(cfg, "default", "jsonl", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_export_refuses_a_directory_it_did_not_write_and_a_work_root_without_a_pack(packed, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="no acepipe export wrote"):
        export(packed.cfg, "default", "jsonl", str(foreign))
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(StoreError, match="acepipe pack --dataset other"):
        export(packed.cfg, "other", "jsonl", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_default_output_lies_under_the_work_root(packed, tmp_path):
    cfg, store = copy_work(packed, tmp_path)
    summary = export(cfg, "default", "jsonl")
    assert Path(summary["out"]) == tmp_path / "work" / "exports" / "default" / "jsonl"
    assert json.loads((Path(summary["out"]) / "export.json").read_text())["tracks"] == len(packed.manifest)


# -- the flow, its deployment and the CLI ----------------------------------------------------------
def test_the_deployment_validates_and_its_flow_runs(prefect_harness, packed, tmp_path):
    from prefect.artifacts import Artifact
    from prefect.flows import load_flow_from_entrypoint

    from flows.export import ExportParams

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["entrypoint"] == "flows/export.py:export")
    params = ExportParams.model_validate(deployment["parameters"]["params"])
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    cfg, store = copy_work(packed, tmp_path)
    shard, lost = next(iter(sorted(tracks_by_shard(packed).items())))
    Path(store.path("shards", "default", shard)).unlink()
    overrides = fixture_overrides(Path(packed.cfg.models.tiny_dir), Path(packed.cfg.lyrics_db))
    run = params.model_copy(update={"config": "tiny", "work_root": cfg.work_root, "overrides": overrides,
                                    "out": str(tmp_path / "deployed")})
    summary = flow(run.model_dump())   # as a deployment passes it: JSON, validated by the flow
    assert summary["tracks"] == len(packed.manifest) - len(lost) and summary["format"] == params.format
    assert (tmp_path / "deployed" / "export.json").is_file()
    key = f"export-default-{params.format.replace('.', '-')}"
    artifact = Artifact.get(key)
    assert artifact is not None and f"{summary['tracks']} tracks" in artifact.data
    assert "shard_missing" in artifact.data
    table = Artifact.get(f"{key}-rejects")
    assert table is not None and all(t in table.data for t in lost)


def test_cli_exports_and_says_what_to_do_without_a_pack(prefect_harness, packed, tmp_path, capsys):
    from flows.cli import main

    overrides = [a for o in fixture_overrides(Path(packed.cfg.models.tiny_dir), Path(packed.cfg.lyrics_db))
                 for a in ("--set", o)]
    out = tmp_path / "cli"
    assert main(["export", "--config", "tiny", "--work", packed.cfg.work_root, *overrides,
                 "--format", "jsonl", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported  {len(packed.manifest)} tracks" in printed and str(out) in printed
    assert len((out / "dataset.jsonl").read_text().splitlines()) == len(packed.manifest)
    assert main(["export", "--config", "tiny", "--work", str(tmp_path / "empty"), *overrides,
                 "--format", "jsonl", "--out", str(tmp_path / "none")]) == 2
    assert "acepipe pack" in capsys.readouterr().err


def test_audio_comes_from_the_shards_not_the_sources(packed, tmp_path):
    """The exported FLAC is the packed sample's bytes (not a new decode of the source)."""
    cfg, store = copy_work(packed, tmp_path)
    out = tmp_path / "out"
    export(cfg, "default", "jsonl", str(out))
    track = packed.index[0]
    with tarfile.open(Path(store.path("shards", "default", track["shard"]))) as tar:
        flac = tar.extractfile(f"{track['track_id']}.flac").read()
    assert (out / "data" / f"{track['track_id']}.flac").read_bytes() == flac
    assert sf.info(io.BytesIO(flac)).samplerate == 44100
