"""Caption stage: the tiny Qwen2.5-Omni twin is written like the release, loads its thinker
(and no talker) through the real code, hears synthetic songs through the processor and
generates in batches, feeding and answering as the stock transformers processor and thinker
do (parity); an answer cut at max_new_tokens is retried once with the larger budget and is a
truncated_caption reject if still cut; a structured answer becomes a row with its tags, ACE-Step's
variants (recaption) and its finish_reason, written as the runner writes it; a random twin's
gibberish is kept as raw text with a null recaption; bad audio is a reject. (Reading answers:
test_caption_parse.py.)"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from schemas.caption import CAPTION_SCHEMA, RECAPTION_KEYS, CaptionConfig
from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import load_config
from tasks import audio
from tasks.caption import CaptionStage, Generation, OmniThinker, clip_window, thinker_config
from tasks.models import ModelLoadError, resolve_checkpoint

TINY = ["device=cpu", "caption.checkpoint=tiny:qwen_omni", "caption.max_new_tokens=16",
        "caption.batch_size=4", "caption.clip_s=10"]
GOOD_VARIANTS = {"simplified": "dance pop", "expanded": "dance pop, synth-pop, electropop, club beat",
                 "descriptive": "Glossy synth chords and a punchy kick under a bright, confident female voice.",
                 "synonyms": "electronic pop, keyboards, upbeat, party", "use_cases": "club playlists, workout videos"}
GOOD_JSON = ('Sure! Here is the caption:\n```json\n{"description": "A bright pop song with synths and a '
             'female singer.", "genre": ["Pop", "Dance Pop"], "instruments": ["Synth", "drum kit", "bass"], '
             '"vocals": "female singer", "mood": ["happy", "Energetic"], "tags": ["club", "POP"], '
             + json.dumps(GOOD_VARIANTS)[1:-1] + '}\n```')


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
    with pytest.raises(ModelLoadError, match=r"^caption.checkpoint=.*nowhere.*tiny:qwen_omni") as caught:
        OmniThinker(str(tmp_path / "nowhere"), "cpu")
    assert "\n" not in str(caught.value)


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
    # a random twin never says <|im_end|>: both answers are cut, and say so
    assert [(g.completion_tokens, g.finish_reason, g.truncated) for g in gens] == [(5, "length", True)] * 2
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


class EndTokenAt(torch.nn.Module):
    """The adapter's head, except that batch row `row` says `end_id` as its `step`-th new token."""

    def __init__(self, head: torch.nn.Module, row: int, step: int, end_id: int):
        super().__init__()
        self.head, self.row, self.step, self.end_id, self.calls = head, row, step, end_id, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)  # (B, 1, V): one call per new token
        self.calls += 1
        if self.calls == self.step:
            logits[self.row, -1, self.end_id] = logits[self.row].max() + 1.0
        return logits


def test_each_answer_in_a_batch_says_whether_it_reached_its_end_token(twin):
    model = OmniThinker(twin, "cpu")
    end_id = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.model.lm_head = EndTokenAt(model.model.lm_head, row=0, step=3, end_id=end_id)
    clips = [np.random.default_rng(i).normal(0, 0.1, 16000 * 3).astype(np.float32) for i in (4, 5)]
    ended, cut = model.generate(clips, ["Describe it."] * 2, "You are a music critic.", max_new_tokens=8)
    assert (ended.finish_reason, ended.truncated, ended.completion_tokens) == ("stop", False, 3)
    assert ended.text and "<|im_end|>" not in ended.text
    assert (cut.finish_reason, cut.truncated, cut.completion_tokens) == ("length", True, 8)


def test_the_adapter_feeds_and_answers_like_the_stock_processor_and_thinker_parity(twin, monkeypatch):
    """For one clip and the stage's prompt, our model inputs and greedy answer equal those of
    the stock transformers path as the model card runs it: Qwen2_5OmniProcessor's own
    apply_chat_template on a conversation with {"type": "audio", "audio": array}, its own
    __call__ (use_audio_in_video False), Qwen2_5OmniThinkerForConditionalGeneration.generate.

    How our path differs, and why no difference changes what the thinker computes:
      - AudioOmniProcessor has no image/video processors (the video one needs torchvision, not
        installed). The stock processor reads them only for <|IMAGE|>/<|VIDEO|> tokens, absent
        from an audio prompt. To build the stock one here, its class check is pointed at the real
        BaseVideoProcessor (transformers exports a placeholder when torchvision is missing), and
        it gets a Qwen2VLImageProcessor and a BaseVideoProcessor with the released merge_size 2;
        neither is ever called.
      - Padding: the stock processor pads each clip to the feature extractor's n_samples (300 s);
        we pad to the longest clip plus half a window, rounded up to a hop. input_ids, the mask's
        frames and the masked features are equal; the thinker gathers only masked frames, and the
        stock tensor's extra columns are zero-padding with mask 0. The clip is 5.02 s + 1 sample
        on purpose: padding to the clip's own length (our old way) dropped its last partial frame
        and gave 125 audio tokens where the reference gives 126.
      - Our conversation carries a placeholder where the array goes: the chat template only asks
        whether a part is audio, so the text is the same (asserted).
      - Generation: only the last position is scored (LastPositionHead), the vision tower is
        dropped, generation stops at <|im_end|> or <|endoftext|>, and the text is trimmed of
        surrounding whitespace. The twin never reaches an end token, so both run to max_new_tokens.
    None of these is a deliberate difference in behaviour, so none has a config switch."""
    import transformers.processing_utils
    from transformers import (AutoTokenizer, Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration,
                              Qwen2VLImageProcessor, WhisperFeatureExtractor)
    from transformers.video_processing_utils import BaseVideoProcessor

    monkeypatch.setattr(transformers.processing_utils.transformers_module, "BaseVideoProcessor", BaseVideoProcessor)
    stock = Qwen2_5OmniProcessor(Qwen2VLImageProcessor(), BaseVideoProcessor(merge_size=2),
                                 WhisperFeatureExtractor.from_pretrained(twin), AutoTokenizer.from_pretrained(twin),
                                 chat_template=(Path(twin) / "chat_template.jinja").read_text())
    cfg = CaptionConfig()
    clip = np.random.default_rng(7).normal(0, 0.1, 160 * 502 + 1).astype(np.float32)
    conversation = [{"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]},
                    {"role": "user", "content": [{"type": "audio", "audio": clip},
                                                 {"type": "text", "text": cfg.prompt}]}]
    text = stock.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    reference = stock(text=text, audio=[clip], return_tensors="pt", padding=True, use_audio_in_video=False)

    ours = OmniThinker(twin, "cpu")
    inputs = ours.inputs([clip], [cfg.prompt], cfg.system_prompt)
    assert ours._text(cfg.system_prompt, cfg.prompt) == text
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    assert torch.equal(inputs["attention_mask"], reference["attention_mask"])
    audio_token = ours.model.config.audio_token_id
    assert int((inputs["input_ids"] == audio_token).sum()) == int((reference["input_ids"] == audio_token).sum()) == 126
    frames, width = int(reference["feature_attention_mask"].sum()), inputs["input_features"].shape[-1]
    assert frames == 503
    assert torch.equal(inputs["feature_attention_mask"], reference["feature_attention_mask"][:, :width])
    assert not reference["feature_attention_mask"][:, width:].any()
    assert torch.equal(inputs["input_features"][..., :frames], reference["input_features"][..., :frames])

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(twin).eval()
    with torch.no_grad():
        out = model.generate(**reference, max_new_tokens=12, do_sample=False)
    stock_text = stock.batch_decode(out[:, reference["input_ids"].shape[1]:], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)[0]
    answer = ours.generate([clip], [cfg.prompt], cfg.system_prompt, max_new_tokens=12)[0]
    assert answer.text and answer.text == stock_text.strip()


# ---- the stage on synthetic songs ------------------------------------------------------------

def test_every_song_gets_a_row_that_fits_the_schema_with_the_raw_text_kept(make_stage, songs):
    rows = make_stage("caption.on_malformed=reject", "caption.retry_max_new_tokens=32").process(songs)
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    assert table.column("track_id").to_pylist() == [s["track_id"] for s in songs]
    for row, song in zip(rows, songs):
        assert row["backend"] == "transformers" and row["model"] == "tiny:qwen_omni"
        assert isinstance(row["raw"], str) and row["raw"]
        assert row["clip_s"] == pytest.approx(min(10.0, song["duration"]), abs=0.01)
        assert row["clip_start"] == pytest.approx((song["duration"] - row["clip_s"]) / 2, abs=0.01)
        assert row["finish_reason"] == "length"  # random weights never say <|im_end|>
        if row["status"] == STATUS_REJECTED:
            assert row["reason"].startswith(("malformed_caption: ", "truncated_caption: "))
        else:
            assert row["status"] == STATUS_OK and row["description"] and row["tags"]
    # random weights never end an answer (nor write JSON): cut at 16 tokens, cut again at 32
    assert any(r["reason"].startswith("truncated_caption: 32 tokens, no end of answer") for r in rows)
    # the tiny profile keeps those tracks, with the twin's text as their description; its random
    # text holds no variant, so recaption is null (the column is there all the same)
    kept = make_stage().process(songs)
    assert all(r["status"] == STATUS_OK and r["description"] == " ".join(r["raw"].split()) for r in kept
               if r["raw"].strip())
    table = pa.Table.from_pylist(kept, schema=CAPTION_SCHEMA)
    assert table.column("recaption").to_pylist() == [None] * len(songs)
    assert table.column("finish_reason").to_pylist() == ["length"] * len(songs)


def test_greedy_answers_do_not_depend_on_the_batch_size(make_stage, songs):
    a = make_stage().process(songs[:3])
    b = make_stage("caption.batch_size=1").process(songs[:3])
    assert [r["raw"] for r in a] == [r["raw"] for r in b]


def spy_budgets(stage: CaptionStage, monkeypatch) -> list[tuple[int, int]]:
    """(clips, max_new_tokens) of each generate() call the stage makes from now on."""
    calls, real = [], stage.backend.generate

    def generate(clips, prompts, system, max_new_tokens, temperature=0.0):
        calls.append((len(clips), max_new_tokens))
        return real(clips, prompts, system, max_new_tokens, temperature)
    monkeypatch.setattr(stage.backend, "generate", generate)
    return calls


@pytest.mark.parametrize("retry, calls, tokens", [("8", [(2, 4), (2, 8)], 8), ("4", [(2, 4)], 4)])
def test_a_cut_answer_is_retried_once_with_the_larger_budget_then_rejected_as_truncated(
        make_stage, songs, monkeypatch, retry, calls, tokens):
    stage = make_stage("caption.on_malformed=reject", "caption.max_new_tokens=4",
                       f"caption.retry_max_new_tokens={retry}")
    made = spy_budgets(stage, monkeypatch)
    rows = stage.process(songs[:2])
    assert made == calls  # retry_max_new_tokens equal to max_new_tokens: no retry
    for row in rows:
        assert row["status"] == STATUS_REJECTED and row["raw"]
        assert row["finish_reason"] == "length" and row.get("recaption") is None
        assert row["reason"].startswith(f"truncated_caption: {tokens} tokens, no end of answer")
        assert f"caption.retry_max_new_tokens={tokens}" in row["reason"]
    pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)


def test_only_cut_answers_are_retried_and_one_that_ends_on_the_retry_is_kept(make_stage, songs, monkeypatch):
    stage = make_stage("caption.on_malformed=reject", "caption.max_new_tokens=4",
                       "caption.retry_max_new_tokens=8")
    calls = []

    def generate(clips, prompts, system, max_new_tokens, temperature=0.0):
        calls.append((len(clips), max_new_tokens))
        if max_new_tokens == 4:  # the first song's answer is cut, the second's is whole
            return [Generation('{"description": "A bright', 90, 4, "length"), Generation(GOOD_JSON, 90, 4, "stop")]
        return [Generation(GOOD_JSON, 90, 7, "stop")]
    monkeypatch.setattr(stage.backend, "generate", generate)
    rows = stage.process(songs[:2])
    assert calls == [(2, 4), (1, 8)]
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_OK]
    assert [r["raw"] for r in rows] == [GOOD_JSON, GOOD_JSON]
    assert [r["finish_reason"] for r in rows] == ["stop", "stop"]  # the retry's, for the first


def test_the_retry_budget_defaults_to_twice_max_new_tokens_and_is_never_smaller():
    assert load_config("default", environ={}).caption.retry_budget == 1024
    assert CaptionConfig(max_new_tokens=100, retry_max_new_tokens=150).retry_budget == 150
    with pytest.raises(ValidationError, match="retry_max_new_tokens=50 is below caption.max_new_tokens=100"):
        CaptionConfig(max_new_tokens=100, retry_max_new_tokens=50)


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
    assert all(r.get("finish_reason") is None for r in rows[:-1])  # no answer: no finish reason
    pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)


def test_a_good_answer_becomes_an_ok_row_with_bpm_and_key_in_the_tags(make_stage, songs):
    row = make_stage()._row(songs[0], Generation(GOOD_JSON, 90, 60, "stop"))
    assert row["status"] == STATUS_OK and row["reason"] is None
    assert row["description"] == "A bright pop song with synths and a female singer."
    assert row["genre"] == ["pop", "dance pop"]
    assert row["instruments"] == ["synthesizer", "drums", "bass"]
    assert row["vocals"] == ["female vocals"]
    tempo, key = songs[0]["rhythm"]["tempo_phrase"].lower(), songs[0]["rhythm"]["key_phrase"].lower()
    assert row["tags"] == ["pop", "dance pop", "synthesizer", "drums", "bass", "female vocals", "happy",
                           "energetic", "club", tempo, key]
    assert row["raw"] == GOOD_JSON and row["finish_reason"] == "stop"
    assert row["recaption"] == GOOD_VARIANTS


def test_the_variants_land_in_the_stage_output_as_acestep_reads_them(make_stage, songs, tmp_path):
    """Written and read back as the runner writes a partition; then read the way ACE-Step's
    text2music_dataset.py reads `recaption`: every non-empty string value is a prompt."""
    import pyarrow.parquet as pq

    stage = make_stage()
    partial = '{"description": "Calm piano.", "genre": ["ambient"], "simplified": "ambient", "expanded": 7}'
    rows = [{**stage._row(song, Generation(text, 90, 60, "stop")), "clip_start": 0.0, "clip_s": 10.0}
            for song, text in zip(songs, (GOOD_JSON, partial))]
    pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA), tmp_path / "part-00000.parquet")
    back = pq.read_table(tmp_path / "part-00000.parquet")
    assert back.schema.field("recaption").type == pa.struct([(k, pa.string()) for k in RECAPTION_KEYS])
    recaptions = back.column("recaption").to_pylist()
    assert [sorted(v for v in r.values() if isinstance(v, str) and v) for r in recaptions] == \
        [sorted(GOOD_VARIANTS.values()), ["ambient"]]
    assert back.column("description").to_pylist() == ["A bright pop song with synths and a female singer.",
                                                      "Calm piano."]


def test_where_the_clip_is_taken():
    assert clip_window(100.0, 30.0) == (35.0, 30.0)
    assert clip_window(12.0, 30.0) == (0.0, 12.0)


def test_the_stage_key_ignores_how_the_server_is_reached():
    def fp(*overrides):
        return CaptionStage(load_config("default", list(overrides), environ={})).fingerprint()
    assert fp("caption.url=http://a/v1", "caption.timeout_s=5") == fp("caption.url=http://b/v1")
    assert fp("caption.prompt=Describe it.") != fp()


def test_defaults_name_the_released_model():
    cfg = load_config("default", environ={}).caption
    assert cfg.checkpoint == "Qwen/Qwen2.5-Omni-7B" and cfg.backend == "transformers"
    assert "JSON" in cfg.prompt and cfg.temperature == 0.0
    assert all(f'"{key}"' in cfg.prompt for key in RECAPTION_KEYS)  # one answer asks for every variant


def test_twin_builder_writes_a_loadable_directory_again(tmp_path, twin):
    # the builder is deterministic: a second build has the same weights
    from tasks.caption_twin import write_twin

    write_twin(tmp_path)
    with safe_open(os.path.join(twin, "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
        key = "thinker.audio_tower.conv1.weight"
        assert np.array_equal(a.get_tensor(key).numpy(), b.get_tensor(key).numpy())
