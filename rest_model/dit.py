"""Causal DiT (REST stage 2-4 network): flow-matching velocity over latent tokens.

One module, two ways to run:
- `forward`: a whole clip in one pass, bidirectional (the teacher) or under the block-causal mask
  (the student seen all at once), with the ID-Sink prepended to the keys;
- `chunk`: one chunk of the stream, reading the ID-Context Cache and returning its own K/V for commit.
Both end in the same `DiTBlock`, so `chunk` run over a sequence equals `forward` with the equivalent
block-causal mask (tests/test_dit.py).

Every latent frame has its own flow time t (diffusion forcing / asynchronous schedules), rotary
positions are 3D, and audio enters by cross-attention of each latent frame to its own audio window
plus `audio_context` neighbouring latent frames on each side (TalkingMachines).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import rope
from .config import DiTConfig
from .audio import AudioEncoder
from .id_context_cache import IDContextCache, LayerKV


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1] (scaled to [0, 1000] like DDPM steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * 1000 * freqs
    return torch.cat([args.cos(), args.sin()], -1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def block_causal_mask(n_frames: int, chunk: int, context: int, sink_tokens: int, tokens_per_frame: int,
                      device=None) -> torch.Tensor:
    """Bool mask [queries, sink + frames] of the streaming student seen all at once.

    A query in chunk j sees the ID-Sink, the `context` latent frames before its chunk (the
    Context-Cache) and its whole chunk; nothing later.
    """
    f = torch.arange(n_frames, device=device)
    start = (f // chunk) * chunk  # first frame of each frame's chunk
    q, k = f[:, None], f[None, :]
    frames = (k >= start[:, None] - context) & (k < start[:, None] + chunk)
    del q
    frames = frames.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
    sink = torch.ones(frames.shape[0], sink_tokens, dtype=torch.bool, device=device)
    return torch.cat([sink, frames], 1)


class Attention(nn.Module):
    """Self-attention over [ID-Sink | Context-Cache | current frames].

    The sink is timeless: its score uses the query's temporal dims unrotated, via an augmented
    query/key (extra dt dims), so a single attention call serves sink and frames together.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.hd, self.theta = cfg.heads, cfg.dim // cfg.heads, cfg.rope_theta
        self.dt = rope.split(self.hd)[0]
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm, self.k_norm = nn.RMSNorm(self.hd), nn.RMSNorm(self.hd)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def sink_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Spatially rotated sink keys -> augmented [0 temporal | spatial | raw temporal]."""
        kt = k[..., : self.dt]
        return torch.cat([torch.zeros_like(kt), k[..., self.dt:], kt], -1)

    def project(self, x, hw) -> tuple[torch.Tensor, LayerKV]:
        """x: (B, f*h*w, D) -> (normed queries, not rotated; this call's K/V, keys spatially rotated only)."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.q_norm(q), LayerKV(rope.rotate_space(self.k_norm(k), *hw, self.theta), v)

    def forward(self, x, hw, frame_pos, sink: LayerKV | None, ctx: LayerKV | None, ctx_pos, mask):
        """x: (B, f*h*w, D) -> (out, this call's K/V with keys spatially rotated only)."""
        h, w = hw
        q, own = self.project(x, hw)
        k, v = own.k, own.v
        keys, vals, pos = [k], [v], [frame_pos]
        if ctx is not None:
            keys, vals, pos = [ctx.k] + keys, [ctx.v] + vals, [ctx_pos] + pos
        keys = rope.rotate_time(torch.cat(keys, 2), torch.cat(pos), h * w, self.theta)
        keys = F.pad(keys, (0, self.dt))  # frames carry nothing in the sink's dims
        vals = torch.cat(vals, 2)
        if sink is not None:
            keys, vals = torch.cat([sink.k, keys], 2), torch.cat([sink.v, vals], 2)
        qa = torch.cat([rope.rotate_space_time(q, h, w, frame_pos, self.theta), q[..., : self.dt]], -1)
        # values padded to the augmented width: with equal widths torch's fused (flash) kernel serves the call,
        # 2.5x faster on a CPU than the unfused path it takes for unequal ones
        o = F.scaled_dot_product_attention(qa, keys, F.pad(vals, (0, self.dt)), attn_mask=mask, scale=self.hd ** -0.5)
        return self.proj(rearrange(o[..., : self.hd], "b h n d -> b n (h d)")), own


class AudioCrossAttention(nn.Module):
    """Each latent frame's tokens attend only to that frame's audio window (TalkingMachines)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm = nn.LayerNorm(cfg.dim)
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.audio.dim, 2 * cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.audio_window, cfg.audio.dim))  # place within the window
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x, audio, frames: int):
        """x: (B, f*hw, D); audio: (B, f, W, A) windows -> (B, f*hw, D)."""
        q = rearrange(self.q(self.norm(x)), "b (f n) (h d) -> (b f) h n d", f=frames, h=self.heads)
        k, v = rearrange(self.kv(audio + self.pos), "b f w (two h d) -> two (b f) h w d", two=2, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(o, "(b f) h n d -> b (f n) (h d)", f=frames))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1, self.norm2 = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.audio_attn = AudioCrossAttention(cfg)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Linear(d, 6 * d)  # adaLN-zero from the per-frame flow time
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)

    def _attn_input(self, x, c):
        """-> (x per frame, the six adaLN modulations, the attention's input)."""
        mods = rearrange(self.ada(F.silu(c)), "b f (six d) -> six b f 1 d", six=6)
        xf = rearrange(x, "b (f n) d -> b f n d", f=c.shape[1])
        return xf, mods, rearrange(modulate(self.norm1(xf), mods[0], mods[1]), "b f n d -> b (f n) d")

    def kv(self, x, c, hw) -> LayerKV:
        """Only this block's own K/V: all a chunk's commit needs from the last block."""
        return self.attn.project(self._attn_input(x, c)[2], hw)[1]

    def forward(self, x, c, hw, frame_pos, audio, sink=None, ctx=None, ctx_pos=None, mask=None):
        """x: (B, f*hw, D); c: (B, f, D) per-frame condition; audio: (B, f, W, A) or None (ID-Sink)."""
        f = c.shape[1]
        xf, mods, h = self._attn_input(x, c)
        _, _, sa_gate, mlp_shift, mlp_scale, mlp_gate = mods
        a, own = self.attn(h, hw, frame_pos, sink, ctx, ctx_pos, mask)
        xf = xf + sa_gate * rearrange(a, "b (f n) d -> b f n d", f=f)
        if audio is not None:
            xf = xf + rearrange(self.audio_attn(rearrange(xf, "b f n d -> b (f n) d"), audio, f),
                                "b (f n) d -> b f n d", f=f)
        xf = xf + mlp_gate * self.mlp(modulate(self.norm2(xf), mlp_shift, mlp_scale))
        return rearrange(xf, "b f n d -> b (f n) d"), own


class CausalDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.audio_encoder = AudioEncoder(cfg.audio, cfg.fps)  # the DiT owns its audio encoder
        self.patch_in = nn.Linear(cfg.latent_channels, d)
        self.ref_embed = nn.Parameter(torch.zeros(d))  # marks ID-Sink tokens
        self.t_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, cfg.latent_channels)
        nn.init.zeros_(self.ada_out.weight), nn.init.zeros_(self.ada_out.bias)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    # -- pieces ------------------------------------------------------------------------------------
    def _tokens(self, latent):  # (B, Cz, f, h, w) -> (B, f*h*w, D)
        return self.patch_in(rearrange(latent, "b c f h w -> b (f h w) c"))

    def _cond(self, t):  # (B, f) -> (B, f, D)
        return self.t_embed(timestep_embedding(t, 256))

    def _velocity(self, x, c, shape):
        b, f, h, w = shape
        shift, scale = rearrange(self.ada_out(F.silu(c)), "b f (two d) -> two b f 1 d", two=2)
        xf = modulate(self.norm_out(rearrange(x, "b (f n) d -> b f n d", f=f)), shift, scale)
        return rearrange(self.out(xf), "b f (h w) c -> b c f h w", h=h, w=w)

    def _check_latent(self, latent, what):
        c = self.cfg
        if latent.ndim != 5 or latent.shape[1] != c.latent_channels or latent.shape[-1] != c.latent_size \
                or latent.shape[-2] != c.latent_size:
            raise ValueError(f"{what} must be [B, {c.latent_channels}, f, {c.latent_size}, {c.latent_size}] "
                             f"for this DiT, got {tuple(latent.shape)}")

    # -- ID-Sink -----------------------------------------------------------------------------------
    def id_sink(self, ref: torch.Tensor) -> list[LayerKV]:
        """K/V of the reference latent [B, Cz, 1, h, w] at every block, computed once per stream.

        The reference is a clean frame (t = 0) that attends only to itself and hears no audio.
        """
        self._check_latent(ref, "reference latent")
        b, _, f, h, w = ref.shape
        x = self._tokens(ref) + self.ref_embed
        c = self._cond(torch.zeros(b, f, device=ref.device))
        pos = torch.zeros(f)
        sink = []
        for blk in self.blocks:
            x, own = blk(x, c, (h, w), pos, None)
            sink.append(LayerKV(blk.attn.sink_keys(own.k), own.v))
        return sink

    # -- whole clip (teacher, or student under the block-causal mask) ------------------------------
    def forward(self, x, t, audio, ref, causal: bool = False, chunk: int = 1, context: int = 0):
        """x: (B, Cz, T, h, w) at per-frame flow times t (B, T); audio: (B, T, W, A) windows.

        `causal` applies the block-causal mask of a stream with `chunk` latent frames per chunk and
        a Context-Cache of `context` frames; otherwise every frame sees the whole clip (teacher).
        """
        self._check_latent(x, "latent")
        b, _, f, h, w = x.shape
        sink = self.id_sink(ref)
        mask = None
        if causal:
            mask = block_causal_mask(f, chunk, context, sink[0].k.shape[2], h * w, x.device)
        tokens, c = self._tokens(x), self._cond(t)
        pos = torch.arange(f)
        for blk, s in zip(self.blocks, sink):
            tokens, _ = blk(tokens, c, (h, w), pos, audio, sink=s, mask=mask)
        return self._velocity(tokens, c, (b, f, h, w))

    # -- one chunk of a stream ---------------------------------------------------------------------
    def chunk(self, x, t, audio, cache: IDContextCache, kv_only: bool = False):
        """x: (B, Cz, k, h, w) at flow times t (B, k) -> (velocity, this chunk's K/V per block).

        Reads the ID-Sink and Context-Cache; commit the returned K/V with `cache.append` once the
        chunk is final. `kv_only` (the commit pass) skips what nothing reads: the last block's attention
        output, audio and MLP, and the velocity head (velocity None).
        """
        b, _, f, h, w = x.shape
        tokens, c = self._tokens(x), self._cond(t)
        pos = torch.arange(f)
        kvs = []
        for i, blk in enumerate(self.blocks):
            if kv_only and i == len(self.blocks) - 1:
                return None, kvs + [blk.kv(tokens, c, (h, w))]
            ctx, ctx_pos = cache.window(i)
            tokens, own = blk(tokens, c, (h, w), pos, audio, sink=cache.sink[i], ctx=ctx, ctx_pos=ctx_pos)
            kvs.append(own)
        return self._velocity(tokens, c, (b, f, h, w)), kvs


def audio_windows(features: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """Per-video-frame features covering latent frames [s - a, e + a) -> windows (B, e - s, W, A).

    `features` holds (n + 2a) * tc vectors for n latent frames plus `a` neighbours on each side.
    """
    tc, W = cfg.temporal_compression, cfg.audio_window
    win = features.unfold(1, W, tc)  # (B, n, A, W)
    return rearrange(win, "b n a w -> b n w a")
