"""Where the face and the mouth sit in a prepared (framed) crop, and the mouth a speech track implies.

Shared by the generator that draws the procedural faces (`synth`, whose mouths follow
`audio_mouth_shape`), the training stages (extra loss weight on the mouth region) and the quality
metrics (lip-sync reads the mouth region; identity is judged over the face box), so all three agree on
one geometry and one audio model.
"""
from __future__ import annotations

import numpy as np

# where the mouth lies in the frames of a prepared dataset (fractions of H and W): the face crop
# and the generator both centre the face with the mouth a little below the middle; tall enough for
# the head motion of natural speech and a fully open jaw, narrow enough to miss the nostrils and hair
MOUTH_ROI = (0.53, 0.74, 0.33, 0.67)  # top, bottom, left, right
# where identity is judged (face-region PSNR/SSIM): the face without hair fringe, shoulders or background
FACE_BOX = (0.22, 0.78, 0.26, 0.74)
ANALYSIS_RATE = 16000


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing along the last axis (no lag: sync must not be biased)."""
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(r, r)], mode="edge")
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), -1, pad)


# ---------------------------------------------------------------------------------------------
# audio -> mouth shape
# ---------------------------------------------------------------------------------------------
def resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    """A 1-D numpy signal at another sample rate (torchaudio's windowed-sinc resampler)."""
    if sr == target:
        return wave
    import torch
    import torchaudio
    return torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(wave)), sr, target).numpy()


def frame_spectra(wave, sr: int, fps: int, n_frames: int | None = None, window_s: float = 0.064):
    """Power spectra of a Hann window centred on each video frame's own span -> ([T, F], freqs)."""
    w = np.asarray(wave, dtype=np.float32)
    if w.ndim == 2:
        w = w.mean(0)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"audio must be a non-empty [samples] or [channels, samples] array, got {w.shape}")
    w = resample(w, int(sr), ANALYSIS_RATE)
    spf = ANALYSIS_RATE / fps
    if n_frames is None:
        n_frames = max(1, int(np.ceil(w.size / spf - 1e-6)))
    win = int(window_s * ANALYSIS_RATE)
    n_fft = 1 << (win - 1).bit_length()
    centres = ((np.arange(n_frames) + 0.5) * spf).astype(np.int64)
    idx = centres[:, None] + np.arange(win)[None] - win // 2
    padded = np.pad(w, (win, win + int(n_frames * spf) + 1))  # silence outside the audio
    seg = padded[idx + win] * np.hanning(win).astype(np.float32)
    spec = np.abs(np.fft.rfft(seg, n_fft)) ** 2
    return spec, np.fft.rfftfreq(n_fft, 1 / ANALYSIS_RATE)


def _centroid(spec, freqs, lo, hi):
    band = (freqs >= lo) & (freqs < hi)
    p = spec[:, band]
    return (p * freqs[band]).sum(1) / np.maximum(p.sum(1), 1e-12)


def audio_mouth_shape(wave, sr: int, fps: int = 25, n_frames: int | None = None,
                      dynamic_range_db: float = 36.0) -> tuple[np.ndarray, np.ndarray]:
    """Openness and width in [0, 1] per video frame that a speaking mouth would show for this audio.

    openness: speech-band (250-4000 Hz) loudness relative to the clip's loud level over
    `dynamic_range_db`, times a first-formant cue (open vowels raise F1); silence closes the mouth.
    width: second-formant cue (front vowels /i/, /e/ spread the lips, rounded /u/, /o/ narrow them),
    0.5 = neutral, pulled to neutral when quiet. Invariant to the recording's gain.
    """
    spec, freqs = frame_spectra(wave, sr, fps, n_frames)
    band = (freqs >= 250) & (freqs < 4000)
    db = 10 * np.log10(spec[:, band].sum(1) + 1e-10)
    loud = np.percentile(db, 95) if db.size > 1 else db.max()
    env = np.clip((db - (loud - dynamic_range_db)) / dynamic_range_db, 0, 1) ** 1.6
    f1 = np.clip((_centroid(spec, freqs, 200, 1000) - 350) / 450, 0, 1)
    f2 = np.clip((_centroid(spec, freqs, 900, 3000) - 1300) / 1100, 0, 1)
    openness = np.clip(env * (0.6 + 0.4 * f1), 0, 1)
    width = 0.5 + (f2 - 0.5) * np.clip(2 * env, 0, 1)
    openness, width = _smooth(np.stack([openness, width]), 0.7)
    return openness.astype(np.float32), np.clip(width, 0, 1).astype(np.float32)
