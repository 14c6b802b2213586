"""Portrait framing: find the face in any portrait, frame it the way the training data frames faces,
and paste the generated square back into the original picture at its own resolution.

The training data is framed by one rule (`face_square`, which `rest_model.data.prepare` uses too): a
square `FACE_SCALE` times the face box, the face a little above its centre. The procedural faces
the demo model learned from (`rest_model.data.synth`) are drawn at exactly that framing, so a
portrait framed by it looks to the model like its training faces.

Face finding is classical and dependency-free (numpy/torch only: the core and the ComfyUI nodes
must not need OpenCV and nothing is downloaded): the largest compact skin-coloured blob (YCrCb skin
range of Chai & Ngan 1999), background colours seen on the border removed, cut at the neck. Its
widest rows are the cheeks and ears, at the face's vertical centre on a drawn face and close to it
on a photo; the face box is a square around them whose side is a fixed multiple of that width
(`FACE_PER_WIDTH`, measured on the drawn faces by scripts/calibrate_framing.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .media import CROP_MODES as FIT_MODES, MIN_SIDE, fit_portrait, portrait_rgb, to_rgb

CROP_MODES = ("face",) + FIT_MODES  # "face" first: the default for real portraits
FACE_SCALE = 2.0  # crop side / face box side (prepare's --face-scale default)
FACE_DROP = 0.06  # the face centre sits this fraction of the crop side above the crop's centre
# face box side / width of the skin blob's widest rows (cheeks and ears), measured on 200 drawn faces of unseen
# identities by scripts/calibrate_framing.py: 196 found, median 1.026 (quartiles 0.96-1.09), centre within 0.3%
# of the frame (median). A drawn face's widest skin is about 0.9 of its height; a real head's is about 0.8 of
# the hairline-to-chin height (textbook head proportions; no photo was at hand to measure), so a photo is
# framed some 10% tighter than a drawn face of the same height.
FACE_PER_WIDTH = 1.03
DETECT_SIDE = 160  # the finder works on the portrait downscaled to this side (enough for one face)
# A face whose framing square is the centre square to within the finder's error (its size within 10%, its centre
# within 5% of the side; the finder's own spread on drawn faces is about 6% in size and 1.5% in place) is taken
# as already framed like the training faces: the centre crop is kept, so such a portrait (the bundled one)
# gives exactly the frames of a center crop, not a copy shifted and rescaled by the finder's jitter.
ALREADY_FRAMED = (0.10, 0.05)


@dataclass(frozen=True)
class Framing:
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the original's pixels; may pass its edges
    size: tuple[int, int]  # (width, height) of the original image
    mode: str  # the mode actually used ("center" after a face-mode fallback)
    message: str  # plain words for the user


def face_square(box: tuple[float, float, float, float], width: int, height: int, scale: float = FACE_SCALE,
                shrink: bool = True) -> tuple[int, int, int]:
    """The training framing of a face box (x, y, w, h) in a width x height frame -> square (left, top, side).

    The square is `scale` times the face box, the face `FACE_DROP` above its centre, shifted to lie inside
    the frame where it fits. shrink=True (a training clip, which has no pixels beyond its edges) makes a
    square larger than the frame the frame's size; shrink=False (a portrait) keeps the face's scale, and
    the square passes the frame's edges (the caller pads).
    """
    x, y, w, h = (float(v) for v in box)
    side = scale * max(w, h)
    if shrink:
        side = min(side, width, height)
    cx, cy = x + w / 2, y + h / 2 + FACE_DROP * side
    left, top = cx - side / 2, cy - side / 2
    if side <= width:
        left = np.clip(left, 0, width - side)
    if side <= height:
        top = np.clip(top, 0, height - side)
    return int(round(left)), int(round(top)), int(round(side))


# ---------------------------------------------------------------------------------------------
# face finding
# ---------------------------------------------------------------------------------------------
def _ycrcb(rgb: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 255] -> Y, Cr, Cb [3, H, W] (ITU-R BT.601, as OpenCV's COLOR_RGB2YCrCb)."""
    r, g, b = rgb
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, (r - y) * 0.713 + 128, (b - y) * 0.564 + 128])


def _dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(mask[None, None], k, 1, k // 2)[0, 0]


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    return -F.max_pool2d(-mask[None, None], k, 1, k // 2)[0, 0]


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a 0/1 mask [H, W] (0 = background), by max-label propagation."""
    h, w = mask.shape
    labels = (torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w)) * mask
    while True:
        grown = _dilate(labels, 3) * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def skin_mask(rgb: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> float 0/1 mask [H, W] of skin colours not seen on the top/left/right border
    (a wall of skin colour is background), opened and closed to compact blobs."""
    h, w = rgb.shape[1:]
    ycc = _ycrcb(rgb * 255)
    y, cr, cb = ycc
    mask = (y >= 30) & (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)
    b = max(2, min(h, w) // 25)
    ring = torch.cat([ycc[:, :b].reshape(3, -1), ycc[:, :, :b].reshape(3, -1), ycc[:, :, -b:].reshape(3, -1)], 1)
    pick = np.random.default_rng(0).choice(ring.shape[1], min(96, ring.shape[1]), replace=False)
    ring = ring[1:, torch.from_numpy(pick)]  # [2, 96] border chroma
    near_bg = torch.zeros(h, w, dtype=torch.bool)
    for cr_b, cb_b in ring.T:  # 96 cheap passes, no [H, W, 96] tensor
        near_bg |= ((cr - cr_b).abs() + (cb - cb_b).abs()) < 6
    mask = (mask & ~near_bg).float()
    k = max(3, min(h, w) // 40) | 1
    mask = _dilate(_erode(mask, k), k)  # open: drop specks
    return _erode(_dilate(mask, 2 * k + 1), 2 * k + 1)  # close: fill eyes, mouth, glasses


def _spans(comp: np.ndarray) -> np.ndarray:
    """Per row of a blob [bh, bw], first to last pixel (eyes, glasses and a mouth leave holes in a row)."""
    any_ = comp.any(1)
    first = comp.argmax(1)
    last = comp.shape[1] - 1 - comp[:, ::-1].argmax(1)
    return np.where(any_, last - first + 1, 0)


def _head(widths: np.ndarray) -> int:
    """How many rows of a blob (given its row widths) are the head: a blob running down the neck into
    skin-coloured clothes or shoulders is cut where it widens again (widest at the cheeks, narrow at
    the neck, wide again below)."""
    peak, low = 0, None
    for r, wd in enumerate(widths):
        if low is None:
            peak = max(peak, wd)
            low = wd if wd < 0.8 * peak else None
        else:
            low = min(low, wd)
            if wd > 1.5 * low and wd > 0.9 * peak:
                return r
    return len(widths)


def _face_in_mask(labels: np.ndarray) -> tuple[float, float, float] | None:
    """(centre x, centre y, width of the widest rows) of the largest face-like blob, in label pixels."""
    h, w = labels.shape
    best, best_area = None, 0
    for i in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == i)
        if len(ys) < 0.02 * h * w:
            continue
        y0 = ys.min()
        comp = labels[y0:ys.max() + 1] == i
        comp = comp[:_head(_spans(comp))]
        cols = np.flatnonzero(comp.any(0))
        x0 = cols[0]
        comp = comp[:, x0:cols[-1] + 1]
        area = int(comp.sum())
        if area <= best_area:
            continue
        widths = _spans(comp)
        wmax = float(np.percentile(widths, 95))  # robust to a stray row caught by an earring or a hand
        rows = np.flatnonzero(widths >= 0.9 * wmax)
        cy = float(np.median(rows))
        cx = float(np.nonzero(comp[rows])[1].mean())
        # a face: a compact blob about as tall as wide, not a thin band, a ring or a scatter
        if not (0.5 < comp.shape[0] / wmax < 3.0 and comp.mean() > 0.45 and wmax >= 0.08 * min(h, w)):
            continue
        best, best_area = (x0 + cx + 0.5, y0 + cy + 0.5, wmax), area
    return best


def _find_once(image: torch.Tensor) -> tuple[float, float, float] | None:
    """(centre x, centre y, widest width) of the face in [3, H, W], in its pixels, from one detection pass."""
    h, w = image.shape[1:]
    s = min(1.0, DETECT_SIDE / max(h, w))
    small = F.interpolate(image[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                          antialias=True, align_corners=False)[0].clamp(0, 1) if s < 1 else image
    found = _face_in_mask(_components(skin_mask(small)).numpy())
    if found is None:
        return None
    s_y, s_x = small.shape[1] / h, small.shape[2] / w
    return found[0] / s_x, found[1] / s_y, found[2] / s_x


def find_face(image: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The face box (left, top, right, bottom) of a portrait [3, H, W] in [0, 1], or None if no face is
    found. The box is a square about the face's height, centred on the face (as a face detector's)."""
    image = to_rgb(image.float())
    h, w = image.shape[1:]
    found = _find_once(image)
    if found is None:
        return None
    cx, cy, width = found
    # a face small in a large picture (half-body) was measured on few pixels: measure again on a
    # region around it, which also sees only the background near the face
    r = 2.5 * width
    x0, y0, x1, y1 = (int(max(0, cx - r)), int(max(0, cy - r)), int(min(w, cx + r)), int(min(h, cy + r)))
    if max(x1 - x0, y1 - y0) < 0.8 * max(h, w) and min(x1 - x0, y1 - y0) >= MIN_SIDE:
        again = _find_once(image[:, y0:y1, x0:x1])
        if again is not None:
            cx, cy, width = again[0] + x0, again[1] + y0, again[2]
    half = FACE_PER_WIDTH * width / 2
    return int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half))


# ---------------------------------------------------------------------------------------------
# framing and paste-back
# ---------------------------------------------------------------------------------------------
def _already_framed(box, centre) -> bool:
    side, c_side = box[2] - box[0], centre[2] - centre[0]
    offset = max(abs(box[0] + box[2] - centre[0] - centre[2]), abs(box[1] + box[3] - centre[1] - centre[3])) / 2
    return abs(side / c_side - 1) <= ALREADY_FRAMED[0] and offset <= ALREADY_FRAMED[1] * c_side


def fit_box(mode: str, width: int, height: int) -> tuple[int, int, int, int]:
    """Where `media.fit_portrait`'s square lies in the original for center/pad/stretch."""
    if mode == "center":
        s = min(width, height)
        left, top = (width - s) // 2, (height - s) // 2
        return left, top, left + s, top + s
    if mode == "pad":
        s = max(width, height)
        left, top = -((s - width) // 2), -((s - height) // 2)
        return left, top, left + s, top + s
    return 0, 0, width, height


def crop_box(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """[3, H, W] -> the box's pixels [3, bottom - top, right - left]; outside the image the edge pixels
    are repeated (a face framed past the edge of a tight close-up gets its background continued)."""
    h, w = image.shape[1:]
    left, top, right, bottom = box
    pads = (max(0, -left), max(0, right - w), max(0, -top), max(0, bottom - h))
    inner = image[:, max(0, top):min(h, bottom), max(0, left):min(w, right)]
    return F.pad(inner[None], pads, mode="replicate")[0] if any(pads) else inner


def frame_portrait(image: torch.Tensor, size: int, mode: str = "face") -> tuple[torch.Tensor, Framing]:
    """Portrait [C, H, W] in [0, 1] (C = 1..4, composited as `media.fit_portrait` does) -> the model's
    square [3, size, size] in [-1, 1] and where it came from.

    face: find the face and frame it the way the training data frames faces (`face_square`); with no face
    found, the centre crop, and the message says so. center/pad/stretch: `media.fit_portrait`.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    rgb = portrait_rgb(image)
    h, w = rgb.shape[1:]
    if mode != "face":
        box = fit_box(mode, w, h)
        return fit_portrait(rgb, size, mode), Framing(box, (w, h), mode, f"{mode} crop: {_describe(box)}")
    face = find_face(rgb)
    if face is None:
        box = fit_box("center", w, h)
        return fit_portrait(rgb, size, "center"), Framing(
            box, (w, h), "center", f"no face found: centered crop {_describe(box)}")
    fl, ft, fr, fb = face
    left, top, side = face_square((fl, ft, fr - fl, fb - ft), w, h, shrink=False)
    box = (left, top, left + side, top + side)
    centre = fit_box("center", w, h)
    if _already_framed(box, centre):
        return fit_portrait(rgb, size, "center"), Framing(
            centre, (w, h), "face", f"face found at {_describe(face)}; the portrait is already framed like "
                                    f"the training faces: centered crop {_describe(centre)}")
    crop = crop_box(rgb, box)
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    edge = " (past the picture's edge: edge pixels repeated)" if left < 0 or top < 0 or left + side > w \
        or top + side > h else ""
    return out.clamp(0, 1) * 2 - 1, Framing(box, (w, h), "face", f"face found at {_describe(face)}: "
                                                                 f"framed {_describe(box)}{edge}")


def _describe(box) -> str:
    left, top, right, bottom = box
    return f"{right - left}x{bottom - top} at ({left}, {top})"


def _feather_mask(box, width: int, height: int, feather: float) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Blend weights [bh, bw] of the box's part inside the image and that part (left, top, right, bottom).

    1 inside, falling linearly to 0 over `feather` x the box side at the box edges that lie inside the
    image; an edge on or beyond the image's edge is not feathered (nothing of the original is there)."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = max(0, left), max(0, top), min(width, right), min(height, bottom)
    ramp = max(feather * min(right - left, bottom - top), 1e-6)

    def axis(a0, a1, lo, hi, limit):
        c = torch.arange(a0, a1, dtype=torch.float32) + 0.5
        m = torch.ones_like(c)
        if lo > 0:
            m = torch.minimum(m, (c - lo) / ramp)
        if hi < limit:
            m = torch.minimum(m, (hi - c) / ramp)
        return m.clamp(0, 1)

    wx = axis(x0, x1, left, right, width)
    wy = axis(y0, y1, top, bottom, height)
    return wy[:, None] * wx[None, :], (x0, y0, x1, y1)


def paste_back(frames: torch.Tensor, original: torch.Tensor, framing: Framing, feather: float = 0.08) -> torch.Tensor:
    """Generated squares [n, 3, s, s] in [-1, 1] -> the original [C, H, W] in [0, 1] with each square
    resized into `framing.box` and composited with a feathered edge: [n, 3, H, W] in [-1, 1].

    Pixels outside the box are the original's, exactly; inside, `feather` x the box side of ramp at
    each box edge that lies inside the picture hides the seam."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [n, 3, s, s], got {tuple(frames.shape)}")
    if not 0 <= feather <= 0.5:
        raise ValueError(f"feather must be in [0, 0.5] (a fraction of the box side), got {feather}")
    base = to_rgb(original.float()) * 2 - 1
    h, w = base.shape[1:]
    if framing.size != (w, h):
        raise ValueError(f"framing is of a {framing.size[0]}x{framing.size[1]} image, the original is {w}x{h}")
    left, top, right, bottom = framing.box
    mask, (x0, y0, x1, y1) = _feather_mask(framing.box, w, h, feather)
    out = base[None].repeat(frames.shape[0], 1, 1, 1)
    if x1 <= x0 or y1 <= y0:
        return out
    big = F.interpolate(frames.float(), size=(bottom - top, right - left), mode="bilinear", antialias=True,
                        align_corners=False).clamp(-1, 1)
    gen = big[:, :, y0 - top:y1 - top, x0 - left:x1 - left]
    region = out[:, :, y0:y1, x0:x1]
    out[:, :, y0:y1, x0:x1] = region + (gen - region) * mask.to(gen)
    return out


# ---------------------------------------------------------------------------------------------
# out-of-domain report
# ---------------------------------------------------------------------------------------------
# The VAE was trained only on the training faces: how well it reconstructs a portrait says how close the
# portrait is to them. Measured with the demo VAE at 128x128 by scripts/calibrate_framing.py (median, range):
# the bundled portrait 29.5 dB; drawn faces of training identities 28.3 (22.3-29.7), of unseen ones 27.2
# (23.0-28.7), drawn faces in grayscale 26.7, small in a wide frame 25.3; a smooth colour gradient 28.7; the
# textures photos are made of, 1/f noise 17.3 (17.1-17.5) and rougher 1/f^0.5 noise 15.1; uniform noise 10.7.
# 20 dB sits between the worst drawn face (22.3) and the best texture (17.5). It flags what is unlike the
# training faces in texture; a smooth picture (the gradient) passes, so passing does not prove a face.
DOMAIN_PSNR_DB = 20.0


@torch.no_grad()
def reconstruction_psnr(vae, portrait: torch.Tensor) -> float:
    p = next(vae.parameters())
    x = portrait.to(p)[None]
    rec = vae.decode(vae.encode_image(x))[:, :, -1].clamp(-1, 1)  # the still clip's last frame
    mse = ((rec - x) ** 2).mean().item() / 4  # in [0, 1] units
    return 10 * math.log10(1 / max(mse, 1e-10))


def domain_report(vae, portrait: torch.Tensor) -> tuple[float, str | None]:
    """(PSNR in dB of the portrait [3, R, R] in [-1, 1] through the VAE, a plain-words warning or None)."""
    psnr = reconstruction_psnr(vae, portrait)
    if psnr >= DOMAIN_PSNR_DB:
        return psnr, None
    return psnr, (f"this portrait is far from what the model was trained on: its VAE reconstructs it at "
                  f"{psnr:.1f} dB (its training faces: above {DOMAIN_PSNR_DB:.0f} dB); expect a poor result")
