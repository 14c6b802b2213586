"""3D rotary positions (time, height, width) for latent tokens.

The head dimension is split into a temporal part (the first quarter) and two spatial halves of the
rest. Keys are cached with only their spatial rotation applied; the temporal rotation is applied when
they are read, relative to the chunk being generated, so positions never grow with stream length.
"""
from __future__ import annotations

import torch


def split(head_dim: int) -> tuple[int, int, int]:
    dt = head_dim // 4
    ds = (head_dim - dt) // 2
    return dt, ds, ds


def _freqs(n: int, theta: float, device) -> torch.Tensor:
    return theta ** (-torch.arange(0, n, 2, device=device, dtype=torch.float32) / n)


def _rotate(x: torch.Tensor, angles: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of dims [lo, hi) by angles [..., (hi - lo) / 2]."""
    part = x[..., lo:hi].float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    a, b = part[..., 0], part[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :lo], rot, x[..., hi:]], -1)


def rotate_space(x: torch.Tensor, h: int, w: int, theta: float) -> torch.Tensor:
    """x: (B, H, f*h*w, d) tokens in (frame, row, col) order -> spatially rotated."""
    dt, dh, dw = split(x.shape[-1])
    dev = x.device
    rows = torch.arange(h, device=dev).repeat_interleave(w).float()
    cols = torch.arange(w, device=dev).repeat(h).float()
    ang = torch.cat([rows[:, None] * _freqs(dh, theta, dev), cols[:, None] * _freqs(dw, theta, dev)], -1)
    ang = ang.repeat(x.shape[-2] // (h * w), 1)  # same grid in every frame
    return _rotate(x, ang, dt, dt + dh + dw)


def rotate_time(x: torch.Tensor, frame_pos: torch.Tensor, tokens_per_frame: int, theta: float) -> torch.Tensor:
    """x: (B, H, f*hw, d); frame_pos: (f,) temporal position of each frame (may be negative)."""
    dt = split(x.shape[-1])[0]
    pos = frame_pos.to(x.device).float().repeat_interleave(tokens_per_frame)
    return _rotate(x, pos[:, None] * _freqs(dt, theta, x.device), 0, dt)
