"""Test helper: latent shards in the latents stage's agreed format, written without the stage.

`<root>/shard-NNNNNN.tar` (WebDataset: __key__ = track_id, latent.npy float16 (8, 16, T),
json metadata, optional mert.npy / mhubert.npy (T, d) and speaker.npy (512,)) and
`<root>/index.parquet` (shard, track_id, frames). Latents are smooth, track-specific patterns
so a model has something to fit. `decoded_sample` and `tiny_module` give a track as the collate
function gets it and the tiny training module, for tests of one training step.
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


def sample_files(track: dict) -> dict[str, bytes]:
    """A track's files in its shard, by extension."""
    files = {"latent.npy": _npy(track["latent"]), "json": json.dumps(track["meta"]).encode()}
    for key in ("mert", "mhubert", "speaker"):
        if track.get(key) is not None:
            files[f"{key}.npy"] = _npy(track[key])
    return files


def decoded_sample(track: dict, target_names=("mert", "mhubert")) -> dict:
    """A track as the data module hands it to the collate function (through model.data's decoder)."""
    from model.data import decode_sample

    return decode_sample({"__key__": track["track_id"], **sample_files(track)}, list(target_names))


def write_latent_shards(root: Path, tracks: list[dict], per_shard: int = 4) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(0, len(tracks), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for tr in tracks[s:s + per_shard]:
                for ext, data in sample_files(tr).items():
                    info = tarfile.TarInfo(f"{tr['track_id']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"shard": name, "track_id": tr["track_id"], "frames": tr["latent"].shape[-1]})
    pq.write_table(pa.Table.from_pylist(rows), root / "index.parquet")
    return root


def tiny_module(cfg):
    """AceDiTModule of a config (REPA target sizes of make_track's features) and its collate
    function; zero-initialised weights (the output layer, cross-attention) are drawn at random so
    every part of the DiT reaches the velocity, as after some training."""
    import torch

    from model.data import Collate
    from model.lit import AceDiTModule
    from model.lyric_encoder import load_lyric_tokenizer
    from model.text_encoder import load_text_encoder

    dims = {"mert": 24, "mhubert": 16}
    targets = [t.model_copy(update={"dim": dims[t.name]}) for t in cfg.repa.targets]
    cfg = cfg.model_copy(update={"repa": cfg.repa.model_copy(update={"targets": targets})})
    text = load_text_encoder(cfg.text_encoder.checkpoint, cfg.tiny_dir, cfg.text_encoder.max_length)
    tok = load_lyric_tokenizer(cfg.lyric_encoder.tokenizer, cfg.tiny_dir, cfg.lyric_encoder.max_tokens)
    torch.manual_seed(0)
    module = AceDiTModule(cfg, text, tok.vocab_size).eval()
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return module, Collate(tok, list(dims), cfg.conditions.speaker_dim)
