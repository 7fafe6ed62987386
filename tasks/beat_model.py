"""Beat This adapter for the rhythm stage: checkpoint loading, tiny twin, chunked inference.

The model class (`beat_this.model.beat_tracker.BeatThis`) and its `Postprocessor` come from
the installed package. `beat_this.inference` is not imported: it pulls in torchaudio through
`beat_this.preprocessing`, so its checkpoint loading and split/predict/aggregate steps are
written here to the same definition (chunks of 1500 frames overlapping by 2 x 6 border
frames, borders discarded, earlier chunks win overlaps); tests/test_rhythm.py imports the
package's inference with a stand-in torchaudio and checks logits and beat times against it.
Checkpoints are the released Lightning format:
{"state_dict": {"model.<param>": ...}, "hyper_parameters": {...}}.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from tasks.models import ModelLoadError, load_cause as _cause

# Where the reference downloads released checkpoints from (as beat_this.inference does).
CHECKPOINT_URL = "https://cloud.cp.jku.at/public.php/dav/files/7ik4RrBKTS273gp"
RELEASED_NAMES = "final0-2, small0-2, single_final0-2, fold0-7"   # the reference's README
TINY_NAME = "beat_this-tiny.ckpt"
WITHOUT_WEIGHTS = ("--set rhythm.beat_tracker=onset (no weights needed; rhythm.beat_tracker=essentia "
                   "is the slower alternative)")


def _released_path(name: str) -> Path:
    """Where torch.hub keeps a released checkpoint once downloaded (the reference's file name)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"beat_this-{name}.ckpt"


def _torch_load(path: Path, ref: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an HTML page saved as .ckpt, a truncated copy
        raise ModelLoadError(f"rhythm.checkpoint={ref!r}: {path} is not a readable checkpoint ({_cause(exc)}); "
                             f"download it again or use {WITHOUT_WEIGHTS}") from exc


def load_checkpoint(ref: str) -> dict:
    """A checkpoint dict from a .ckpt path, a directory holding one .ckpt, or a released name.
    Raises ModelLoadError, one line saying what to do, when none of these can be read."""
    path = Path(ref).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        if len(found) != 1:
            raise ModelLoadError(f"rhythm.checkpoint={ref!r}: expected one .ckpt in the directory, found "
                                 f"{len(found)}; point it at the .ckpt file")
        path = found[0]
    if path.is_file():
        return _torch_load(path, ref)
    if "/" in ref or ref.endswith(".ckpt"):
        raise ModelLoadError(f"rhythm.checkpoint={ref!r}: no such file; fix the path, use a released name "
                             f"({RELEASED_NAMES}) or {WITHOUT_WEIGHTS}")
    cached = _released_path(ref)
    if cached.is_file():
        return _torch_load(cached, ref)
    url = f"{CHECKPOINT_URL}/{ref}.ckpt"
    # Not torch.hub.load_state_dict_from_url: it announces the download on stdout, which
    # `acepipe analyze --json` keeps for JSON lines. This one shows a progress bar on stderr
    # and renames into place, so a failed download leaves no partial checkpoint.
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached))
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise ModelLoadError(
            f"rhythm.checkpoint={ref!r}: no local file and the download failed ({_cause(exc)}); "
            f"run without Beat This: {WITHOUT_WEIGHTS}, or fetch {url} and "
            f"--set rhythm.checkpoint=/path/to/{ref}.ckpt (or save it as {cached}); "
            f"released names: {RELEASED_NAMES}") from exc
    return _torch_load(cached, ref)


def load_model(ref: str, device: torch.device | str = "cpu"):
    """A BeatThis in eval mode, built from the checkpoint's own hyper-parameters."""
    from beat_this.model.beat_tracker import BeatThis

    ckpt = load_checkpoint(ref)
    accepted = set(inspect.signature(BeatThis).parameters)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted}
    model = BeatThis(**hparams)
    # the Lightning module holds BeatThis under "model."
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def build_tiny(path: Path) -> None:
    """Tiny twin: BeatThis with an 8-channel stem, a 32-wide single transformer layer and random
    weights, saved in the released Lightning checkpoint layout as path/beat_this-tiny.ckpt."""
    from beat_this.model.beat_tracker import BeatThis

    hparams = {"spect_dim": 128, "fps": 50, "transformer_dim": 32, "ff_mult": 2, "n_layers": 1,
               "stem_dim": 8, "dropout": {"frontend": 0.0, "transformer": 0.0}, "lr": 0.0008,
               "weight_decay": 0.01, "pos_weights": {"beat": 1, "downbeat": 1}, "head_dim": 8,
               "loss_type": "shift_tolerant_weighted_bce", "warmup_steps": 1000, "max_epochs": 100,
               "use_dbn": False, "eval_trim_beats": 5, "sum_head": True, "partial_transformers": True}
    accepted = set(inspect.signature(BeatThis).parameters)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BeatThis(**{k: v for k, v in hparams.items() if k in accepted})
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.0.0"}, Path(path) / TINY_NAME)


def split_piece(spect: torch.Tensor, chunk: int, border: int) -> tuple[list[torch.Tensor], list[int]]:
    """(T, F) -> chunks of `chunk` frames and their starts; consecutive chunks overlap by
    2 * border, the first and last are zero-padded by `border`, and the last is moved left to
    end at the piece's end. A piece shorter than a chunk is one shorter chunk."""
    n = len(spect)
    starts = list(range(-border, n - border, chunk - 2 * border))
    if n > chunk - 2 * border:
        starts[-1] = n - (chunk - border)
    chunks = []
    for s in starts:
        piece = spect[max(s, 0):min(s + chunk, n)]
        left, right = max(0, -s), max(0, min(border, s + chunk - n))
        chunks.append(torch.nn.functional.pad(piece, (0, 0, left, right)))
    return chunks, starts


def aggregate(preds: list[tuple[torch.Tensor, torch.Tensor]], starts: list[int], n: int, chunk: int,
              border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk logits back onto the piece: borders dropped, earlier chunks win overlaps -> (T,), (T,)."""
    beat = torch.full((n,), -1000.0)
    down = torch.full((n,), -1000.0)
    for s, (b, d) in reversed(list(zip(starts, preds))):
        b, d = (b[border:len(b) - border], d[border:len(d) - border]) if border else (b, d)
        lo, hi = s + border, s + border + len(b)
        keep = slice(max(0, -lo), len(b) - max(0, hi - n))
        beat[max(lo, 0):min(hi, n)] = b[keep]
        down[max(lo, 0):min(hi, n)] = d[keep]
    return beat, down


class BeatThisTracker:
    """Frame logits and beat/downbeat times for log-mel spectrograms of whole tracks."""

    def __init__(self, ref: str, device: torch.device, chunk: int = 1500, border: int = 6,
                 batch_size: int = 4, float16: bool = False, postprocessor: str = "minimal"):
        from beat_this.model.postprocessor import Postprocessor

        self.model = load_model(ref, device)
        self.device = device
        self.chunk, self.border, self.batch_size = chunk, border, batch_size
        self.float16 = float16 and device.type == "cuda"
        self.post = Postprocessor(type=postprocessor, fps=50)

    @torch.inference_mode()
    def logits(self, spects: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per piece, (beat, downbeat) logits (T,). Full-length chunks of all pieces are batched;
        a piece shorter than a chunk runs alone (no padding inside the attention)."""
        jobs = []   # (piece index, chunk index, chunk)
        layout = []
        for p, spect in enumerate(spects):
            chunks, starts = split_piece(spect, self.chunk, self.border)
            layout.append(starts)
            jobs.extend((p, c, x) for c, x in enumerate(chunks))
        out: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        by_len: dict[int, list] = {}
        for job in jobs:
            by_len.setdefault(len(job[2]), []).append(job)
        for group in by_len.values():
            for i in range(0, len(group), self.batch_size):
                batch = group[i:i + self.batch_size]
                x = torch.stack([j[2] for j in batch]).to(self.device)      # (B, chunk, 128)
                with torch.autocast(self.device.type, enabled=self.float16):
                    pred = self.model(x)
                for j, b, d in zip(batch, pred["beat"].float().cpu(), pred["downbeat"].float().cpu()):
                    out[(j[0], j[1])] = (b, d)
        result = []
        for p, spect in enumerate(spects):
            preds = [out[(p, c)] for c in range(len(layout[p]))]
            result.append(aggregate(preds, layout[p], len(spect), self.chunk, self.border))
        return result

    def beats(self, beat_logits: torch.Tensor, down_logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        beats, downbeats = self.post(beat_logits, down_logits)
        return np.asarray(beats, float), np.asarray(downbeats, float)
