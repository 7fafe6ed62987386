"""Throughput and memory of the model stages (aesthetics, transcribe).

Prints, per stage: model setup time, seconds per track, real-time factor (processing
seconds / audio seconds; below 1 is faster than real time) and the peak RSS of a process
that ran only that stage, on the synthetic corpus with the tiny twins. With --real-size,
also times random-weight models of the released sizes (Audiobox Aesthetics, and the
Whisper size given) through the same loaders. Always prints the weight memory of the
released models from their parameter counts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/models.py --quick
    .venv/bin/python bench/models.py --real-size base --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Published Whisper dimensions (n_mels, n_vocab, width, heads, encoder layers, decoder layers).
WHISPER_DIMS = {
    "tiny": (80, 51865, 384, 6, 4, 4), "base": (80, 51865, 512, 8, 6, 6),
    "small": (80, 51865, 768, 12, 12, 12), "medium": (80, 51865, 1024, 16, 24, 24),
    "large-v2": (80, 51865, 1280, 20, 32, 32), "large-v3": (128, 51866, 1280, 20, 32, 32),
    "turbo": (128, 51866, 1280, 20, 32, 4),
}


def whisper_dims(name: str):
    from whisper.model import ModelDimensions

    mels, vocab, width, heads, enc, dec = WHISPER_DIMS[name]
    return ModelDimensions(n_mels=mels, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads,
                           n_audio_layer=enc, n_vocab=vocab, n_text_ctx=448, n_text_state=width,
                           n_text_head=heads, n_text_layer=dec)


def build_real_size(stage: str, size: str, out: Path) -> str:
    """A random-weight model of a released size, written in the released on-disk format."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if stage == "aesthetics":
        from tasks.aesthetics import MODEL_CFG_KEYS, _construct

        model_cfg = {"proj_num_layer": 1, "proj_ln": False, "proj_act_fn": "gelu", "proj_dropout": 0.0,
                     "nth_layer": 13, "use_weighted_layer_sum": True, "precision": "32",
                     "normalize_embed": True, "output_dim": 1}
        assert set(model_cfg) == set(MODEL_CFG_KEYS)
        tt = {a: {"mean": 5.5, "std": 1.5} for a in ("CE", "CU", "PC", "PQ")}
        model = _construct(model_cfg, tt)
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "model_cfg": model_cfg, "target_transform": tt}, out / "checkpoint.pt")
    else:
        from dataclasses import asdict

        from whisper.model import Whisper

        model = Whisper(whisper_dims(size))
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
        torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, out / "model.pt")
    return str(out)


def run_one(stage: str, corpus: Path, tiny_dir: Path, device: str, real: str | None) -> dict:
    """Run one stage over the corpus songs in this process; return its figures."""
    from schemas.config import load_config
    from tasks import audio
    from tasks.stage import stage_class

    truth = json.loads((corpus / "ground_truth.json").read_text())
    tracks = []
    for s in truth["songs"]:
        if s["kind"] != "song":
            continue
        raw = os.fsencode(corpus) + b"/" + (bytes.fromhex(s["file_hex"]) if "file_hex" in s else s["file"].encode())
        info = audio.probe(raw)
        tracks.append({"track_id": raw.hex()[-16:], "uri_raw": raw, "uri": audio.display_path(raw),
                       "duration": info.duration, "sample_rate": info.sample_rate,
                       "channels": info.channels, "codec": info.codec})
    overrides = [f"models.tiny_dir={tiny_dir}", f"device={device}", "aesthetics.min_pq=null",
                 "aesthetics.checkpoint=tiny:aesthetics", "transcribe.model=tiny:whisper",
                 "transcribe.sample_len=16", "transcribe.temperatures=[0.0]"]
    if real:
        path = build_real_size(stage, real, tiny_dir / f"real-{stage}-{real}")
        overrides += [f"aesthetics.checkpoint={path}", f"transcribe.model={path}",
                      "transcribe.sample_len=64"]
    cfg = load_config("tiny", overrides, environ={})
    for t in tracks:  # decode once so the figures are the model's, not the decoder's
        audio.load_track(t, 16000, 1, cfg.audio)
    st = stage_class(stage)(cfg)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    st.setup()
    setup_s = time.perf_counter() - started
    params = sum(p.numel() for p in st.model.parameters())
    st.process(tracks[:1])  # warm-up
    started = time.perf_counter()
    rows = st.process(tracks)
    seconds = time.perf_counter() - started
    audio_s = sum(t["duration"] for t in tracks)
    result = {"stage": stage, "model": real or "tiny", "device": str(st.device), "params": params,
              "tracks": len(tracks), "ok": sum(r["status"] == "ok" for r in rows),
              "setup_s": round(setup_s, 2), "s_per_track": round(seconds / len(tracks), 3),
              "rtf": round(seconds / audio_s, 4),
              "rss_before_mb": round(rss_before),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if st.device.type == "cuda":
        import torch

        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def whisper_params(d) -> int:
    """Parameter count of Whisper(dims), from its layer shapes (no allocation)."""
    def attn(w):
        return 4 * w * w + 3 * w  # q, k (no bias), v, out
    def block(w, cross):
        mlp = 2 * 4 * w * w + 5 * w
        return attn(w) + 2 * w + mlp + 2 * w + (attn(w) + 2 * w if cross else 0)
    wa, wt = d.n_audio_state, d.n_text_state
    encoder = d.n_mels * wa * 3 + wa + wa * wa * 3 + wa + d.n_audio_layer * block(wa, False) + 2 * wa
    decoder = d.n_vocab * wt + d.n_text_ctx * wt + d.n_text_layer * block(wt, True) + 2 * wt
    return encoder + decoder


def weight_table() -> list[tuple[str, int]]:
    """Parameter counts of the released models."""
    rows = [("audiobox-aesthetics (WavLM-base+ and 4 heads)", 94_385_064)]  # counted from the class
    for name in ("large-v3", "turbo", "medium", "small"):
        rows.append((f"whisper {name}", whisper_params(whisper_dims(name))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 songs instead of 12")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real-size", metavar="WHISPER_SIZE", choices=sorted(WHISPER_DIMS),
                    help="also time random-weight models of released sizes")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tiny-dir", help=argparse.SUPPRESS)
    ap.add_argument("--real", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one stage, so its peak RSS is its own
        print(json.dumps(run_one(args.one, Path(args.corpus), Path(args.tiny_dir), args.device, args.real)))
        return

    from tasks.synth import generate_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        generate_corpus(corpus, n=4 if args.quick else 12, seed=1)
        runs = [(s, None) for s in ("aesthetics", "transcribe")]
        if args.real_size:
            runs += [("aesthetics", "release"), ("transcribe", args.real_size)]
        print(f"{'stage':<11} {'model':<8} {'device':<6} {'params':>12} {'tracks':>6} {'setup s':>8} "
              f"{'s/track':>8} {'RTF':>8} {'RSS pre-model MB':>17} {'peak RSS MB':>12} {'peak GPU MB':>12}")
        for stage, real in runs:
            cmd = [sys.executable, __file__, "--one", stage, "--corpus", str(corpus),
                   "--tiny-dir", str(Path(tmp) / "models"), "--device", args.device]
            if real:
                cmd += ["--real", real]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{stage} {real or 'tiny'}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['stage']:<11} {r['model']:<8} {r['device']:<6} {r['params']:>12,} {r['tracks']:>6} "
                  f"{r['setup_s']:>8} {r['s_per_track']:>8} {r['rtf']:>8} {r['rss_before_mb']:>17} {r['peak_rss_mb']:>12} "
                  f"{r.get('peak_gpu_mb', '-'):>12}")
    print("\nweights of the released models (fp32 as loaded; whisper computes in fp16 on GPU "
          "but keeps fp32 weights):")
    for name, n in weight_table():
        print(f"  {name:<48} {n / 1e6:>8.1f} M params  {n * 4 / 2**30:>6.2f} GiB fp32  "
              f"{n * 2 / 2**30:>6.2f} GiB fp16")


if __name__ == "__main__":
    main()
