"""The linear Diffusion Transformer over DCAE latents (Sana's design as ACE-Step adapts it).

A latent (B, 8 channels, 16 mel bins, T frames) becomes a token sequence along time (one token
per `patch_time` frames, all mel bins in it). Each block: AdaLN-single modulation -> ReLU-kernel
linear self-attention with rotary positions -> softmax cross-attention to the condition sequence
-> a 1D-conv GLU feed-forward. Padding is masked everywhere it could leak into valid frames:
keys/values of the linear attention, the condition keys, and the input of the depthwise conv
(which neither Sana nor ACE-Step masks). Trained by model/flow.py, aligned by model/repa.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from schemas.train import DiTConfig


# --- rotary positions ----------------------------------------------------------------------

def rope_tables(n: int, dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n, dim/2) for positions 0..n-1 (float32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim. x (B, H, N, d); cos/sin (N, d/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]                       # (B, H, N, d/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)                                    # (B, H, N, d)


# --- attention -----------------------------------------------------------------------------

def linear_attention(q, k, v, cos, sin, eps: float = 1e-6) -> torch.Tensor:
    """ReLU-kernel linear attention, O(N): out_i = sum_j <R_i q_i, R_j k_j> v_j / sum_j <q_i, k_j>.

    q, k already through ReLU and with padded keys (and values) zeroed; (B, H, N, d). Rotary
    positions go in the numerator only, so the normaliser stays positive (RoFormer, sec. 3.4).
    Computed in float32 with autocast off: sums over thousands of tokens lose too much in bf16.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        kv = torch.einsum("bhnd,bhne->bhde", apply_rope(k, cos, sin), v)     # (B, H, d, d)
        num = torch.einsum("bhnd,bhde->bhne", apply_rope(q, cos, sin), kv)   # (B, H, N, d)
        den = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))                 # (B, H, N)
        return num / (den[..., None] + eps)


class LinearSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(width, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, width)

    def forward(self, x, mask, cos, sin):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        keep = mask[:, None, :, None].to(x.dtype)                # (B, 1, N, 1)
        out = linear_attention(F.relu(q), F.relu(k) * keep, v * keep, cos, sin)
        out = out.to(x.dtype).transpose(1, 2).reshape(B, N, -1)  # (B, N, H*d)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Softmax attention from latent tokens to the (short) condition sequence."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(width, heads * head_dim)
        self.kv = nn.Linear(width, 2 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, width)

    def forward(self, x, cond, cond_mask):
        B, N, _ = x.shape
        L = cond.shape[1]
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)              # (B, H, N, d)
        k, v = self.kv(cond).view(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cond_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


# --- feed-forward --------------------------------------------------------------------------

class ConvGLU(nn.Module):
    """Pointwise expand -> depthwise conv along time -> gate -> pointwise project (1D Mix-FFN)."""

    def __init__(self, width: int, hidden: int, kernel: int):
        super().__init__()
        self.expand = nn.Linear(width, 2 * hidden)
        self.depthwise = nn.Conv1d(2 * hidden, 2 * hidden, kernel, padding=kernel // 2, groups=2 * hidden)
        self.project = nn.Linear(hidden, width)

    def forward(self, x, mask):
        h = F.silu(self.expand(x)) * mask[..., None].to(x.dtype)     # (B, N, 2h); padding -> 0
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)         # (B, N, 2h)
        h, gate = h.chunk(2, dim=-1)
        return self.project(h * F.silu(gate))                         # (B, N, W)


# --- blocks --------------------------------------------------------------------------------

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        W = cfg.width
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.attn = LinearSelfAttention(W, cfg.heads, cfg.head_dim)
        self.cross = CrossAttention(W, cfg.heads, cfg.head_dim)
        self.norm2 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.ffn = ConvGLU(W, int(W * cfg.mlp_ratio), cfg.conv_kernel)
        # AdaLN-single: the shared timestep modulation plus this block's learned table.
        self.scale_shift_table = nn.Parameter(torch.randn(6, W) / W ** 0.5)

    def forward(self, x, mask, t_mod, cond, cond_mask, cos, sin):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.scale_shift_table[None] + t_mod).unbind(1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), mask, cos, sin)
        x = x + self.cross(x, cond, cond_mask)
        x = x + gate_f[:, None] * self.ffn(modulate(self.norm2(x), shift_f, scale_f), mask)
        return x


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to 0..1000 as in DiT). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class LinearDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.patch_mel != cfg.mel_bins:
            raise ValueError(f"dit.patch_mel ({cfg.patch_mel}) must equal mel_bins ({cfg.mel_bins}): "
                             "tokens run along time only")
        self.cfg = cfg
        W = cfg.width
        self.patch_dim = cfg.in_channels * cfg.mel_bins * cfg.patch_time
        self.patch_embed = nn.Linear(self.patch_dim, W)
        self.t_embed = nn.Sequential(nn.Linear(256, W), nn.SiLU(), nn.Linear(W, W))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(W, 6 * W))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.randn(2, W) / W ** 0.5)
        self.out = nn.Linear(W, self.patch_dim)
        # Sana's init: conditions and the output start silent, so early steps learn the prior.
        for block in self.blocks:
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def patchify(self, x):
        """(B, C, M, T) -> (B, N, C*M*p), T padded with zeros to a multiple of p."""
        B, C, M, T = x.shape
        p = self.cfg.patch_time
        x = F.pad(x, (0, (-T) % p))
        x = x.view(B, C, M, -1, p).permute(0, 3, 1, 2, 4)           # (B, N, C, M, p)
        return x.reshape(B, x.shape[1], -1)

    def unpatchify(self, tokens, T: int):
        B, N, _ = tokens.shape
        C, M, p = self.cfg.in_channels, self.cfg.mel_bins, self.cfg.patch_time
        x = tokens.view(B, N, C, M, p).permute(0, 2, 3, 1, 4)       # (B, C, M, N, p)
        return x.reshape(B, C, M, N * p)[..., :T]

    def token_mask(self, frame_mask):
        """(B, T) frames -> (B, N) tokens: a token is valid when its first frame is."""
        return frame_mask[:, :: self.cfg.patch_time]

    def forward(self, x, t, cond, cond_mask, frame_mask, hidden_at: int | None = None):
        """Velocity for x_t (B, C, M, T) at t (B,) in [0, 1]; cond (B, L, W) with cond_mask (B, L).

        Returns (velocity (B, C, M, T), hidden states after block `hidden_at` (B, N, W) or None).
        """
        T = x.shape[-1]
        frame_mask = frame_mask.bool()
        x = x * frame_mask[:, None, None, :].to(x.dtype)             # padded frames carry nothing
        h = self.patch_embed(self.patchify(x))                       # (B, N, W)
        mask = self.token_mask(frame_mask)                           # (B, N)
        cos, sin = rope_tables(h.shape[1], self.cfg.head_dim, self.cfg.rope_theta, h.device)
        t_emb = self.t_embed(timestep_embedding(t).to(h.dtype))      # (B, W)
        t_mod = self.t_block(t_emb).view(-1, 6, self.cfg.width)      # (B, 6, W)
        hidden = None
        for i, block in enumerate(self.blocks):
            h = block(h, mask, t_mod, cond, cond_mask.bool(), cos, sin)
            if i == hidden_at:
                hidden = h
        shift, scale = (self.out_table[None] + t_emb[:, None]).unbind(1)
        out = self.out(modulate(self.norm_out(h), shift, scale))     # (B, N, C*M*p)
        return self.unpatchify(out, T), hidden


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
