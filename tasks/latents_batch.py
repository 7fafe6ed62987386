"""The latents stage's batch function: decoded tracks of an audio shard -> latent samples.

A sample's FLAC is decoded and checked with the audio loader's guards (tasks/audio.py
check_samples, remix), resampled with soxr to the mel rate, and tracks are encoded in batches
of similar duration (tasks/latents_models.py MusicDCAE, then the REPA encoders on the same
batch). Every refusal is a reject row with a reason (codes in tasks/latents.py's docstring).
"""
from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import soundfile as sf
import soxr
import torch

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import Config
from tasks.audio import AudioError, check_samples, remix
from tasks.latents_models import MusicDCAE, SslEncoder, compute_dtype, load_dcae, load_ssl, pool_to_frames
from tasks.models import resolve_device

TARGETS = ("mert", "mhubert")
# Sample metadata carried from the pack's sample json into the latent json (the trainer's conditions).
CONDITIONS = ("caption", "tags", "language", "instrumental", "bpm", "key", "scale")


# -- decoding -------------------------------------------------------------------------------------
def decode_flac(data: bytes, cfg: Config) -> np.ndarray:
    """FLAC bytes -> (2, samples) float32 at the mel rate; AudioError (with a reason) on refusal."""
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)   # (samples, C)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError("unreadable", f"the shard's FLAC does not decode ({exc}); re-run pack") from None
    check_samples(audio, cfg.audio)
    audio = remix(audio, 2)
    rate = cfg.latents.mel.sample_rate
    if sr != rate:
        audio = soxr.resample(audio, sr, rate, quality="HQ")
    return np.ascontiguousarray(audio.T, dtype=np.float32)


def reject(track_id: str, reason: str) -> dict:
    return {"track_id": track_id, "status": STATUS_REJECTED, "reason": reason[:300]}


def decode_sample(item: tuple[dict, dict], cfg: Config) -> dict:
    """One sample -> {"track_id", "audio", "meta", "audio_sha"} or a reject row (runs on a worker)."""
    row, files = item
    tid = row["track_id"]
    if "flac" not in files or "json" not in files:
        return reject(tid, f"missing_audio: the audio shard has no {'.flac' if 'flac' not in files else '.json'} "
                           "for this track; re-run pack")
    try:
        meta = json.loads(files["json"])
        audio = decode_flac(files["flac"], cfg)
    except AudioError as exc:
        return reject(tid, exc.reason)
    except ValueError as exc:
        return reject(tid, f"unreadable: the sample's json metadata does not parse ({exc})")
    if not isinstance(meta, dict):
        return reject(tid, "unreadable: the sample's json metadata is not an object")
    meta["lyrics_text"] = meta.get("lyrics_text") or files.get("txt", b"").decode("utf-8", "replace")
    return {"track_id": tid, "audio": audio, "meta": meta,
            "audio_sha": hashlib.sha256(files["flac"]).hexdigest()}


# -- encoding -----------------------------------------------------------------------------------
def encoders(cfg: Config) -> tuple[MusicDCAE, list[SslEncoder]]:
    """The DCAE and the enabled REPA encoders (loaded once per process), all in the stage's
    compute dtype (latents.compute_dtype on a GPU, float32 on a CPU)."""
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg.latents, device)
    dcae = load_dcae(cfg.latents, cfg.models.tiny_dir, device)
    ssl = [load_ssl(name, getattr(cfg.latents, name), cfg.models.tiny_dir, device, dtype)
           for name in TARGETS if getattr(cfg.latents, name).enabled]
    return dcae, ssl


def batches(tracks: list[dict], batch_size: int, max_frames: int, frame_seconds: float) -> list[list[dict]]:
    """Tracks sorted by duration, cut into batches of at most batch_size tracks and max_frames
    padded latent frames (batch size x the longest track); a longer track goes alone."""
    order = sorted(tracks, key=lambda t: (t.get("duration") or 0.0, t["track_id"]))
    out: list[list[dict]] = []
    for t in order:
        frames = math.ceil((t.get("duration") or 0.0) / frame_seconds)   # the longest so far
        if out and len(out[-1]) < batch_size and frames * (len(out[-1]) + 1) <= max_frames:
            out[-1].append(t)
        else:
            out.append([t])
    return out


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        x = x.to(torch.bfloat16).float()
    return x.clamp(-65504, 65504).to(torch.float16).cpu().numpy()


def encode_batch(dcae: MusicDCAE, ssl: list[SslEncoder], decoded: list[dict], cfg: Config) -> list[dict]:
    """Decoded tracks -> results with "latent" (8, 16, T) and per-target features, or reject rows.
    A batch that raises is retried track by track, so only the track at fault is rejected."""
    fs = dcae.frame_samples
    results: list[dict] = []
    todo = []
    for d in decoded:
        if dcae.valid_length(d["audio"].shape[1]) < 1:
            results.append(reject(d["track_id"], f"too_short: {d['audio'].shape[1]} samples, fewer than "
                                                 f"one latent frame ({fs})"))
        else:
            todo.append(d)
    if not todo:
        return results
    try:
        latents = _encode_padded(dcae, [d["audio"] for d in todo])
    except Exception as exc:  # noqa: BLE001 - one track should not sink its batch
        latents = [exc] if len(todo) == 1 else \
            [_attempt(lambda d=d: _encode_padded(dcae, [d["audio"]])[0]) for d in todo]
    done = []
    for d, latent in zip(todo, latents):
        r = reject(d["track_id"], _exception(latent)) if isinstance(latent, Exception) \
            else _check(dcae, d, latent, cfg)
        (done if r["status"] == STATUS_OK else results).append(r)
    if ssl and done:
        audio = {d["track_id"]: d["audio"] for d in todo}
        try:
            _add_features(dcae, ssl, done, audio, cfg)
        except Exception:  # noqa: BLE001 - again track by track
            for r in done:
                error = _attempt(lambda r=r: _add_features(dcae, ssl, [r], audio, cfg))
                if isinstance(error, Exception):
                    r.update(reject(r["track_id"], _exception(error)))
    return results + done


def _attempt(fn):
    """fn() or the exception it raised."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the caller turns it into a reject row
        return exc


def _exception(exc: Exception) -> str:
    return f"exception: {type(exc).__name__}: {exc}"


def _encode_padded(dcae: MusicDCAE, audios: list[np.ndarray]) -> list[torch.Tensor]:
    """Zero-pad to the longest, encode once, crop each latent to its own ceil(samples / 4096)."""
    longest = max(a.shape[1] for a in audios)
    batch = torch.zeros(len(audios), 2, longest)
    for i, a in enumerate(audios):
        batch[i, :, :a.shape[1]] = torch.from_numpy(a)
    z = dcae.encode_audio(batch).cpu()                                   # (B, 8, 16, ceil(longest / fs))
    return [z[i, ..., :math.ceil(a.shape[1] / dcae.frame_samples)] for i, a in enumerate(audios)]


def _check(dcae: MusicDCAE, d: dict, latent: torch.Tensor, cfg: Config) -> dict:
    """A latent of the expected shape and finite -> an ok result, else a bad_latent reject."""
    samples = d["audio"].shape[1]
    frames = math.ceil(samples / dcae.frame_samples)
    expected = (dcae.dcae.config.latent_channels, cfg.latents.mel.n_mels // cfg.latents.dcae.time_multiple, frames)
    if tuple(latent.shape) != expected:
        return reject(d["track_id"], f"bad_latent: shape {tuple(latent.shape)}, expected {expected}")
    if not torch.isfinite(latent).all():
        return reject(d["track_id"], f"bad_latent: {int((~torch.isfinite(latent)).sum())} non-finite values")
    return {"track_id": d["track_id"], "status": STATUS_OK, "reason": None, "frames": frames,
            "valid_length": dcae.valid_length(samples), "duration": samples / cfg.latents.mel.sample_rate,
            "audio_sha": d["audio_sha"], "meta": d["meta"],
            "latent": _to_storage(latent, cfg.latents.storage_dtype), "features": {}}


def _add_features(dcae: MusicDCAE, ssl: list[SslEncoder], results: list[dict], audio: dict[str, np.ndarray],
                  cfg: Config) -> None:
    """Each REPA target's (valid_length, d) features for ok results, all chunks of the batch together.
    Only the audio under valid latent frames is used, so feature frame i is latent frame i."""
    monos = [remix(audio[r["track_id"]][:, :r["valid_length"] * dcae.frame_samples].T, 1)[:, 0] for r in results]
    for enc in ssl:
        wavs = [np.ascontiguousarray(soxr.resample(m, cfg.latents.mel.sample_rate, enc.sample_rate, quality="HQ"),
                                     dtype=np.float32) for m in monos]
        for r, feats in zip(results, enc.features(wavs)):
            r["features"][enc.name] = _to_storage(pool_to_frames(feats, r["valid_length"]),
                                                  cfg.latents.storage_dtype)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def sample_files(result: dict, dcae: MusicDCAE, ssl: list[SslEncoder]) -> dict[str, bytes]:
    meta = result["meta"]
    doc = {"track_id": result["track_id"], "valid_length": result["valid_length"], "frames": result["frames"],
           "latent_fps": dcae.latent_fps, "sample_rate": dcae.cfg.mel.sample_rate,
           "encoder_id": dcae.encoder_id, "revision": dcae.revision, "audio_sha": result["audio_sha"],
           "duration": result["duration"], "lyrics": meta.get("lyrics_text") or meta.get("lyrics") or "",
           **{k: meta.get(k) for k in CONDITIONS},
           "targets": {e.name: {"encoder_id": e.encoder_id, "layer": e.cfg.layer, "dim": e.dim,
                                "fps": dcae.latent_fps} for e in ssl}}
    files = {"latent.npy": _npy(result["latent"]),
             "json": json.dumps(doc, sort_keys=True, ensure_ascii=False, default=float).encode()}
    for name, feats in result["features"].items():
        files[f"{name}.npy"] = _npy(feats)
    return files
