"""Lyric texts of the synthetic corpus, in several languages (three CJK), with section tags.

Corpus songs sing these texts with espeak-ng; texts no song sings, near-variants of sung
ones and generated word salads fill the lyrics database as distractors, so that matching
has something to get wrong.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LyricText:
    language: str        # ISO 639-1
    voice: str           # espeak-ng voice
    title: str
    lyrics: str          # what the database holds: lines with [verse]/[chorus] tags
    sung: str = ""       # what espeak reads, when it cannot read `lyrics` itself

    def sung_text(self) -> str:
        return self.sung or sung_text(self.lyrics)


# Ordered so that the first five vocal songs of a corpus cover en, zh, es, fr, de.
SONG_LYRICS = [
    LyricText("en", "en", "Morning Light",
              "[verse]\nI walked along the river in the morning light\n"
              "the city was still sleeping and the sky was white\n"
              "[chorus]\nhold on to the morning light\nhold on and never say goodnight"),
    # This espeak-ng build lacks most Han characters (it spells their pinyin in English),
    # so the Mandarin song is sung from tone-numbered pinyin; the database keeps the Han text.
    LyricText("zh", "cmn-latn-pinyin", "月光",
              "[verse]\n我在月光下走路\n城市安静地睡着\n[chorus]\n月光照亮我的心\n我们一起唱这首歌",
              sung="wo3 zai4 yue4 guang1 xia4 zou3 lu4, cheng2 shi4 an1 jing4 de5 shui4 zhe5, "
                   "yue4 guang1 zhao4 liang4 wo3 de5 xin1, wo3 men5 yi4 qi3 chang4 zhe4 shou3 ge1"),
    LyricText("es", "es", "Camino del Mar",
              "[verse]\ncamino por la playa cuando sale el sol\nlas olas me cantan una vieja canción\n"
              "[chorus]\nven conmigo al camino del mar\nven conmigo y vamos a bailar"),
    LyricText("fr", "fr", "La Ville Blanche",
              "[verse]\nje marche dans la ville quand la nuit descend\nles lumières dansent au rythme du vent\n"
              "[chorus]\noh la ville blanche mon amour\noh la ville blanche pour toujours"),
    LyricText("de", "de", "Über den Bergen",
              "[verse]\nich wandere über die Berge im kalten Wind\nund denke an die Tage als wir Kinder sind\n"
              "[chorus]\nüber den Bergen scheint das Licht\nüber den Bergen vergess ich dich nicht"),
    # Kana only: espeak-ng's Japanese voice reads kana but not kanji.
    LyricText("ja", "ja", "つきのうた",
              "[verse]\nよるのまちを ひとりで あるく\nつきのひかりが みちを てらす\n"
              "[chorus]\nうたおう いっしょに うたおう\nこころの なかで ひかる ほし"),
    LyricText("ko", "ko", "별빛",
              "[verse]\n밤하늘 아래 혼자 걸어요\n바람이 불어 노래를 해요\n"
              "[chorus]\n별빛이 내려 내 마음에\n우리 함께 노래해요"),
    LyricText("it", "it", "Sole di Sera",
              "[verse]\ncammino per la strada quando il sole va giù\nle stelle del cielo mi parlano di te\n"
              "[chorus]\nsole di sera resta con me\nsole di sera io canto per te"),
    LyricText("pt", "pt", "Luz do Sol",
              "[verse]\neu caminho pela praia quando nasce o sol\no vento canta baixinho uma velha canção\n"
              "[chorus]\nluz do sol fica comigo\nluz do sol meu velho amigo"),
]

_WORDS = {
    "en": "love night fire dream heart road rain city light dance sky river home golden wild".split(),
    "es": "amor noche fuego sueño corazón camino lluvia ciudad luz baile cielo río casa".split(),
    "fr": "amour nuit feu rêve coeur route pluie ville lumière danse ciel rivière maison".split(),
    "de": "Liebe Nacht Feuer Traum Herz Straße Regen Stadt Licht Tanz Himmel Fluss Haus".split(),
    "zh": list("爱夜火梦心路雨城光舞天河家风海"),
    "ja": "あい よる ひ ゆめ こころ みち あめ まち ひかり そら かわ いえ かぜ うみ".split(),
}


def _line(rng: random.Random, language: str) -> str:
    words = _WORDS[language]
    return ("" if language == "zh" else " ").join(rng.choice(words) for _ in range(rng.randint(5, 8)))


def distractor_lyrics(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(language, title, lyrics) of generated songs that are in the database only."""
    rng = random.Random(seed)
    out = []
    langs = sorted(_WORDS)
    for i in range(count):
        lang = langs[i % len(langs)]
        verse = "\n".join(_line(rng, lang) for _ in range(2))
        chorus = "\n".join(_line(rng, lang) for _ in range(2))
        out.append((lang, f"Generated {lang} {i}", f"[verse]\n{verse}\n[chorus]\n{chorus}"))
    return out


def variant_lyrics(text: LyricText, seed: int) -> str:
    """A near-miss of a sung text: the same verse under a different chorus (a "cover" that
    shares half its words with the real song, so a matcher must verify, not just find)."""
    rng = random.Random(f"{seed}-{text.title}")
    verse = text.lyrics.split("[chorus]")[0].rstrip("\n")
    lang = text.language if text.language in _WORDS else "en"
    chorus = "\n".join(_line(rng, lang) for _ in range(2))
    return f"{verse}\n[chorus]\n{chorus}"


def sung_text(lyrics: str) -> str:
    """The words a singer reads: section tags dropped, lines joined."""
    return " ".join(line for line in lyrics.splitlines() if line and not line.startswith("["))
