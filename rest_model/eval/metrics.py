"""Quality metrics as pure functions over numpy arrays: lip-sync, identity retention, flicker.

Conventions: frames are [T, H, W, 3] uint8 (or float in [0, 255]); video frame i owns the audio of
[i / fps, (i + 1) / fps), as everywhere in rest_model; per-frame signals are float32 [T].

Lip-sync works without a learned expert (none can be downloaded): the mouth's openness is read
from the frames as the area of dark mouth interior in the mouth region, and compared with the
openness the audio implies (`data.mouth.audio_mouth_shape`: speech-band loudness and a first-formant
cue).
The procedural generator (`rest_model.data.synth`) drives its mouths with that same audio function, so
on its clips the metric is high at the true offset and drops away from it; on real speech the
relation is physical (an open jaw radiates more energy and raises F1), just noisier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.mouth import FACE_BOX, MOUTH_ROI, audio_mouth_shape


def _as_float_frames(frames) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (RGB, channels last), got {a.shape}")
    return a.astype(np.float32, copy=False)


def _luma(a: np.ndarray) -> np.ndarray:
    """Rec. 601 luminance of RGB along the last axis (float32 in, float32 out)."""
    return a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _box(shape, box):
    h, w = shape
    t, b, l, r = box
    return slice(int(round(t * h)), max(int(round(b * h)), int(round(t * h)) + 1)), \
        slice(int(round(l * w)), max(int(round(r * w)), int(round(l * w)) + 1))


# ---------------------------------------------------------------------------------------------
# frames -> mouth openness
# ---------------------------------------------------------------------------------------------
def mouth_openness(frames, roi=MOUTH_ROI) -> np.ndarray:
    """Area of dark mouth interior in the mouth region per frame, as a fraction of the region.

    "Dark" is relative to the region's own median brightness (the surrounding skin) in each frame, so
    skin tone and lighting do not matter, with a soft threshold so that blurry generated mouths still
    count. Dark areas that touch the region's edge continue outside it (hair, a beard, the shadow
    under the chin) and are left out: the mouth's interior is enclosed by the lips. What remains
    constant (a moustache, a mole) only adds an offset, which correlation ignores.
    """
    import cv2
    a = _as_float_frames(frames)
    ys, xs = _box(a.shape[1:3], roi)
    lum = _luma(a[:, ys, xs])
    ref = np.median(lum.reshape(len(lum), -1), axis=1)[:, None, None]
    dark = np.clip((0.5 * ref - lum) / np.maximum(0.25 * ref, 1e-3), 0, 1)
    out = np.empty(len(dark), np.float32)
    for i, d in enumerate(dark):
        _, lab = cv2.connectedComponents((d > 0.2).astype(np.uint8), connectivity=8)
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        keep = (lab > 0) & ~np.isin(lab, edge)
        out[i] = (d * keep).mean()
    return out


# ---------------------------------------------------------------------------------------------
# sync score and offset search
# ---------------------------------------------------------------------------------------------
@dataclass
class SyncResult:
    score: float  # Pearson correlation at the best offset (1 = perfect, ~0 = unrelated)
    offset: int  # frames the audio lags the video at the best fit (+: the sound comes late)
    confidence: float  # best minus median correlation over the searched offsets (SyncNet-style)
    at_zero: float  # correlation at offset 0
    lags: np.ndarray
    curve: np.ndarray

    def as_dict(self) -> dict:
        return dict(score=self.score, offset=self.offset, confidence=self.confidence, at_zero=self.at_zero)


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 1e-12 else 0.0


def sync_curve(mouth, audio_open, max_offset: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Correlation of mouth[i] with audio_open[i + lag] for lag in [-max_offset, max_offset]."""
    m, a = np.asarray(mouth, np.float64), np.asarray(audio_open, np.float64)
    n = min(m.size, a.size)
    if n < 8:
        raise ValueError(f"need at least 8 frames of mouth and audio to measure sync, got {n}")
    m, a = m[:n], a[:n]
    max_offset = min(max_offset, n // 2)
    lags = np.arange(-max_offset, max_offset + 1)
    curve = np.array([_corr(m[max(0, -l): n - max(0, l)], a[max(0, l): n - max(0, -l)]) for l in lags])
    return lags, curve


def sync_score(mouth, audio_open, max_offset: int = 15) -> SyncResult:
    """How well the mouth follows the audio, and at which offset (search +-max_offset frames)."""
    lags, curve = sync_curve(mouth, audio_open, max_offset)
    best = int(np.argmax(curve))
    return SyncResult(float(curve[best]), int(lags[best]), float(curve[best] - np.median(curve)),
                      float(curve[lags == 0][0]), lags, curve)


def lip_sync(frames, wave, sr: int, fps: int = 25, max_offset: int = 15) -> SyncResult:
    """Sync of a talking-head clip with its speech track (frames [T, H, W, 3], wave [S] or [C, S])."""
    a = _as_float_frames(frames)
    audio_open, _ = audio_mouth_shape(wave, sr, fps, len(a))
    return sync_score(mouth_openness(a), audio_open, max_offset)


def mouth_motion(frames, group: int, roi=MOUTH_ROI) -> tuple[float, float]:
    """Mean |frame-to-frame change| of luminance (0-255) in the mouth region -> (inside, across): between
    frames of the same `group`-frame group (what one latent frame of a VAE with temporal compression
    `group` must carry) and between the last frame of a group and the first of the next."""
    a = _as_float_frames(frames)
    if len(a) < group + 1 or group < 2:
        raise ValueError(f"need group >= 2 and more than {group} frames, got group {group}, {len(a)} frames")
    ys, xs = _box(a.shape[1:3], roi)
    lum = _luma(a[:, ys, xs])
    d = np.abs(np.diff(lum, axis=0)).reshape(len(lum) - 1, -1).mean(1)
    inside = np.arange(len(d)) % group != group - 1
    return float(d[inside].mean()), float(d[~inside].mean())


def latent_probe(train_x, train_y, test_x, test_y, ridge: float = 10.0) -> dict:
    """How much of a per-frame signal a linear read-out of latent features recovers on held-out data.

    x: [N, D] features of N latent frames (e.g. the latent cells over the mouth); y: [N, tc] the signal
    (e.g. mouth openness) of each latent frame's tc video frames. A ridge regression fit on train is scored
    on test by correlation: `frames` [tc] per frame of a latent, `in_group` for the change from a latent's
    first to its last frame (what a decoder must show to move the mouth inside a latent frame; nan at tc 1).
    What a linear probe cannot read a decoder may still recover, so it is a floor on the information; a low
    `in_group` beside a high `frames` says the latent holds one mouth per latent frame, not tc of them."""
    xs = [np.asarray(a, np.float64) for a in (train_x, test_x)]
    ys = [np.asarray(a, np.float64).reshape(len(a), -1) for a in (train_y, test_y)]
    if xs[0].ndim != 2 or len(xs[0]) != len(ys[0]) or len(xs[1]) != len(ys[1]) or xs[0].shape[1] != xs[1].shape[1]:
        raise ValueError(f"latent_probe needs x [N, D] and y [N, tc] of matching N and D, got "
                         f"{xs[0].shape}/{ys[0].shape} and {xs[1].shape}/{ys[1].shape}")
    if len(xs[1]) < 3:
        raise ValueError(f"latent_probe needs at least 3 test samples, got {len(xs[1])}")
    mu, sd = xs[0].mean(0), xs[0].std(0) + 1e-8
    a, b = [np.c_[(x - mu) / sd, np.ones(len(x))] for x in xs]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ ys[0])
    pred, y = b @ w, ys[1]
    frames = [_corr(pred[:, k], y[:, k]) for k in range(y.shape[1])]
    in_group = _corr(pred[:, -1] - pred[:, 0], y[:, -1] - y[:, 0]) if y.shape[1] > 1 else float("nan")
    return dict(frames=frames, in_group=in_group)


def shift_audio(wave, samples: int) -> np.ndarray:
    """Delay (+) or advance (-) a waveform by a number of samples, keeping its length (silence fills)."""
    w = np.asarray(wave, dtype=np.float32)
    out = np.zeros_like(w)
    if samples >= 0:
        out[..., samples:] = w[..., : w.shape[-1] - samples]
    else:
        out[..., :samples] = w[..., -samples:]
    return out


# ---------------------------------------------------------------------------------------------
# identity retention and temporal stability
# ---------------------------------------------------------------------------------------------
def _paired(a, b, box=None) -> tuple[np.ndarray, np.ndarray]:
    """Two frames [H, W, 3] as float, cut to `box` (fractions of the frame) when given."""
    x, y = _as_float_frames(a)[0], _as_float_frames(b)[0]
    if x.shape != y.shape:
        raise ValueError(f"frames differ in shape: {x.shape} vs {y.shape}")
    if box is not None:
        ys, xs = _box(x.shape[:2], box)
        x, y = x[ys, xs], y[ys, xs]
    return x, y


def psnr(a, b, box=None) -> float:
    """PSNR (dB, peak 255) between two frames [H, W, 3], over `box` (fractions) or the whole frame."""
    x, y = _paired(a, b, box)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ssim(a, b, box=None) -> float:
    """SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) on luminance."""
    import cv2
    x, y = _paired(a, b, box)
    x, y = _luma(x).astype(np.float64), _luma(y).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):
        return cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(m.mean())


def face_similarity(frames, reference, box=FACE_BOX) -> dict:
    """Mean face-region PSNR and SSIM of frames [T, H, W, 3] to the reference portrait [H, W, 3]."""
    a = _as_float_frames(frames)
    r = _as_float_frames(reference)[0]
    if a.shape[1:] != r.shape:
        raise ValueError(f"frames {a.shape[1:]} and reference {r.shape} differ in size")
    return dict(psnr=float(np.mean([psnr(f, r, box) for f in a])),
                ssim=float(np.mean([ssim(f, r, box) for f in a])))


def static_mask(frames, threshold: float = 2.0, erode: int = 2) -> np.ndarray:
    """Pixels that do not move in a (ground-truth) clip: temporal std of luminance below `threshold`
    (0-255 scale), eroded so that edges of moving parts are not counted -> bool [H, W]."""
    import cv2
    a = _as_float_frames(frames)
    lum = _luma(a)
    m = (lum.std(0) < threshold).astype(np.uint8)
    if erode > 0:
        m = cv2.erode(m, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8))
    return m.astype(bool)


def flicker(frames, mask=None) -> float:
    """Mean absolute frame-to-frame change (0-255 scale) inside `mask` (static regions), i.e. how much
    a region that should stand still shimmers. Lower is better; a still, clean video gives 0."""
    a = _as_float_frames(frames)
    if len(a) < 2:
        raise ValueError("flicker needs at least 2 frames")
    d = np.abs(np.diff(a, axis=0)).mean(-1)  # [T-1, H, W]
    if mask is None:
        return float(d.mean())
    mask = np.asarray(mask, bool)
    if mask.shape != d.shape[1:]:
        raise ValueError(f"mask {mask.shape} does not match frames {d.shape[1:]}")
    if not mask.any():
        raise ValueError("static mask is empty: nothing in the clip stands still")
    return float(d[:, mask].mean())


class FlickerMeter:
    """Running flicker over a stream of frame batches (a long stream never sits in memory)."""

    def __init__(self, mask=None):
        self.mask = None if mask is None else np.asarray(mask, bool)
        self.last, self.total, self.count = None, 0.0, 0

    def update(self, frames):
        a = _as_float_frames(frames)
        if self.last is not None:
            a = np.concatenate([self.last[None], a])
        if len(a) >= 2:
            d = np.abs(np.diff(a, axis=0)).mean(-1)
            d = d[:, self.mask] if self.mask is not None else d.reshape(len(d), -1)
            self.total += float(d.sum())
            self.count += d.size
        self.last = a[-1]

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")
