"""Reading the caption model's answer (DAG step 5, tasks/caption.py): fields, tags, ACE-Step's variants.

One answer holds the stage's own fields (description; genre, instruments, vocals, mood and
tags as lists of phrases) and ACE-Step's description variants (simplified, expanded,
descriptive, synonyms, use_cases: strings its trainer reads as `recaption`). Read, in order:
  - a JSON object, bare, fenced or amid chatter; ACE-Step's own layout (the lists under
    "analysis", the variants at the top or under "recaption") is read too;
  - the complete `"key": value` pairs of a JSON answer cut short (kept only under
    caption.on_malformed=keep_raw: the stage rejects a cut answer otherwise);
  - `Description: ...` / `Genre: a, b` / `Simplified: ...` lines.
A key that is missing, or holds a value of the wrong type, is empty (lists) or null (variants),
never an exception. The answer is malformed (MalformedCaption) only when it has no
description or not a single phrase: without them the track has no caption to train on.
"""
from __future__ import annotations

import json
import re

from schemas.caption import RECAPTION_KEYS, CaptionConfig

LIST_FIELDS = ("genre", "instruments", "vocals", "mood", "tags")
TEXT_FIELDS = ("description", *RECAPTION_KEYS)
# What models write instead of our key names.
FIELD_ALIASES = {"caption": "description", "summary": "description", "genres": "genre",
                 "instrument": "instruments", "instrumentation": "instruments", "vocal": "vocals",
                 "voice": "vocals", "voices": "vocals", "moods": "mood", "tag": "tags", "keywords": "tags",
                 "simple": "simplified", "expansion": "expanded", "synonym": "synonyms",
                 "use_case": "use_cases", "usecases": "use_cases", "applications": "use_cases"}
# Objects whose keys fill the answer's missing ones: ACE-Step's prompt puts the lists under
# "analysis"; some answers group the variants.
NESTED = ("analysis", "recaption", "variants")
KNOWN = (*TEXT_FIELDS, *LIST_FIELDS, *NESTED)


class MalformedCaption(ValueError):
    """The model's text holds no usable caption; the message says what was missing."""


def _field(name: str) -> str:
    name = re.sub(r"[\s_-]+", "_", name.strip().lower())
    return FIELD_ALIASES.get(name, name)


def _flatten(obj: dict) -> dict:
    """Keys normalised; the keys of a nested analysis/recaption object fill those missing at the top."""
    flat: dict = {}
    for key, value in obj.items():
        flat.setdefault(_field(str(key)), value)  # "Use Cases" then "use-cases": the first one counts
    for name in NESTED:
        if isinstance(flat.get(name), dict):
            for key, value in _flatten(flat[name]).items():
                flat.setdefault(key, value)
    return flat


def _json_object(text: str) -> dict | None:
    """The first JSON object in the text that has a caption key (fences and chatter around it are fine)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            obj = _flatten(obj)
            if any(k in obj for k in KNOWN):
                return obj
    return None


# A complete "key": value pair whose value is a string, a flat list, a number or a literal.
_PAIR = re.compile(r'"([^"\\]{1,40})"\s*:\s*("(?:[^"\\]|\\.)*"|\[[^\[\]{}]*\]|-?\d+(?:\.\d+)?|true|false|null)')


def _json_pairs(text: str) -> dict | None:
    """Every complete `"key": value` pair of a JSON answer cut mid-way (first one of a key wins);
    pairs of a nested object land at the top, which is where we want analysis's lists."""
    found: dict = {}
    for match in _PAIR.finditer(text):
        try:
            value = json.loads(match.group(2))
        except json.JSONDecodeError:
            continue
        found.setdefault(_field(match.group(1)), value)
    return found if any(k in found for k in KNOWN) else None


_LABEL = re.compile(r"^[\s>*#-]*([A-Za-z_ -]{3,20}?)\s*\**\s*:\s*\**\s*(.*)$")  # '- **Genre:** x'


def _labelled_lines(text: str) -> dict | None:
    """`Description: ...` / `Tags: a, b` lines; a description or variant may run on over following lines."""
    found: dict = {}
    last = None
    for line in text.splitlines():
        m = _LABEL.match(line)
        key = _field(m.group(1)) if m else None
        if key in TEXT_FIELDS or key in LIST_FIELDS:
            found[key] = m.group(2).strip()
            last = key
        elif last in TEXT_FIELDS and line.strip():
            found[last] += " " + line.strip()
        else:
            last = None
    return found or None


def _answer_object(text: str) -> dict | None:
    obj = _json_object(text)
    if obj is not None and any(k in obj for k in TEXT_FIELDS):
        return obj
    # No complete object with a description or variant: a cut answer (whose first complete
    # object may be its nested analysis), or none at all.
    pairs = _json_pairs(text)
    if pairs is not None:
        return {**pairs, **(obj or {})}
    return obj or _labelled_lines(text)


def _phrases(value) -> list[str] | None:
    """A list of phrases from a list or a comma-separated string; None when the value is of
    another type (a dict, a bool). Items of the wrong type in a list are left out."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in re.split(r"[,;\n]|\s+/\s+", value) if p.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list):
        return [str(v).strip() for v in value
                if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip()]
    return None


def _text(value) -> str | None:
    """One line of text, or None for an empty or non-string value."""
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def read_answer(text: str) -> tuple[dict, str | None]:
    """({'description': str | None, 'genre': [...], 'instruments', 'vocals', 'mood', 'tags',
    'recaption': {variant: str | None} | None}, why it is no caption or None). Never raises:
    what the answer lacks is empty or null. It is no caption without a description or
    without a single phrase."""
    obj = _answer_object(text)
    notes = []
    parsed: dict = {"description": _text((obj or {}).get("description"))}
    for key in LIST_FIELDS:
        phrases = _phrases((obj or {}).get(key))
        if phrases is None:
            notes.append(f"{key!r} is a {type(obj[key]).__name__}, not a list of phrases")
        parsed[key] = phrases or []
    variants = {key: _text((obj or {}).get(key)) for key in RECAPTION_KEYS}
    parsed["recaption"] = variants if any(variants.values()) else None
    if parsed["description"] is None and variants["descriptive"]:
        # an answer in ACE-Step's own layout has no description: its sound-only sentence is one
        parsed["description"] = variants["descriptive"]
    if obj is None:
        return parsed, "no JSON object and no 'Description:' line"
    if not parsed["description"]:
        return parsed, "no description"
    if not any(parsed[k] for k in LIST_FIELDS):
        return parsed, "no genre, instruments, vocals, mood or tags" + (f" ({'; '.join(notes)})" if notes else "")
    return parsed, None


def parse_caption(text: str) -> dict:
    """The fields of read_answer; MalformedCaption (saying what is missing) when they are no caption."""
    parsed, problem = read_answer(text)
    if problem:
        raise MalformedCaption(problem)
    return parsed


def normalise_tags(phrases: list[str], synonyms: dict[str, str] | None = None,
                   max_words: int = 4) -> list[str]:
    """Lower-case, trimmed, one space between words, synonyms mapped, duplicates dropped (order kept)."""
    synonyms = synonyms or {}
    out: list[str] = []
    for phrase in phrases:
        tag = " ".join(str(phrase).replace("_", " ").lower().split()).strip(" \"'`.,;:!?()[]{}*#-")
        tag = synonyms.get(tag, tag)
        if tag and len(tag.split()) <= max_words and tag not in out:
            out.append(tag)
    return out


def caption_fields(raw: str, rhythm: dict | None, cfg: CaptionConfig) -> dict:
    """The stage's fields for one track from the model's text (MalformedCaption if unusable,
    unless caption.on_malformed keeps what parses, with the raw text as the description when
    there is none)."""
    parsed, problem = read_answer(raw)
    if problem:
        if cfg.on_malformed != "keep_raw" or not raw.strip():
            raise MalformedCaption(problem)
        parsed["description"] = parsed["description"] or " ".join(raw.split())
    fields = {"description": parsed["description"], "recaption": parsed["recaption"]}
    for key in LIST_FIELDS:
        fields[key] = normalise_tags(parsed[key], cfg.synonyms, cfg.max_tag_words)
    rhythm = rhythm or {}
    musical = normalise_tags([p for p in (rhythm.get("tempo_phrase"), rhythm.get("key_phrase")) if p])
    heard = normalise_tags([t for k in LIST_FIELDS for t in fields[k]], max_words=cfg.max_tag_words)
    heard = [t for t in heard if t not in musical][:max(cfg.max_tags - len(musical), 0)]
    fields["tags"] = heard + musical
    return fields
