"""Test helper: latent shards in the latents stage's agreed format, written without the stage.

`<root>/shard-NNNNNN.tar` (WebDataset: __key__ = track_id, latent.npy float16 (8, 16, T),
json metadata, optional mert.npy / mhubert.npy (T, d) and speaker.npy (512,)) and
`<root>/index.parquet` (shard, track_id, frames). Latents are smooth, track-specific patterns
so a model has something to fit.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LYRICS = ["[verse]\nwalking down the street tonight\n[chorus]\nsing it loud", "",
          "[verse]\nje marche seul\n[chorus]\nla la la", "[verse]\n夜空の星\n[chorus]\n歌おう"]


def make_track(i: int, frames: int, feat_dims=(24, 16), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed * 1000 + i)
    track_id = hashlib.sha1(f"track-{seed}-{i}".encode()).hexdigest()[:16]
    t = np.arange(frames)[None, None, :]
    freq = rng.uniform(0.05, 0.3, size=(8, 16, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(8, 16, 1))
    latent = (np.sin(freq * t + phase) + 0.1 * rng.standard_normal((8, 16, frames))).astype(np.float16)
    instrumental = LYRICS[i % len(LYRICS)] == ""
    meta = {"track_id": track_id, "valid_length": frames, "latent_fps": 10.77, "sample_rate": 44100,
            "encoder_id": "tiny:dcae", "revision": "test", "audio_sha": track_id, "duration": frames / 10.77,
            "caption": f"test song {i}", "tags": ["pop", "synth"] if i % 2 else ["rock"],
            "lyrics": LYRICS[i % len(LYRICS)], "language": None if instrumental else ["en", "fr", "ja"][i % 3],
            "instrumental": instrumental}
    track = {"track_id": track_id, "latent": latent, "meta": meta}
    proj = rng.standard_normal((8 * 16, sum(feat_dims)))
    feats = (latent.reshape(128, frames).T.astype(np.float32) @ proj).astype(np.float16)
    track["mert"], track["mhubert"] = feats[:, :feat_dims[0]], feats[:, feat_dims[0]:]
    track["speaker"] = (np.zeros(512) if instrumental else rng.standard_normal(512)).astype(np.float16)
    return track


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_latent_shards(root: Path, tracks: list[dict], per_shard: int = 4) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(0, len(tracks), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for tr in tracks[s:s + per_shard]:
                files = {"latent.npy": _npy(tr["latent"]), "json": json.dumps(tr["meta"]).encode()}
                for key in ("mert", "mhubert", "speaker"):
                    if tr.get(key) is not None:
                        files[f"{key}.npy"] = _npy(tr[key])
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{tr['track_id']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"shard": name, "track_id": tr["track_id"], "frames": tr["latent"].shape[-1]})
    pq.write_table(pa.Table.from_pylist(rows), root / "index.parquet")
    return root
