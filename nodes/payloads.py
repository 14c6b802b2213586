"""What travels on the pack's custom sockets between nodes: one value per socket.

REST_VAE / REST_DIT carry a `RestModel` (nodes/managed.py): the module under ComfyUI's model management
and the file it came from. The other three are the small records below. None of them holds another
socket's value: the sampler gets the DiT and the VAE on their own sockets, and the cache says which DiT
it was made with instead of carrying it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..rest_model.config import DiTConfig
from ..rest_model.id_context_cache import LayerKV

VAE, DIT, AUDIO, CACHE, CHUNKS = "REST_VAE", "REST_DIT", "REST_AUDIO", "REST_CACHE", "REST_LATENT_CHUNKS"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made something: its file, config and where it runs (not the model object), so a
    consumer can refuse what another model made without holding that model alive."""
    file: str
    config: str  # the config as JSON
    device: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.file} ({self.dtype.replace('torch.', '')} on {self.device})"


@dataclass
class RestAudio:
    """Speech resampled to the DiT's audio-encoder rate (fps * samples_per_frame), mono, so video
    frame i owns exactly samples [i * spf, (i + 1) * spf)."""
    waveform: torch.Tensor  # [S] float32, CPU
    sample_rate: int  # the encoder rate it was resampled to
    fps: int
    num_frames: int  # video frames the stream will produce: ceil(duration * fps)

    @property
    def duration(self) -> float:
        return self.waveform.numel() / self.sample_rate


@dataclass
class IDSink:
    """The REST_CACHE socket: what the Streaming Sampler needs of a portrait (the ID-Sink K/V, computed
    once, and the rolling Context-Cache length) and what the video output needs to paste the face back."""
    sink: list[LayerKV]  # per DiT block, on the DiT's device
    context_frames: int
    dit: ModelIdentity  # the DiT whose blocks computed the sink: the sampler refuses any other
    original: torch.Tensor  # [3, H, W] in [0, 1], CPU: the portrait as given, for paste-back
    framing: object | None = None  # rest_model.framing.Framing: where the model's square sits in `original`
    notes: list[str] = field(default_factory=list)  # framing / domain messages for the sampler's report


class LatentChunks:
    """The REST_LATENT_CHUNKS socket: the Streaming Sampler's latent video, chunk by chunk.

    ComfyUI runs the sampler to the end before any decode starts, so the whole latent video waits
    between the two nodes. Chunks stay on the device that made them (no device -> CPU -> device trip)
    until `budget_bytes`; later ones go to a spill file in the temp folder and are read back one at a
    time, so an hour of video holds the same memory as a minute.
    """

    def __init__(self, fps: int, dit_cfg: DiTConfig, budget_bytes: int = 16 * 2 ** 20,
                 spill_dir: str | None = None, original: torch.Tensor | None = None, framing=None):
        self.fps, self.dit_cfg = fps, dit_cfg
        self.original, self.framing = original, framing  # from the ID-Context Cache, for paste-back
        self.num_frames: list[int] = []  # video frames each chunk contributes (the last is cut to the audio)
        self.budget, self.spill_dir = budget_bytes, spill_dir
        self._memory: list[torch.Tensor] = []
        self._spilled: list[tuple[tuple, torch.dtype]] = []  # shapes and dtypes, in file order
        self._file = None
        self._bytes = 0

    def append(self, latent: torch.Tensor, num_frames: int) -> None:
        size = latent.numel() * latent.element_size()
        if not self._spilled and self._bytes + size <= self.budget:
            self._memory.append(latent)
            self._bytes += size
        else:
            if self._file is None:  # deleted by the OS when closed or when this object is collected
                self._file = tempfile.TemporaryFile(prefix="rest_latents_", dir=self.spill_dir)
            self._file.write(latent.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._spilled.append((tuple(latent.shape), latent.dtype))
        self.num_frames.append(num_frames)

    def __len__(self) -> int:
        return len(self.num_frames)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self._memory
        if self._file is not None:
            self._file.flush()
            offset = 0
            for shape, dtype in self._spilled:  # one chunk read back at a time
                n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
                data = os.pread(self._file.fileno(), n, offset)
                offset += n
                yield torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)

    @property
    def spilled(self) -> int:
        return len(self._spilled)

    @property
    def total_frames(self) -> int:
        return sum(self.num_frames)

    @property
    def latents(self) -> list[torch.Tensor]:
        """Every chunk as a list (tests and short videos; a long video should be iterated)."""
        return list(self)
