"""Rectified-flow sampling: x_t = (1 - t) x_0 + t e, velocity v = e - x_0, t = 1 is pure noise.

Small pure functions over a velocity callable, in the manner of k-diffusion's samplers.
"""
from __future__ import annotations

from typing import Callable

import torch


def flow_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """Times 1 -> 0 in `steps` Euler steps; shift > 1 spends more steps at high noise (SD3)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


def sample_euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 times: torch.Tensor) -> torch.Tensor:
    """Euler integration of dx/dt = v(x, t) from times[0] to times[-1] (Liu et al., rectified flow)."""
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x


def denoised(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_0 predicted from a velocity: x_0 = x_t - t v (t broadcast per latent frame)."""
    return x_t - t * v


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - t) * x0 + t * noise


def sample_clip(dit, ref: torch.Tensor, audio: torch.Tensor, noise: torch.Tensor, times: torch.Tensor,
                causal: bool = False, chunk: int = 1, context: int = 0) -> torch.Tensor:
    """Whole-clip sampling in one sequence: the bidirectional teacher (causal=False), or the student
    seen all at once under its block-causal mask. noise: (B, Cz, T, h, w); audio: (B, T, W, A) windows.
    Every frame shares the same time here; per-frame times are for training (diffusion forcing, ASD).
    """
    b, f = noise.shape[0], noise.shape[2]

    def velocity(x, t):
        return dit(x, t.expand(b, f), audio, ref, causal=causal, chunk=chunk, context=context)

    return sample_euler(velocity, noise, times)
