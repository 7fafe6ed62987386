"""The real-model profile (configs/default.yaml) end to end at load time: every stage it runs and
every model it names is loaded through the stages' own loading code, from twins saved the way
the released checkpoints are (paths an offline operator would set, not `tiny:` names).

What "saved the way the released checkpoints are" means per model:
  - aesthetics: a Hugging Face-format directory (config.json + model.safetensors), as the hub's
    facebook/audiobox-aesthetics holds it;
  - whisper: a `.pt` file given by path (what the stage's own error tells offline operators to do);
  - Qwen2.5-Omni: a full-model directory whose thinker config lacks vision_start_token_id;
  - Beat This: a Lightning `.ckpt`;
  - DCAE: a repository directory with the music_dcae_f8c8 subfolder;
  - MERT: remote code (trust_remote_code) whose config class has no `conv_pos_batch_norm`, which
    transformers >= 4.48's HuBERT encoder reads;
  - mHuBERT: a transformers HubertModel directory.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import load_config
from tasks.models import resolve_checkpoint
from tasks.stage import dag_order, stage_class


@pytest.fixture(scope="module")
def released_twins(tiny_models_dir, tmp_path_factory):
    """{model: the path an operator would put in configs/default.yaml}."""
    from tasks.aesthetics import load_model as load_aesthetics

    out = tmp_path_factory.mktemp("released")
    twin = {n: resolve_checkpoint(f"tiny:{n}", tiny_models_dir)
            for n in ("aesthetics", "whisper", "qwen_omni", "beat_this", "dcae", "mert", "mhubert")}
    hf_aesthetics = out / "audiobox-aesthetics"
    load_aesthetics(twin["aesthetics"]).save_pretrained(hf_aesthetics)
    ckpts = sorted(p for p in Path(twin["beat_this"]).iterdir() if p.suffix == ".ckpt")
    return {"aesthetics": str(hf_aesthetics), "whisper": f"{twin['whisper']}/model.pt",
            "qwen_omni": twin["qwen_omni"], "beat_this": str(ckpts[0]), "dcae": twin["dcae"],
            "mert": twin["mert"], "mhubert": twin["mhubert"]}


@pytest.fixture(scope="module")
def default_cfg(released_twins, synth_corpus, tiny_models_dir, tmp_path_factory):
    t = released_twins
    return load_config("default", [
        f"work_root={tmp_path_factory.mktemp('work')}", f"models.tiny_dir={tiny_models_dir}", "device=cpu",
        f"lyrics_db={synth_corpus / 'lyrics.parquet'}",
        f"aesthetics.checkpoint={t['aesthetics']}", f"transcribe.model={t['whisper']}",
        f"caption.checkpoint={t['qwen_omni']}", f"rhythm.checkpoint={t['beat_this']}",
        f"latents.dcae.checkpoint={t['dcae']}", f"latents.mert.checkpoint={t['mert']}",
        f"latents.mhubert.checkpoint={t['mhubert']}"], environ={})


def test_the_default_profile_sets_up_every_stage_with_the_released_model_classes(default_cfg):
    expected = {"probe": None, "aesthetics": "AesMultiOutput", "transcribe": "Whisper", "lyrics": None,
                "rhythm": "BeatThis", "caption": "Qwen2_5OmniThinkerForConditionalGeneration"}
    order = dag_order(default_cfg.stages)
    assert order == list(expected)
    loaded = {}
    for name in order:
        stage = stage_class(name)(default_cfg)
        stage.setup()
        model = {"aesthetics": lambda s: s.model, "transcribe": lambda s: s.model,
                 "rhythm": lambda s: s.tracker.model, "caption": lambda s: s.backend.model}.get(name)
        loaded[name] = type(model(stage)).__name__ if model else None
    assert loaded == expected


def test_the_default_profile_loads_the_latents_models(default_cfg):
    from tasks.latents_models import load_dcae, load_ssl

    cfg = default_cfg.latents
    assert cfg.compute_dtype == "float32" and cfg.mert.enabled and cfg.mhubert.enabled
    dcae = load_dcae(cfg, default_cfg.models.tiny_dir, "cpu")
    assert type(dcae.dcae).__name__ == "AutoencoderDC" and dcae.dtype.is_floating_point
    mert = load_ssl("mert", cfg.mert, default_cfg.models.tiny_dir, "cpu")
    assert not hasattr(type(mert.model.config)(), "conv_pos_batch_norm"), \
        "the MERT-style twin must reproduce the released config's missing attribute"
    mhubert = load_ssl("mhubert", cfg.mhubert, default_cfg.models.tiny_dir, "cpu")
    assert type(mhubert.model).__name__ == "HubertModel"
