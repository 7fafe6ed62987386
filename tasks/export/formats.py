"""The three layouts an export writes (schemas/export.py), one small class each.

A layout writes into the staging directory (`tmp`) while every path it records for a trainer
names the final directory (`out`): the staging directory is renamed to `out` when complete.
Per track it is asked for the audio first (`write_audio`, undone by `take_back` when the shard
turns out damaged), then for the sidecars (`add`); `close` writes what covers the whole dataset.
Values come from the manifest by the issue 15 column contract; a column an older manifest lacks
reads as null and is written as null or empty, never guessed.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa

from schemas.export import RECAPTION_KEYS, TIMESIGNATURES, V1_SCHEMA
from tasks.export.samples import Audio
from tasks.pack_samples import sample_lyrics


# -- values from a manifest row -------------------------------------------------------------------
def recaption_strings(row: dict) -> dict[str, str]:
    """Every recaption style as a string ("" where there is none): ACE-Step keeps non-empty ones."""
    recaption = row.get("recaption") or {}
    return {k: recaption.get(k) or "" for k in RECAPTION_KEYS}


def caption_text(row: dict) -> str:
    """The caption, else the tags joined as ACE-Step joins them, else ''."""
    return row.get("caption") or ", ".join(row.get("tags") or [])


def keyscale(row: dict) -> str:
    """'F# minor', ACE-Step 1.5's key notation; '' when the key or scale is unknown."""
    return f"{row['key']} {row['scale']}" if row.get("key") and row.get("scale") else ""


def timesignature(row: dict) -> str:
    meter = row.get("meter")
    return str(meter) if meter in TIMESIGNATURES else ""


def is_instrumental(row: dict) -> bool:
    return bool(row.get("instrumental")) or not sample_lyrics(row).strip()


def _short(value: float | None) -> float | None:
    """A float32 column's value without the digits float32 does not hold (5.1230001449 -> 5.123)."""
    return None if value is None else float(f"{value:.7g}")


class Layout:
    """Audio in data/<track_id>.flac; subclasses add their sidecars and dataset files."""

    def __init__(self, tmp: Path, out: Path, dataset: str):
        self.tmp, self.out, self.dataset = tmp, out, dataset
        (tmp / "data").mkdir(parents=True, exist_ok=True)

    def write_audio(self, row: dict, flac: bytes) -> Path:
        path = self.tmp / "data" / f"{row['track_id']}.flac"
        path.write_bytes(flac)
        return path

    def take_back(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def final_audio(self, row: dict) -> str:
        return str(self.out / "data" / f"{row['track_id']}.flac")

    def sidecar(self, row: dict, suffix: str, text: str) -> None:
        (self.tmp / "data" / f"{row['track_id']}{suffix}").write_text(text, encoding="utf-8")

    def add(self, row: dict, audio: Audio) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class AceStepV1(Layout):
    """convert2hf_dataset.py's output: a `datasets` folder whose rows point at data/*.flac, and
    the _prompt.txt / _lyrics.txt pairs that script reads from its data folder."""
    BATCH = 10_000   # rows per Arrow batch: the dataset's rows are held as Arrow, not as dicts

    def __init__(self, tmp: Path, out: Path, dataset: str):
        super().__init__(tmp, out, dataset)
        self.rows: list[dict] = []
        self.batches = []

    def add(self, row: dict, audio: Audio) -> None:
        tags = [t for t in row.get("tags") or [] if t]
        lyrics = sample_lyrics(row)
        self.sidecar(row, "_prompt.txt", ", ".join(tags))
        self.sidecar(row, "_lyrics.txt", lyrics)
        self.rows.append({"keys": row["track_id"], "filename": self.final_audio(row), "tags": tags,
                          "speaker_emb_path": "", "norm_lyrics": lyrics, "recaption": recaption_strings(row)})
        if len(self.rows) >= self.BATCH:
            self.batches.append(pa.Table.from_pylist(self.rows, schema=V1_SCHEMA))
            self.rows = []

    def close(self) -> None:
        import datasets   # here, not at the top: only this format needs it, and it imports slowly
        from datasets import Dataset, DatasetInfo, Features
        from datasets.table import InMemoryTable

        table = pa.concat_tables([*self.batches, pa.Table.from_pylist(self.rows, schema=V1_SCHEMA)])
        info = DatasetInfo(description=f"acepipe dataset {self.dataset}",
                           features=Features.from_arrow_schema(V1_SCHEMA))
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()    # a progress bar per export would only clutter the run's log
        try:
            # With no rows datasets would write no data file, and load_from_disk would then fail.
            Dataset(InMemoryTable(table), info=info).save_to_disk(
                str(self.tmp / "dataset"), num_shards=1 if table.num_rows == 0 else None)
        finally:
            if not quiet:
                datasets.enable_progress_bars()


class AceStep15(Layout):
    """ACE-Step 1.5's dataset folder: beside each FLAC its .caption.txt and .lyrics.txt (what the
    builder's directory scan reads), a <stem>.json with the builder's sample fields, and
    metadata.csv (file, bpm, key, caption: where the scan takes bpm and key from) and dataset.json
    (the builder's saved dataset, which its loader reads whole)."""

    def __init__(self, tmp: Path, out: Path, dataset: str):
        super().__init__(tmp, out, dataset)
        self.csv_file = (tmp / "metadata.csv").open("w", encoding="utf-8", newline="")
        self.csv = csv.writer(self.csv_file)
        self.csv.writerow(["file", "bpm", "key", "caption"])
        self.json_file = (tmp / "dataset.json").open("w", encoding="utf-8")
        self.json_file.write('{"samples": [')
        self.count, self.all_instrumental = 0, True

    def sample(self, row: dict, audio: Audio) -> dict:
        lyrics = sample_lyrics(row).strip()
        instrumental = is_instrumental(row)
        bpm = row.get("bpm")
        return {
            "id": row["track_id"], "audio_path": self.final_audio(row), "filename": f"{row['track_id']}.flac",
            "caption": caption_text(row), "genre": ", ".join(row.get("tags") or []),
            "lyrics": "[Instrumental]" if instrumental else lyrics, "raw_lyrics": "" if instrumental else lyrics,
            "bpm": round(bpm) if bpm is not None else None, "keyscale": keyscale(row),
            "timesignature": timesignature(row), "duration": int(audio.duration),
            "language": row.get("language") or "unknown", "is_instrumental": instrumental,
            "labeled": bool(caption_text(row)),
        }

    def add(self, row: dict, audio: Audio) -> None:
        sample = self.sample(row, audio)
        self.sidecar(row, ".json", json.dumps(sample, ensure_ascii=False, indent=1))
        self.sidecar(row, ".caption.txt", sample["caption"])
        # Empty for an instrumental: the scan then leaves the lyrics at "[Instrumental]".
        self.sidecar(row, ".lyrics.txt", sample["raw_lyrics"])
        self.csv.writerow([sample["filename"], "" if sample["bpm"] is None else sample["bpm"],
                           sample["keyscale"], sample["caption"]])
        self.json_file.write(("," if self.count else "") + "\n" + json.dumps(sample, ensure_ascii=False))
        self.count += 1
        self.all_instrumental &= sample["is_instrumental"]

    def close(self) -> None:
        self.csv_file.close()
        metadata = {"name": self.dataset, "custom_tag": "", "tag_position": "prepend", "created_at": "",
                    "num_samples": self.count, "all_instrumental": self.all_instrumental and self.count > 0,
                    "genre_ratio": 0}
        self.json_file.write(f'\n], "metadata": {json.dumps(metadata, ensure_ascii=False)}}}\n')
        self.json_file.close()


class Jsonl(Layout):
    """dataset.jsonl: one song a line with every label and its confidence (JSONL_FIELDS)."""

    def __init__(self, tmp: Path, out: Path, dataset: str):
        super().__init__(tmp, out, dataset)
        self.file = (tmp / "dataset.jsonl").open("w", encoding="utf-8")

    def line(self, row: dict, audio: Audio) -> dict:
        get = row.get
        line = {
            "track_id": row["track_id"], "audio_path": f"data/{row['track_id']}.flac",
            "duration": round(audio.duration, 3), "sample_rate": audio.sample_rate, "channels": audio.channels,
            "caption": get("caption"), "tags": get("tags"), "recaption": get("recaption"),
            "lyrics": sample_lyrics(row), "lyrics_lines": get("lyrics_lines"),
            "instrumental": get("instrumental"), "language": get("language"),
            "bpm": get("bpm"), "key": get("key"), "scale": get("scale"), "meter": get("meter"),
            "structure": get("structure"), "title": get("title"), "artist": get("artist"),
            "lyric_id": get("lyric_id"),
            "aesthetics": {k: _short(get(k)) for k in ("ce", "cu", "pc", "pq")},
            "confidence": {"bpm": get("bpm_confidence"), "key": get("key_confidence"),
                           "lyrics": _short(get("lyrics_score")), "language": _short(get("language_prob")),
                           "caption_finish_reason": get("caption_finish_reason")},
            "overridden": get("overridden"),
        }
        return line

    def add(self, row: dict, audio: Audio) -> None:
        self.file.write(json.dumps(self.line(row, audio), ensure_ascii=False, default=float) + "\n")

    def close(self) -> None:
        self.file.close()


LAYOUTS = {"acestep-v1": AceStepV1, "acestep-1.5": AceStep15, "jsonl": Jsonl}
