"""Pack appends (tasks/pack_append.py): an increment of new, changed and departed tracks leaves
every existing audio shard and latent shard byte-identical, tombstones what left, and the
trainer's DataModule reads every live sample and no tombstoned one; --rebuild compacts; a
killed append leaves the previous pack intact; a stage key change whose outputs are equal
rewrites nothing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from pack_fixtures import build_work, tiny_config, write_stages  # noqa: E402

from tasks.ingest import ingest  # noqa: E402
from tasks.overrides import set_override  # noqa: E402
from tasks.pack import pack  # noqa: E402
from tasks.store import StageStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NEW_TRACKS = 3


def files_under(directory: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(pattern))}


def snapshot(store: StageStore) -> dict[str, dict[str, bytes]]:
    shards, latents = Path(store.path("shards", "default")), Path(store.path("latents", "default"))
    return {"audio": files_under(shards, "shard-*.tar"), "latents": files_under(latents, "shard-*.tar"),
            "records": files_under(latents / "records", "*.parquet")}


def encode_latents(cfg) -> dict:
    """The latents stage over dataset default, shard by shard (what the flow's tasks call)."""
    from tasks.latents import encode_shard, plan, prepare, write_index

    store = StageStore(cfg.work_root)
    the_plan = plan(cfg, "default", store)
    current = prepare(cfg, the_plan, store)
    results = [encode_shard(cfg, "default", s, store) for s in the_plan["shards"]]
    return write_index(cfg, the_plan, results, store, current)


def write_new_songs(directory: Path, n: int) -> None:
    directory.mkdir()
    rng = np.random.default_rng(7)
    t = np.arange(int(2.5 * 44100)) / 44100
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(directory / f"new-{i}.wav", np.stack([tone, tone * 0.8], axis=1), 44100)


def grow(cfg, root: Path) -> None:
    """New files ingested into new partitions and their stage outputs written."""
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(root / "audio"), str(root / "new")])
    write_stages(cfg, store, store.catalog_partitions())


def index_rows(store: StageStore) -> list[dict]:
    return pq.read_table(store.path("shards", "default", "index.parquet")).to_pylist()


def manifest_rows(store: StageStore) -> list[dict]:
    return pq.read_table(store.path("manifest", "default.parquet")).to_pylist()


@pytest.fixture(scope="module")
def grown(tmp_path_factory, synth_corpus, tiny_models_dir):
    root = tmp_path_factory.mktemp("append")
    cfg = build_work(root, synth_corpus, tiny_models_dir, "device=cpu")
    store = StageStore(cfg.work_root)
    first = pack(cfg)
    assert first["mode"] == "full" and first["shards"] >= 3
    first_latents = encode_latents(cfg)
    before = snapshot(store)
    old_manifest = manifest_rows(store)

    # The increment: new files, one track corrected by a person, one filtered out.
    write_new_songs(root / "new", NEW_TRACKS)
    grow(cfg, root)
    changed, gone = old_manifest[1]["track_id"], old_manifest[-2]["track_id"]
    set_override(store, "default", changed, "caption", "a corrected caption", who="test")
    set_override(store, "default", gone, "pq", 1.0, who="test")
    cfg = tiny_config(Path(cfg.work_root), Path(cfg.models.tiny_dir), Path(cfg.lyrics_db), "device=cpu",
                      "pack.filter.min_pq=1.5")   # the synthetic pq lie in [2, 9]: only `gone` falls
    second = pack(cfg)
    second_latents = encode_latents(cfg)
    return SimpleNamespace(root=root, cfg=cfg, store=store, first=first, second=second, before=before,
                           after=snapshot(store), old_manifest=old_manifest, changed=changed, gone=gone,
                           first_latents=first_latents, second_latents=second_latents)


def test_an_increment_leaves_old_shards_and_latents_byte_identical(grown):
    before, after = grown.before, grown.after
    for kind in ("audio", "latents", "records"):
        assert {name: after[kind][name] for name in before[kind]} == before[kind], kind
    new = sorted(set(after["audio"]) - set(before["audio"]))
    assert new and min(new) > max(before["audio"])           # numbered after the last shard
    assert sorted(set(after["latents"]) - set(before["latents"])) == new
    assert grown.second["mode"] == "append" and grown.second["new_shards"] == new
    assert grown.second["appended"] == NEW_TRACKS + 1         # the new songs and the changed track
    assert grown.second["removed_now"] == 2                   # the changed track's old sample, the filtered one
    assert grown.second_latents["shards_run"] == len(new)     # only the new shards were encoded
    assert grown.second_latents["shards_skipped"] == len(before["latents"])
    new_bytes = sum(len(after["audio"][n]) for n in new)
    assert new_bytes < sum(len(b) for b in before["audio"].values())


def test_tombstones_say_why_and_the_manifest_lists_live_samples_once(grown):
    rows = index_rows(grown.store)
    removed = {r["track_id"]: r for r in rows if r["removed"] is not None}
    assert set(removed) == {grown.changed, grown.gone}
    live = [r for r in rows if r["removed"] is None]
    new_copy = next(r for r in live if r["track_id"] == grown.changed)
    assert removed[grown.changed]["removed"].startswith("changed: ")
    assert new_copy["shard"] in removed[grown.changed]["removed"] and new_copy["shard"] in grown.second["new_shards"]
    assert removed[grown.gone]["removed"].startswith("filtered: pq 1.00 < pack.filter.min_pq 1.5")

    manifest = manifest_rows(grown.store)
    assert sorted((m["shard"], m["track_id"]) for m in manifest) == sorted((r["shard"], r["track_id"]) for r in live)
    assert len({m["track_id"] for m in manifest}) == len(manifest) == grown.second["packed"]
    by_id = {m["track_id"]: m for m in manifest}
    assert by_id[grown.changed]["caption"] == "a corrected caption" and by_id[grown.changed]["overridden"] == ["caption"]
    assert grown.gone not in by_id
    old = {m["track_id"] for m in grown.old_manifest}
    assert len(set(by_id) - old) == NEW_TRACKS and old - set(by_id) == {grown.gone}

    latent_index = pq.read_table(Path(grown.store.path("latents", "default")) / "index.parquet").to_pylist()
    assert sorted((r["shard"], r["track_id"]) for r in latent_index) == \
        sorted((r["shard"], r["track_id"]) for r in live)


def test_the_datamodule_reads_every_live_sample_and_no_removed_one(grown):
    from model.data import LatentDataModule
    from model.lyric_encoder import load_lyric_tokenizer
    from schemas.train import load_train_config

    out = grown.store.path("latents", "default")
    tcfg = load_train_config("tiny", [f"data.shards={out}", f"tiny_dir={grown.cfg.models.tiny_dir}",
                                      "data.num_workers=0", "data.batch_size=2"])
    dm = LatentDataModule(tcfg, load_lyric_tokenizer(tcfg.lyric_encoder.tokenizer, tcfg.tiny_dir))
    dm.setup("fit")
    live = {m["track_id"] for m in manifest_rows(grown.store)}
    seen: dict[str, set[str]] = {}
    for s in dm.val_samples:
        seen.setdefault(s["track_id"], set()).add(s["prompt"])
    batches = iter(dm.train_dataloader())
    for _ in range(400):
        if set(seen) == live:
            break
        batch = next(batches)
        for track_id, prompt in zip(batch["track_id"], batch["prompt"]):
            seen.setdefault(track_id, set()).add(prompt)
    assert set(seen) == live                                  # old and new samples alike
    assert grown.gone not in seen
    assert all("a corrected caption" in p for p in seen[grown.changed])   # never its tombstoned sample


def test_an_unchanged_rerun_skips(grown):
    summary = pack(grown.cfg)
    assert summary["mode"] == "skip" and summary["skipped"] is True
    assert summary["packed"] == grown.second["packed"] and summary["tombstoned"] == 2
    assert snapshot(grown.store)["audio"] == grown.after["audio"]


def copy_root(grown, dest: Path):
    shutil.copytree(grown.root / "work", dest / "work", ignore=shutil.ignore_patterns(".lock-*"))
    return grown.cfg.model_copy(update={"work_root": str(dest / "work")})


def test_rebuild_compacts_in_track_id_order(grown, tmp_path):
    cfg = copy_root(grown, tmp_path)
    store = StageStore(cfg.work_root)
    summary = pack(cfg, rebuild=True)
    assert summary["mode"] == "full" and summary["tombstoned"] == 0
    rows = index_rows(store)
    assert all(r["removed"] is None for r in rows)
    assert [r["track_id"] for r in rows] == sorted(m["track_id"] for m in manifest_rows(grown.store))
    assert sorted({r["shard"] for r in rows})[0] == "shard-000000.tar"
    on_disk = sorted(p.name for p in Path(store.path("shards", "default")).glob("shard-*.tar"))
    assert on_disk == sorted({r["shard"] for r in rows})       # no shard of the appends is left


def test_a_stage_key_change_with_equal_outputs_rewrites_nothing(grown, tmp_path):
    cfg = copy_root(grown, tmp_path)
    store = StageStore(cfg.work_root)
    bumped = tiny_config(Path(cfg.work_root), Path(cfg.models.tiny_dir), Path(cfg.lyrics_db), "device=cpu",
                         "pack.filter.min_pq=1.5", "rhythm.cross_check=none")
    waiting = pack(bumped)   # rhythm and caption outputs are missing under the new keys
    assert waiting["stage_missing"] > 0 and waiting["mode"] == "append"
    assert waiting["appended"] == 0 and waiting["removed_now"] == 0 and waiting["packed"] == grown.second["packed"]
    write_stages(bumped, store, store.catalog_partitions())   # curate catches up: the same values
    done = pack(bumped)
    assert done["stage_missing"] == 0 and done["appended"] == 0 and done["removed_now"] == 0
    assert snapshot(store)["audio"] == grown.after["audio"]


KILLER = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
from schemas.config import Config
from tasks import pack, shards

original = shards.ShardWriter.add
def add(self, key, files):
    shard = original(self, key, files)
    self._fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)   # one sample into the first appended shard
shards.ShardWriter.add = add
cfg = Config.model_validate_json(open({cfg!r}).read())
pack.pack(cfg, "default")
"""


def test_a_killed_append_leaves_the_previous_pack_whole(tmp_path, synth_corpus, tiny_models_dir):
    root = tmp_path / "root"
    root.mkdir()
    cfg = build_work(root, synth_corpus, tiny_models_dir, "device=cpu")
    store = StageStore(cfg.work_root)
    pack(cfg)
    before_index, before_audio = index_rows(store), snapshot(store)["audio"]
    write_new_songs(root / "new", NEW_TRACKS)
    grow(cfg, root)
    shutil.copytree(cfg.work_root, tmp_path / "clean")   # the same state, appended without a kill
    clean = StageStore(str(tmp_path / "clean"))
    pack(cfg.model_copy(update={"work_root": str(tmp_path / "clean")}))

    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    proc = subprocess.run([sys.executable, "-c", KILLER.format(repo=str(REPO), cfg=str(tmp_path / "cfg.json"))],
                          cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    shard_dir = Path(store.path("shards", "default"))
    assert list(shard_dir.glob(".tmp-*")), "the kill did not land mid-shard"
    assert index_rows(store) == before_index and snapshot(store)["audio"] == before_audio

    summary = pack(cfg)   # the rerun cleans up and appends what a run that was not killed appends
    assert summary["mode"] == "append" and summary["appended"] == NEW_TRACKS
    assert not list(shard_dir.glob(".tmp-*")) and not list(Path(store.root).glob(".lock-*"))
    assert snapshot(store)["audio"] == snapshot(clean)["audio"]
    assert index_rows(store) == index_rows(clean) and manifest_rows(store) != []
    assert len(index_rows(store)) == len(before_index) + NEW_TRACKS


def test_unchanged_partitions_are_carried_over_unread_and_give_what_a_full_read_gives(tmp_path, synth_corpus,
                                                                                       tiny_models_dir):
    root = tmp_path / "root"
    root.mkdir()
    cfg = build_work(root, synth_corpus, tiny_models_dir, "device=cpu", "pack.filter.min_pq=5")   # pq in [2, 9]
    store = StageStore(cfg.work_root)
    assert pack(cfg)["reasons"].get("filtered", 0) >= 2   # old partitions have rejects to carry
    old_partitions = store.catalog_partitions()
    write_new_songs(root / "new", NEW_TRACKS)
    grow(cfg, root)
    shutil.copytree(cfg.work_root, tmp_path / "touched")
    touched = StageStore(str(tmp_path / "touched"))
    for path in Path(touched.root).glob("stages/*/*/part-*.parquet"):   # rewritten with the same bytes
        path.touch()

    carried = pack(cfg)
    read_all = pack(cfg.model_copy(update={"work_root": touched.root}))
    assert carried["carried_partitions"] == len(old_partitions) and read_all["carried_partitions"] == 0
    assert carried["appended"] == read_all["appended"] >= 1
    for key in ("packed", "rejected", "reasons", "catalog_tracks", "not_ok_upstream", "stage_missing", "bytes"):
        assert carried[key] == read_all[key], key
    by_id = lambda rows: sorted(rows, key=lambda r: (r["track_id"], r["shard"]))  # noqa: E731
    assert by_id(manifest_rows(store)) == by_id(manifest_rows(touched))
    assert index_rows(store) == index_rows(touched)
    rejects = [pq.read_table(s.path("shards", "default", "rejects.parquet")).to_pylist() for s in (store, touched)]
    assert rejects[0] == rejects[1] and all(r["partition"] is not None for r in rejects[0])
    assert pack(cfg)["mode"] == "skip"
