"""Causal spatiotemporal VAE (REST stage 1).

Video [B, 3, T, H, W] in [-1, 1] -> latent [B, Cz, T/tc, H/s, W/s] and back. Temporal compression is a
space-to-depth over groups of tc frames, and every temporal convolution is causal, so each latent
frame depends only on itself and earlier frames. The decoder therefore streams exactly: feed it one
latent chunk at a time with the carried tails of its causal convolutions (`DecoderState`), and the
frames equal a full decode of the whole latent. Norms are per frame (never over time) for the same
reason.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import VAEConfig


class CausalPad:
    """The carried tails of every causal conv in a module, in call order.

    `tails=None` starts a stream: the missing past is the first frame repeated (a still picture before
    the video began), identical in full and streaming decode. After a call, `new` holds what the next
    chunk needs; its size is fixed, so streaming memory does not grow with stream length.
    """

    def __init__(self, tails: list[torch.Tensor] | None = None):
        self.tails, self.new, self._i = tails, [], 0

    def __call__(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if n == 0:
            return x
        if self.tails is None:
            past = x[:, :, :1].expand(-1, -1, n, -1, -1)
        else:
            past = self.tails[self._i]
            self._i += 1
        x = torch.cat([past, x], dim=2)
        self.new.append(x[:, :, -n:].detach())
        return x


class CausalConv3d(nn.Module):
    def __init__(self, cin: int, cout: int, kt: int = 3, ks: int = 3):
        super().__init__()
        self.kt = kt
        self.conv = nn.Conv3d(cin, cout, (kt, ks, ks), padding=(0, ks // 2, ks // 2))

    def forward(self, x, pad: CausalPad):
        x = pad(x, self.kt - 1)
        return conv_over_frames(self.conv, x) if x.shape[0] == 1 else self.conv(x)


def conv_over_frames(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` (no temporal padding) as one 2D convolution over the output frames, with each frame's kt
    temporal taps stacked as channels: the same sums.

    For batch 1 torch runs Conv3d on CPU through its unfolded reference kernel (slow_conv3d), which made the
    streaming decode (always batch 1) 3x slower than oneDNN's conv2d; batches > 1 already get oneDNN, and
    skip the kt-fold copy of the input this needs.
    """
    kt = conv.weight.shape[2]
    taps = rearrange(x.unfold(2, kt, 1), "b c t h w k -> (b t) (c k) h w")
    y = F.conv2d(taps, rearrange(conv.weight, "o c k h w -> o (c k) h w"), conv.bias, padding=conv.padding[1:])
    return rearrange(y, "(b t) o h w -> b o t h w", b=x.shape[0])


def frame_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm over (C, H, W) of each frame separately: statistics never mix time steps."""
    b = x.shape[0]
    y = norm(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kt: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), CausalConv3d(cin, cout, kt)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), CausalConv3d(cout, cout, kt)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, pad: CausalPad):
        h = self.conv1(F.silu(frame_norm(self.norm1, x)), pad)
        h = self.conv2(F.silu(frame_norm(self.norm2, h)), pad)
        return self.skip(x) + h


class Down(nn.Module):
    """2x spatial downsample: space-to-depth then a 1x1 conv (cheap, exact). With `frames` > 1 it also
    merges that many consecutive frames into one, stacked as channels (the encoder's late temporal merge)."""

    def __init__(self, cin, cout, frames: int = 1):
        super().__init__()
        self.frames = frames
        self.proj = nn.Conv3d(cin * 4 * frames, cout, 1)

    def forward(self, x):
        return self.proj(rearrange(x, "b c (t pt) (h p) (w q) -> b (c pt p q) t h w", p=2, q=2, pt=self.frames))


class Up(nn.Module):
    """2x spatial upsample: a 1x1 conv then depth-to-space. With `frames` > 1 it also splits every frame into
    that many consecutive ones (the decoder's split of a latent frame, the mirror of Down's merge)."""

    def __init__(self, cin, cout, frames: int = 1):
        super().__init__()
        self.frames = frames
        self.proj = nn.Conv3d(cin, cout * 4 * frames, 1)

    def forward(self, x):
        return rearrange(self.proj(x), "b (c pt p q) t h w -> b c (t pt) (h p) (w q)", p=2, q=2, pt=self.frames)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        ch, kt, merge = cfg.channels, cfg.temporal_kernel, cfg.encoder_merge_level
        self.conv_in = CausalConv3d(3 * cfg.patch_size ** 2 * self.input_frames, ch[0], kt)
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks = nn.ModuleList(ResBlock(c, c, kt) for _ in range(cfg.blocks_per_level))
            frames = cfg.temporal_compression if i + 1 == merge else 1
            down = Down(c, ch[i + 1], frames) if i + 1 < len(ch) else nn.Identity()
            self.levels.append(nn.ModuleDict(dict(blocks=blocks, down=down)))
        self.norm_out = nn.GroupNorm(_groups(ch[-1]), ch[-1])
        self.conv_out = nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 1)

    @property
    def input_frames(self) -> int:
        """Frames stacked as channels at the input: all tc of a latent frame, or 1 with a late merge."""
        return 1 if self.cfg.encoder_merge_level else self.cfg.temporal_compression

    def forward(self, video):  # (B, 3, T, H, W) -> (B, 2Cz, t, h, w)
        c = self.cfg
        x = rearrange(video, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w",
                      pt=self.input_frames, ph=c.patch_size, pw=c.patch_size)
        pad = CausalPad()
        x = self.conv_in(x, pad)
        for level in self.levels:
            for block in level["blocks"]:
                x = block(x, pad)
            x = level["down"](x)
        return self.conv_out(F.silu(frame_norm(self.norm_out, x)))


def patch_unshuffle(x: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """(B, C*f*p*p, t, h, w) -> (B, C, t*f, h*p, w*p): the decoder's per-patch channels back to frames, f =
    cfg.decoder_output_frames (tc, or 1 when the decoder split the latent frames before its output)."""
    return rearrange(x, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)",
                     pt=cfg.decoder_output_frames, ph=cfg.patch_size, pw=cfg.patch_size)


class PixelRefiner(nn.Module):
    """A residual full-resolution stage after the decoder's patch unshuffle, per frame.

    The decoder thinks at 1/patch of the resolution and writes each patch's pixels as one linear map of its
    last features, which can blur a structure smaller than a patch (a lip line, teeth). The refiner sees the
    decoded frame plus `c // 2` extra feature planes per pixel and adds a correction; its last conv starts at
    zero, so added to a trained decoder it changes nothing until fine-tuned (`train-vae --init
    --refine-channels`), and the latents stay as they were. It cannot restore what the latents lack (the
    mouth's motion inside a latent frame); docs/demo_model.md says what it did for the demo VAE."""

    def __init__(self, cfg: VAEConfig, cin: int):
        super().__init__()
        self.cfg = cfg
        c, k, p = cfg.refine_channels, cfg.refine_channels // 2, cfg.patch_size
        self.hidden = nn.Conv3d(cin, k * p * p * cfg.decoder_output_frames, 1)
        self.conv1 = nn.Conv2d(3 + k, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, features, video):
        x = torch.cat([video, patch_unshuffle(self.hidden(features), self.cfg)], 1)
        b = x.shape[0]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.conv_out(F.silu(self.conv2(F.silu(self.conv1(x)))))
        return video + rearrange(x, "(b t) c h w -> b c t h w", b=b)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        ch, kt, split = cfg.channels[::-1], cfg.temporal_kernel, cfg.decoder_split_level
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], kt)
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks = nn.ModuleList(ResBlock(c, c, kt) for _ in range(cfg.blocks_per_level))
            frames = cfg.temporal_compression if i + 1 == split else 1
            up = Up(c, ch[i + 1], frames) if i + 1 < len(ch) else nn.Identity()
            self.levels.append(nn.ModuleDict(dict(blocks=blocks, up=up)))
        self.norm_out = nn.GroupNorm(_groups(ch[-1]), ch[-1])
        self.conv_out = nn.Conv3d(ch[-1], 3 * cfg.patch_size ** 2 * cfg.decoder_output_frames, 1)
        self.refine = PixelRefiner(cfg, ch[-1]) if cfg.refine_channels else None

    def forward(self, z, pad: CausalPad):  # (B, Cz, t, h, w) -> (B, 3, t*tc, H, W)
        x = self.conv_in(z, pad)
        for level in self.levels:
            for block in level["blocks"]:
                x = block(x, pad)
            x = level["up"](x)
        x = F.silu(frame_norm(self.norm_out, x))
        video = patch_unshuffle(self.conv_out(x), self.cfg)
        return video if self.refine is None else self.refine(x, video)


DecoderState = list  # the carried conv tails of a streaming decode; None starts a new stream


class CausalVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def _check_video(self, video: torch.Tensor):
        c = self.cfg
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if t % c.temporal_compression or h % c.spatial_compression or w % c.spatial_compression:
            raise ValueError(f"video of {t} frames at {h}x{w}: frames must be a multiple of "
                             f"{c.temporal_compression} and sides of {c.spatial_compression}")

    def encode_dist(self, video):
        """Posterior mean and log-variance (training), latents scaled for the DiT."""
        self._check_video(video)
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> posterior-mean latent [B, Cz, T/tc, h, w] (scaled)."""
        return self.encode_dist(video)[0] * self.cfg.scaling_factor

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] portrait -> one latent frame [B, Cz, 1, h, w]: a still clip of tc frames."""
        clip = image.unsqueeze(2).expand(-1, -1, self.cfg.temporal_compression, -1, -1)
        return self.encode(clip)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Whole latent [B, Cz, t, h, w] -> video [B, 3, t*tc, H, W]."""
        return self.decode_chunk(latent, None)[0]

    def decode_chunk(self, latent: torch.Tensor, state: DecoderState | None):
        """Streaming decode: one latent chunk plus the carried state -> (frames, next state).

        Chaining this over consecutive chunks equals `decode` of their concatenation.
        """
        pad = CausalPad(state)
        video = self.decoder(latent / self.cfg.scaling_factor, pad)
        return video, pad.new


def with_refiner(vae: CausalVAE, channels: int) -> CausalVAE:
    """`vae` with a fresh pixel refiner of `channels` (its last conv at zero: the same frames until trained),
    or with none (0); the encoder, the latents and the rest of the decoder are carried over unchanged."""
    out = CausalVAE(dataclasses.replace(vae.cfg, refine_channels=channels)).to(next(vae.parameters()).device)
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.refine.")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("decoder.refine.") for k in missing), (missing, unexpected)
    return out
