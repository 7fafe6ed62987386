"""Throughput and memory of the caption stage (Qwen2.5-Omni thinker).

Prints, on the synthetic corpus with the tiny twin: setup time, seconds per track and
real-time factor per (batch size, max_new_tokens), in process and (unless --quick) through
the HTTP backend against tasks/caption_server.py on loopback, and the peak RSS. Always
prints what the released Qwen2.5-Omni-7B thinker needs on a GPU: weights by component
(parameters counted on the meta device from the released dimensions), KV cache per
token, and prefill activations.

    OMP_NUM_THREADS=1 .venv/bin/python bench/caption.py --quick
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen/Qwen2.5-Omni-7B config.json, thinker_config (the talker and token2wav are never loaded).
RELEASED_THINKER = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4},
    "audio_config": {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
                     "encoder_ffn_dim": 5120, "d_model": 1280, "output_dim": 3584},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584},
}
AUDIO_TOKENS_PER_S = 25      # 10 ms mel frames, conv stride 2, pooling 2
CHARS_PER_TOKEN = 4          # English text in Qwen2's BPE, roughly (the twin's tokenizer is not Qwen2's)


def prompt_tokens() -> int:
    """System + default prompt (with ACE-Step's variants and an example answer) + chat markup, approx."""
    from schemas.caption import CaptionConfig

    cfg = CaptionConfig()
    return (len(cfg.system_prompt) + len(cfg.prompt)) // CHARS_PER_TOKEN + 20


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def released_memory(batch: int, clip_s: float, max_new_tokens: int) -> list[str]:
    import torch
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig(**RELEASED_THINKER)
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    parts = {name: sum(p.numel() for p in module.parameters())
             for name, module in (("language model", model.model), ("lm_head", model.lm_head),
                                  ("audio tower", model.audio_tower), ("vision tower (dropped after load)", model.visual))}
    used = total = sum(parts.values())
    used -= parts["vision tower (dropped after load)"]
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # k and v, bf16
    prompt = int(clip_s * AUDIO_TOKENS_PER_S) + prompt_tokens()
    kv = batch * (prompt + max_new_tokens) * kv_per_token
    full_logits = batch * prompt * text.vocab_size * 2  # bf16, what the thinker's own lm_head would give
    mlp = batch * prompt * text.intermediate_size * 2 * 3  # gate, up and their product during prefill
    lines = [f"{name:34s} {n / 1e9:6.2f} B params  {gib(2 * n)} bf16" for name, n in parts.items()]
    lines.append(f"{'thinker as loaded (no vision)':34s} {used / 1e9:6.2f} B params  {gib(2 * used)} bf16")
    lines.append(f"KV cache: {kv_per_token / 1024:.0f} KiB/token; batch {batch} x ({prompt} prompt + "
                 f"{max_new_tokens} new) tokens = {gib(kv)}")
    lines.append(f"prefill MLP activations ~{gib(mlp)}; full-sequence logits avoided by LastPositionHead: "
                 f"{gib(full_logits)}")
    lines.append(f"=> about {gib(2 * used + kv + mlp)} + CUDA context (~0.5-1 GiB): a 24 GiB GPU runs batch 8 "
                 f"at 30 s clips; each further track costs ~{gib((kv + mlp) / batch)}")
    return lines


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def songs(corpus: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_caption import corpus_songs, track_row

    return [track_row(p, {"tempo_phrase": "120 BPM", "key_phrase": "C major"})
            for p, _ in corpus_songs(corpus, "song")]


def time_stage(overrides: list[str], tracks: list[dict]) -> tuple[float, float]:
    from schemas.config import load_config
    from tasks.caption import CaptionStage

    cfg = load_config("tiny", overrides, environ={})
    started = time.perf_counter()
    stage = CaptionStage(cfg)
    stage.setup()
    setup_s = time.perf_counter() - started
    stage.process(tracks[:1])  # warm-up
    started = time.perf_counter()
    stage.process(tracks)
    return setup_s, (time.perf_counter() - started) / len(tracks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 tracks, in process only")
    parser.add_argument("--tiny-dir", default=None, help="reuse built twins (default: a temp dir)")
    parser.add_argument("--clip-s", type=float, default=30.0)
    args = parser.parse_args()

    from tasks.models import resolve_checkpoint
    from tasks.synth import generate_corpus

    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    tiny_dir = args.tiny_dir or str(work / "tiny")
    generate_corpus(work / "synth", n=4 if args.quick else 8, seed=0)
    tracks = songs(work / "synth")
    twin = resolve_checkpoint("tiny:qwen_omni", tiny_dir)
    audio_s = sum(min(args.clip_s, t["duration"]) for t in tracks) / len(tracks)
    base = [f"models.tiny_dir={tiny_dir}", "device=cpu", "caption.checkpoint=tiny:qwen_omni",
            f"caption.clip_s={args.clip_s}"]
    print(f"tiny twin on CPU, {len(tracks)} tracks, {audio_s:.1f} s heard per track "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"{'backend':12s} {'batch':>5s} {'new tok':>7s} {'setup s':>8s} {'s/track':>8s} {'RTF':>7s}")
    grid = [(4, 16)] if args.quick else [(1, 16), (4, 16), (4, 64)]
    for batch, new in grid:
        setup_s, per_track = time_stage(base + [f"caption.batch_size={batch}", f"caption.max_new_tokens={new}"],
                                        tracks)
        print(f"{'in process':12s} {batch:5d} {new:7d} {setup_s:8.2f} {per_track:8.3f} {per_track / audio_s:7.4f}")
    print(f"peak RSS of this process (twin in process): {peak_rss_mib():.0f} MiB")
    if not args.quick:
        server = subprocess.Popen([sys.executable, "-m", "tasks.caption_server", "--checkpoint", twin, "--port", "0",
                                   "--device", "cpu", "--served-model", "twin", "--max-seconds", "600"],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split("listening on ")[1].split()[0]
            for batch in (1, 4):
                setup_s, per_track = time_stage(
                    base + ["caption.backend=openai", f"caption.url={url}", "caption.served_model=twin",
                            f"caption.batch_size={batch}", "caption.max_new_tokens=16"], tracks)
                print(f"{'http':12s} {batch:5d} {16:7d} {setup_s:8.2f} {per_track:8.3f} {per_track / audio_s:7.4f}")
        finally:
            os.kill(server.pid, 15)
            server.wait(timeout=10)
    from schemas.caption import CaptionConfig

    new_tokens = CaptionConfig().max_new_tokens
    print(f"\nreleased Qwen2.5-Omni-7B thinker on a GPU (batch 8, 30 s clips, {new_tokens} new tokens, "
          f"~{prompt_tokens()} prompt text tokens):")
    for line in released_memory(8, 30.0, new_tokens):
        print("  " + line)


if __name__ == "__main__":
    main()
