"""Model plumbing shared by the model stages: device choice, tiny twins, load errors.

A checkpoint reference in config is a local path, a hub id, or `tiny:<name>`. A tiny
reference resolves to `<models.tiny_dir>/<name>`, built on first use by that model's
twin builder (the real class with random weights and small dimensions, saved in the
real on-disk format), then loaded through the stage's real loading code. Building is
atomic (temporary directory, then rename) so parallel workers never see half a twin.
"""
from __future__ import annotations

import contextlib
import importlib
import shutil
import threading
import uuid
from pathlib import Path

# twin name -> "module:function(path: Path) -> None" that writes the twin into `path`.
TINY_BUILDERS = {
    "aesthetics": "tasks.aesthetics:build_tiny",
    "whisper": "tasks.transcribe:build_tiny",
    "qwen_omni": "tasks.caption_twin:write_twin",
    "beat_this": "tasks.rhythm:build_tiny",
    "dcae": "tasks.latents:build_tiny_dcae",
    "mert": "tasks.latents:build_tiny_mert",
    "mhubert": "tasks.latents:build_tiny_mhubert",
    "mt5": "model.text_encoder:build_tiny",
    "lyric_tokenizer": "model.lyric_encoder:build_tiny_tokenizer",
}

_BUILD_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    """A stage's model could not be loaded: no such file, a failed download, not a checkpoint.
    One line naming the config field, the reference, the cause and what to do. It fails the
    same way every time, so the flows do not retry it and the CLI prints it without a traceback."""


def load_cause(exc: BaseException, limit: int = 200) -> str:
    """`Type: message` on one line, cut to `limit` characters: the cause in a one-line error."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


@contextlib.contextmanager
def loading(field: str, ref: str, hint: str):
    """Load a model inside this block: any failure becomes one ModelLoadError line naming the
    config field, the checkpoint reference, the cause and what to do (`hint`).

        with loading("latents.mert.checkpoint", cfg.checkpoint, "point it at a local copy"):
            model = AutoModel.from_pretrained(ref)

    A ModelLoadError raised inside (already one line) passes through unchanged."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every load failure gets the same one-line form
        raise ModelLoadError(f"{field}={ref!r} could not be loaded ({load_cause(exc)}); {hint}") from exc


def resolve_device(spec: str = "auto"):
    """'auto' -> cuda when present, else cpu; otherwise torch.device(spec)."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} in config but CUDA is not available; use auto or cpu")
    return device


def _builder(name: str):
    if name not in TINY_BUILDERS:
        raise KeyError(f"no tiny twin named {name!r}; known: {', '.join(TINY_BUILDERS)}")
    module, func = TINY_BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), func)


def build_tiny(name: str, tiny_dir: str | Path, force: bool = False) -> Path:
    """Build the twin `name` under tiny_dir unless it is there; return its directory."""
    target = Path(tiny_dir) / name
    with _BUILD_LOCK:
        if target.exists() and not force:
            return target
        tmp = target.parent / f".tmp-{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            _builder(name)(tmp)
            if target.exists():
                if not force:
                    return target   # another process built it meanwhile: never pull it from under a reader
                shutil.rmtree(target)
            try:
                tmp.rename(target)
            except OSError:
                if force or not target.exists():
                    raise
                # another process renamed its build in first: keep that one
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target


def resolve_checkpoint(ref: str, tiny_dir: str | Path) -> str:
    """A config checkpoint reference -> what the real loader takes (path or hub id)."""
    if ref.startswith("tiny:"):
        return str(build_tiny(ref[len("tiny:"):], tiny_dir))
    return ref


def build_all(tiny_dir: str | Path, names: list[str] | None = None, force: bool = False) -> list[Path]:
    """`acepipe tiny-models DIR`: build every twin (or the named ones)."""
    return [build_tiny(n, tiny_dir, force) for n in (names or list(TINY_BUILDERS))]
