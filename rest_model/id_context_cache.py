"""ID-Context Cache (REST): per DiT block, the ID-Sink plus a rolling Context-Cache.

- ID-Sink: K/V of the reference portrait's latent tokens, computed once and kept for the whole stream,
  so identity has the same anchor at frame 10 and at frame 10 million. The sink is timeless: its keys
  carry spatial rotary positions only, so every frame sees it at temporal distance zero.
- Context-Cache: K/V of the last `context_frames` generated latent frames, rolling. Keys are stored
  before temporal rotation; `window` rotates them relative to the chunk being generated, so positions
  never run out and memory stays constant however long the stream runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    k: torch.Tensor  # (B, H, n_tokens, d)
    v: torch.Tensor  # (B, H, n_tokens, d)


class IDContextCache:
    def __init__(self, sink: list[LayerKV], context_frames: int, tokens_per_frame: int, start_frame: int = 0):
        self.sink = sink
        self.context_frames = context_frames
        self.tokens_per_frame = tokens_per_frame
        self.frame = start_frame  # absolute index of the next frame to be generated
        self._ctx: list[LayerKV | None] = [None] * len(sink)

    @property
    def window_frames(self) -> int:
        ctx = self._ctx[0]
        return 0 if ctx is None else ctx.k.shape[2] // self.tokens_per_frame

    def window(self, layer: int) -> tuple[LayerKV | None, torch.Tensor]:
        """The layer's context K/V and each cached frame's position relative to the next frame."""
        ctx = self._ctx[layer]
        n = self.window_frames
        return ctx, torch.arange(-n, 0)

    def append(self, kvs: list[LayerKV], n_frames: int):
        """Commit the K/V of `n_frames` freshly generated frames; the oldest fall out of the window."""
        keep = self.context_frames * self.tokens_per_frame
        for i, kv in enumerate(kvs):
            old = self._ctx[i]
            k = kv.k if old is None else torch.cat([old.k, kv.k], 2)
            v = kv.v if old is None else torch.cat([old.v, kv.v], 2)
            # clone so the window does not keep the whole concatenation (or a caller's tensor) alive
            cut = max(0, k.shape[2] - keep)
            self._ctx[i] = LayerKV(k[:, :, cut:].clone(), v[:, :, cut:].clone()) if keep > 0 else None
        self.frame += n_frames

    def reset(self, start_frame: int = 0):
        """Forget the Context-Cache (a new stream); the ID-Sink stays."""
        self._ctx = [None] * len(self.sink)
        self.frame = start_frame

    def nbytes(self) -> int:
        kvs = self.sink + [c for c in self._ctx if c is not None]
        return sum(kv.k.numel() * kv.k.element_size() + kv.v.numel() * kv.v.element_size() for kv in kvs)
