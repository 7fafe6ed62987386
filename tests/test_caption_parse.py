"""Reading the caption model's answer: a full structured answer gives the stage's fields, its
tags and ACE-Step's five description variants; ACE-Step's own layout, labelled lines and the
complete pairs of a cut answer are read too; a partial answer leaves what it lacks null or
empty, whatever the types; an answer with no description or no phrase says what is missing;
tags are normalised and carry the BPM and key."""
from __future__ import annotations

import json

import pytest

from schemas.caption import CAPTION_PROMPT, RECAPTION_KEYS, CaptionConfig
from tasks.caption_parse import MalformedCaption, caption_fields, normalise_tags, parse_caption, read_answer

# What a chat model answers to the default prompt: a fenced JSON object after a line of chatter.
FULL_ANSWER = """Here is the caption for the track:
```json
{
  "description": "A mid-tempo indie folk song led by fingerpicked acoustic guitar and a soft male voice, with brushed drums and a cello joining in the second half. The mood is wistful and warm.",
  "genre": ["Indie Folk", "Singer-Songwriter"],
  "instruments": ["acoustic guitar", "brushed drums", "Cello", "upright bass"],
  "vocals": ["male vocals", "soft harmonies"],
  "mood": ["wistful", "warm", "Melancholic"],
  "tags": ["intimate", "organic"],
  "simplified": "indie folk",
  "expanded": "indie folk, chamber folk, fingerstyle guitar, brushed percussion, acoustic singer-songwriter",
  "descriptive": "Gentle fingerpicked guitar and a hushed male voice, warmed by a slow cello line and the soft hiss of brushed drums.",
  "synonyms": "acoustic folk, unplugged, strings, mellow, reflective",
  "use_cases": "coffee shop playlists, reflective film scenes, quiet evening listening"
}
```"""
FULL_VARIANTS = {
    "simplified": "indie folk",
    "expanded": "indie folk, chamber folk, fingerstyle guitar, brushed percussion, acoustic singer-songwriter",
    "descriptive": "Gentle fingerpicked guitar and a hushed male voice, warmed by a slow cello line and the soft "
                   "hiss of brushed drums.",
    "synonyms": "acoustic folk, unplugged, strings, mellow, reflective",
    "use_cases": "coffee shop playlists, reflective film scenes, quiet evening listening",
}
NO_VARIANTS = dict.fromkeys(RECAPTION_KEYS)


def test_a_full_answer_gives_the_fields_and_all_five_variants():
    parsed = parse_caption(FULL_ANSWER)
    assert parsed == {
        "description": "A mid-tempo indie folk song led by fingerpicked acoustic guitar and a soft male voice, "
                       "with brushed drums and a cello joining in the second half. The mood is wistful and warm.",
        "genre": ["Indie Folk", "Singer-Songwriter"],
        "instruments": ["acoustic guitar", "brushed drums", "Cello", "upright bass"],
        "vocals": ["male vocals", "soft harmonies"],
        "mood": ["wistful", "warm", "Melancholic"],
        "tags": ["intimate", "organic"],
        "recaption": FULL_VARIANTS,
    }
    fields = caption_fields(FULL_ANSWER, {"tempo_phrase": "92 BPM", "key_phrase": "D major"}, CaptionConfig())
    assert fields["tags"] == ["indie folk", "singer-songwriter", "acoustic guitar", "brushed drums", "cello",
                              "upright bass", "male vocals", "soft harmonies", "wistful", "warm", "melancholy",
                              "intimate", "organic", "92 bpm", "d major"]
    assert fields["recaption"] == FULL_VARIANTS


def test_the_default_prompts_own_example_is_a_full_answer():
    # the prompt asks for every key the parser reads: its example parses with all five variants
    example = CAPTION_PROMPT.split("Example: ", 1)[1]
    parsed = parse_caption(example)
    assert parsed["description"] == "An upbeat pop song with bright synths and a female singer."
    assert all(parsed["recaption"][key] for key in RECAPTION_KEYS)
    assert set(json.loads(example)) == {"description", "genre", "instruments", "vocals", "mood", "tags",
                                        *RECAPTION_KEYS}


def test_an_answer_in_ace_steps_own_layout_is_read():
    """The layout of ACE-Step's TRAIN_INSTRUCTION.md prompt: lists under analysis, no description."""
    answer = json.dumps({
        "simplified": "trap", "expanded": "trap, hip-hop, 808 bass, hi-hat rolls",
        "descriptive": "Booming 808s under crisp rolling hi-hats and a dark bell melody.",
        "synonyms": "southern rap beat, sub bass, dark", "use_cases": "gaming montages, workout mixes",
        "analysis": {"genre": ["trap", "hip-hop"], "instruments": ["808 bass", "hi-hats", "bells"],
                     "tempo": "140 BPM half-time", "mood": ["dark", "aggressive"]},
        "lyrical_rap_check": True})
    parsed = parse_caption(answer)
    assert parsed["description"] == "Booming 808s under crisp rolling hi-hats and a dark bell melody."
    assert parsed["genre"] == ["trap", "hip-hop"] and parsed["instruments"] == ["808 bass", "hi-hats", "bells"]
    assert parsed["mood"] == ["dark", "aggressive"] and parsed["vocals"] == [] and parsed["tags"] == []
    assert parsed["recaption"]["use_cases"] == "gaming montages, workout mixes"
    # its tempo guess never joins the tags: the rhythm stage measures tempo
    assert "140 bpm half-time" not in caption_fields(answer, None, CaptionConfig())["tags"]


def test_a_partial_answer_leaves_what_it_lacks_null():
    answer = ('{"description": "Solo piano, slow and sparse.", "genre": ["classical"], "mood": {"main": "calm"}, '
              '"instruments": ["piano", 3, null, true, ["x"]], "simplified": "piano", "expanded": ["piano", "solo"], '
              '"descriptive": 42, "synonyms": "   ", "use_cases": null}')
    parsed = parse_caption(answer)
    assert parsed["description"] == "Solo piano, slow and sparse."
    assert parsed["genre"] == ["classical"] and parsed["mood"] == [] and parsed["vocals"] == []
    assert parsed["instruments"] == ["piano", "3"]
    assert parsed["recaption"] == {**NO_VARIANTS, "simplified": "piano"}
    # no variant at all: the column is null, not a struct of nulls
    assert parse_caption('{"description": "Solo piano.", "genre": ["classical"]}')["recaption"] is None


def test_a_cut_answer_keeps_its_complete_pairs_under_keep_raw():
    cut = FULL_ANSWER.split('"synonyms"')[0] + '"synonyms": "acoustic folk, unplu'
    fields = caption_fields(cut, None, CaptionConfig(on_malformed="keep_raw"))
    assert fields["description"].startswith("A mid-tempo indie folk song")
    assert fields["genre"] == ["indie folk", "singer-songwriter"]
    assert fields["recaption"] == {**FULL_VARIANTS, "synonyms": None, "use_cases": None}
    # cut inside its description: no caption, so the raw text stands in (or the track is rejected)
    early = '{"genre": ["pop"], "analysis": {"mood": ["happy"]}, "description": "A bright'
    with pytest.raises(MalformedCaption, match="no description"):
        caption_fields(early, None, CaptionConfig())
    kept = caption_fields(early, None, CaptionConfig(on_malformed="keep_raw"))
    assert kept["description"] == early and kept["genre"] == ["pop"] and kept["mood"] == ["happy"]


def test_json_is_found_in_fences_and_chatter_under_other_key_names():
    bare = parse_caption('Sure. {"caption": "Slow piano.", "Moods": "calm, sad", "genres": ["classical"], '
                         '"Use Cases": "sleep", "use-cases": "later ones lose"} Enjoy!')
    assert bare == {"description": "Slow piano.", "genre": ["classical"], "instruments": [], "vocals": [],
                    "mood": ["calm", "sad"], "tags": [], "recaption": {**NO_VARIANTS, "use_cases": "sleep"}}


def test_labelled_lines_are_read_when_there_is_no_json():
    text = ("**Description:** A moody trip-hop track with a\nbreakbeat and muted trumpet.\n"
            "Genre: trip hop, downtempo\n- Instruments: drums; trumpet\nVocals: none\nMood: dark\n"
            "Simplified: trip hop\nDescriptive: Dusty breaks and a lonely\nmuted trumpet.\nUse-cases: noir films\n")
    parsed = parse_caption(text)
    assert parsed["description"] == "A moody trip-hop track with a breakbeat and muted trumpet."
    assert parsed["genre"] == ["trip hop", "downtempo"] and parsed["instruments"] == ["drums", "trumpet"]
    assert parsed["vocals"] == ["none"] and parsed["mood"] == ["dark"]
    assert parsed["recaption"] == {**NO_VARIANTS, "simplified": "trip hop",
                                   "descriptive": "Dusty breaks and a lonely muted trumpet.",
                                   "use_cases": "noir films"}


@pytest.mark.parametrize("text, why", [
    ("qzjx vbnm wq", "no JSON object"),
    ("", "no JSON object"),
    ('{"description": "", "genre": ["pop"]}', "no description"),
    ('{"description": ["A", "list"], "genre": ["pop"], "simplified": "pop"}', "no description"),
    ('{"description": "Nice.", "genre": []}', "no genre"),
    ('{"description": "Nice.", "genre": {"main": "pop"}}', r"no genre.*'genre' is a dict, not a list of phrases"),
    ('{"description": "Nice.", "simplified": "pop", "expanded": "pop, dance"}', "no genre"),
    ("Description: a song", "no genre"),
    ('{"genre": ["pop"', "no JSON object"),
    ('[{"description": "A list, not an object."}]', "no genre"),
])
def test_unusable_answers_say_what_is_missing(text, why):
    with pytest.raises(MalformedCaption, match=why):
        parse_caption(text)
    parsed, problem = read_answer(text)  # the same verdict without an exception
    assert problem and set(parsed) == {"description", "genre", "instruments", "vocals", "mood", "tags", "recaption"}


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


def test_keep_raw_keeps_a_malformed_answer_as_the_description():
    rhythm = {"tempo_phrase": "120 bpm", "key_phrase": "a minor"}
    with pytest.raises(MalformedCaption):
        caption_fields("zx qq  vv", rhythm, CaptionConfig())
    kept = caption_fields("zx qq  vv", rhythm, CaptionConfig(on_malformed="keep_raw"))
    assert kept["description"] == "zx qq vv" and kept["recaption"] is None
    assert kept["tags"] == ["120 bpm", "a minor"] and kept["genre"] == []
    # a description with variants but no phrase keeps both, not the raw JSON
    partial = '{"description": "Soft rain and a piano.", "simplified": "ambient"}'
    kept = caption_fields(partial, rhythm, CaptionConfig(on_malformed="keep_raw"))
    assert kept["description"] == "Soft rain and a piano." and kept["recaption"]["simplified"] == "ambient"
    with pytest.raises(MalformedCaption):      # an empty answer is never a caption
        caption_fields("  ", rhythm, CaptionConfig(on_malformed="keep_raw"))
