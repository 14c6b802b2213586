"""3D rotary positions (time, height, width) for latent tokens.

The head dimension is split into a temporal part (the first quarter) and two spatial halves of the
rest. Keys are cached with only their spatial rotation applied; the temporal rotation is applied when
they are read, relative to the chunk being generated, so positions never grow with stream length.

A rotation multiplies each pair of dims, read as a complex number, by a unit complex number from a table over
the whole head dimension (1 on the dims it leaves alone). The tables depend only on the grid and the frame positions,
which repeat every chunk of a stream, so they are built once and kept (`_table`'s cache): rebuilding
them was a fifth of a streaming DiT call on a CPU.
"""
from __future__ import annotations

import functools

import torch


def split(head_dim: int) -> tuple[int, int, int]:
    dt = head_dim // 4
    ds = (head_dim - dt) // 2
    return dt, ds, ds


def _freqs(n: int, theta: float, device) -> torch.Tensor:
    return theta ** (-torch.arange(0, n, 2, device=device, dtype=torch.float32) / n)


def _space_angles(h: int, w: int, head_dim: int, theta: float, device) -> torch.Tensor:
    """(h*w, (dh + dw) / 2) angles of a frame's grid in (row, col) order."""
    _, dh, dw = split(head_dim)
    rows = torch.arange(h, device=device).repeat_interleave(w).float()
    cols = torch.arange(w, device=device).repeat(h).float()
    return torch.cat([rows[:, None] * _freqs(dh, theta, device), cols[:, None] * _freqs(dw, theta, device)], -1)


@functools.lru_cache(maxsize=32)
def _table(head_dim: int, theta: float, device: torch.device, tokens_per_frame: int, frames: int,
           grid: tuple[int, int] | None, frame_pos: tuple[float, ...] | None) -> torch.Tensor:
    """Complex table (frames * tokens_per_frame, head_dim / 2) turning the spatial dims by the (h, w) `grid` of
    every frame and/or the temporal dims by each frame's position; 1 where nothing turns."""
    with torch.inference_mode(False), torch.no_grad():  # a table made under ComfyUI's inference mode stays usable in training
        return _build_table(head_dim, theta, device, tokens_per_frame, frames, grid, frame_pos)


def _build_table(head_dim, theta, device, tokens_per_frame, frames, grid, frame_pos) -> torch.Tensor:
    dt, dh, dw = split(head_dim)
    n, half = frames * tokens_per_frame, head_dim // 2
    ang = torch.zeros(n, half, device=device)  # angle 0 turns nothing
    if frame_pos is not None:
        pos = torch.tensor(frame_pos, device=device, dtype=torch.float32).repeat_interleave(tokens_per_frame)
        ang[:, : dt // 2] = pos[:, None] * _freqs(dt, theta, device)
    if grid is not None:
        ang[:, dt // 2:(dt + dh + dw) // 2] = _space_angles(*grid, head_dim, theta, device).repeat(frames, 1)
    return torch.polar(torch.ones_like(ang), ang)


def _apply(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x[2i], x[2i+1]) as the complex number x[2i] + i x[2i+1], times the table's unit number."""
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs whole pairs in memory
    return torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * table).flatten(-2).to(x.dtype)


def _positions(frame_pos: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(p) for p in frame_pos.flatten().tolist())


def rotate_space(x: torch.Tensor, h: int, w: int, theta: float) -> torch.Tensor:
    """x: (B, H, f*h*w, d) tokens in (frame, row, col) order -> spatially rotated."""
    return _apply(x, _table(x.shape[-1], theta, x.device, h * w, x.shape[-2] // (h * w), (h, w), None))


def rotate_time(x: torch.Tensor, frame_pos: torch.Tensor, tokens_per_frame: int, theta: float) -> torch.Tensor:
    """x: (B, H, f*hw, d); frame_pos: (f,) temporal position of each frame (may be negative)."""
    pos = _positions(frame_pos)
    return _apply(x, _table(x.shape[-1], theta, x.device, tokens_per_frame, len(pos), None, pos))


def rotate_space_time(x: torch.Tensor, h: int, w: int, frame_pos: torch.Tensor, theta: float) -> torch.Tensor:
    """`rotate_time(rotate_space(x, h, w, theta), frame_pos, h * w, theta)` in one pass (their dims differ)."""
    pos = _positions(frame_pos)
    return _apply(x, _table(x.shape[-1], theta, x.device, h * w, len(pos), (h, w), pos))
