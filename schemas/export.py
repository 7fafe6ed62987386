"""What an export writes (tasks/export/): the formats, the rows of ACE-Step v1's `datasets`
folder, and the rejects file.

    acestep-v1   dataset/  Hugging Face `save_to_disk` folder (V1_SCHEMA), the rows ACE-Step v1's
                           Text2MusicDataset reads; data/<track_id>.flac with <track_id>_prompt.txt
                           and <track_id>_lyrics.txt beside it (convert2hf_dataset.py's data folder)
    acestep-1.5  data/<track_id>.flac with .json, .caption.txt, .lyrics.txt beside it; metadata.csv
                           (file, bpm, key, caption) and dataset.json (the Gradio dataset builder's
                           file), the two places ACE-Step 1.5's builder reads bpm and key from
    jsonl        dataset.jsonl (one song a line, JSONL_FIELDS) and data/<track_id>.flac

Each export directory also holds `rejects.parquet` (EXPORT_REJECTS_SCHEMA: every packed track
the export could not write, with a `code: detail` reason) and `export.json` (what was exported,
from which pack; its presence marks a directory a re-export may replace).
"""
from __future__ import annotations

import pyarrow as pa

from schemas.caption import RECAPTION, RECAPTION_KEYS  # noqa: F401 - the caption stage owns the styles

FORMATS = ("acestep-v1", "acestep-1.5", "jsonl")

# ACE-Step 1.5 writes a time signature as the beats per bar it knows: 2 (2/4), 3, 4, 6 (6/8).
TIMESIGNATURES = (2, 3, 4, 6)

# One row of the acestep-v1 dataset, as convert2hf_dataset.py builds it. `recaption` always has
# every style, "" where the caption stage gave none: the trainer skips empty strings and picks
# among the rest and the joined tags. `tags` is a large_list because `datasets` >= 4 records a
# plain list as a `List` feature, which the datasets 3.4.1 that ACE-Step v1 pins cannot load;
# both read a `LargeList`, and both hand the trainer a Python list.
V1_SCHEMA = pa.schema([
    pa.field("keys", pa.string()),
    pa.field("filename", pa.string()),                  # absolute path of the FLAC in data/
    pa.field("tags", pa.large_list(pa.string())),
    pa.field("speaker_emb_path", pa.string()),          # "" (no speaker embeddings)
    pa.field("norm_lyrics", pa.string()),               # canonical lyrics, else the transcript, else ""
    pa.field("recaption", RECAPTION),
])

# The fields of a dataset.jsonl line (null where the manifest has no value or no such column).
JSONL_FIELDS = {
    "track_id": "the shard key: a hash of the source file's bytes",
    "audio_path": "the FLAC, relative to the directory of dataset.jsonl",
    "duration": "seconds of audio in the FLAC", "sample_rate": "Hz", "channels": "1 or 2",
    "caption": "the caption stage's description", "tags": "list of short phrases",
    "recaption": "{simplified, expanded, descriptive, synonyms, use_cases} or null",
    "lyrics": "canonical lyrics with [section] tags, else the transcript, else ''",
    "lyrics_lines": "[{start, end, section, text}]: when each canonical line is sung, or null",
    "instrumental": "bool", "language": "ISO 639-1",
    "bpm": "beats per minute", "key": "tonic (C, F#, Eb...)", "scale": "major | minor",
    "meter": "beats per bar", "structure": "[{start, end, label}]",
    "title": "of the matched lyrics", "artist": "of the matched lyrics", "lyric_id": "matched lyrics id",
    "aesthetics": "{ce, cu, pc, pq}: Audiobox Aesthetics scores",
    "confidence": "{bpm, key, lyrics, language, caption_finish_reason}: each label's confidence",
    "overridden": "manifest fields a person set for this track",
}

EXPORT_REJECTS_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("shard", pa.string()),       # the shard the index names for it (null: none)
    pa.field("reason", pa.string()),
])
