"""The LightningDataModule over latent shards (stage 8's output, read by the train stage).

Reads `<shards>/index.parquet` (shard, track_id, frames) and the WebDataset tars beside it, and
reads only the samples it lists, by (shard, track_id): a latent shard also holds samples that
pack tombstoned since (tasks/pack_append.py), which the latents stage leaves out of the index.
Training streams an infinite, resampled, shuffled sequence (so DDP ranks and loader workers
never need an epoch boundary), randomly cropped to `max_frames`; each DDP rank resamples only
its own disjoint share of the tracks (`rank_share`).
Validation is a few tracks held out by track_id hash (or, in a corpus too small to hold any
out, the first few tracks), loaded once, cropped from the start. Batches are padded to the
longest item with a frame mask; lyrics are tokenised here, prompts in the LightningModule.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch

from model.lyric_encoder import LyricTokenizer
from model.repa import align_to_frames
from schemas.train import TrainConfig


class ShardError(ValueError):
    """Latent shards missing or not in the agreed format; the message says what to fix."""


def prompt_text(meta: dict) -> str:
    """The prompt the text encoder sees: the tags, then the caption."""
    tags = ", ".join(t for t in meta.get("tags") or [] if t)
    caption = (meta.get("caption") or "").strip()
    return "; ".join(p for p in (tags, caption) if p)


def is_held_out(track_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(track_id.encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000


def decode_sample(raw: dict, target_names: list[str]) -> dict:
    """A raw WebDataset sample (bytes per extension) -> tensors and metadata."""
    import io
    import json

    meta = json.loads(raw["json"])
    latent = torch.from_numpy(np.load(io.BytesIO(raw["latent.npy"])).astype(np.float32))   # (C, M, T)
    T = int(meta.get("valid_length", latent.shape[-1]))
    latent = latent[..., :T]
    sample = {"track_id": meta.get("track_id", raw["__key__"]), "latent": latent,
              "prompt": prompt_text(meta), "lyrics": meta.get("lyrics") or "",
              "language": meta.get("language"), "instrumental": bool(meta.get("instrumental"))}
    speaker = raw.get("speaker.npy")
    sample["speaker"] = (torch.from_numpy(np.load(io.BytesIO(speaker)).astype(np.float32))
                         if speaker is not None and not sample["instrumental"] else None)
    for name in target_names:
        blob = raw.get(f"{name}.npy")
        feats = torch.from_numpy(np.load(io.BytesIO(blob)).astype(np.float32)) if blob is not None else None
        # Pooled to the latent rate by the latents stage; a frame of rounding is interpolated away.
        sample[name] = align_to_frames(feats, T) if feats is not None else None
    return sample


def crop(sample: dict, max_frames: int, rng: random.Random | None, target_names: list[str]) -> dict:
    """Crop latent and features to max_frames (random start when rng is given, else from 0)."""
    T = sample["latent"].shape[-1]
    if T <= max_frames:
        return sample
    start = rng.randint(0, T - max_frames) if rng else 0
    out = dict(sample, latent=sample["latent"][..., start:start + max_frames])
    for name in target_names:
        if out.get(name) is not None:
            out[name] = out[name][start:start + max_frames]
    return out


class Collate:
    """Pad a list of samples into one batch (picklable for loader workers)."""

    def __init__(self, tokenizer: LyricTokenizer, target_names: list[str], speaker_dim: int):
        self.tokenizer, self.target_names, self.speaker_dim = tokenizer, target_names, speaker_dim

    def __call__(self, samples: list[dict]) -> dict:
        B = len(samples)
        C, M = samples[0]["latent"].shape[:2]
        T = max(s["latent"].shape[-1] for s in samples)
        latents = torch.zeros(B, C, M, T)
        frame_mask = torch.zeros(B, T, dtype=torch.bool)
        speaker = torch.zeros(B, self.speaker_dim)
        for i, s in enumerate(samples):
            n = s["latent"].shape[-1]
            latents[i, ..., :n] = s["latent"]
            frame_mask[i, :n] = True
            if s["speaker"] is not None:
                speaker[i] = s["speaker"]
        lyric_ids, lyric_mask = self.tokenizer.batch([s["lyrics"] for s in samples],
                                                     [s["language"] for s in samples])
        batch = {"track_id": [s["track_id"] for s in samples], "latents": latents,
                 "frame_mask": frame_mask, "prompt": [s["prompt"] for s in samples],
                 "lyric_ids": lyric_ids, "lyric_mask": lyric_mask, "speaker": speaker, "targets": {}}
        for name in self.target_names:
            have = [s[name] for s in samples if s.get(name) is not None]
            if not have:
                continue
            feats = torch.zeros(B, T, have[0].shape[-1])
            fmask = torch.zeros(B, T, dtype=torch.bool)
            for i, s in enumerate(samples):
                if s.get(name) is not None:
                    n = s[name].shape[0]
                    feats[i, :n] = s[name]
                    fmask[i, :n] = True
            batch["targets"][name] = (feats, fmask & frame_mask)
        return batch


def sample_key(raw: dict) -> tuple[str, str]:
    """(shard file name, track_id) of a raw WebDataset sample: what the index names. A track
    packed again after a change has a tombstoned sample of the same key in an older shard."""
    return raw["__url__"].replace("\\", "/").rsplit("/", 1)[-1], raw["__key__"]


def rank_share(index: list[dict], root: Path, held_out: set[str], rank: int, world: int
               ) -> tuple[list[str], set[tuple[str, str]]]:
    """The shards a data-parallel rank reads and the training samples ((shard, track_id), as
    index.parquet lists them) it keeps from them: disjoint across ranks. With at least one shard
    per rank, whole shards (round robin); with fewer, every shard, and the tracks split by
    track_id hash. A rank left with no track is an error (it would wait forever for a first batch)."""
    shards = sorted({row["shard"] for row in index})
    if world > 1 and len(shards) >= world:
        own = set(shards[rank::world])
        tracks = {(row["shard"], row["track_id"]) for row in index if row["shard"] in own}
    else:
        own = set(shards)
        tracks = {(row["shard"], row["track_id"]) for row in index
                  if world == 1 or int(hashlib.sha1(row["track_id"].encode()).hexdigest()[8:16], 16) % world == rank}
    tracks = {t for t in tracks if t[1] not in held_out}
    if not tracks:
        raise ShardError(f"rank {rank} of {world} has no training track ({len(index)} tracks in "
                         f"{len(shards)} shards, {len(held_out)} held out): train on fewer devices or more data")
    return [str(root / name) for name in sorted(own)], tracks


class LatentDataModule(L.LightningDataModule):
    def __init__(self, cfg: TrainConfig, tokenizer: LyricTokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.target_names = [t.name for t in cfg.repa.targets] if cfg.repa.enabled else []
        self.collate = Collate(tokenizer, self.target_names, cfg.conditions.speaker_dim)
        self.root = Path(cfg.data.shards)
        self.val_samples: list[dict] = []

    def read_index(self):
        import pyarrow.parquet as pq

        index_path = self.root / "index.parquet"
        if not index_path.is_file():
            raise ShardError(f"{index_path} not found: data.shards must be a latents dir written by the "
                             "latents flow (index.parquet and shard-NNNNNN.tar)")
        index = pq.read_table(index_path).to_pylist()
        if not index:
            raise ShardError(f"{index_path} lists no tracks")
        return index

    def setup(self, stage: str | None = None):
        if hasattr(self, "shard_urls"):
            return
        index = self.index = self.read_index()
        self.shard_urls = sorted({str(self.root / row["shard"]) for row in index})
        missing = [u for u in self.shard_urls if not Path(u).is_file()]
        if missing:
            raise ShardError(f"index.parquet names shards that are missing: {missing[:3]}")
        ids = [row["track_id"] for row in index]
        held = [t for t in ids if is_held_out(t, self.cfg.data.val_fraction)][: self.cfg.data.val_samples]
        self.held_out = set(held)
        # Too small a corpus to hold tracks out: validate on the first few training tracks.
        val_ids = set(held) if held else set(ids[: self.cfg.data.val_samples])
        self.val_keys = {(row["shard"], row["track_id"]) for row in index if row["track_id"] in val_ids}
        self.val_samples = self._load_val()
        self._fill_target_dims()
        self._check_dims(self.val_samples[0] if self.val_samples else None)

    def _fill_target_dims(self):
        """REPA targets with dim: null take their size from the first sample that has them."""
        if not self.cfg.repa.enabled:
            return
        targets = []
        for t in self.cfg.repa.targets:
            if t.dim is None:
                dims = [s[t.name].shape[-1] for s in self.val_samples if s.get(t.name) is not None]
                if not dims:
                    raise ShardError(f"repa.targets[{t.name}].dim is null and no validation track has "
                                     f"{t.name}.npy to read it from: set the dim or disable REPA")
                t = t.model_copy(update={"dim": int(dims[0])})
            targets.append(t)
        repa = self.cfg.repa.model_copy(update={"targets": targets})
        self.cfg = self.cfg.model_copy(update={"repa": repa})

    def _load_val(self) -> list[dict]:
        import webdataset as wds

        found = []
        for raw in wds.WebDataset(self.shard_urls, shardshuffle=False, empty_check=False,
                                  nodesplitter=None, workersplitter=None):
            if sample_key(raw) in self.val_keys:
                s = decode_sample(raw, self.target_names)
                found.append(crop(s, self.cfg.data.max_frames, None, self.target_names))
            if len(found) == len(self.val_keys):
                break
        return sorted(found, key=lambda s: s["track_id"])

    def _check_dims(self, sample: dict | None):
        if sample is None:
            return
        C, M, _ = sample["latent"].shape
        if (C, M) != (self.cfg.dit.in_channels, self.cfg.dit.mel_bins):
            raise ShardError(f"latents are ({C}, {M}, T) but dit.in_channels/mel_bins are "
                             f"({self.cfg.dit.in_channels}, {self.cfg.dit.mel_bins})")
        for t in self.cfg.repa.targets if self.cfg.repa.enabled else []:
            if sample.get(t.name) is not None and sample[t.name].shape[-1] != t.dim:
                raise ShardError(f"{t.name}.npy features are {sample[t.name].shape[-1]}-d but "
                                 f"repa.targets[{t.name}].dim is {t.dim}")

    def train_dataloader(self):
        import webdataset as wds

        names, max_frames = self.target_names, self.cfg.data.max_frames
        rank, world = self._rank_and_world()
        urls, mine = rank_share(self.index, self.root, self.held_out, rank, world)
        rng = random.Random()   # reseeded per worker below

        def pipeline(src):
            for raw in src:
                if sample_key(raw) in mine:
                    yield crop(decode_sample(raw, names), max_frames, rng, names)

        # Resampled shards are an independent random stream per process, so a node splitter
        # cannot make ranks disjoint; each rank resamples only its own share (rank_share).
        dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None,
                                  seed=self.cfg.seed)
                   .shuffle(self.cfg.data.shuffle_buffer)
                   .compose(pipeline)
                   .batched(self.cfg.data.batch_size, collation_fn=self.collate, partial=False))
        return wds.WebLoader(dataset, batch_size=None, num_workers=self.cfg.data.num_workers,
                             persistent_workers=self.cfg.data.num_workers > 0,
                             worker_init_fn=lambda w: rng.seed(torch.initial_seed() + w))

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_samples, batch_size=self.cfg.data.batch_size,
                                           shuffle=False, collate_fn=self.collate)
