"""A lip-sync expert over VAE latents (`train-sync`), and the sync loss it gives the student in distillation.

SyncNet (Chung & Zisserman 2016) judges whether a mouth and a stretch of speech belong together; Wav2Lip and
LatentSync train their generators against such a frozen expert. None can be downloaded here, so `train-sync`
trains one on the prepared dataset, without labels: all it learns from is which audio goes with which frames.
It works on latents, not pixels: the DiT writes latents, so an expert over them needs no VAE decode inside a
distillation step (on a CPU the decode would cost more than the student), and its gradient reaches the student
directly. LatentSync reports a pixel expert more accurate than a latent one; `train-sync` prints the held-out
accuracy of this one.

Two towers, each ending in a unit vector:
  video: the latent cells over the mouth region (data.mouth.MOUTH_ROI and one cell around it for head motion),
         `span` latent frames
  audio: the log-mel of those frames' audio and `pad` frames each side
scored s(v, a) = exp(log_scale) * cos(v, a). Per latent position (InfoNCE), the aligned audio must outscore the
same clip's audio shifted by +-shift_step..max_shift video frames (timing, which is what lip-sync is) and the
other clips' aligned audio (content):

    L_sync = -log softmax_c s(v, a_c) at c = aligned,   c over {a_shift} + {other clips' a_0}

`distill --sync-expert F --sync-weight W` scores the student's own rollout with the same loss, the expert frozen,
so the student is pushed towards mouths the expert places at the true timing, which regression onto a teacher
can not give beyond the teacher's own lip-sync.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from einops import rearrange
from torch import nn

from .. import checkpoint
from ..config import SyncExpertConfig, latent_layout
from ..data.mouth import MOUTH_ROI


def mouth_cells(cfg: SyncExpertConfig) -> tuple[slice, slice]:
    """Latent rows and columns the video tower reads: those under MOUTH_ROI and one more on each side."""
    n = cfg.latent_size
    top, bottom, left, right = MOUTH_ROI
    return (slice(max(0, math.floor(top * n) - 1), min(n, math.ceil(bottom * n) + 1)),
            slice(max(0, math.floor(left * n) - 1), min(n, math.ceil(right * n) + 1)))


def _tower(n_in: int, hidden: int, dim: int) -> nn.Sequential:
    # LayerNorm first: on the log-mel it removes the window's gain (a constant in log domain), so the tower hears
    # how the speech moves, not how loud the recording is
    return nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                         nn.GELU(), nn.Linear(hidden, dim))


class SyncExpert(nn.Module):
    def __init__(self, cfg: SyncExpertConfig):
        super().__init__()
        self.cfg = cfg
        rows, cols = mouth_cells(cfg)
        cells = (rows.stop - rows.start) * (cols.stop - cols.start)
        hop = cfg.samples_per_frame // cfg.mels_per_frame
        self.mel = torchaudio.transforms.MelSpectrogram(cfg.fps * cfg.samples_per_frame, n_fft=cfg.n_fft,
                                                        hop_length=hop, n_mels=cfg.n_mels, center=False)
        mel_frames = (cfg.window_frames * cfg.samples_per_frame - cfg.n_fft) // hop + 1
        self.video = _tower(cfg.latent_channels * cfg.span * cells, cfg.hidden, cfg.dim)
        self.audio = _tower(cfg.n_mels * mel_frames, cfg.hidden, cfg.dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))


checkpoint.register_kind("sync", SyncExpertConfig, SyncExpert)


def check_fits(cfg: SyncExpertConfig, other, what: str) -> None:
    """Refuse a VAE or DiT config whose latent layout (and, for a DiT, frame and audio rate) the expert was not
    trained on."""
    pairs = latent_layout(other)
    if hasattr(other, "audio"):
        pairs |= {"resolution": other.resolution, "fps": other.fps, "samples_per_frame": other.audio.samples_per_frame}
    diff = [f"{k}: expert {getattr(cfg, k)} vs {what} {v}" for k, v in pairs.items() if getattr(cfg, k) != v]
    if diff:
        raise ValueError(f"the lip-sync expert does not fit the {what} (" + "; ".join(diff) + ")")


def video_embeddings(expert: SyncExpert, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, Cz, n, h, w] -> unit vectors [B, P, D], one per window of `span` latent frames (P = n - span + 1)."""
    c = expert.cfg
    rows, cols = mouth_cells(c)
    if latents.shape[2] < c.span:
        raise ValueError(f"the lip-sync expert needs at least {c.span} latent frames, got {latents.shape[2]}")
    crop = latents[:, :, :, rows, cols].unfold(2, c.span, 1)  # [B, Cz, P, r, c, span]
    return F.normalize(expert.video(rearrange(crop, "b z p r c s -> b p (z s r c)")), dim=-1)


def audio_frames(cfg: SyncExpertConfig, wave: torch.Tensor, margin: int, n_latent: int) -> torch.Tensor:
    """Audio [B, (n_latent * tc + 2 * margin) * spf] (a clip's, with `margin` frames each side) -> the samples each
    window of `span` latent frames is judged against [B, P, S, window_frames * spf]: its own video frames and `pad`
    frames each side, at each of cfg.shifts (+: later audio)."""
    spf, tc = cfg.samples_per_frame, cfg.temporal_compression
    want = (n_latent * tc + 2 * margin) * spf
    if margin < cfg.margin:
        raise ValueError(f"the lip-sync expert needs {cfg.margin} frames of audio beyond the clip's ends, got {margin}")
    if wave.shape[-1] != want:
        raise ValueError(f"audio of {wave.shape[-1]} samples does not cover {n_latent} latent frames with "
                         f"{margin} frames each side ({want} samples)")
    frames = wave.unfold(-1, cfg.window_frames * spf, spf)  # [B, starts, samples]: a window from each video frame
    first = torch.arange(n_latent - cfg.span + 1) * tc  # first video frame of each window of latent frames
    starts = margin - cfg.pad + first[:, None] + torch.tensor(cfg.shifts)[None]  # [P, S]
    return frames[:, starts.to(wave.device)]


def audio_embeddings(expert: SyncExpert, wave: torch.Tensor, margin: int, n_latent: int) -> torch.Tensor:
    """Unit vectors [B, P, S, D] of audio_frames(...)."""
    mel = expert.mel(audio_frames(expert.cfg, wave, margin, n_latent))  # [B, P, S, mels, time]
    return F.normalize(expert.audio(torch.log(mel.clamp_min(1e-10)).flatten(-2)), dim=-1)


def sync_logits(expert: SyncExpert, latents: torch.Tensor, wave: torch.Tensor, margin: int):
    """(shifted [B, P, S], others [B, P, B]): the scores of each window against its own audio at every shift and
    against the other clips' aligned audio (its own clip's entry -inf: it is the aligned one of `shifted`)."""
    v = video_embeddings(expert, latents)
    a = audio_embeddings(expert, wave, margin, latents.shape[2])
    scale = expert.log_scale.exp()
    shifted = scale * torch.einsum("bpd,bpsd->bps", v, a)
    aligned = a[:, :, len(expert.cfg.shifts) // 2]
    others = scale * torch.einsum("bpd,cpd->bpc", v, aligned)
    own = torch.eye(v.shape[0], dtype=torch.bool, device=v.device)[:, None, :]
    return shifted, others.masked_fill(own, float("-inf"))


def sync_loss(expert: SyncExpert, latents: torch.Tensor, wave: torch.Tensor, margin: int) -> tuple[torch.Tensor, dict]:
    """L_sync (mean over windows) and the share of windows whose aligned audio outscores every shift."""
    shifted, others = sync_logits(expert, latents, wave, margin)
    aligned = len(expert.cfg.shifts) // 2
    logits = torch.cat([shifted, others], -1).flatten(0, 1)
    loss = F.cross_entropy(logits, torch.full((logits.shape[0],), aligned, device=logits.device))
    acc = (shifted.argmax(-1) == aligned).float().mean()
    return loss, {"sync": loss.item(), "sync_acc": acc.item()}
