"""What travels on the pack's custom sockets between nodes.

REST_VAE / REST_DIT are the rest_model modules themselves, tagged with the file they came from so
errors can name it. The other three are the small records below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rest_model.config import DiTConfig
from ..rest_model.id_context_cache import IDContextCache

VAE, DIT, AUDIO, CACHE, CHUNKS = "REST_VAE", "REST_DIT", "REST_AUDIO", "REST_CACHE", "REST_LATENT_CHUNKS"


def source(module: torch.nn.Module) -> str:
    """The file a loaded model came from (or its class, for a model built in memory)."""
    return getattr(module, "rest_file", None) or f"<in-memory {type(module).__name__}>"


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


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
class RestCache:
    """The ID-Context Cache of one portrait: the ID-Sink computed once, plus what the sampler needs."""
    vae: torch.nn.Module
    dit: torch.nn.Module
    portrait: torch.Tensor  # [3, R, R] in [-1, 1] at the DiT's resolution (what the model sees)
    reference: torch.Tensor  # [1, Cz, 1, h, w] reference latent
    cache: IDContextCache  # ID-Sink + (empty) rolling Context-Cache
    context_frames: int


@dataclass
class LatentChunks:
    """The Streaming Sampler's output: consecutive latent chunks, kept on the CPU."""
    latents: list = field(default_factory=list)  # each [1, Cz, k, h, w]
    num_frames: list = field(default_factory=list)  # video frames each chunk contributes
    fps: int = 25
    dit_cfg: DiTConfig | None = None  # the latent layout the chunks are in

    @property
    def total_frames(self) -> int:
        return sum(self.num_frames)
