"""Shared fixtures: tiny models with every weight random (zero-initialised gates would hide bugs)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))

from rest_model.cli import random_model  # noqa: E402


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give zero-initialised parameters (adaLN-zero, output heads, null embeddings) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


@pytest.fixture
def tiny():
    vae, dit = random_model("tiny", seed=0)
    return randomize(vae, 1), randomize(dit, 2)


def speech_like(seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    """A voiced, syllable-modulated signal with pauses: enough structure to exercise the audio path."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0 / sr, 0)
    voiced = sum(torch.sin(h * phase) / h for h in range(1, 8))
    syll = (torch.sin(2 * math.pi * 4 * t).clamp_min(0)) * (torch.sin(2 * math.pi * 0.5 * t) > -0.3)
    return (0.3 * voiced * syll + 0.01 * torch.randn(t.shape, generator=g)).float()


def latent(cfg, frames: int, seed: int = 0) -> torch.Tensor:
    """Random latent [1, Cz, frames, h, w] in the layout of a DiT config (no test hard-codes a preset's)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.latent_channels, frames, cfg.latent_size, cfg.latent_size, generator=g)


def audio_features(cfg, latent_frames: int, seed: int = 0) -> torch.Tensor:
    """Random per-video-frame audio features covering `latent_frames` latent frames plus the audio context on
    each side, windowed for the DiT: [1, latent_frames, W, A]."""
    from rest_model.dit import audio_windows
    g = torch.Generator().manual_seed(seed)
    n = (latent_frames + 2 * cfg.audio_context) * cfg.temporal_compression
    return audio_windows(torch.randn(1, n, cfg.audio.dim, generator=g), cfg)
