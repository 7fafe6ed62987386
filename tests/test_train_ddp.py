"""Data-parallel training for real: the tiny training under torchrun, 2 CPU processes (gloo), as the
train flow launches it. Ranks read disjoint tracks, gradients are synchronised (identical weights
on both ranks after the run, changed from the start) and rank 0 alone writes the run directory.
Also the rule that shares tracks out to ranks (model.data.rank_share)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from latent_shards import make_track, write_latent_shards  # noqa: E402

from flows.train import TrainParams, training_command  # noqa: E402
from model.data import ShardError, rank_share  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Runs model.train's own entry point on each rank, with a callback that records what the rank
# trained on and its final weights, and an audit hook that records every file it writes.
DRIVER = """
import hashlib, json, os, sys
sys.path.insert(0, {repo!r})
import torch
from lightning.pytorch.callbacks import Callback
import model.train as train

torch.set_num_threads(1)
out = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
rank = int(os.environ["RANK"])
record = {{"rank": rank, "tracks": [], "written": []}}

def audit(event, args):
    if event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
        path = os.path.abspath(os.fsdecode(args[0]))
    elif event in ("os.rename", "os.replace"):
        path = os.path.abspath(os.fsdecode(args[1]))
    else:
        return
    if path.startswith(out):
        record["written"].append(path)

def digest(module):
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

class Record(Callback):
    def on_train_start(self, trainer, module):
        record["start"], record["world"] = digest(module), trainer.world_size
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        record["tracks"].extend(batch["track_id"])
    def on_train_end(self, trainer, module):
        record["end"], record["step"] = digest(module), trainer.global_step

make_trainer = train.make_trainer
train.make_trainer = lambda cfg, out, callbacks=(): make_trainer(cfg, out, [*callbacks, Record()])
sys.addaudithook(audit)
code = train.main(sys.argv[1:])
with open({records!r} + f"/rank-{{rank}}.json", "w") as f:
    json.dump(record, f)
sys.exit(code)
"""


@pytest.mark.slow
def test_two_cpu_ranks_train_on_disjoint_tracks_with_synchronised_weights(tmp_path, tiny_models_dir):
    tracks = [make_track(i, frames) for i, frames in enumerate([40, 33, 57, 48, 61, 25, 36, 44])]
    shards = write_latent_shards(tmp_path / "latents" / "default", tracks, per_shard=4)
    out, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    params = TrainParams(config="tiny", out=str(out), shards=str(shards), max_steps=6, resume=False,
                         overrides=[f"tiny_dir={tiny_models_dir}", "trainer.accelerator=cpu",
                                    "trainer.strategy=ddp", "data.batch_size=2",
                                    "trainer.checkpoint_every=3", "trainer.val_every=3", "trainer.log_every=1"])
    cmd = training_command(params, out, gpus=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), records=str(records)))
    at = cmd.index("-m", 2)
    cmd[at:at + 2] = [str(driver)]          # model.train's main, with the recording callback
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (json.loads((records / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 6
    # disjoint data: each rank trained only on its own shard's tracks
    by_shard = [{t["track_id"] for t in tracks[:4]}, {t["track_id"] for t in tracks[4:]}]
    assert set(r0["tracks"]) <= by_shard[0] and set(r1["tracks"]) <= by_shard[1]
    assert len(r0["tracks"]) == len(r1["tracks"]) == 6 * 2
    # synchronised gradients: on different data, the same weights (and they did change)
    assert r0["start"] == r1["start"] and r0["end"] == r1["end"] and r0["end"] != r0["start"]
    # rank 0 alone writes the run directory: checkpoints, logs, samples, config, final.json
    assert r1["written"] == [], r1["written"][:5]
    written = {Path(p).relative_to(out).parts[0] for p in r0["written"]}
    assert {"checkpoints", "csv", "samples", "config.yaml", "final.json"} <= written
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "final.json").read_text())["step"] == 6


def _index(shards: int, per_shard: int) -> list[dict]:
    return [{"shard": f"shard-{s:06d}.tar", "track_id": f"{s:02d}-{i:02d}"}
            for s in range(shards) for i in range(per_shard)]


@pytest.mark.parametrize("shards,per_shard,world", [(4, 3, 2), (3, 3, 2), (1, 40, 2), (1, 60, 3), (5, 2, 1)])
def test_ranks_share_out_every_training_track_exactly_once(shards, per_shard, world):
    index = _index(shards, per_shard)
    held = {index[0]["track_id"]}
    shares = [rank_share(index, Path("/data"), held, rank, world) for rank in range(world)]
    tracks = [share[1] for share in shares]
    assert sum(map(len, tracks)) == len(index) - 1
    assert set().union(*tracks) == {(r["shard"], r["track_id"]) for r in index if r["track_id"] not in held}
    for share_urls, share_tracks in shares:   # each rank opens only shards that hold its tracks
        files = {Path(u).name for u in share_urls}
        assert {shard for shard, _ in share_tracks} <= files
        if shards >= world > 1:
            assert len(files) < shards


def test_a_rank_without_tracks_is_a_clear_error():
    index = _index(1, 1)   # one track, two ranks: one of them would wait forever for a batch
    errors = []
    for rank in (0, 1):
        try:
            rank_share(index, Path("/data"), set(), rank, 2)
        except ShardError as exc:
            errors.append(str(exc))
    assert len(errors) == 1 and "has no training track" in errors[0] and "of 2" in errors[0]
