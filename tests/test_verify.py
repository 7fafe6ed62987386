"""acepipe verify on a real work root (ingest + probe on the synthetic corpus, the other stages
written into the store, pack, latents): a clean root passes; a damaged stage output, catalog
partition, seen memo, shard and latent shard are each reported, --repair moves them aside, and
after the step that wrote each runs again the root equals the clean one (shard bytes, tables)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pack_fixtures import build_work, fixture_overrides, tiny_config, write_stages  # noqa: E402

from tasks.ingest import ingest  # noqa: E402
from tasks.latents import encode_shard, plan, prepare, write_index  # noqa: E402
from tasks.pack import pack  # noqa: E402
from tasks.stage import dag_order, stage_keys  # noqa: E402
from tasks.store import StageStore  # noqa: E402

# Latents without the REPA encoders: the latent shards are what is checked here, not the features.
EXTRA = ("device=cpu", "latents.mert.enabled=false", "latents.mhubert.enabled=false")


def run_latents(cfg, store: StageStore) -> dict:
    """What the latents flow runs: plan, prepare, one encode per shard, the index."""
    the_plan = plan(cfg, "default", store)
    current = prepare(cfg, the_plan, store)
    results = [encode_shard(cfg, "default", s, store) for s in the_plan["shards"]]
    return write_index(cfg, the_plan, results, store, index_current=current)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_corpus, tiny_models_dir):
    """A clean work root (kept untouched) that each test copies and damages."""
    root = tmp_path_factory.mktemp("verify")
    cfg = build_work(root, synth_corpus, tiny_models_dir, *EXTRA)
    store = StageStore(cfg.work_root)
    assert pack(cfg)["shards"] >= 2
    assert run_latents(cfg, store)["shards"] >= 2
    return SimpleNamespace(root=root, cfg=cfg, work=Path(cfg.work_root))


@pytest.fixture
def damaged(reference, tmp_path):
    """A copy of the reference work root (its catalog points at the same audio)."""
    work = tmp_path / "work"
    shutil.copytree(reference.work, work)
    cfg = tiny_config(work, Path(reference.cfg.models.tiny_dir), Path(reference.cfg.lyrics_db), *EXTRA)
    return SimpleNamespace(work=work, cfg=cfg, store=StageStore(cfg.work_root))


def verify(cfg, capsys, *flags: str) -> tuple[int, list[str]]:
    from flows.cli import main

    argv = ["verify", *flags, "--config", "tiny", "--work", cfg.work_root]
    for o in [*fixture_overrides(Path(cfg.models.tiny_dir), Path(cfg.lyrics_db)), *EXTRA]:
        argv += ["--set", o]
    rc = main(argv)
    return rc, capsys.readouterr().out.splitlines()


def line_of(lines: list[str], path: str) -> str:
    found = [line for line in lines if f" {path}: " in line]
    assert len(found) == 1, (path, lines)
    return found[0]


def flip_a_page_byte(path: Path) -> None:
    """Change one byte inside a data page: the footer still reads, only the page checksum tells."""
    meta = pq.read_metadata(path).row_group(0).column(0)
    data = bytearray(path.read_bytes())
    data[meta.data_page_offset + meta.total_compressed_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_a_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def same_files(a: Path, b: Path, pattern: str) -> None:
    names = sorted(p.relative_to(a) for p in a.glob(pattern))
    assert names and names == sorted(p.relative_to(b) for p in b.glob(pattern)), pattern
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def same_tables(a: Path, b: Path, pattern: str) -> None:
    names = sorted(p.relative_to(a) for p in a.glob(pattern))
    assert names and names == sorted(p.relative_to(b) for p in b.glob(pattern)), pattern
    for name in names:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name


def test_a_clean_work_root_passes(reference, capsys):
    rc, lines = verify(reference.cfg, capsys)
    assert rc == 0 and len(lines) == 1 and "no problems" in lines[0], lines
    assert "files checked" in lines[0]


def test_a_shard_and_a_latent_shard_are_repaired(reference, damaged, capsys):
    truncate(damaged.work / "shards/default/shard-000001.tar")
    flip_a_middle_byte(damaged.work / "latents/default/shard-000000.tar")   # same size: only the checksum

    rc, lines = verify(damaged.cfg, capsys)
    assert rc == 1 and "2 problem(s), 0 repaired, 2 left (run with --repair)" in lines[-1], lines
    assert "the index recorded" in line_of(lines, "shards/default/shard-000001.tar")
    latent = line_of(lines, "latents/default/shard-000000.tar")
    assert latent.startswith("problem") and "blake2b" in latent and "acepipe latents" in latent

    rc, lines = verify(damaged.cfg, capsys, "--repair")
    assert rc == 0 and "2 problem(s), 2 repaired, 0 left" in lines[-1], lines
    assert "pack wrote shard-000001.tar again" in line_of(lines, "shards/default/shard-000001.tar")
    same_files(damaged.work, reference.work, "shards/default/shard-*.tar")       # rewritten alone, same bytes
    assert not (damaged.work / "latents/default/shard-000000.tar").exists()
    assert not (damaged.work / "latents/default/records/shard-000000.parquet").exists()
    assert list((damaged.work / "quarantine/latents/default").glob("shard-000000.tar.*"))

    summary = run_latents(damaged.cfg, damaged.store)                           # `acepipe latents` again
    assert summary["shards_run"] == 1 and summary["index_unchanged"] is True
    same_files(damaged.work, reference.work, "latents/default/shard-*.tar")
    same_tables(damaged.work, reference.work, "latents/default/**/*.parquet")
    rc, lines = verify(damaged.cfg, capsys)
    assert rc == 0 and "no problems" in lines[-1], lines


def test_a_damaged_stage_output_is_quarantined_and_a_pack_waits_for_curate(reference, damaged, capsys):
    keys = stage_keys(damaged.cfg, dag_order(damaged.cfg.stages))
    stage_rel = f"stages/probe/{keys['probe']}/part-00001.parquet"
    flip_a_page_byte(damaged.work / stage_rel)
    assert damaged.store.unreadable(str(damaged.work / stage_rel)) is None   # the footer reads
    truncate(damaged.work / "shards/default/shard-000000.tar")

    rc, lines = verify(damaged.cfg, capsys)
    assert rc == 1 and "2 problem(s)" in lines[-1], lines
    assert "acepipe run" in line_of(lines, stage_rel)

    # Pack cannot write the shard again before curate recomputes what it was packed from.
    rc, lines = verify(damaged.cfg, capsys, "--repair")
    assert rc == 1 and "2 problem(s), 1 repaired, 1 left" in lines[-1], lines
    assert line_of(lines, stage_rel).startswith("repaired")
    left = line_of(lines, "shards/default/shard-000000.tar")
    assert left.startswith("left") and "not repaired" in left and "acepipe run" in left
    assert not (damaged.work / stage_rel).exists()

    write_stages(damaged.cfg, damaged.store, damaged.store.catalog_partitions())   # `acepipe run`
    same_tables(damaged.work, reference.work, "stages/**/*.parquet")
    assert pack(damaged.cfg)["rewritten"] == ["shard-000000.tar"]                  # `acepipe pack`
    same_files(damaged.work, reference.work, "shards/default/shard-*.tar")
    same_tables(damaged.work, reference.work, "manifest/*.parquet")
    rc, lines = verify(damaged.cfg, capsys)
    assert rc == 0 and "no problems" in lines[-1], lines


def test_a_damaged_catalog_partition_and_memo_are_catalogued_again(reference, damaged, capsys):
    last = damaged.store.catalog_partitions()[-1]
    part_rel = f"catalog/part-{last:05d}.parquet"
    lost = pq.read_table(reference.work / part_rel).num_rows
    truncate(damaged.work / part_rel)
    flip_a_page_byte(damaged.work / "catalog/seen.parquet")

    rc, lines = verify(damaged.cfg, capsys)
    assert rc == 1 and "2 problem(s)" in lines[-1], lines
    assert "catalogues its files again as new tracks" in line_of(lines, part_rel)
    assert "hashes every file" in line_of(lines, "catalog/seen.parquet")

    rc, lines = verify(damaged.cfg, capsys, "--repair")
    assert rc == 0 and "2 problem(s), 2 repaired, 0 left" in lines[-1], lines
    assert f"stage output(s) of partition {last}" in line_of(lines, part_rel)
    assert not (damaged.work / part_rel).exists()
    assert not list(damaged.work.glob(f"stages/*/*/part-{last:05d}.parquet"))   # not skipped as done later

    # `acepipe run`: ingest finds the partition's files new (the memo only spares a hash), then stages.
    result = ingest(damaged.cfg, damaged.store, [str(reference.root / "audio")])
    assert result.new_tracks == lost and result.new_partitions == [last]
    write_stages(damaged.cfg, damaged.store, result.new_partitions)
    same_tables(damaged.work, reference.work, "catalog/*.parquet")
    same_tables(damaged.work, reference.work, "stages/**/*.parquet")
    rc, lines = verify(damaged.cfg, capsys)
    assert rc == 0 and "no problems" in lines[-1], lines
