"""Reading portraits and audio, writing mp4 with sound (PIL + PyAV, as ComfyUI does)."""
from __future__ import annotations

import os
from typing import Iterable

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

CROP_MODES = ("center", "pad", "stretch")
MIN_SIDE = 8


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Any PIL-readable image -> [3, H, W] float in [0, 1]. Alpha is composited on white, gray expanded."""
    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_tensor(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"portrait not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit / float grayscale: scale to 8 bits first
        arr = np.asarray(im, dtype=np.float32)
        im = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255, 0, 255).astype(np.uint8))
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] with C in {1, 2, 3, 4} (gray, gray+alpha, RGB, RGBA) in [0, 1] -> [3, H, W]."""
    if image.ndim != 3 or image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"portrait must be [C, H, W] with 1-4 channels, got {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("portrait contains NaN or infinite values")
    c = image.shape[0]
    if c in (2, 4):  # composite the alpha channel over white
        rgb, alpha = image[:-1], image[-1:].clamp(0, 1)
        image = rgb * alpha + (1 - alpha)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def fit_portrait(image: torch.Tensor, size: int, mode: str = "center") -> torch.Tensor:
    """Portrait [C, H, W] in [0, 1], any size -> [3, size, size] in [-1, 1] for the model.

    center: crop the central square then resize; pad: letterbox on white; stretch: resize as is.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    image = to_rgb(image.float())
    h, w = image.shape[1:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"portrait of {w}x{h} is too small (each side must be at least {MIN_SIDE} px)")
    if mode == "center":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image = image[:, top:top + s, left:left + s]
    elif mode == "pad":
        s = max(h, w)
        canvas = torch.ones(3, s, s)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[:, top:top + h, left:left + w] = image
        image = canvas
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp(0, 1) * 2 - 1


def load_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """First audio stream of a media file -> ([channels, samples] float, sample_rate)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio not found: {path}")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # planar float, native rate and layout
            chunks, rate = [], None
            for frame in container.decode(stream):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())
                    rate = f.sample_rate
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
    except av.error.FFmpegError as e:
        raise ValueError(f"{path} is not readable audio: {e}") from None
    if not chunks:
        raise ValueError(f"{path} contains no audio samples")
    return torch.from_numpy(np.concatenate(chunks, axis=1)), int(rate)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] -> [n, H, W, 3] uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class VideoWriter:
    """mp4 (H.264 + AAC) written as frames arrive. Both streams must exist before the first packet,
    so the speech track is given up front and encoded on close, a second at a time (an hour of speech is
    never copied whole)."""

    def __init__(self, path: str | os.PathLike, fps: int, width: int, height: int,
                 audio: torch.Tensor | None = None, sample_rate: int | None = None, crf: int = 18):
        self.path = os.fspath(path)
        self.container = av.open(self.path, mode="w")
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.options = {"crf": str(crf)}
        self.frames = 0
        self.audio_stream = None
        if audio is not None:
            wave = audio if audio.ndim == 2 else audio[None]
            self.wave = wave[:2]  # a view: converted piece by piece in close()
            self.layout = "stereo" if self.wave.shape[0] == 2 else "mono"
            self.audio_stream = self.container.add_stream("aac", rate=sample_rate, layout=self.layout)
            self.rate = sample_rate

    def write(self, frames_uint8: np.ndarray):
        for arr in frames_uint8:
            for packet in self.video.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                self.container.mux(packet)
            self.frames += 1

    def close(self):
        for packet in self.video.encode():
            self.container.mux(packet)
        if self.audio_stream is not None:
            for start in range(0, self.wave.shape[1], self.rate):
                piece = np.ascontiguousarray(self.wave[:, start:start + self.rate].float().clamp(-1, 1).cpu().numpy())
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=self.layout)
                frame.sample_rate, frame.pts = self.rate, start
                for packet in self.audio_stream.encode(frame):
                    self.container.mux(packet)
            for packet in self.audio_stream.encode(None):
                self.container.mux(packet)
        self.container.close()


def write_video(path, frames: Iterable[torch.Tensor], fps: int, audio=None, sample_rate=None) -> int:
    """Write frame batches [n, 3, H, W] in [-1, 1] (e.g. the streamer's chunks) to mp4; returns frames."""
    writer = None
    try:
        for batch in frames:
            if writer is None:
                writer = VideoWriter(path, fps, batch.shape[-1], batch.shape[-2], audio, sample_rate)
            writer.write(to_uint8(batch))
    finally:
        if writer is not None:
            writer.close()
    return 0 if writer is None else writer.frames


def probe(path) -> dict:
    """Frame count, fps and durations of a written file (for tests and the CLI's summary)."""
    with av.open(os.fspath(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
    with av.open(os.fspath(path)) as c:
        out = {"frames": frames, "fps": float(c.streams.video[0].average_rate),
               "width": c.streams.video[0].width, "height": c.streams.video[0].height,
               "has_audio": bool(c.streams.audio)}
        if c.streams.audio:
            a = c.streams.audio[0]
            out["audio_duration"] = float(a.duration * a.time_base) if a.duration else None
    return out
