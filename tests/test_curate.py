"""The curate flow end to end on the synthetic corpus, under Prefect's test harness."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.curate import curate
from flows.params import RunParams
from schemas.common import reason_code
from tasks.stage import dag_order, stage_keys
from tasks.store import StageStore
from tasks.summary import track_outcomes


def run_curate(cfg_overrides: list[str], work: Path, sources: list[str], config: str = "tiny") -> dict:
    return curate(RunParams(config=config, work_root=str(work), sources=sources,
                            overrides=cfg_overrides))


@pytest.fixture
def base_overrides(tiny_models_dir, synth_corpus):
    return [f"models.tiny_dir={tiny_models_dir}", f"lyrics_db={synth_corpus / 'lyrics.parquet'}"]


@pytest.fixture(scope="module")
def clean_run(prefect_harness, synth_corpus, tiny_models_dir, tmp_path_factory):
    """One fault-free run that the fault-injection tests compare with: its summary, its work
    root (copy it before changing anything) and the rows of every stage output."""
    work = tmp_path_factory.mktemp("clean") / "work"
    summary = run_curate([f"models.tiny_dir={tiny_models_dir}", f"lyrics_db={synth_corpus / 'lyrics.parquet'}"],
                         work, [str(synth_corpus / "audio")])
    assert summary["failed_tasks"] == [] and summary["pending"] == 0, summary["stages"]
    return summary, work, stage_tables(work)


def test_every_file_is_accounted_for(clean_run, synth_corpus, base_overrides):
    truth = json.loads((synth_corpus / "ground_truth.json").read_text())
    summary, work, _ = clean_run
    assert summary["tracks"] == summary["ok"] + summary["rejected"] + summary["error"]
    assert summary["error"] == 0, summary["stages"]
    n_duplicates = sum(1 for s in truth["songs"] if s["kind"] == "duplicate")
    assert summary["found"] == len(truth["songs"])
    assert summary["tracks"] == len(truth["songs"]) - n_duplicates
    # every model stage of the tiny profile ran on the good tracks inside the flow
    rows = {s["stage"]: s for s in summary["stages"]}
    for name in ("aesthetics", "transcribe", "lyrics", "rhythm", "caption"):
        assert rows[name]["ok"] == summary["ok"] > 0, rows[name]

    from schemas.config import load_config

    cfg = load_config("tiny", [f"work_root={work}", *base_overrides], environ={})
    assert "lyrics" in cfg.stages
    store = StageStore(cfg.work_root)
    order = dag_order(cfg.stages)
    outcomes = track_outcomes(store, order, stage_keys(cfg, order), store.catalog_partitions())
    by_uri = {o["uri"]: o for o in outcomes.values()}
    root = str((synth_corpus / "audio").resolve())
    for song in truth["songs"]:
        if song["kind"] == "duplicate" or song["expect"] == "ok":
            continue
        name = song["file"].split("audio/", 1)[-1]
        outcome = by_uri.get(f"{root}/{name}")
        assert outcome is not None, f"{song['file']} is missing from the catalog"
        assert outcome["status"] == "rejected", (song["file"], outcome)
        assert reason_code(outcome["reason"]) == song["expect"], (song["file"], outcome["reason"])


def test_second_run_does_no_stage_work(clean_run, synth_corpus, tmp_path, base_overrides):
    from prefect.artifacts import Artifact

    first, clean_work, _ = clean_run
    work = tmp_path / "work"
    shutil.copytree(clean_work, work)
    assert sum(s["partitions_run"] for s in first["stages"] if s["stage"] != "ingest") > 0
    first_ingest = next(s for s in first["stages"] if s["stage"] == "ingest")
    assert first_ingest["seconds"] > 0 and first_ingest["rejected"] > 0
    second = run_curate(base_overrides, work, [str(synth_corpus / "audio")])
    stage_rows = [s for s in second["stages"] if s["stage"] != "ingest"]
    assert all(s["partitions_run"] == 0 for s in stage_rows), stage_rows
    assert second["new_tracks"] == 0
    assert (second["ok"], second["rejected"]) == (first["ok"], first["rejected"])

    # The rerun did no ingest work, yet its ingest row still explains every catalog track.
    ingest_row = next(s for s in second["stages"] if s["stage"] == "ingest")
    assert ingest_row["rejected"] == 0 and ingest_row["total_rejected"] == first_ingest["rejected"]
    assert ingest_row["total_ok"] + ingest_row["total_rejected"] + ingest_row["total_error"] == second["tracks"]
    truth = json.loads((synth_corpus / "ground_truth.json").read_text())
    assert second["tracks"] == sum(1 for s in truth["songs"] if s["kind"] != "duplicate")

    # Which files were rejected, and why: the Parquet and the artifact name exactly the bad files.
    root = str((synth_corpus / "audio").resolve())
    expected = {f"{root}/{s['file'].split('audio/', 1)[-1]}": s["expect"] for s in truth["songs"]
                if s["kind"] != "duplicate" and s["expect"] != "ok"}
    assert second["rejects_path"] == str(work / "reports" / "curate-rejects.parquet")
    rejects = pq.read_table(second["rejects_path"]).to_pylist()
    assert {r["uri"]: reason_code(r["reason"]) for r in rejects} == expected
    for r in rejects:
        code, colon, detail = r["reason"].partition(": ")
        assert colon and detail.strip() and r["status"] == "rejected", r
    artifact = Artifact.get("curate-rejects")
    assert json.loads(artifact.data) == rejects
    assert second["rejects_path"] in artifact.description
    summary_artifact = Artifact.get("curate-summary")
    assert f"found {second['found']} files" in summary_artifact.description
    assert json.loads(summary_artifact.data) == second["stages"]


def stage_task_runs(state) -> list[str]:
    """Names of the stage task runs a curate run created (in its curate-stages subflow), as
    Prefect's API lists them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in subflows])))
    return sorted(r.name for r in runs)


def test_new_files_run_only_new_partitions(prefect_harness, synth_corpus, tmp_path, base_overrides):
    src = tmp_path / "src"
    shutil.copytree(synth_corpus / "audio", src, ignore=shutil.ignore_patterns("bad"))
    work = tmp_path / "work"
    first = run_curate(base_overrides, work, [str(src)])
    extra = next(p for p in sorted((synth_corpus / "audio" / "bad").iterdir()) if p.suffix == ".wav")
    shutil.copy(extra, src / "late-arrival.wav")
    shutil.copy(next(src.glob("*.flac")), src / "late-copy-of-a-known-song.flac")
    state = curate(RunParams(config="tiny", work_root=str(work), sources=[str(src)], overrides=base_overrides),
                   return_state=True)
    second = state.result()
    assert second["new_tracks"] == 1 and second["new_partitions"] == 1
    # Prefect task runs only for the new partition's stages: the done ones were planned away
    new = first["partitions"]
    assert stage_task_runs(state) == sorted(f"{s['stage']}-p{new:05d}" for s in second["stages"]
                                            if s["stage"] != "ingest")
    assert second["partitions"] == first["partitions"] + 1
    for s in second["stages"]:
        if s["stage"] != "ingest":   # the new partition ran (empty or not), the old ones did not
            assert (s["partitions_run"], s["partitions_skipped"]) == (1, first["partitions"]), s
    # the new partition's probe output holds the new file, with its own verdict
    newest = max((work / "stages" / "probe").rglob("part-*.parquet"), key=partition_of)
    assert partition_of(newest) == first["partitions"]
    [late] = [r for r in pq.read_table(newest).to_pylist()]
    assert late["status"] == "rejected" and late["reason"].partition(": ")[2], late


def test_version_bump_reruns_only_that_stage_and_its_dependants(clean_run, synth_corpus, tmp_path,
                                                              base_overrides, monkeypatch):
    """Bump rhythm's version: rhythm and what reads it (caption) run again, with the outputs of the
    clean run; probe, aesthetics, transcribe and lyrics are skipped."""
    from tasks.rhythm import RhythmStage
    from tasks.stage import stage_class

    first, clean_work, clean_tables = clean_run
    work = tmp_path / "work"
    shutil.copytree(clean_work, work)
    monkeypatch.setattr(RhythmStage, "version", RhythmStage.version + "-bumped")
    second = run_curate(base_overrides, work, [str(synth_corpus / "audio")])
    rows = {s["stage"]: s for s in second["stages"] if s["stage"] != "ingest"}
    # the stages that read rhythm, directly or through another stage, from their declared inputs
    reads = {"rhythm"}
    for name in dag_order(list(rows)):
        if reads & set(stage_class(name).inputs):
            reads.add(name)
    assert reads == {"rhythm", "caption"}
    for name, s in rows.items():
        expected = (first["partitions"], 0) if name in reads else (0, first["partitions"])
        assert (s["partitions_run"], s["partitions_skipped"]) == expected, s
    # the re-run stages wrote new outputs (new keys) holding what the clean run computed
    for name in reads:
        new = {p.parent.name for p in (work / "stages" / name).rglob("part-*.parquet")} - \
              {p.parent.name for p in (clean_work / "stages" / name).rglob("part-*.parquet")}
        assert len(new) == 1, (name, new)
        for path in sorted((work / "stages" / name / new.pop()).glob("part-*.parquet")):
            old = next(k for k in clean_tables if k.startswith(f"stages/{name}/") and k.endswith(path.name))
            got = sorted(pq.read_table(path).to_pylist(), key=lambda r: r["track_id"])
            assert_close(got, clean_tables[old], str(path))


def stage_tables(work: Path) -> dict[str, list[dict]]:
    """Every stage output under a work root: relative path -> rows sorted by track_id."""
    return {str(p.relative_to(work)): sorted(pq.read_table(p).to_pylist(), key=lambda r: r["track_id"])
            for p in sorted((work / "stages").rglob("part-*.parquet"))}


def partition_of(path: Path) -> int:
    return int(path.name[len("part-"):].split(".")[0])


def test_damaged_outputs_are_quarantined_and_recomputed(clean_run, synth_corpus, tmp_path, base_overrides):
    """Fault injection: one stage output truncated to half, another of another stage overwritten
    with random bytes. The rerun moves both aside, recomputes exactly those two, and ends with
    the outputs of a clean run; `acepipe inspect` reads past a damaged file too."""
    import random

    from schemas.config import load_config
    from tasks.inspect import inspect_track

    clean, clean_work, clean_tables = clean_run
    work = tmp_path / "work"
    shutil.copytree(clean_work, work)
    truncated = sorted((work / "stages" / "aesthetics").rglob("part-*.parquet"))[0]
    garbage = sorted((work / "stages" / "rhythm").rglob("part-*.parquet"))[-1]
    half = truncated.read_bytes()
    truncated.write_bytes(half[: len(half) // 2])
    garbage.write_bytes(random.Random(0).randbytes(garbage.stat().st_size))
    damaged = {str(p.relative_to(work)) for p in (truncated, garbage)}

    rerun = run_curate(base_overrides, work, [str(synth_corpus / "audio")])

    assert rerun["failed_tasks"] == []
    counts = ("tracks", "ok", "rejected", "error", "pending")
    assert [rerun[k] for k in counts] == [clean[k] for k in counts]
    quarantined = {str(p.relative_to(work / "quarantine")) for p in (work / "quarantine").rglob("*") if p.is_file()}
    assert {q.rsplit(".", 1)[0] for q in quarantined} == damaged, quarantined
    rows = {s["stage"]: s for s in rerun["stages"] if s["stage"] != "ingest"}
    redone = {"aesthetics": str(partition_of(truncated)), "rhythm": str(partition_of(garbage))}
    for name, s in rows.items():
        assert (s["partitions_run"], s["ran"]) == ((1, redone[name]) if name in redone else (0, "")), s
    assert stage_tables(work) == clean_tables

    # A file damaged after the run: inspect reports it (and moves it aside) instead of crashing.
    cfg = load_config("tiny", [f"work_root={work}", *base_overrides], environ={})
    caption = sorted((work / "stages" / "caption").rglob("part-*.parquet"))[0]
    track_id = next(r["track_id"] for r in pq.read_table(caption).to_pylist() if r["status"] == "ok")
    caption.write_bytes(random.Random(1).randbytes(caption.stat().st_size))
    report = inspect_track(cfg, track_id)
    assert report["found"] and "quarantine" in report["stages"]["caption"]["status"], report["stages"]
    assert report["stages"]["rhythm"]["status"] == "ok"
    assert not caption.exists()


def test_a_full_disk_fails_the_run_and_names_the_tasks(clean_run, synth_corpus, tmp_path, base_overrides,
                                                       tiny_models_dir, monkeypatch, capsys):
    """Fault injection: the disk fills while aesthetics writes. The run still writes its summary,
    counts those tracks as not yet processed, and fails naming the tasks and the cause; the CLI
    prints the summary and one error line; once there is space, a rerun completes."""
    import errno

    from flows.cli import main
    from flows.curate import CurateFailed

    write_table = StageStore.write_table
    refused = []

    def full_disk(self, path, table):
        if "/stages/aesthetics/" in path:
            refused.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_table(self, path, table)

    monkeypatch.setattr(StageStore, "write_table", full_disk)
    work = tmp_path / "work"
    with pytest.raises(CurateFailed) as failed:
        run_curate(base_overrides, work, [str(synth_corpus / "audio")])

    message, summary = str(failed.value), failed.value.summary
    assert message.startswith("curate: ") and "aesthetics partition 0" in message
    assert "No space left on device" in message and "\n" not in message
    partitions = StageStore(work).catalog_partitions()
    assert sorted(refused) == sorted(set(refused)) and len(refused) == len(partitions)   # not retried
    assert [(f["stage"], f["partition"], f["cause"]) for f in summary["failed_tasks"]] == [
        ("aesthetics", p, "OSError: [Errno 28] No space left on device") for p in partitions]
    assert summary["ok"] == 0 and summary["error"] == 0
    assert summary["pending"] == summary["by_reason"]["aesthetics/pending"] > 0
    assert summary["tracks"] == summary["rejected"] + summary["pending"]
    rows = {s["stage"]: s for s in summary["stages"]}
    assert rows["aesthetics"]["partitions_run"] == len(partitions)
    assert rows["aesthetics"]["reasons"] == f"task_failed: OSError: [Errno 28] No space left on device={len(partitions)}"
    assert rows["caption"]["partitions_run"] == rows["caption"]["partitions_skipped"] == 0
    assert rows["caption"]["reasons"] == f"not_run: upstream task failed={len(partitions)}"
    assert (work / "reports" / "curate-rejects.parquet").is_file()   # the operator's summary is written

    cli_args = ["--config", "tiny", "--work", str(work), "--source", str(synth_corpus / "audio"),
                "--set", f"models.tiny_dir={tiny_models_dir}", "--set", f"lyrics_db={synth_corpus / 'lyrics.parquet'}"]
    capsys.readouterr()
    assert main(["run", *cli_args]) == 1
    out, err = capsys.readouterr()
    assert f"not yet processed {summary['pending']}" in out
    assert err.rstrip().splitlines()[-1].startswith("acepipe: error: curate: ")
    assert "aesthetics partition 0: OSError: [Errno 28] No space left on device" in err
    # The pipeline stops after a failed curate: nothing is packed from a partial catalog.
    assert main(["pipeline", *cli_args, "--no-train"]) == 1
    out, err = capsys.readouterr()
    assert f"not yet processed {summary['pending']}" in out
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("acepipe: error: curate: ") and last.endswith("pack, latents and train did not run")
    assert not (work / "manifest").exists()

    monkeypatch.undo()   # space again
    assert main(["run", *cli_args, "--json"]) == 0
    out = capsys.readouterr().out
    rerun = json.loads(out[out.index("{"):])
    assert rerun["failed_tasks"] == [] and rerun["pending"] == 0
    assert (rerun["ok"], rerun["rejected"], rerun["error"]) == (clean_run[0]["ok"], clean_run[0]["rejected"], 0)


@pytest.mark.slow
def test_dask_runner_gives_the_same_outputs(clean_run, synth_corpus, tmp_path, base_overrides):
    a, threads, _ = clean_run      # the default threads runner
    b = run_curate(base_overrides + ["runner.kind=dask", "runner.max_workers=2"], tmp_path / "dask",
                   [str(synth_corpus / "audio")])
    assert (a["ok"], a["rejected"], a["error"], a["by_reason"]) == (b["ok"], b["rejected"], b["error"], b["by_reason"])
    for path in sorted((threads / "stages").rglob("part-*.parquet")):
        twin = tmp_path / "dask" / path.relative_to(threads)
        # Same rows and fields; model floats may differ in the last bits between processes.
        assert_close(pq.read_table(path).to_pylist(), pq.read_table(twin).to_pylist(), str(path))


def assert_close(a, b, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (where, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_a_killed_run_resumes_without_loss_or_duplicates(clean_run, synth_corpus, tmp_path, tiny_models_dir):
    """Kill `acepipe run` once some partitions are done; the rerun redoes only the rest and ends
    with what an uninterrupted run computes, each track once per stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", "tiny", "--work", str(work),
           "--source", str(synth_corpus / "audio"), "--set", "ingest.partition_size=1",
           "--set", f"models.tiny_dir={tiny_models_dir}", "--set", f"lyrics_db={synth_corpus / 'lyrics.parquet'}",
           "--json"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((work / "stages").rglob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in (work / "stages").rglob("part-*.parquet")}

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    total_parts = summary["partitions"]
    probe = next(s for s in summary["stages"] if s["stage"] == "probe")
    assert probe["partitions_skipped"] >= len(done_before) >= 1
    assert probe["partitions_run"] + probe["partitions_skipped"] == total_parts
    ids = [
        tid for p in sorted((work / "catalog").glob("part-*.parquet"))
        for tid in pq.read_table(p).column("track_id").to_pylist()]
    assert len(ids) == len(set(ids)) == summary["tracks"]
    assert summary["tracks"] == summary["ok"] + summary["rejected"] + summary["error"]
    truth = json.loads((synth_corpus / "ground_truth.json").read_text())
    assert summary["tracks"] == sum(1 for s in truth["songs"] if s["kind"] != "duplicate")
    # stage by stage, track by track: the same rows as the clean run (which used other partitions)
    resumed, clean = by_stage_and_track(work), by_stage_and_track(clean_run[1])
    assert resumed.keys() == clean.keys()
    for name in clean:
        assert_close(resumed[name], clean[name], name)


def by_stage_and_track(work: Path) -> dict[str, dict[str, dict]]:
    """{stage: {track_id: row}} over every partition; a track written twice fails here."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted((work / "stages").rglob("part-*.parquet")):
        rows = out.setdefault(path.relative_to(work / "stages").parts[0], {})
        for row in pq.read_table(path).to_pylist():
            assert row["track_id"] not in rows, (path, row["track_id"])
            rows[row["track_id"]] = row
    return out


def test_the_plan_lists_what_is_missing_or_damaged_and_quarantines_the_damaged(tmp_path):
    import pyarrow as pa

    from flows.curate import plan

    store = StageStore(str(tmp_path / "work"))
    keys = {"probe": "k1", "rhythm": "k2"}
    table = pa.table({"track_id": ["t"], "status": ["ok"], "reason": [None]})
    for p in (0, 1, 3):
        store.write_table(store.stage_path("probe", "k1", p), table)
    store.write_bytes(store.stage_path("probe", "k1", 1), b"PAR1 cut short")   # damaged after writing
    store.write_table(store.stage_path("probe", "other-key", 2), table)         # a stale key: not ours
    store.write_table(store.stage_path("rhythm", "k2", 2), table)
    todo = plan(store, ["probe", "rhythm"], keys, [0, 1, 2])
    assert todo == {"probe": {1, 2}, "rhythm": {0, 1}}
    assert not store.exists(store.stage_path("probe", "k1", 1))
    assert [n for n in store.listdir(store.path("quarantine", "stages", "probe", "k1"))
            if n.startswith("part-00001.parquet.")]
