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


def audio_guided(dit, x, t, audio, ref, scale: float = 1.0, **kw) -> torch.Tensor:
    """Velocity with classifier-free guidance on the audio: v_null + scale (v_audio - v_null), where v_null
    hears the silence embedding (the teacher learned it from its audio dropout). A teacher whose mouth follows
    the speech only weakly is pushed further along what the speech changes; scale 1 is the plain velocity."""
    v = dit(x, t, audio, ref, **kw)
    if scale == 1.0:
        return v
    v_null = dit(x, t, dit.audio_encoder.null.expand_as(audio), ref, **kw)
    return v_null + scale * (v - v_null)


def sample_clip(dit, ref: torch.Tensor, audio: torch.Tensor, noise: torch.Tensor, times: torch.Tensor,
                causal: bool = False, chunk: int = 1, context: int = 0, guidance: float = 1.0) -> torch.Tensor:
    """Whole-clip sampling in one sequence: the bidirectional teacher (causal=False), or the student
    seen all at once under its block-causal mask. noise: (B, Cz, T, h, w); audio: (B, T, W, A) windows.
    Every frame shares the same time here; per-frame times are for training (diffusion forcing, ASD).
    `guidance` > 1 applies audio classifier-free guidance (`audio_guided`) at every step.
    """
    b, f = noise.shape[0], noise.shape[2]

    def velocity(x, t):
        return audio_guided(dit, x, t.expand(b, f), audio, ref, guidance, causal=causal, chunk=chunk, context=context)

    return sample_euler(velocity, noise, times)
