"""Caption stage: the tiny Qwen2.5-Omni twin is written like the release, loads its thinker
(and no talker) through the real code, hears synthetic songs through the processor and
generates in batches; the parser and normaliser turn answers into tags; a random twin's
gibberish is a malformed_caption reject with the raw text kept; bad audio is a reject."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pytest
from safetensors import safe_open

from schemas.caption import CAPTION_SCHEMA, CaptionConfig
from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import load_config
from tasks import audio
from tasks.caption import (
    CaptionStage,
    MalformedCaption,
    OmniThinker,
    caption_fields,
    clip_window,
    normalise_tags,
    parse_caption,
    thinker_config,
)
from tasks.models import resolve_checkpoint

TINY = ["device=cpu", "caption.checkpoint=tiny:qwen_omni", "caption.max_new_tokens=16",
        "caption.batch_size=4", "caption.clip_s=10"]
GOOD_JSON = ('Sure! Here is the caption:\n```json\n{"description": "A bright pop song with synths and a '
             'female singer.", "genre": ["Pop", "Dance Pop"], "instruments": ["Synth", "drum kit", "bass"], '
             '"vocals": "female singer", "mood": ["happy", "Energetic"], "tags": ["club", "POP"]}\n```')


def track_row(path, rhythm: dict | None = None) -> dict:
    """A catalog-like row (what ingest gives), with what rhythm would add."""
    raw = os.fsencode(path)
    info = audio.probe(raw)
    return {"track_id": hashlib.sha1(raw).hexdigest()[:16], "uri": audio.display_path(raw),
            "uri_raw": raw, "duration": info.duration, "sample_rate": info.sample_rate,
            "channels": info.channels, "codec": info.codec, "rhythm": rhythm}


def corpus_songs(corpus, kind: str) -> list[tuple[bytes, dict]]:
    truth = json.loads((corpus / "ground_truth.json").read_text())
    return [(os.fsencode(corpus) + b"/" + (bytes.fromhex(s["file_hex"]) if "file_hex" in s
                                           else s["file"].encode()), s)
            for s in truth["songs"] if s["kind"] == kind]


@pytest.fixture(scope="module")
def twin(tiny_models_dir) -> str:
    return resolve_checkpoint("tiny:qwen_omni", tiny_models_dir)


@pytest.fixture(scope="module")
def make_stage(tiny_models_dir, twin):
    stages: dict[tuple, CaptionStage] = {}

    def make(*overrides: str) -> CaptionStage:
        if overrides not in stages:
            cfg = load_config("tiny", [f"models.tiny_dir={tiny_models_dir}", *TINY, *overrides], environ={})
            stages[overrides] = CaptionStage(cfg)
            stages[overrides].setup()
        return stages[overrides]
    return make


@pytest.fixture(scope="module")
def songs(synth_corpus) -> list[dict]:
    return [track_row(path, {"tempo_phrase": f"{round(s['bpm'])} BPM", "key_phrase": f"{s['key']} {s['scale']}"})
            for path, s in corpus_songs(synth_corpus, "song")]


# ---- the twin and the adapter -----------------------------------------------------------------

def test_twin_is_saved_like_the_release_with_thinker_weights_only(twin):
    config = json.loads(open(os.path.join(twin, "config.json")).read())
    assert config["model_type"] == "qwen2_5_omni" and config["enable_audio_output"] is False
    with safe_open(os.path.join(twin, "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(k.startswith("thinker.") for k in keys)
    assert any(k.startswith("thinker.audio_tower.") for k in keys)
    model = OmniThinker(twin, "cpu")
    assert type(model.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert not hasattr(model.model, "talker")
    assert model.model.config.text_config.vocab_size == 151936
    assert sum(p.numel() for p in model.model.parameters()) < 25_000_000
    tok = model.processor.tokenizer
    assert tok.convert_tokens_to_ids("<|AUDIO|>") == model.model.config.audio_token_id == 151646
    assert tok.convert_tokens_to_ids("<|audio_bos|>") == model.model.config.audio_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_bos|>") == model.model.config.vision_start_token_id
    assert tok.decode(tok("Describe this song: 128 BPM").input_ids) == "Describe this song: 128 BPM"


def test_a_config_without_vision_start_token_id_gets_the_released_id(twin, tmp_path):
    config = json.loads(open(os.path.join(twin, "config.json")).read())
    config["thinker_config"].pop("vision_start_token_id")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert thinker_config(str(tmp_path)).vision_start_token_id == 151652


def test_a_missing_checkpoint_says_which_setting_to_fix(tmp_path):
    with pytest.raises(RuntimeError, match="caption.checkpoint"):
        OmniThinker(str(tmp_path / "nowhere"), "cpu")


def test_the_processor_gives_one_audio_token_per_40_ms(twin):
    model = OmniThinker(twin, "cpu")
    clip = np.zeros(5 * 16000, dtype=np.float32)
    inputs = model.processor(text=[model._text("s", "p")], audio=[clip], return_tensors="pt",
                             audio_kwargs={"max_length": len(clip)})
    assert int(inputs["feature_attention_mask"].sum()) == 500      # 10 ms mel frames
    assert int((inputs["input_ids"] == 151646).sum()) == 125       # 25 audio tokens per second


def test_generation_is_capped_by_max_new_tokens(twin):
    model = OmniThinker(twin, "cpu")
    clips = [np.random.default_rng(i).normal(0, 0.1, 16000 * s).astype(np.float32) for i, s in ((0, 3), (1, 6))]
    gens = model.generate(clips, ["Describe it."] * 2, "You are a music critic.", max_new_tokens=5)
    assert [g.completion_tokens <= 5 for g in gens] == [True, True]
    assert gens[0].prompt_tokens < gens[1].prompt_tokens  # longer clip, more audio tokens
    assert all(isinstance(g.text, str) for g in gens)


def test_scoring_only_the_last_position_changes_no_answer(twin):
    model = OmniThinker(twin, "cpu")
    assert model.model.visual is None  # the vision tower is dropped after loading
    clips = [np.random.default_rng(i).normal(0, 0.1, 16000 * s).astype(np.float32) for i, s in ((2, 4), (3, 7))]
    fast = model.generate(clips, ["Describe it."] * 2, "You are a music critic.", max_new_tokens=8)
    model.model.lm_head = model.model.lm_head.head  # the thinker's own head: logits for every position
    full = model.generate(clips, ["Describe it."] * 2, "You are a music critic.", max_new_tokens=8)
    assert [g.text for g in fast] == [g.text for g in full]


# ---- the stage on synthetic songs ------------------------------------------------------------

def test_every_song_gets_a_row_that_fits_the_schema_with_the_raw_text_kept(make_stage, songs):
    rows = make_stage("caption.on_malformed=reject").process(songs)
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    assert table.column("track_id").to_pylist() == [s["track_id"] for s in songs]
    for row, song in zip(rows, songs):
        assert row["backend"] == "transformers" and row["model"] == "tiny:qwen_omni"
        assert isinstance(row["raw"], str) and row["raw"]
        assert row["clip_s"] == pytest.approx(min(10.0, song["duration"]), abs=0.01)
        assert row["clip_start"] == pytest.approx((song["duration"] - row["clip_s"]) / 2, abs=0.01)
        if row["status"] == STATUS_REJECTED:
            assert row["reason"].startswith("malformed_caption: ")
        else:
            assert row["status"] == STATUS_OK and row["description"] and row["tags"]
    # random weights speak no JSON: the reject path is what the twin exercises
    assert any(r["status"] == STATUS_REJECTED for r in rows)
    # the tiny profile keeps those tracks, with the twin's text as their description
    kept = make_stage().process(songs)
    assert all(r["status"] == STATUS_OK and r["description"] == " ".join(r["raw"].split()) for r in kept
               if r["raw"].strip())


def test_greedy_answers_do_not_depend_on_the_batch_size(make_stage, songs):
    a = make_stage().process(songs[:3])
    b = make_stage("caption.batch_size=1").process(songs[:3])
    assert [r["raw"] for r in a] == [r["raw"] for r in b]


def test_bad_input_is_rejected_with_the_loaders_reason(make_stage, synth_corpus, songs):
    bad = []
    for path, _ in corpus_songs(synth_corpus, "bad"):
        try:
            bad.append(track_row(path))
        except audio.AudioError:
            continue  # ingest rejects what cannot even be probed
    rows = make_stage().process(bad + songs[:1])
    assert all(r["status"] == STATUS_REJECTED for r in rows[:-1])
    assert {"silent", "too_short", "non_finite"} <= {r["reason"].split(":")[0] for r in rows[:-1]}
    assert rows[-1]["raw"]  # the good track in the same batch was captioned
    pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)


def test_a_good_answer_becomes_an_ok_row_with_bpm_and_key_in_the_tags(make_stage, songs):
    row = make_stage()._row(songs[0], GOOD_JSON)
    assert row["status"] == STATUS_OK and row["reason"] is None
    assert row["description"] == "A bright pop song with synths and a female singer."
    assert row["genre"] == ["pop", "dance pop"]
    assert row["instruments"] == ["synthesizer", "drums", "bass"]
    assert row["vocals"] == ["female vocals"]
    tempo, key = songs[0]["rhythm"]["tempo_phrase"].lower(), songs[0]["rhythm"]["key_phrase"].lower()
    assert row["tags"] == ["pop", "dance pop", "synthesizer", "drums", "bass", "female vocals", "happy",
                           "energetic", "club", tempo, key]
    assert row["raw"] == GOOD_JSON


def test_where_the_clip_is_taken():
    assert clip_window(100.0, 30.0) == (35.0, 30.0)
    assert clip_window(12.0, 30.0) == (0.0, 12.0)


def test_the_stage_key_ignores_how_the_server_is_reached():
    def fp(*overrides):
        return CaptionStage(load_config("default", list(overrides), environ={})).fingerprint()
    assert fp("caption.url=http://a/v1", "caption.timeout_s=5") == fp("caption.url=http://b/v1")
    assert fp("caption.prompt=Describe it.") != fp()


# ---- parsing and tags --------------------------------------------------------------------------

def test_json_is_found_in_fences_and_chatter():
    parsed = parse_caption(GOOD_JSON)
    assert parsed["description"].startswith("A bright pop song")
    assert parsed["vocals"] == ["female singer"] and parsed["tags"] == ["club", "POP"]
    bare = parse_caption('{"caption": "Slow piano.", "Moods": "calm, sad", "genres": ["classical"]}')
    assert bare == {"description": "Slow piano.", "genre": ["classical"], "instruments": [], "vocals": [],
                    "mood": ["calm", "sad"], "tags": []}


def test_labelled_lines_are_read_when_there_is_no_json():
    text = ("**Description:** A moody trip-hop track with a\nbreakbeat and muted trumpet.\n"
            "Genre: trip hop, downtempo\n- Instruments: drums; trumpet\nVocals: none\nMood: dark\n")
    parsed = parse_caption(text)
    assert parsed["description"] == "A moody trip-hop track with a breakbeat and muted trumpet."
    assert parsed["genre"] == ["trip hop", "downtempo"] and parsed["instruments"] == ["drums", "trumpet"]
    assert parsed["vocals"] == ["none"] and parsed["mood"] == ["dark"]


@pytest.mark.parametrize("text, why", [
    ("qzjx vbnm wq", "no JSON object"),
    ('{"description": "", "genre": ["pop"]}', "no description"),
    ('{"description": "Nice.", "genre": []}', "no genre"),
    ('{"description": "Nice.", "genre": {"main": "pop"}}', "'genre' is a dict"),
    ("Description: a song", "no genre"),
    ('{"genre": ["pop"', "no JSON object"),
])
def test_unusable_answers_say_what_is_missing(text, why):
    with pytest.raises(MalformedCaption, match=why):
        parse_caption(text)


def test_tags_are_lowercased_trimmed_mapped_and_deduplicated():
    synonyms = CaptionConfig().synonyms
    tags = normalise_tags([" Hip Hop ", "hip-hop", "E-Guitar.", '"Synth"', "drum_kit", "", "  ",
                           "a very long phrase of many words", "R and B"], synonyms)
    assert tags == ["hip-hop", "electric guitar", "synthesizer", "drums", "r&b"]


def test_bpm_and_key_join_the_tags_and_survive_the_cap():
    cfg = CaptionConfig(max_tags=4)
    raw = '{"description": "x", "genre": ["rock", "metal", "punk", "grunge", "indie"]}'
    fields = caption_fields(raw, {"tempo_phrase": "128 BPM", "key_phrase": "A minor"}, cfg)
    assert fields["tags"] == ["rock", "metal", "128 bpm", "a minor"]
    assert caption_fields(raw, {"tempo_phrase": None, "key_phrase": None}, cfg)["tags"] == \
        ["rock", "metal", "punk", "grunge"]
    assert caption_fields(raw, None, cfg)["genre"] == ["rock", "metal", "punk", "grunge", "indie"]


def test_defaults_name_the_released_model():
    cfg = load_config("default", environ={}).caption
    assert cfg.checkpoint == "Qwen/Qwen2.5-Omni-7B" and cfg.backend == "transformers"
    assert "JSON" in cfg.prompt and cfg.temperature == 0.0


def test_twin_builder_writes_a_loadable_directory_again(tmp_path, twin):
    # the builder is deterministic: a second build has the same weights
    from tasks.caption import build_tiny

    build_tiny(tmp_path)
    with safe_open(os.path.join(twin, "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
        key = "thinker.audio_tower.conv1.weight"
        assert np.array_equal(a.get_tensor(key).numpy(), b.get_tensor(key).numpy())


def test_keep_raw_keeps_a_malformed_answer_as_the_description():
    from schemas.caption import CaptionConfig
    from tasks.caption import MalformedCaption, caption_fields

    rhythm = {"tempo_phrase": "120 bpm", "key_phrase": "a minor"}
    with pytest.raises(MalformedCaption):
        caption_fields("zx qq  vv", rhythm, CaptionConfig())
    kept = caption_fields("zx qq  vv", rhythm, CaptionConfig(on_malformed="keep_raw"))
    assert kept["description"] == "zx qq vv"
    assert kept["tags"] == ["120 bpm", "a minor"] and kept["genre"] == []
    with pytest.raises(MalformedCaption):      # an empty answer is never a caption
        caption_fields("  ", rhythm, CaptionConfig(on_malformed="keep_raw"))
