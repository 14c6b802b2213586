"""Reading portraits and audio, writing mp4 with sound (PIL + PyAV, as ComfyUI does).

Outputs are written atomically: `atomic_video` encodes into a hidden temporary file beside the target and
renames it over the target only when the video is complete, so an interrupted or failed run (Ctrl-C,
SIGTERM, an exception, a full disk) leaves the earlier file untouched and removes its temporary file.
SIGKILL cannot be caught: then the temporary file `.<name>.<random>.part` stays behind, never a broken
file under the real name.
"""
from __future__ import annotations

import os
import secrets
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, OutputPathError, WriteError

CROP_MODES = ("center", "pad", "stretch")
MIN_SIDE = 8
# output extension -> PyAV container format; each takes H.264 video + AAC audio
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# default FFmpeg layout per channel count, for a multichannel waveform that comes without its layout
DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Any PIL-readable image -> [3, H, W] float in [0, 1], upright as its EXIF orientation says (a phone
    photo stores the sensor's pixels plus a rotation). Alpha is composited on white, gray expanded.
    An image of more than PIL's MAX_IMAGE_PIXELS (a decompression bomb, or a photo no portrait needs) is
    refused before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return pil_to_tensor(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise FileNotFoundError(f"portrait not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path} is too large an image to load safely ({e}); a portrait needs no more "
                         f"than a few megapixels: scale it down") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"{path} is not a readable image: {e}") from None


# full scale of the modes PIL gives high-bit-depth grayscale: a 16-bit PNG/TIFF opens as I;16* or I
HIGH_DEPTH_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0,
                         "F": 1.0}


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if im.mode in HIGH_DEPTH_FULL_SCALE:  # map by the bit depth (a dark photo stays dark), not by its own max
        arr = np.asarray(im, dtype=np.float32) / HIGH_DEPTH_FULL_SCALE[im.mode]
        gray = torch.from_numpy(np.clip(arr, 0.0, 1.0).copy())
        return gray[None].expand(3, -1, -1).contiguous()
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


def portrait_rgb(image: torch.Tensor) -> torch.Tensor:
    """Portrait [C, H, W] in [0, 1] (C = 1..4) -> float RGB [3, H, W], refusing one too small to frame."""
    rgb = to_rgb(image.float())
    h, w = rgb.shape[1:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"portrait of {w}x{h} is too small (each side must be at least {MIN_SIDE} px)")
    return rgb


def fit_portrait(image: torch.Tensor, size: int, mode: str = "center") -> torch.Tensor:
    """Portrait [C, H, W] in [0, 1], any size -> [3, size, size] in [-1, 1] for the model.

    center: crop the central square then resize; pad: letterbox on white; stretch: resize as is.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    image = portrait_rgb(image)
    h, w = image.shape[1:]
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
    """First audio stream of a media file -> ([channels, samples] float, sample_rate).

    Mono and stereo come as they are; more channels (5.1, 7.1) are mixed to stereo by FFmpeg's standard
    downmix matrix, so speech in the centre channel is kept. Samples are never clipped (float may exceed
    +-1). A codec's padding (AAC's last frame is filled up to 1024 samples) is cut to the duration the
    container states, so the video gets exactly ceil(duration * fps) frames.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio not found: {path}")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            layout = "stereo" if stream.codec_context.channels > 2 else None
            resampler = av.AudioResampler(format="fltp", layout=layout)  # planar float, native rate
            chunks, rate = [], None
            for frame in container.decode(stream):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())
                    rate = f.sample_rate
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
            stated = _stated_samples(stream, rate)
    except av.error.FFmpegError as e:
        raise InputError(f"{path} is not readable audio: {e}") from None
    if not chunks:
        raise InputError(f"{path} contains no audio samples")
    wave = np.concatenate(chunks, axis=1)
    if stated is not None and 0 < wave.shape[1] - stated <= 2 * max(stream.codec_context.frame_size or 0, 1024):
        wave = wave[:, :stated]  # the codec's end padding; a larger excess means a wrong header: keep it all
    return torch.from_numpy(wave), int(rate)


def _stated_samples(stream, rate: int | None) -> int | None:
    """Samples the container says the stream lasts (after the encoder's priming, which FFmpeg skips)."""
    if not rate or not stream.duration or stream.time_base is None:
        return None
    return int(round(float(stream.duration * stream.time_base) * rate))


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] -> [n, H, W, 3] uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def audio_track(audio: torch.Tensor, sample_rate: int) -> tuple[np.ndarray, str]:
    """A waveform [samples] or [channels, samples] -> (planar float32 [C, S], layout) for the AAC track.

    More than two channels go through FFmpeg's standard downmix to stereo (the centre channel, where
    films put speech, is kept). Peaks beyond +-1 are scaled down with one gain for the whole track: a
    player would clip them, and a single gain keeps the waveform's shape where a clamp distorts it.
    """
    wave = audio if audio.ndim == 2 else audio.reshape(1, -1)
    wave = np.ascontiguousarray(wave.detach().float().cpu().numpy())
    if not np.isfinite(wave.sum(dtype=np.float64)):  # NaN/inf propagate; no temporary the size of the track
        raise InputError("audio contains NaN or infinite samples")
    if wave.shape[0] > 2:
        name = DEFAULT_LAYOUTS.get(wave.shape[0])
        if name is None:  # no standard layout: every channel counts the same
            wave = wave.mean(0, keepdims=True)
        else:
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout=name)
            frame.sample_rate = sample_rate
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate)
            wave = np.concatenate([f.to_ndarray() for f in resampler.resample(frame) + resampler.resample(None)], 1)
    peak = max(float(wave.max()), -float(wave.min())) if wave.size else 0.0
    if peak > 1.0:
        wave = wave / peak
    return np.ascontiguousarray(wave, dtype=np.float32), "stereo" if wave.shape[0] == 2 else "mono"


class VideoWriter:
    """mp4 (H.264 + AAC) written into `path` as frames arrive. Both streams must exist before the first
    packet, so the speech track is given up front and encoded on close. It writes in place: for a user's
    output use `atomic_video`, which runs it on a temporary file and renames it when complete."""

    def __init__(self, path: str | os.PathLike, fps: int, width: int, height: int,
                 audio: torch.Tensor | None = None, sample_rate: int | None = None, crf: int = 18,
                 format: str | None = None, audio_rate: int | None = None):
        self.path = os.fspath(path)
        self.container = av.open(self.path, mode="w", format=format)
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.options = {"crf": str(crf)}
        self.frames = 0
        self.audio_stream, self.wave, self.audio_samples = None, None, 0
        if audio is not None:
            self.wave, self.layout = audio_track(audio, sample_rate)
            self.audio_stream = self.container.add_stream("aac", rate=sample_rate, layout=self.layout)
            self.rate = sample_rate
        elif audio_rate:  # a mono track that arrives while the video is made (a live stream): write_audio
            self.layout, self.rate = "mono", audio_rate
            self.audio_stream = self.container.add_stream("aac", rate=audio_rate, layout="mono")

    def write(self, frames_uint8: np.ndarray):
        for arr in frames_uint8:
            for packet in self.video.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                self.container.mux(packet)
            self.frames += 1

    def write_audio(self, samples: np.ndarray):
        """The next float32 samples [channels, S] of the sound track, encoded now. pts counts from 0: the AAC
        encoder's priming then goes out at negative time and the muxer writes an edit list, so a reader (ours
        included) skips it instead of hearing the speech 1024 samples late."""
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=self.layout)
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.audio_samples, Fraction(1, self.rate)
        self.audio_samples += samples.shape[1]
        for packet in self.audio_stream.encode(frame):
            self.container.mux(packet)

    def close(self):
        for packet in self.video.encode():
            self.container.mux(packet)
        if self.audio_stream is not None:
            if self.wave is not None:  # a second at a time, so the track is not copied once more into one frame
                for start in range(0, self.wave.shape[1], self.rate):
                    self.write_audio(self.wave[:, start:start + self.rate])
            for packet in self.audio_stream.encode(None):
                self.container.mux(packet)
        self.container.close()

    def abort(self):
        """Stop without finishing the file (its contents are to be thrown away)."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - a full disk fails here too; the file is removed anyway
            pass


def check_output(path: str | os.PathLike, writable: bool = False) -> str:
    """Everything about an output path that can be known before any work: a supported extension, not a
    folder, a parent that is (or can be made) a folder, the encoders present; with `writable`, the folder
    is created and a file created in it and removed. Returns the PyAV container format."""
    p = Path(path)
    fmt = OUTPUT_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise OutputPathError(f"cannot write {path}: {p.suffix or 'no extension'} is not a supported video "
                              f"format; use one of {', '.join(OUTPUT_FORMATS)} (H.264 + AAC)")
    if p.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a folder")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    for codec in ("libx264", "aac"):
        try:
            av.Codec(codec, "w")
        except Exception:  # noqa: BLE001 - PyAV's error for an unknown codec differs between versions
            raise WriteError(f"cannot write {path}: this PyAV/FFmpeg has no {codec} encoder") from None
    if writable:
        with AtomicVideo(path, 1):
            pass  # creates the folder and a temporary file there, then removes the file
    return fmt


class AtomicVideo:
    """Context manager of a streamed video output that appears under its name only when complete:

        with media.atomic_video(path, fps, audio, sample_rate) as writer:
            for chunk in stream(...):
                writer.write(chunk.frames)

    Entering checks the path and creates the hidden temporary file beside it (same folder, so the final
    rename is atomic), so a bad or unwritable output fails before any frame is computed. A clean exit
    finishes the file and renames it over `path`; any exception (Ctrl-C, SIGTERM via
    `errors.raise_on_sigterm`, a full disk) removes the temporary file and leaves an earlier file under
    `path` untouched. OS errors come out as `WriteError` naming the file.
    """

    def __init__(self, path, fps: int, audio: torch.Tensor | None = None, sample_rate: int | None = None,
                 width: int | None = None, height: int | None = None, crf: int = 18, audio_rate: int | None = None):
        self.path, self.fps, self.audio, self.sample_rate, self.crf = os.fspath(path), fps, audio, sample_rate, crf
        self.audio_rate = audio_rate
        self.size = (width, height) if width and height else None
        self.tmp, self.writer, self.frames = None, None, 0
        if audio is not None and not sample_rate:
            raise InputError("audio given without its sample rate")

    def __enter__(self) -> "AtomicVideo":
        return self.open()

    def open(self) -> "AtomicVideo":
        """Check the path and create the temporary file (what entering the context does)."""
        self.format = check_output(self.path)
        parent = os.path.dirname(os.path.abspath(self.path))
        name = os.path.basename(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = os.path.join(parent, f".{name}.{secrets.token_hex(4)}.part")
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            self.tmp = None
            raise self._write_error(e, f"cannot create a file in {parent}: ") from None
        if self.size is not None:
            self._open(*self.size)
        return self

    def _write_error(self, e: OSError, where: str = "") -> WriteError:
        had = "the earlier file is unchanged" if os.path.exists(self.path) else "nothing was written"
        return WriteError(f"cannot write {self.path}: {where}{e.strerror or e} ({had})", e.errno)

    def _open(self, width: int, height: int):
        try:
            self.writer = VideoWriter(self.tmp, self.fps, width, height, self.audio, self.sample_rate, self.crf,
                                      format=self.format, audio_rate=self.audio_rate)
        except OSError as e:
            raise self._write_error(e) from None

    def write(self, frames) -> None:
        """Frames [n, 3, H, W] float in [-1, 1] (the streamer's chunks), or uint8 [n, H, W, 3]."""
        arr = frames if isinstance(frames, np.ndarray) else to_uint8(frames)
        if self.writer is None:
            self._open(arr.shape[2], arr.shape[1])
        try:
            self.writer.write(arr)
        except OSError as e:
            raise self._write_error(e) from None
        self.frames = self.writer.frames

    def write_audio(self, samples: np.ndarray) -> None:
        """Float32 samples [1, S] of a sound track that arrives while the video is made (`audio_rate`; the
        encoder is open once width and height were given)."""
        try:
            self.writer.write_audio(samples)
        except OSError as e:
            raise self._write_error(e) from None

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.commit()
        self.discard()

    def commit(self) -> str:
        """Finish the file and rename it over `path` (what a clean exit of the context does); returns `path`."""
        try:
            if self.writer is not None:
                self.writer.close()
                _fsync(self.tmp)
                os.replace(self.tmp, self.path)
                self.tmp = None
        except OSError as e:
            self.discard()
            raise self._write_error(e) from None
        self.discard()
        return self.path

    def discard(self):
        """Throw the unfinished file away (what leaving the context by an exception does)."""
        if self.writer is not None and self.tmp is not None:
            self.writer.abort()
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def atomic_video(path, fps: int, audio: torch.Tensor | None = None, sample_rate: int | None = None,
                 width: int | None = None, height: int | None = None, crf: int = 18,
                 audio_rate: int | None = None) -> AtomicVideo:
    """The atomic streamed video output (see AtomicVideo); width/height given -> the encoder opens on entry.
    `audio` is the whole sound track, given up front; `audio_rate` instead opens a mono track that arrives
    while the video is made (`write_audio`)."""
    return AtomicVideo(path, fps, audio, sample_rate, width, height, crf, audio_rate)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data is on disk before the name points at it
    finally:
        os.close(fd)


def write_video(path, frames: Iterable[torch.Tensor], fps: int, audio=None, sample_rate=None) -> int:
    """Write frame batches [n, 3, H, W] in [-1, 1] (e.g. the streamer's chunks) to a video file, atomically
    (see AtomicVideo); returns frames. Nothing is written when there are no frames."""
    with atomic_video(path, fps, audio, sample_rate) as writer:
        for batch in frames:
            writer.write(batch)
    return writer.frames


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
