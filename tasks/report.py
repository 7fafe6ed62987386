"""The dataset report of a pack: counts and hours by language, BPM, key, aesthetics, durations.

Built from the manifest and the pack's rejects; rendered as markdown plus PNG charts
(matplotlib, Agg backend, no display). The pack flow writes it beside the shards
(`shards/<dataset>/report.md` and `report-*.png`) and publishes it as a Prefect markdown
artifact with the charts inlined.
"""
from __future__ import annotations

import base64
import io
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from schemas.common import reason_code

KEY_ORDER = ["C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#", "Bb", "B"]


@dataclass
class Report:
    markdown: str                                        # links charts by file name
    charts: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes

    def inline_markdown(self) -> str:
        """The markdown with each chart as a data URI (for a Prefect artifact)."""
        text = self.markdown
        for name, png in self.charts.items():
            text = text.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(png).decode()})")
        return text


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def _figure(draw, size=(6.0, 3.2)) -> bytes:
    from matplotlib.figure import Figure

    # A Figure without pyplot: no global backend switch, no state shared across threads.
    fig = Figure(figsize=size, dpi=90)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _hist(values: list[float], title: str, xlabel: str, bins: int = 20) -> bytes:
    def draw(fig):
        ax = fig.add_subplot()
        ax.hist(values, bins=bins, color="#4c72b0")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tracks")
    return _figure(draw)


def _bars(labels: list[str], counts: list[float], title: str, ylabel: str) -> bytes:
    def draw(fig):
        ax = fig.add_subplot()
        ax.bar(range(len(labels)), counts, color="#55a868")
        ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 8 else 0, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    return _figure(draw)


def _aesthetics(columns: dict[str, list[float]]) -> bytes:
    def draw(fig):
        for i, (axis, values) in enumerate(columns.items()):
            ax = fig.add_subplot(1, len(columns), i + 1)
            ax.hist(values, bins=15, color="#c44e52")
            ax.set_title(axis.upper())
    return _figure(draw, size=(8.0, 2.6))


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# The manifest columns the report reads (a caller may read only these: not the lyrics of 1.8M tracks).
REPORT_COLUMNS = ["duration", "instrumental", "language", "bpm", "key", "scale", "ce", "cu", "pc", "pq",
                  "lyric_id", "caption"]


def _column(manifest: pa.Table, name: str) -> list:
    """One column as a list of values (None where the manifest lacks the column); text columns
    the report only counts come as booleans (present and non-empty), not as their text."""
    if name not in manifest.column_names:
        return [None] * manifest.num_rows
    col = manifest.column(name)
    if name in ("lyric_id", "caption"):
        col = pc.fill_null(pc.greater(pc.utf8_length(col), 0), False)
    return col.to_pylist()


def build_report(manifest: pa.Table, rejects: list[dict], summary: dict, charts: bool = True) -> Report:
    """The report of one packed dataset, read column by column (no dict per track)."""
    cols = {name: _column(manifest, name) for name in REPORT_COLUMNS}
    n = manifest.num_rows
    dataset = summary.get("dataset", "")
    total_s = sum(d or 0.0 for d in cols["duration"])
    out = [f"# Dataset `{dataset}`", "",
           f"- tracks packed: **{n}** ({_hours(total_s)} h) in {summary.get('shards', 0)} shards, "
           f"{summary.get('bytes', 0) / 1e6:.1f} MB",
           f"- catalog tracks: {summary.get('catalog_tracks', 0)}; not kept by a stage: "
           f"{summary.get('not_ok_upstream', 0)}; waiting for a stage output: {summary.get('stage_missing', 0)}",
           f"- left out at pack time: {len(rejects)}", ""]
    png: dict[str, bytes] = {}

    by_lang: dict[str, list[float]] = {}
    for lang, instrumental, duration in zip(cols["language"], cols["instrumental"], cols["duration"]):
        lang = "instrumental" if instrumental else (lang or "unknown")
        by_lang.setdefault(lang, []).append(duration or 0.0)
    lang_rows = sorted(by_lang.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    out += ["## Languages", "", _table(["language", "tracks", "hours"],
                                       [[k, len(v), _hours(sum(v))] for k, v in lang_rows]), ""]
    if charts and lang_rows:
        png["report-languages.png"] = _bars([k for k, _ in lang_rows], [sum(v) / 3600 for _, v in lang_rows],
                                            "hours by language", "hours")
        out += ["![hours by language](report-languages.png)", ""]

    durations = [d for d in cols["duration"] if d is not None]
    if durations:
        median = sorted(durations)[len(durations) // 2]
        out += ["## Durations", "", f"min {min(durations):.1f} s, median {median:.1f} s, "
                f"max {max(durations):.1f} s", ""]
        if charts:
            png["report-durations.png"] = _hist(durations, "durations", "seconds")
            out += ["![durations](report-durations.png)", ""]

    bpms = [b for b in cols["bpm"] if b is not None]
    out += ["## Tempo", "", f"{len(bpms)} of {n} tracks have a BPM", ""]
    if charts and bpms:
        png["report-bpm.png"] = _hist(bpms, "BPM", "beats per minute", bins=24)
        out += ["![BPM](report-bpm.png)", ""]

    keys = Counter(f"{k} {s or ''}".strip() for k, s in zip(cols["key"], cols["scale"]) if k)
    out += ["## Keys", "", f"{sum(keys.values())} of {n} tracks have a key", ""]
    if keys:
        ordered = sorted(keys, key=lambda k: (KEY_ORDER.index(k.split()[0]) if k.split()[0] in KEY_ORDER
                                              else 99, k))
        out += [_table(["key", "tracks"], [[k, keys[k]] for k in ordered]), ""]
        if charts:
            png["report-keys.png"] = _bars(ordered, [keys[k] for k in ordered], "keys", "tracks")
            out += ["![keys](report-keys.png)", ""]

    aesthetics = {a: [v for v in cols[a] if v is not None] for a in ("ce", "cu", "pc", "pq")}
    if any(aesthetics.values()):
        out += ["## Aesthetics", "", _table(["axis", "tracks", "mean", "min", "max"], [
            [a.upper(), len(v), f"{sum(v) / len(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}"]
            for a, v in aesthetics.items() if v]), ""]
        if charts:
            png["report-aesthetics.png"] = _aesthetics({a: v for a, v in aesthetics.items() if v})
            out += ["![aesthetics](report-aesthetics.png)", ""]

    out += ["## Text", "", f"- matched canonical lyrics: {sum(1 for x in cols['lyric_id'] if x)}",
            f"- captioned: {sum(1 for x in cols['caption'] if x)}",
            f"- instrumental: {sum(1 for x in cols['instrumental'] if x)}", ""]

    if rejects:
        reasons = Counter(reason_code(r["reason"]) for r in rejects)
        out += ["## Left out at pack time", "", _table(["reason", "tracks"], reasons.most_common()), "",
                _table(["track_id", "uri", "reason"], [[r["track_id"], r["uri"], r["reason"]]
                                                      for r in rejects[:50]]), ""]
    return Report("\n".join(out), png)


def read_report(store, directory: str) -> Report | None:
    """The report written into `directory` by `write_report`, or None when it is not there
    (a pack that skipped reuses it: building it reads the whole manifest)."""
    path = posixpath.join(directory, "report.md")
    if not store.exists(path):
        return None
    markdown = store.read_bytes(path).decode()
    charts = {}
    for name in sorted(n for n in store.listdir(directory) if n.startswith("report-") and n.endswith(".png")):
        charts[name] = store.read_bytes(posixpath.join(directory, name))
    return Report(markdown, charts)


def write_report(store, directory: str, report: Report) -> list[str]:
    """report.md and its charts into `directory` (atomic writes), removing charts of an
    earlier report that this one no longer has; returns the paths written."""
    paths = [posixpath.join(directory, "report.md")]
    for name, png in sorted(report.charts.items()):
        paths.append(posixpath.join(directory, name))
        store.write_bytes(paths[-1], png)
    store.write_bytes(paths[0], report.markdown.encode())
    for old in store.fs.glob(posixpath.join(directory, "report-*.png")):
        if posixpath.basename(old) not in report.charts:
            store.fs.rm(old)
    return paths
