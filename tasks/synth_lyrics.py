"""Lyric texts of the synthetic corpus, in several languages (one CJK), with section tags.

Corpus songs sing the first texts; the rest, plus generated ones, are database
distractors so that matching has something to get wrong.
"""
from __future__ import annotations

import random

# (language, espeak voice, title, lyrics with [verse]/[chorus] tags)
SONG_LYRICS = [
    ("en", "en", "Morning Light",
     "[verse]\nI walked along the river in the morning light\nthe city was still sleeping and the sky was white\n"
     "[chorus]\nhold on to the morning light\nhold on and never say goodnight"),
    ("es", "es", "Camino del Mar",
     "[verse]\ncamino por la playa cuando sale el sol\nlas olas me cantan una vieja canción\n"
     "[chorus]\nven conmigo al camino del mar\nven conmigo y vamos a bailar"),
    ("fr", "fr", "La Ville Blanche",
     "[verse]\nje marche dans la ville quand la nuit descend\nles lumières dansent au rythme du vent\n"
     "[chorus]\noh la ville blanche mon amour\noh la ville blanche pour toujours"),
    ("de", "de", "Über den Bergen",
     "[verse]\nich wandere über die Berge im kalten Wind\nund denke an die Tage als wir Kinder sind\n"
     "[chorus]\nüber den Bergen scheint das Licht\nüber den Bergen vergess ich dich nicht"),
    ("zh", "cmn", "月光",
     "[verse]\n我在月光下走路\n城市安静地睡着\n[chorus]\n月光照亮我的心\n我们一起唱这首歌"),
    ("it", "it", "Sole di Sera",
     "[verse]\ncammino per la strada quando il sole va giù\nle stelle del cielo mi parlano di te\n"
     "[chorus]\nsole di sera resta con me\nsole di sera io canto per te"),
]

_WORDS = {
    "en": "love night fire dream heart road rain city light dance sky river home golden wild".split(),
    "es": "amor noche fuego sueño corazón camino lluvia ciudad luz baile cielo río casa".split(),
    "fr": "amour nuit feu rêve coeur route pluie ville lumière danse ciel rivière maison".split(),
    "de": "Liebe Nacht Feuer Traum Herz Straße Regen Stadt Licht Tanz Himmel Fluss Haus".split(),
    "zh": list("爱夜火梦心路雨城光舞天河家风海"),
}


def distractor_lyrics(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(language, title, lyrics) of generated songs that are in the database only."""
    rng = random.Random(seed)
    out = []
    langs = sorted(_WORDS)
    for i in range(count):
        lang = langs[i % len(langs)]
        words = _WORDS[lang]
        sep = "" if lang == "zh" else " "

        def line() -> str:
            return sep.join(rng.choice(words) for _ in range(rng.randint(5, 8)))

        verse = "\n".join(line() for _ in range(2))
        chorus = "\n".join(line() for _ in range(2))
        out.append((lang, f"Generated {lang} {i}", f"[verse]\n{verse}\n[chorus]\n{chorus}"))
    return out


def sung_text(lyrics: str) -> str:
    """The words a singer reads: section tags dropped, lines joined."""
    return " ".join(line for line in lyrics.splitlines() if line and not line.startswith("["))
