"""Benchmark of the linear DiT.

1. Self-attention forward+backward time against sequence length, the ReLU linear attention of
   model/dit.py against softmax attention (torch SDPA) with the same projections and width:
   the linear one grows about linearly and overtakes softmax past some length (the crossover).
2. Tokens per second of a full training step (frozen mT5 twin, conditions, DiT, REPA, AdamW)
   for the tiny config on CPU, and for a mid-size config when CUDA is there.

    python bench/dit.py [--quick] [--device cpu|cuda] [--width 256] [--heads 4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.dit import LinearSelfAttention, rope_tables  # noqa: E402


class SoftmaxSelfAttention(LinearSelfAttention):
    """Same projections and RoPE; softmax attention through SDPA (flash/efficient kernels)."""

    def forward(self, x, mask, cos, sin):
        from model.dit import apply_rope

        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(module, N, width, device, dtype, repeats):
    x = torch.randn(1, N, width, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(1, N, dtype=torch.bool, device=device)
    cos, sin = rope_tables(N, module.head_dim, 1e6, device)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        module(x, mask, cos, sin).float().square().mean().backward()
        sync(device)
        if i:                                   # the first run warms up kernels and allocators
            times.append(time.perf_counter() - t0)
    return min(times)


def attention_table(args, device, dtype):
    head_dim = args.width // args.heads
    lin = LinearSelfAttention(args.width, args.heads, head_dim).to(device, dtype)
    soft = SoftmaxSelfAttention(args.width, args.heads, head_dim).to(device, dtype)
    soft.load_state_dict(lin.state_dict())
    lengths = [128, 256, 512, 1024, 2048, 4096] + ([] if args.quick else [8192, 16384])
    print(f"\nself-attention forward+backward, width {args.width} ({args.heads} heads x {head_dim}), "
          f"batch 1, {device.type} {str(dtype).replace('torch.', '')}, best of {args.repeats}")
    print(f"{'tokens':>7} {'linear ms':>10} {'softmax ms':>11} {'softmax/linear':>15} {'linear ms/1k tok':>17}")
    crossover, rows = None, []
    for N in lengths:
        t_lin = time_fwd_bwd(lin, N, args.width, device, dtype, args.repeats)
        t_soft = time_fwd_bwd(soft, N, args.width, device, dtype, args.repeats)
        rows.append((N, t_lin, t_soft))
        if crossover is None and t_lin < t_soft:
            crossover = N
        print(f"{N:7d} {1e3 * t_lin:10.2f} {1e3 * t_soft:11.2f} {t_soft / t_lin:15.2f} "
              f"{1e6 * t_lin / N:17.3f}")
    (n0, l0, s0), (n1, l1, s1) = rows[0], rows[-1]
    print(f"growth {n0}->{n1} tokens (x{n1 // n0}): linear x{l1 / l0:.1f}, softmax x{s1 / s0:.1f}")
    print(f"crossover: linear faster from {crossover} tokens" if crossover else
          f"crossover: not reached up to {lengths[-1]} tokens")


def train_step_rate(cfg_name, overrides, device, batch, frames, steps, label):
    from model.lit import AceDiTModule
    from model.lyric_encoder import load_lyric_tokenizer
    from model.text_encoder import load_text_encoder
    from schemas.train import load_train_config

    tiny_dir = Path(tempfile.gettempdir()) / "acepipe-bench-tiny"
    cfg = load_train_config(cfg_name, [f"tiny_dir={tiny_dir}", "text_encoder.checkpoint=tiny:mt5",
                                       "lyric_encoder.tokenizer=tiny:lyric_tokenizer", *overrides])
    tok = load_lyric_tokenizer(cfg.lyric_encoder.tokenizer, cfg.tiny_dir)
    text = load_text_encoder(cfg.text_encoder.checkpoint, cfg.tiny_dir).to(device)
    module = AceDiTModule(cfg, text, tok.vocab_size).to(device)
    opt = module.configure_optimizers()["optimizer"]
    ids, lmask = tok.batch(["[verse]\nla la la walking down the street"] * batch, ["en"] * batch)
    targets = {t.name: (torch.randn(batch, frames, t.dim, device=device),
                        torch.ones(batch, frames, dtype=torch.bool, device=device)) for t in cfg.repa.targets}
    data = {"latents": torch.randn(batch, 8, 16, frames, device=device),
            "frame_mask": torch.ones(batch, frames, dtype=torch.bool, device=device),
            "prompt": ["an upbeat pop song, 120 bpm"] * batch, "lyric_ids": ids.to(device),
            "lyric_mask": lmask.to(device), "speaker": torch.randn(batch, 512, device=device), "targets": targets}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = module.losses(module.net, data)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.ema.update_parameters(module.net)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    n_params = sum(p.numel() for p in module.net.dit.parameters())
    print(f"{label}: DiT {n_params / 1e6:.1f}M params, batch {batch} x {frames} frames: "
          f"{1e3 * t:.1f} ms/step, {batch * frames / t:,.0f} tokens/s (median of {steps})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    attention_table(args, device, dtype)
    print()
    tiny_targets = "repa.targets=[{name: mert, dim: 32}, {name: mhubert, dim: 32}]"
    train_step_rate("tiny", [tiny_targets], torch.device("cpu"), 4, 256, 5 if args.quick else 20, "tiny config, cpu")
    if device.type == "cuda":
        mid = ["dit.width=1024", "dit.heads=8", "dit.head_dim=128", "dit.depth=12", "repa.depth=4",
               "lyric_encoder.width=256", "lyric_encoder.layers=2", "lyric_encoder.heads=4"]
        train_step_rate("default", mid, device, 4, 2584, 10, "mid-size (width 1024, 12 blocks), cuda bf16")


if __name__ == "__main__":
    main()
