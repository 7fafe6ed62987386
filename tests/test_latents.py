"""The latents stage: mel front end, DCAE and REPA twins through the real loaders, latent shards
from packed synthetic shards, rejects, reruns, and the trainer reading what the stage wrote."""
from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas.config import load_config
from tasks.latents import batches, encode_shard, plan, prepare, write_index
from tasks.latents_models import (TWIN_SUBFOLDER, LogMel, SslEncoder, load_dcae, load_ssl, pool_to_frames,
                                 slaney_filterbank)
from tasks.models import ModelLoadError
from tasks.store import StageStore

SR = 44100
# The MERT twin is remote code, like the released model (until configs/tiny.yaml says so itself).


@pytest.fixture(scope="module")
def tiny_cfg(tiny_models_dir):
    return load_config("tiny", [f"models.tiny_dir={tiny_models_dir}", "device=cpu"], environ={})


@pytest.fixture(scope="module")
def dcae(tiny_cfg):
    return load_dcae(tiny_cfg.latents, tiny_cfg.models.tiny_dir, "cpu")


def stereo_song(seconds: float, seed: int = 0) -> np.ndarray:
    """(2, samples): two detuned chords with noise, different per channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    left = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 4
    right = sum(np.sin(2 * np.pi * f * t) for f in (196.0, 246.9, 392.0)) / 4
    return (np.stack([left, right]) + 0.01 * rng.standard_normal((2, t.size))).astype(np.float32)


# -- models ---------------------------------------------------------------------------------------
def test_twins_are_saved_in_the_real_format_and_load_through_the_real_loaders(tiny_cfg, dcae):
    from diffusers import AutoencoderDC

    twin = Path(tiny_cfg.models.tiny_dir) / "dcae" / TWIN_SUBFOLDER
    assert (twin / "config.json").is_file() and list(twin.glob("*.safetensors"))
    assert isinstance(dcae.dcae, AutoencoderDC)
    assert (dcae.dcae.config.in_channels, dcae.dcae.config.latent_channels) == (2, 8)
    assert dcae.encoder_id == f"tiny:dcae/{TWIN_SUBFOLDER}" and dcae.revision.startswith("local-")
    assert load_dcae(tiny_cfg.latents, tiny_cfg.models.tiny_dir, "cpu") is dcae   # once per process

    for name, rate, fps, model_class in (("mert", 24000, 75, "MERTTwinModel"), ("mhubert", 16000, 50, "HubertModel")):
        enc = load_ssl(name, getattr(tiny_cfg.latents, name), tiny_cfg.models.tiny_dir)
        assert type(enc.model).__name__ == model_class and enc.sample_rate == rate
        assert (Path(tiny_cfg.models.tiny_dir) / name / "preprocessor_config.json").is_file()
        feats = enc.features([np.random.default_rng(0).standard_normal(2 * rate).astype(np.float32)])[0]
        assert abs(feats.shape[0] - 2 * fps) <= 1 and feats.shape[1] == enc.dim


def test_the_mert_twin_is_remote_code_without_conv_pos_batch_norm_and_loads_as_released_mert(tiny_cfg):
    """m-a-p/MERT-v1-330M's remote code builds transformers' HuBERT encoder, which (>= 4.48) reads
    config.conv_pos_batch_norm, missing from MERTConfig: a plain AutoModel load fails on it."""
    from transformers import AutoConfig, AutoModel

    cfg = tiny_cfg.latents.mert
    twin = Path(tiny_cfg.models.tiny_dir) / "mert"
    load_ssl("mert", cfg, tiny_cfg.models.tiny_dir)                         # builds the twin
    assert (twin / "modeling_mert_twin.py").is_file() and "auto_map" in json.loads((twin / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(twin), trust_remote_code=True)
    assert not hasattr(config, "conv_pos_batch_norm")
    with pytest.raises(AttributeError, match="conv_pos_batch_norm"):
        AutoModel.from_pretrained(str(twin), trust_remote_code=True)      # the released model's failure

    enc = load_ssl("mert", cfg, tiny_cfg.models.tiny_dir)
    assert type(enc.model).__name__ == "MERTTwinModel" and enc.model.config.conv_pos_batch_norm is False
    assert enc.model.encoder.pos_conv_embed.batch_norm is None             # the weight-normed conv, as trained
    no_remote = cfg.model_copy(update={"trust_remote_code": False})
    with pytest.raises(ModelLoadError, match="latents.mert.trust_remote_code=true"):
        load_ssl("mert", no_remote, tiny_cfg.models.tiny_dir)


def _broken_checkpoints(root: Path, tiny_dir: str) -> dict[str, Path]:
    """Checkpoints that fail in ways other than a missing file: corrupt JSON, a cut safetensors."""
    dcae = root / "dcae"
    shutil.copytree(Path(tiny_dir) / "dcae", dcae)
    (dcae / TWIN_SUBFOLDER / "config.json").write_text('{"in_channels": 2, ')
    mert = root / "mert"
    shutil.copytree(Path(tiny_dir) / "mert", mert)
    weights = mert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    mhubert = root / "mhubert"
    shutil.copytree(Path(tiny_dir) / "mhubert", mhubert)
    (mhubert / "config.json").write_text("not json")
    return {"dcae": dcae, "mert": mert, "mhubert": mhubert}


def test_any_load_failure_is_one_line_naming_the_config_field_and_checkpoint(tiny_cfg, dcae, tmp_path):
    load_ssl("mert", tiny_cfg.latents.mert, tiny_cfg.models.tiny_dir)         # the twins exist
    load_ssl("mhubert", tiny_cfg.latents.mhubert, tiny_cfg.models.tiny_dir)
    broken = _broken_checkpoints(tmp_path, tiny_cfg.models.tiny_dir)
    lc = tiny_cfg.latents
    bad_dcae = lc.model_copy(update={"dcae": lc.dcae.model_copy(update={"checkpoint": str(broken["dcae"])})})
    attempts = {"dcae": lambda: load_dcae(bad_dcae, tiny_cfg.models.tiny_dir, "cpu")}
    for name in ("mert", "mhubert"):
        cfg = getattr(lc, name).model_copy(update={"checkpoint": str(broken[name])})
        attempts[name] = lambda name=name, cfg=cfg: load_ssl(name, cfg, tiny_cfg.models.tiny_dir)
    for name, attempt in attempts.items():
        with pytest.raises(ModelLoadError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"latents.{name}.checkpoint={str(broken[name])!r}")
        assert "could not be loaded (" in message, message


def test_a_checkpoint_that_is_not_there_names_the_config_key(tiny_cfg, tmp_path):
    bad = tiny_cfg.latents.model_copy(update={"dcae": tiny_cfg.latents.dcae.model_copy(
        update={"checkpoint": str(tmp_path / "nope")})})
    with pytest.raises(ModelLoadError, match="latents.dcae.checkpoint"):
        load_dcae(bad, tiny_cfg.models.tiny_dir, "cpu")


def test_repa_targets_normalise_the_whole_track_then_chunk(tiny_cfg):
    """A track whose level changes between chunks: zero mean, unit variance over the whole track
    (ACE-Step's trainer), then chunks zero-padded to chunk_s, each keeping ceil(samples / 320) frames."""
    cfg = tiny_cfg.latents.mhubert.model_copy(update={"chunk_s": 1.0, "batch_size": 2})
    loaded = load_ssl("mhubert", tiny_cfg.latents.mhubert, tiny_cfg.models.tiny_dir)
    enc = SslEncoder("mhubert", loaded.model, loaded.extractor, cfg, "tiny:mhubert")
    rng = np.random.default_rng(0)
    track = np.concatenate([0.02 * rng.standard_normal(16000), 0.5 * rng.standard_normal(16000) + 0.1,
                            0.1 * rng.standard_normal(9000)]).astype(np.float32)       # 2.56 s, 3 chunks
    ours = enc.features([track])[0]

    # Independent: float64 numpy statistics, one chunk per forward pass.
    whole = ((track - track.astype(np.float64).mean()) / np.sqrt(track.astype(np.float64).var() + 1e-7))
    expected = []
    for start in range(0, len(track), 16000):
        piece = np.zeros(16000, dtype=np.float32)
        piece[:len(whole[start:start + 16000])] = whole[start:start + 16000]
        with torch.no_grad():
            hidden = loaded.model(torch.from_numpy(piece)[None], output_hidden_states=True).hidden_states[-1][0]
        expected.append(hidden[:math.ceil(min(16000, len(track) - start) / 320)])
    expected = torch.cat(expected)
    assert ours.shape == expected.shape == (49 + 49 + 29, enc.dim)               # 49: a whole chunk's frames
    assert torch.allclose(ours, expected, atol=1e-4)

    per_chunk = [loaded.extractor(track[s:s + 16000], sampling_rate=16000)["input_values"][0]
                 for s in range(0, len(track), 16000)]
    plain = SslEncoder("mhubert", loaded.model, loaded.extractor.__class__(do_normalize=False, sampling_rate=16000),
                       cfg, "tiny:mhubert")
    assert not torch.allclose(plain.features([np.concatenate(per_chunk)])[0], expected, atol=1e-2)


def test_every_model_of_the_stage_runs_in_the_compute_dtype(tiny_cfg, monkeypatch):
    """latents.compute_dtype reaches the REPA encoders as it reaches the DCAE (on a GPU; here the
    CPU is made to count as one)."""
    import tasks.latents_batch as batch_module
    import tasks.latents_models as models_module
    from tasks.latents_batch import encode_batch, encoders

    as_gpu = lambda cfg, device: models_module._DTYPES[cfg.compute_dtype]   # noqa: E731
    monkeypatch.setattr(models_module, "compute_dtype", as_gpu)
    monkeypatch.setattr(batch_module, "compute_dtype", as_gpu)
    cfg = tiny_cfg.model_copy(update={"latents": tiny_cfg.latents.model_copy(update={"compute_dtype": "bfloat16"})})
    dcae, ssl = encoders(cfg)
    assert dcae.dtype == torch.bfloat16 and [e.name for e in ssl] == ["mert", "mhubert"]
    assert all(next(e.model.parameters()).dtype == torch.bfloat16 for e in ssl)
    decoded = [{"track_id": "t", "audio": stereo_song(1.0), "meta": {}, "audio_sha": "x"}]
    result = encode_batch(dcae, ssl, decoded, cfg)[0]
    assert result["status"] == "ok" and np.isfinite(result["latent"]).all()
    assert {k: v.shape[1] for k, v in result["features"].items()} == {"mert": 32, "mhubert": 24}


def test_mel_matches_librosa(tiny_cfg):
    import librosa

    mc = tiny_cfg.latents.mel
    ref_fb = librosa.filters.mel(sr=SR, n_fft=2048, n_mels=128, fmin=40.0, fmax=16000.0, htk=False, norm="slaney")
    np.testing.assert_allclose(slaney_filterbank(SR, 2048, 128, 40.0, 16000.0), ref_fb.T, atol=1e-9)

    audio = stereo_song(1.5)
    mel = LogMel(mc)(torch.from_numpy(audio)[None])[0].numpy()             # (2, 128, frames)
    # Independent: numpy reflect padding, librosa's STFT and filterbank, ACE-Step's magnitude and log.
    padded = np.pad(audio, ((0, 0), (768, 768)), mode="reflect")
    spec = np.abs(librosa.stft(padded, n_fft=2048, hop_length=512, win_length=2048, window="hann", center=False))
    ref = np.log(np.maximum(np.einsum("mf,cft->cmt", ref_fb, np.sqrt(spec ** 2 + 1e-6)), 1e-5))
    assert mel.shape == ref.shape == (2, 128, audio.shape[1] // 512)
    np.testing.assert_allclose(mel, ref, atol=2e-4)
    assert not np.allclose(mel[0], mel[1])                                  # each channel its own image


def test_encode_shape_and_latent_rate(dcae):
    assert dcae.latent_fps == pytest.approx(10.77, abs=0.01)
    for seconds in (1.0, 2.37):
        audio = torch.from_numpy(stereo_song(seconds))[None]
        z = dcae.encode_audio(audio)
        assert z.shape == (1, 8, 16, math.ceil(audio.shape[-1] / 4096))
        assert torch.isfinite(z).all()
        assert dcae.valid_length(audio.shape[-1]) == audio.shape[-1] // 4096
    mel = dcae.mel(torch.from_numpy(stereo_song(1.0))[None])
    frames = mel.shape[-1]                                                  # 86: not a multiple of 8
    assert frames % 8 and dcae.encode_mel(mel).shape == (1, 8, 16, math.ceil(frames / 8))


def test_decode_of_encode_gives_a_mel_of_the_input_shape(dcae):
    mel = dcae.mel(torch.from_numpy(np.stack([stereo_song(1.2, 1), stereo_song(1.2, 2)])))   # (2, 2, 128, F)
    z = dcae.encode_mel(mel)
    back = dcae.decode(z)                                                   # what model/images.py draws
    assert back.shape == (2, 2, 128, 8 * math.ceil(mel.shape[-1] / 8)) and torch.isfinite(back).all()
    # decode undoes the latent scaling and the mel normalisation around the autoencoder exactly.
    pad = mel.shape[-1] % 8 and 8 - mel.shape[-1] % 8
    silence = dcae.mel.silence()[None, None, :, None].expand(2, 2, 128, pad)
    with torch.no_grad():
        image = dcae.dcae.decoder(dcae.dcae.encoder(dcae.normalise(torch.cat([mel, silence], dim=-1))))
    assert torch.allclose(back, dcae.denormalise(image), atol=1e-4)
    assert torch.allclose(dcae.normalise(dcae.denormalise(image)), image, atol=1e-6)


def test_vocoder_hook(dcae, tiny_cfg):
    with pytest.raises(RuntimeError, match="latents.dcae.vocoder is not set"):
        dcae.vocode(torch.zeros(1, 2, 128, 8))
    from tasks.latents_models import MusicDCAE

    cfg = tiny_cfg.latents.model_copy(update={"dcae": tiny_cfg.latents.dcae.model_copy(
        update={"vocoder": "tests.test_latents:fake_vocoder"})})
    wav = MusicDCAE(dcae.dcae, cfg, dcae.encoder_id, dcae.revision).vocode(torch.zeros(1, 2, 128, 8))
    assert wav.shape == (1, 2, 8 * 512)


def fake_vocoder(mel: torch.Tensor, sample_rate: int) -> torch.Tensor:
    assert sample_rate == SR
    return torch.zeros(mel.shape[0], mel.shape[1], mel.shape[-1] * 512)


def test_features_pool_to_the_latent_frame_count():
    feats = torch.arange(20.0).repeat(3, 1).T                               # (20, 3), frame i = i
    pooled = pool_to_frames(feats, 5)
    assert pooled.shape == (5, 3)
    assert torch.allclose(pooled[:, 0], torch.tensor([1.5, 5.5, 9.5, 13.5, 17.5]))


def test_batches_group_tracks_of_similar_length_within_the_limits():
    tracks = [{"track_id": f"t{i}", "duration": d} for i, d in enumerate([30, 5, 200, 6, 31, 7, 400])]
    groups = batches(tracks, batch_size=3, max_frames=2000, frame_seconds=1 / 10.77)
    assert [[t["duration"] for t in g] for g in groups] == [[5, 6, 7], [30, 31], [200], [400]]
    assert sorted(t["track_id"] for g in groups for t in g) == sorted(t["track_id"] for t in tracks)


def test_a_bad_latent_or_a_raising_track_rejects_that_track_only(dcae, monkeypatch, tiny_cfg):
    from tasks.latents_batch import encode_batch

    decoded = [{"track_id": f"t{i}", "audio": stereo_song(0.5 + 0.1 * i, i), "meta": {}, "audio_sha": "x"}
               for i in range(3)]
    real = dcae.encode_audio

    def poisoned(audio):   # the batch raises; alone, t1 gives NaNs and t2 raises
        z = real(audio)
        if audio.shape[0] > 1:
            raise RuntimeError("out of memory")
        if audio.shape[-1] == decoded[1]["audio"].shape[1]:
            z[..., 0] = float("nan")
        if audio.shape[-1] == decoded[2]["audio"].shape[1]:
            raise RuntimeError("kernel failed")
        return z

    monkeypatch.setattr(dcae, "encode_audio", poisoned)
    out = {r["track_id"]: r for r in encode_batch(dcae, [], decoded, tiny_cfg)}
    assert out["t0"]["status"] == "ok" and out["t0"]["latent"].shape == (8, 16, math.ceil(0.5 * SR / 4096))
    assert out["t1"]["status"] == "rejected" and out["t1"]["reason"].startswith("bad_latent: ")
    assert out["t2"]["reason"] == "exception: RuntimeError: kernel failed"
    short = {"track_id": "s", "audio": np.zeros((2, 1000), np.float32), "meta": {}, "audio_sha": "x"}
    assert encode_batch(dcae, [], [short], tiny_cfg)[0]["reason"].startswith("too_short: ")


# -- the stage on packed synthetic shards --------------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory, synth_corpus, tiny_models_dir):
    """A work root with the synthetic corpus packed into several audio shards."""
    from pack_fixtures import build_work
    from tasks.pack import pack

    root = tmp_path_factory.mktemp("latents-work")
    cfg = build_work(root, synth_corpus, tiny_models_dir, "pack.shard_bytes=4000000", "device=cpu")
    summary = pack(cfg, "default")
    assert summary["shards"] >= 2
    return cfg


def overrides_of(cfg) -> list[str]:
    return [f"models.tiny_dir={cfg.models.tiny_dir}", f"lyrics_db={cfg.lyrics_db}", "device=cpu",
            f"stages=[{','.join(cfg.stages)}]", f"ingest.partition_size={cfg.ingest.partition_size}",
            f"pack.shard_bytes={cfg.pack.shard_bytes}"]


def copy_work(cfg, dest: Path):
    shutil.copytree(cfg.work_root, dest / "work")
    return cfg.model_copy(update={"work_root": str(dest / "work")})


def test_fingerprint_follows_what_the_shards_hold(packed):
    store = StageStore(packed.work_root)
    base = plan(packed, "default", store)
    faster = packed.model_copy(update={"latents": packed.latents.model_copy(update={"batch_size": 1})})
    assert plan(faster, "default", store)["fingerprint"] == base["fingerprint"]
    other = packed.latents.model_copy(update={"mert": packed.latents.mert.model_copy(update={"layer": 1})})
    changed = plan(packed.model_copy(update={"latents": other}), "default", store)
    assert all(a["fingerprint"] != b["fingerprint"] for a, b in zip(base["shards"], changed["shards"]))


def test_a_corrupt_flac_is_a_reject_and_the_rest_of_its_shard_is_encoded(packed, tmp_path):
    cfg = copy_work(packed, tmp_path)
    cfg = cfg.model_copy(update={"latents": cfg.latents.model_copy(update={
        "mert": cfg.latents.mert.model_copy(update={"enabled": False}),
        "mhubert": cfg.latents.mhubert.model_copy(update={"enabled": False})})})
    store = StageStore(cfg.work_root)
    the_plan = plan(cfg, "default", store)
    shard = next(s for s in the_plan["shards"] if len(s["tracks"]) >= 2)
    victim = shard["tracks"][0]["track_id"]
    path = Path(store.path("shards", "default", shard["shard"]))
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:   # same size: garbage FLAC bytes
        for m, data in members:
            if m.name == f"{victim}.flac":
                data = b"fLaC" + bytes(len(data) - 4)
            tar.addfile(m, io.BytesIO(data))
    the_plan = plan(cfg, "default", store)
    prepare(cfg, the_plan, store)
    results = [encode_shard(cfg, "default", s, store) for s in the_plan["shards"]]
    summary = write_index(cfg, the_plan, results, store)

    hit = next(r for r in results if r["shard"] == shard["shard"])
    assert hit["rejected"] == 1 and hit["ok"] == len(shard["tracks"]) - 1
    rejects = pq.read_table(Path(summary["latents"]) / "rejects.parquet").to_pylist()
    assert [(r["track_id"], r["reason"].split(":")[0]) for r in rejects] == [(victim, "unreadable")]
    index = pq.read_table(Path(summary["latents"]) / "index.parquet").to_pylist()
    packed_ids = pq.read_table(store.path("shards", "default", "index.parquet")).column("track_id").to_pylist()
    assert sorted(r["track_id"] for r in index) == sorted(t for t in packed_ids if t != victim)
    with tarfile.open(Path(summary["latents"]) / shard["shard"]) as tar:
        keys = {m.name.split(".")[0] for m in tar.getmembers()}
    assert victim not in keys and keys == {t["track_id"] for t in shard["tracks"]} - {victim}


def test_a_record_holds_its_tars_size_and_checksum_and_a_cut_tar_is_encoded_again(packed, tmp_path, caplog):
    from tasks.shards import file_digest

    cfg = copy_work(packed, tmp_path)
    cfg = cfg.model_copy(update={"latents": cfg.latents.model_copy(update={
        "mert": cfg.latents.mert.model_copy(update={"enabled": False}),
        "mhubert": cfg.latents.mhubert.model_copy(update={"enabled": False})})})
    store = StageStore(cfg.work_root)
    shard = plan(cfg, "default", store)["shards"][0]
    assert encode_shard(cfg, "default", shard, store)["skipped"] is False
    out = Path(store.path("latents", "default"))
    tar, record = out / shard["shard"], out / "records" / shard["shard"].replace(".tar", ".parquet")
    meta = pq.read_schema(record).metadata
    assert (int(meta[b"tar_bytes"]), meta[b"tar_blake2b"].decode()) == file_digest(store, str(tar))
    clean = tar.read_bytes()
    assert encode_shard(cfg, "default", shard, store)["skipped"] is True

    tar.write_bytes(clean[: len(clean) // 2])          # a stat tells: encoded again, same bytes
    with caplog.at_level("WARNING", logger="acepipe.latents"):
        assert encode_shard(cfg, "default", shard, store)["skipped"] is False
    assert f"{shard['shard']} is damaged" in caplog.text and tar.read_bytes() == clean
    record.write_bytes(b"not parquet")                 # a record that does not read: quarantined, encoded again
    assert encode_shard(cfg, "default", shard, store)["skipped"] is False
    assert tar.read_bytes() == clean and list((Path(cfg.work_root) / "quarantine").rglob("shard-*.parquet.*"))


@pytest.mark.slow
def test_latents_flow_writes_shards_the_trainer_reads_and_a_rerun_skips_them(packed, tmp_path, capsys,
                                                                             prefect_harness):
    from flows.latents import latents
    from flows.params import DatasetParams
    from model.data import decode_sample
    import webdataset as wds

    cfg = copy_work(packed, tmp_path)
    params = DatasetParams(config="tiny", work_root=cfg.work_root, overrides=overrides_of(cfg), dataset="default")
    first = latents(params)

    store = StageStore(cfg.work_root)
    audio_index = pq.read_table(store.path("shards", "default", "index.parquet")).to_pylist()
    audio_shards = sorted({r["shard"] for r in audio_index})
    out = Path(first["latents"])
    assert sorted(p.name for p in out.glob("shard-*.tar")) == audio_shards   # one per audio shard
    index = pq.read_table(out / "index.parquet")
    assert index.schema.metadata[b"fingerprint"].decode() == first["fingerprint"]
    rows = index.to_pylist()
    pairs = sorted((r["shard"], r["track_id"]) for r in audio_index)
    assert sorted((r["shard"], r["track_id"]) for r in rows) == pairs          # every packed track
    assert first["tracks"] == len(audio_index) and first["rejected"] == 0
    assert first["shards_run"] == len(audio_shards)

    by_id = {r["track_id"]: r for r in rows}
    seen = 0
    for raw in wds.WebDataset([str(out / s) for s in audio_shards], shardshuffle=False, empty_check=False):
        meta = json.loads(raw["json"])
        row = by_id[raw["__key__"]]
        latent = np.load(io.BytesIO(raw["latent.npy"]))
        assert latent.dtype == np.float16 and latent.shape == (8, 16, row["frames"])
        assert meta["valid_length"] == row["valid_length"] == math.floor(row["duration"] * SR / 4096)
        assert meta["latent_fps"] == pytest.approx(10.77, abs=0.01) and meta["sample_rate"] == SR
        assert meta["encoder_id"] == "tiny:dcae/music_dcae_f8c8" and len(meta["audio_sha"]) == 64
        assert meta["caption"] and meta["tags"] and "instrumental" in meta and "lyrics" in meta
        for name, dim in (("mert", 32), ("mhubert", 24)):
            assert np.load(io.BytesIO(raw[f"{name}.npy"])).shape == (row["valid_length"], dim)
        sample = decode_sample(raw, ["mert", "mhubert"])
        assert sample["latent"].shape == (8, 16, row["valid_length"]) and sample["prompt"]
        seen += 1
    assert seen == len(rows)

    from model.data import LatentDataModule
    from model.lyric_encoder import load_lyric_tokenizer
    from schemas.train import load_train_config

    tcfg = load_train_config("tiny", [f"data.shards={out}", f"tiny_dir={cfg.models.tiny_dir}"])
    dm = LatentDataModule(tcfg, load_lyric_tokenizer(tcfg.lyric_encoder.tokenizer, tcfg.tiny_dir))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["latents"].shape[:3] == (len(dm.val_samples), 8, 16)
    assert {t.name: t.dim for t in dm.cfg.repa.targets} == {"mert": 32, "mhubert": 24}

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    index_mtime = (out / "index.parquet").stat().st_mtime_ns
    second = latents(params)
    assert second["shards_skipped"] == len(audio_shards) and second["shards_run"] == 0
    assert second["fingerprint"] == first["fingerprint"] and second["tracks"] == first["tracks"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert (out / "index.parquet").stat().st_mtime_ns == index_mtime

    from flows.cli import main

    argv = ["latents", "--config", "tiny", "--work", cfg.work_root, "--dataset", "default"]
    assert main(argv + [x for o in overrides_of(cfg) for x in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(audio_shards)} skipped" in printed and f"tracks    {len(rows)} ok" in printed
