"""Lyrics text -> IPA, for the lyrics stage: normalise, G2P for CJK, espeak-ng for the rest.

Debian's espeak-ng 1.51 reads Mandarin tone digits as English words and kanji as
"Chinese letter", so Chinese goes through pypinyin and Japanese through pykakasi first,
then a small table maps pinyin / Hepburn romaji to IPA. Korean Hangul and alphabetic
languages go through phonemizer's espeak-ng backend. Results are cached by
(language, text) hash, and each language is phonemised in one batched call.
"""
from __future__ import annotations

import hashlib
import re
import threading
import unicodedata

SECTION_TAG = re.compile(r"^\s*\[[^\]]*\]\s*$")
_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)
HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
KANA = re.compile(r"[\u3040-\u30ff]")
HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
NON_LATIN_UNSUPPORTED = re.compile(r"[\u0f00-\u0fff\u1800-\u18af\ua000-\ua4cf]")  # Tibetan, Mongolian, Yi

# ISO 639-1 -> espeak-ng voice. Unknown languages in Latin script fall back to `fallback_voice`.
VOICES = {
    "en": "en-us", "es": "es", "fr": "fr-fr", "de": "de", "it": "it", "pt": "pt", "nl": "nl",
    "sv": "sv", "da": "da", "no": "nb", "nb": "nb", "fi": "fi", "pl": "pl", "cs": "cs", "ro": "ro",
    "hu": "hu", "tr": "tr", "ru": "ru", "uk": "uk", "el": "el", "hi": "hi", "id": "id", "ms": "ms",
    "vi": "vi", "ko": "ko", "ar": "ar", "he": "he", "fa": "fa", "th": "th",
}

_PINYIN_INITIALS = [("zh", "ʈʂ"), ("ch", "ʈʂʰ"), ("sh", "ʂ"), ("b", "p"), ("p", "pʰ"), ("m", "m"),
                    ("f", "f"), ("d", "t"), ("t", "tʰ"), ("n", "n"), ("l", "l"), ("g", "k"),
                    ("k", "kʰ"), ("h", "x"), ("j", "tɕ"), ("q", "tɕʰ"), ("x", "ɕ"), ("r", "ʐ"),
                    ("z", "ts"), ("c", "tsʰ"), ("s", "s"), ("y", "j"), ("w", "w")]
_PINYIN_FINALS = {
    "a": "a", "o": "o", "e": "ɤ", "i": "i", "u": "u", "v": "y", "ü": "y", "ai": "ai", "ei": "ei",
    "ao": "au", "ou": "ou", "an": "an", "en": "ən", "ang": "aŋ", "eng": "əŋ", "ong": "ʊŋ",
    "ia": "ja", "ie": "je", "iao": "jau", "iu": "jou", "ian": "jɛn", "in": "in", "iang": "jaŋ",
    "ing": "iŋ", "iong": "jʊŋ", "ua": "wa", "uo": "wo", "uai": "wai", "ui": "wei", "uan": "wan",
    "un": "wən", "uang": "waŋ", "ue": "ɥe", "ve": "ɥe", "er": "ɚ",
}
_ROMAJI = [("shi", "ɕi"), ("chi", "tɕi"), ("tsu", "tsɯ"), ("sh", "ɕ"), ("ch", "tɕ"), ("fu", "ɸɯ"),
           ("ji", "dʑi"), ("j", "dʑ"), ("y", "j"), ("r", "ɾ"), ("u", "ɯ"), ("ou", "oː"), ("aa", "aː"),
           ("ii", "iː"), ("ee", "eː"), ("oo", "oː")]


def normalise(text: str) -> str:
    """NFKC, lower case, section tags and punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "")
    lines = [ln for ln in text.splitlines() if not SECTION_TAG.match(ln)]
    text = _PUNCT.sub(" ", " ".join(lines).lower())
    return re.sub(r"\s+", " ", text).strip()


def script_language(text: str, tagged: str | None) -> str | None:
    """The language the text's script implies when it overrides the tag (mostly CJK
    characters), else the tag. A few CJK words in Latin text do not flip it."""
    letters = sum(ch.isalpha() for ch in text) or 1
    kana, han, hangul = len(KANA.findall(text)), len(HAN.findall(text)), len(HANGUL.findall(text))
    if (kana + han) / letters >= 0.3 and (kana or tagged == "ja"):
        return "ja"
    if han / letters >= 0.3:
        return "zh"
    if hangul / letters >= 0.3:
        return "ko"
    return (tagged or "").lower().split("-")[0] or None


def _pinyin_ipa(syllable: str) -> str:
    for ini, ipa in _PINYIN_INITIALS:
        if syllable.startswith(ini) and len(syllable) > len(ini):
            rest = syllable[len(ini):]
            if ini in ("j", "q", "x", "y") and rest.startswith("u"):
                rest = "v" + rest[1:]
            if rest == "i" and ini in ("zh", "ch", "sh", "r", "z", "c", "s"):
                return ipa + "ɨ"
            return ipa + _PINYIN_FINALS.get(rest, rest)
    return _PINYIN_FINALS.get(syllable, syllable)


def _zh_ipa(text: str) -> str:
    from pypinyin import Style, lazy_pinyin

    words = []
    for token in text.split():
        syllables = lazy_pinyin(token, style=Style.NORMAL, errors="ignore", v_to_u=False)
        words.append("".join(_pinyin_ipa(s) for s in syllables if s.isalpha()))
    return " ".join(w for w in words if w)


_KAKASI = None
_KAKASI_LOCK = threading.Lock()


def _ja_ipa(text: str) -> str:
    global _KAKASI
    import pykakasi

    with _KAKASI_LOCK:
        if _KAKASI is None:
            _KAKASI = pykakasi.kakasi()
        parts = _KAKASI.convert(text)
    words = []
    for part in parts:
        roman = part["hepburn"].lower()
        for src, ipa in _ROMAJI:
            roman = roman.replace(src, ipa)
        if roman.strip():
            words.append(roman.strip())
    return " ".join(words)


class Phonemizer:
    """Batched, cached text -> IPA. One espeak backend per voice, created on first use."""

    def __init__(self, fallback_voice: str = "en-us"):
        self.fallback_voice = fallback_voice
        self._backends: dict = {}
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str, language: str | None) -> str:
        return hashlib.blake2b(f"{language}\x00{text}".encode(), digest_size=12).hexdigest()

    def _espeak(self, voice: str, texts: list[str]) -> list[str]:
        from phonemizer.backend import EspeakBackend
        from phonemizer.separator import Separator

        with self._lock:
            if voice not in self._backends:
                self._backends[voice] = EspeakBackend(voice, language_switch="remove-flags",
                                                      with_stress=False)
            backend = self._backends[voice]
            return backend.phonemize(texts, strip=True, separator=Separator(phone="", word=" "))

    def ipa(self, texts: list[str], languages: list[str | None]) -> list[str]:
        """IPA of each (already normalised) text; '' where nothing could be phonemised."""
        out: list[str | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, (text, lang) in enumerate(zip(texts, languages)):
            lang = script_language(text, lang)
            k = self.key(text, lang)
            if k in self._cache:
                out[i] = self._cache[k]
            elif not text or NON_LATIN_UNSUPPORTED.search(text):
                out[i] = ""
            elif lang == "zh":
                out[i] = self._cache.setdefault(k, _zh_ipa(text))
            elif lang == "ja":
                out[i] = self._cache.setdefault(k, _ja_ipa(text))
            else:
                todo.setdefault(VOICES.get(lang or "", self.fallback_voice), []).append(i)
        for voice, idx in todo.items():
            results = self._espeak(voice, [texts[i] for i in idx])
            for i, ipa in zip(idx, results):
                lang = script_language(texts[i], languages[i])
                out[i] = self._cache.setdefault(self.key(texts[i], lang), clean_ipa(ipa))
        return [o or "" for o in out]


_STRIP = re.compile(r"[ˈˌː\-]|\([a-z\-]+\)")


def clean_ipa(ipa: str) -> str:
    """Drop stress and length marks and espeak's language-switch flags: ASR errors move them."""
    return re.sub(r"\s+", " ", _STRIP.sub("", ipa)).strip()


def shingles(ipa: str, k: int) -> set[str]:
    """Character k-grams of the IPA with word breaks removed (segmentation-proof for CJK)."""
    s = ipa.replace(" ", "")
    if len(s) < k:
        return {s} if s else set()
    return {s[i:i + k] for i in range(len(s) - k + 1)}
