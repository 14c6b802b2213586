"""Training data: `python -m rest_model prepare` and the `ClipDataset` every training stage reads.

prepare: a folder of talking-head clips (mp4/mov/webm/mkv with an audio track) -> a dataset folder:

    DATASET/index.json      {"preset", "fps", "resolution", "sample_rate", "clips": [{"file", "identity",
                             "voice", "frames", "split"}]}
    DATASET/<clip>.safetensors   "video" uint8 [T, H, W, 3] at the preset fps and resolution,
                             "audio" float32 [T * samples_per_frame] mono at the encoder rate, sample 0
                             at the start of frame 0; and, when the clip has ground truth (a same-stem
                             .json as `synth` writes), "mouth_open" [T], "mouth_width" [T],
                             "head_pose" [T, 3] (yaw, pitch, roll in degrees). Metadata: identity, voice,
                             source, fps, sample_rate.
    DATASET/skipped.log     one line per clip left out and why (no audio, too short, unreadable, no face)
    DATASET/prepare.log     what was done to every clip (crop box, detector, segments)

Frames are resampled to the preset fps by sample-and-hold at each output frame's centre time; audio is
placed on the video's clock using both streams' timestamps (so an encoder delay or a late audio
start does not shift lip-sync), mixed to mono and resampled to the encoder rate.

Cropping (--crop): `face` finds the face on frames spread over the clip and takes one square crop
for the whole clip (a per-frame crop would shake: head motion must stay in the data). The detector
is OpenCV's Haar cascade where the installed OpenCV ships it (cv2.data.haarcascades, or Debian's
opencv-data), YuNet with --face-model, otherwise a skin-colour blob detector. `center` takes the
central square. `auto` (default) is `face`, except for clips with `synth` ground truth, which are
centre-cropped: the generator already centres the face at the framing the models and metrics
expect, and its head-pose ground truth refers to that framing. So synth clips are never dropped as
'no face'.

Identities and voices: taken from the ground-truth json when there is one; otherwise a clip inside a
sub-folder belongs to the identity named by its first sub-folder (DIR/<person>/clip.mp4) and a clip at
the top level is its own identity; a person's voice is their identity. The split holds out whole
connected groups of identities and voices (so test identities AND test voices are unseen in training),
chosen deterministically by a hash of their names, about --test-fraction of the clips.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, get_worker_info

from ..errors import InputError
from ..framing import FACE_SCALE, face_square, find_face
from .jobs import parallel_map

log = logging.getLogger("rest_model.data")

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".m4v", ".avi")
CASCADE = "haarcascade_frontalface_default.xml"
CASCADE_DIRS = ("/usr/share/opencv4/haarcascades", "/usr/share/opencv/haarcascades")
DETECT_SIDE = 320  # detection runs on frames downscaled to this side (faster, and enough for a talking head)


# ---------------------------------------------------------------------------------------------
# face detection
# ---------------------------------------------------------------------------------------------
class FaceDetector:
    """Boxes (x, y, w, h) of faces in an RGB uint8 frame, largest first."""
    name = "none"

    def __call__(self, rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
        raise NotImplementedError


class HaarDetector(FaceDetector):
    name = "haar"

    def __init__(self, path: str):
        self.det = cv2.CascadeClassifier(path)
        if self.det.empty():
            raise ValueError(f"{path} is not a readable Haar cascade")

    def __call__(self, rgb):
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        m = min(gray.shape) // 8
        boxes = self.det.detectMultiScale(gray, 1.1, 5, minSize=(m, m))
        return sorted((tuple(map(float, b)) for b in boxes), key=lambda b: -b[2] * b[3])


class YuNetDetector(FaceDetector):
    name = "yunet"

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"face model not found: {path}")
        self.det = cv2.FaceDetectorYN.create(path, "", (320, 320), 0.7)

    def __call__(self, rgb):
        h, w = rgb.shape[:2]
        self.det.setInputSize((w, h))
        _, faces = self.det.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if faces is None:
            return []
        return sorted((tuple(map(float, f[:4])) for f in faces), key=lambda b: -b[2] * b[3])


class SkinDetector(FaceDetector):
    """Fallback when no trained detector is installed: the core's skin-colour face finder
    (`rest_model.framing.find_face`, the one a portrait's `face` crop uses), so a clip and a portrait are
    framed alike."""
    name = "skin"

    def __call__(self, rgb):
        box = find_face(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255)
        if box is None:
            return []
        left, top, right, bottom = box
        return [(float(left), float(top), float(right - left), float(bottom - top))]


def find_cascade() -> str | None:
    dirs = [getattr(getattr(cv2, "data", None), "haarcascades", None), *CASCADE_DIRS]
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, CASCADE)):
            return os.path.join(d, CASCADE)
    return None


def make_detector(face_model: str | None = None) -> FaceDetector:
    """YuNet if a model is given, else Haar if this OpenCV has it, else the skin-colour fallback."""
    if face_model:
        return YuNetDetector(face_model)
    path = find_cascade()
    if path and hasattr(cv2, "CascadeClassifier"):
        return HaarDetector(path)
    return SkinDetector()


def crop_from_faces(boxes, width: int, height: int, scale: float) -> tuple[int, int, int]:
    """One square (left, top, side) for the clip around the median face box: the training framing
    (`framing.face_square`, the face a little above the centre, as `synth` draws it), kept inside the frame."""
    return face_square(np.median(np.asarray(boxes, dtype=np.float64), axis=0), width, height, scale, shrink=True)


def center_crop(width: int, height: int) -> tuple[int, int, int]:
    s = min(width, height)
    return (width - s) // 2, (height - s) // 2, s


# ---------------------------------------------------------------------------------------------
# reading one clip
# ---------------------------------------------------------------------------------------------
class Skip(Exception):
    """A clip that cannot be used; the message is the reason written to skipped.log."""


@dataclass
class Options:
    fps: int
    resolution: int
    sample_rate: int
    crop: str = "auto"
    face_model: str | None = None
    face_scale: float = FACE_SCALE
    min_seconds: float = 1.0
    max_seconds: float = 60.0


@dataclass
class Prepared:
    source: str
    records: list = field(default_factory=list)  # index entries (without split)
    notes: list = field(default_factory=list)


def _open(path):
    import av
    try:
        return av.open(path)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise Skip(f"unreadable: {type(e).__name__}: {e}") from None


def _read_audio(path, target_rate: int, video_t0: float) -> np.ndarray:
    """Mono audio at target_rate on the video's clock: sample 0 = the first video frame's time."""
    import av
    with _open(path) as c:
        if not c.streams.audio:
            raise Skip("no audio track")
        stream = c.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=target_rate)
        chunks, t0 = [], None
        try:
            for frame in c.decode(stream):
                if t0 is None and frame.time is not None:
                    t0 = float(frame.time)
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray()[0])
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray()[0])
        except (av.error.FFmpegError, ValueError) as e:
            raise Skip(f"unreadable audio: {e}") from None
    if not chunks:
        raise Skip("audio track has no samples")
    wave = np.concatenate(chunks).astype(np.float32)
    shift = int(round(((t0 or 0.0) - video_t0) * target_rate))
    if shift > 0:  # audio starts after the first frame: silence until it does
        wave = np.concatenate([np.zeros(shift, np.float32), wave])
    elif shift < 0:
        wave = wave[-shift:]
    if not np.isfinite(wave).all():
        raise Skip("audio contains NaN/inf samples")
    if np.abs(wave).max() < 1e-4:
        raise Skip("audio track is silent")
    return wave


def _video_frames(container, stream):
    import av
    try:
        for frame in container.decode(stream):
            yield frame
    except (av.error.FFmpegError, ValueError) as e:
        raise Skip(f"unreadable video: {e}") from None


def _probe_video(path, detector: FaceDetector | None, detect_every_s: float = 1.0, max_detect: int = 24):
    """First pass: first frame time, size, frame times, and face boxes on frames spread over the clip."""
    with _open(path) as c:
        if not c.streams.video:
            raise Skip("no video stream")
        stream = c.streams.video[0]
        times, boxes, last_det, size, detected = [], [], -1e9, None, 0
        for frame in _video_frames(c, stream):
            t = float(frame.time) if frame.time is not None else len(times) / float(stream.average_rate or 25)
            times.append(t)
            size = (frame.width, frame.height)
            if detector is not None and t - last_det >= detect_every_s and detected < max_detect:
                last_det, detected = t, detected + 1
                rgb = frame.to_ndarray(format="rgb24")
                s = DETECT_SIDE / max(rgb.shape[:2])
                small = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else rgb
                found = detector(small)
                if found:
                    boxes.append(tuple(v / min(s, 1.0) for v in found[0]))
    if not times:
        raise Skip("no decodable video frames")
    return times, size, boxes, detected


def _ground_truth(path: Path) -> dict | None:
    js = path.with_suffix(".json")
    if not js.is_file():
        return None
    try:
        with open(js) as f:
            gt = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: ground truth unreadable (%s), ignored", js, e)
        return None
    return gt if isinstance(gt, dict) else None


def _identity_of(path: Path, root: Path, gt: dict | None) -> tuple[str, str]:
    if gt and gt.get("identity"):
        ident = str(gt["identity"])
        return ident, str(gt.get("voice") or ident)
    rel = path.relative_to(root)
    ident = rel.parts[0] if len(rel.parts) > 1 else path.stem
    return ident, ident


def clip_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return "__".join(rel.parts).replace(" ", "_")


def prepare_clip(path: Path, root: Path, out: Path, opt: Options) -> Prepared:
    """Read, crop, resample and write one clip (split into segments of at most max_seconds)."""
    res = Prepared(str(path))
    gt = _ground_truth(path)
    synth = bool(gt and str(gt.get("generator", "")).startswith("rest_model.synth"))
    mode = opt.crop if opt.crop != "auto" else ("center" if synth else "face")
    detector = make_detector(opt.face_model) if mode == "face" else None
    times, (width, height), boxes, tried = _probe_video(os.fspath(path), detector)
    t_first = times[0]
    spf = opt.sample_rate // opt.fps
    wave = _read_audio(os.fspath(path), opt.sample_rate, t_first)
    rel_times = np.asarray(times) - t_first
    video_end = rel_times[-1] + (np.median(np.diff(rel_times)) if len(rel_times) > 1 else 1.0 / opt.fps)
    n_out = min(int(np.floor(video_end * opt.fps + 1e-6)), wave.size // spf)
    if n_out < opt.min_seconds * opt.fps:
        raise Skip(f"too short: {n_out / opt.fps:.2f} s of video with audio (< {opt.min_seconds:g} s)")
    if mode == "face":
        if not boxes:
            raise Skip(f"no face detected ({detector.name} detector, {tried} frames tried)")
        left, top, side = crop_from_faces(boxes, width, height, opt.face_scale)
        res.notes.append(f"{detector.name} face crop {side}px at ({left},{top}) from {len(boxes)}/{tried} detections")
    else:
        left, top, side = center_crop(width, height)
        res.notes.append(f"centre crop {side}px" + (" (synth clip: generator framing kept)" if synth else ""))

    # second pass: sample-and-hold each output frame's centre time, crop, resize
    want = (np.arange(n_out) + 0.5) / opt.fps
    src_index = np.clip(np.searchsorted(rel_times, want + 1e-6, side="right") - 1, 0, len(times) - 1)
    video = np.empty((n_out, opt.resolution, opt.resolution, 3), np.uint8)
    r = opt.resolution
    with _open(os.fspath(path)) as c:
        j, cur = 0, None
        for k, frame in enumerate(_video_frames(c, c.streams.video[0])):
            if j >= n_out:
                break
            if src_index[j] != k:
                continue
            rgb = frame.to_ndarray(format="rgb24")[top:top + side, left:left + side]
            interp = cv2.INTER_AREA if side > r else cv2.INTER_CUBIC
            cur = cv2.resize(rgb, (r, r), interpolation=interp) if side != r else rgb
            while j < n_out and src_index[j] == k:
                video[j] = cur
                j += 1
    if j < n_out:  # the second decode ended early (a file truncated mid-stream)
        if j < opt.min_seconds * opt.fps:
            raise Skip(f"unreadable: video decodes to only {j} frames on the second pass")
        n_out = j
        video = video[:j]
    audio = wave[: n_out * spf]

    extra = {}
    if gt:
        src_fps = float(gt.get("fps", opt.fps))
        idx = np.minimum(np.round(np.arange(n_out) * src_fps / opt.fps).astype(int), 10 ** 9)
        for key, shape in (("mouth_open", ()), ("mouth_width", ()), ("head_pose", (3,)), ("blink", ())):
            arr = np.asarray(gt.get(key, []), dtype=np.float32)
            if arr.ndim == 1 + len(shape) and arr.shape[1:] == shape and len(arr) > 0:
                extra[key] = arr[np.minimum(idx, len(arr) - 1)]
    identity, voice = _identity_of(path, root, gt)

    seg_frames = max(1, int(opt.max_seconds * opt.fps))
    segments = [(s, min(n_out, s + seg_frames)) for s in range(0, n_out, seg_frames)]
    if len(segments) > 1 and segments[-1][1] - segments[-1][0] < opt.min_seconds * opt.fps:
        segments.pop()  # a too-short tail of a long clip
    base = clip_name(path, root)
    for s, e in segments:
        name = base if len(segments) == 1 else f"{base}_s{s // seg_frames:03d}"
        tensors = {"video": torch.from_numpy(np.ascontiguousarray(video[s:e])),
                   "audio": torch.from_numpy(np.ascontiguousarray(audio[s * spf:e * spf]))}
        for key, arr in extra.items():
            tensors[key] = torch.from_numpy(np.ascontiguousarray(arr[s:e]))
        meta = dict(identity=identity, voice=voice, source=str(path), fps=str(opt.fps),
                    sample_rate=str(opt.sample_rate), start_frame=str(s))
        tmp = out / f"{name}.safetensors.tmp"
        save_file(tensors, os.fspath(tmp), metadata=meta)
        os.replace(tmp, out / f"{name}.safetensors")
        res.records.append(dict(file=f"{name}.safetensors", identity=identity, voice=voice, frames=e - s,
                                source="synth" if synth else "video"))
    if len(segments) > 1:
        res.notes.append(f"split into {len(segments)} segments of up to {opt.max_seconds:g} s")
    return res


def _prepare_one(args):
    path, root, out, opt = args
    try:
        return prepare_clip(path, root, out, opt), None
    except Skip as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop a long run; the log says why
        return None, f"unreadable: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# split and the whole run
# ---------------------------------------------------------------------------------------------
def _h(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def assign_split(clips: list[dict], test_fraction: float = 0.15) -> list[str]:
    """'test' for whole groups of identities and voices that share no identity or voice with the
    rest (connected components of the identity-voice graph), chosen by name hash until about
    test_fraction of the clips; deterministic and stable when clips are added."""
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in clips:
        a, b = find("i:" + c["identity"]), find("v:" + c["voice"])
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault(find("i:" + c["identity"]), []).append(i)
    split = ["train"] * len(clips)
    if len(groups) < 2:
        log.warning("all clips share identities/voices: no held-out test split is possible")
        return split
    target = test_fraction * len(clips)
    taken = 0
    for key in sorted(groups, key=_h):
        members = groups[key]
        if taken and taken + len(members) > target * 1.34:
            continue
        if len(members) > 0.5 * len(clips):  # never hold out most of the data
            continue
        for i in members:
            split[i] = "test"
        taken += len(members)
        if taken >= target:
            break
    return split


def find_videos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)


def prepare(videos: str, out: str, preset_name: str, *, crop: str = "auto", face_model: str | None = None,
            face_scale: float = FACE_SCALE, min_seconds: float = 1.0, max_seconds: float = 60.0,
            test_fraction: float = 0.15, jobs: int | None = None, progress: bool = False) -> dict:
    """Prepare every clip under `videos` into the dataset folder `out`; returns the index."""
    from ..config import preset
    p = preset(preset_name)
    root, dst = Path(videos), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"--videos {videos} is not a folder")
    if crop not in ("auto", "face", "center"):
        raise ValueError(f"--crop must be auto, face or center, got {crop!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if min_seconds <= 0 or max_seconds < min_seconds:
        raise ValueError(f"need 0 < --min-seconds <= --max-seconds, got {min_seconds}, {max_seconds}")
    files = find_videos(root)
    if not files:
        raise ValueError(f"no video files ({', '.join(VIDEO_EXTS)}) under {videos}")
    if face_model:
        YuNetDetector(face_model)  # fail now, not once per clip
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / "index.json").is_file():  # a re-run must not leave clips of the earlier run behind
        try:
            for c in load_index(dst)["clips"]:
                (dst / c["file"]).unlink(missing_ok=True)
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.warning("%s: earlier index unreadable (%s); its clip files are left in place", dst, e)
    d = p.dit
    opt = Options(fps=d.fps, resolution=d.resolution, sample_rate=d.fps * d.audio.samples_per_frame, crop=crop,
                  face_model=face_model, face_scale=face_scale, min_seconds=min_seconds, max_seconds=max_seconds)
    results = parallel_map(_prepare_one, [(f, root, dst, opt) for f in files], jobs, progress)
    clips, skipped, lines = [], [], []
    for f, (res, reason) in zip(files, results):
        if res is None:
            skipped.append((str(f), reason))
            lines.append(f"SKIP {f}: {reason}")
        else:
            clips.extend(res.records)
            lines.append(f"OK   {f}: " + "; ".join(res.notes))
    for c, s in zip(clips, assign_split(clips, test_fraction)):
        c["split"] = s
    index = dict(preset=p.name, fps=opt.fps, resolution=opt.resolution, sample_rate=opt.sample_rate, clips=clips)
    with open(dst / "skipped.log", "w") as f:
        f.writelines(f"{path}\t{reason}\n" for path, reason in skipped)
    with open(dst / "prepare.log", "w") as f:
        f.writelines(line + "\n" for line in lines)
    tmp = dst / "index.json.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, dst / "index.json")
    return index


def cmd_prepare(args) -> int:
    t0 = time.perf_counter()
    index = prepare(args.videos, args.out, args.preset, crop=args.crop, face_model=args.face_model,
                    face_scale=args.face_scale, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                    test_fraction=args.test_fraction, jobs=args.jobs, progress=True)
    clips = index["clips"]
    with open(Path(args.out) / "skipped.log") as f:
        skipped = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    test = [c for c in clips if c["split"] == "test"]
    frames = sum(c["frames"] for c in clips)
    print(f"prepared {len(clips)} clips ({frames / index['fps'] / 60:.1f} min, {len({c['identity'] for c in clips})} "
          f"identities; test: {len(test)} clips, {len({c['identity'] for c in test})} identities) at "
          f"{index['resolution']}px {index['fps']} fps, audio {index['sample_rate']} Hz -> {args.out} "
          f"in {time.perf_counter() - t0:.1f} s; skipped {len(skipped)} (see skipped.log)")
    return 0 if clips else 1


def register(sub) -> None:
    p = sub.add_parser("prepare", help="folder of talking-head clips -> prepared training dataset")
    p.add_argument("--videos", required=True, help="folder of clips with audio (searched recursively; "
                   "DIR/<person>/clip.mp4 names identities)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--preset", default="demo", help="fps, resolution and audio rate of this preset (tiny/demo/base)")
    p.add_argument("--crop", default="auto", choices=("auto", "face", "center"),
                   help="auto: face crop, except centre crop for synth clips (default)")
    p.add_argument("--face-model", help="YuNet face detector .onnx (optional; default Haar if installed, else skin colour)")
    p.add_argument("--face-scale", type=float, default=FACE_SCALE,
                   help=f"crop side / face box side (default {FACE_SCALE:g}, the training framing)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter clips are skipped (default 1)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="longer clips are split into segments (default 60)")
    p.add_argument("--test-fraction", type=float, default=0.15, help="held-out share of clips (default 0.15)")
    p.add_argument("--jobs", type=int, help="worker processes (default: all cores)")
    p.set_defaults(fn=cmd_prepare)


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------
def load_index(root) -> dict:
    path = Path(root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a prepared dataset (no index.json); run `python -m rest_model "
                                f"prepare --videos DIR --out {root}`")
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    for key in ("fps", "resolution", "sample_rate", "clips"):
        if key not in index:
            raise ValueError(f"{path} lacks '{key}'")
    if index["sample_rate"] % index["fps"]:
        raise ValueError(f"{path}: sample_rate {index['sample_rate']} is not a multiple of fps {index['fps']}")
    return index


def describe_dataset(root) -> str:
    """What a model trained on this dataset's train split learned from, in words (a checkpoint's `trained_on`)."""
    index = load_index(root)
    clips = [c for c in index["clips"] if c.get("split", "train") == "train"]
    kinds = {c.get("source") for c in clips}
    if kinds == {"synth"}:
        what = "procedural drawn faces (rest_model synth)"
    elif kinds == {"video"}:
        what = "face-cropped talking-head videos"
    elif kinds == {"synth", "video"}:
        n = sum(c.get("source") == "synth" for c in clips)
        what = f"talking-head videos and procedural drawn faces ({n} of the clips)"
    else:
        what = "talking-head clips"
    frames = sum(int(c.get("frames", 0)) for c in clips)
    n, ids = len(clips), len({c.get("identity") for c in clips})
    return (f"{what}, {index['resolution']}x{index['resolution']} at {index['fps']} fps: {n} clip{'s' * (n != 1)}, "
            f"{ids} identit{'ies' if ids != 1 else 'y'}, {frames / index['fps'] / 60:.1f} min "
            f"(dataset {Path(root).resolve().name})")


class ClipDataset(Dataset):
    """Random clips of a prepared dataset for training.

    item: video float [3, clip_frames, H, W] in [-1, 1] (a random temporal crop), audio float
    [clip_frames * spf] aligned to it, ref float [3, H, W] in [-1, 1] (a random frame of the same clip,
    anywhere in it: identity decoupled from pose), identity (str), start (first frame of the crop), and
    mouth_open / mouth_width [clip_frames], head_pose [clip_frames, 3] when the clip has them.
    With audio_margin > 0 also audio_padded [(clip_frames + 2 * audio_margin) * spf]: the crop's audio
    with `audio_margin` frames of the clip's real audio on each side (silence beyond the clip's ends),
    for encoders that look back and ahead.

    Tensors are read with safetensors slices (memory-mapped: only the crop is read), so many
    DataLoader workers and datasets larger than memory are fine; cache=True keeps whole clips in memory.
    """

    def __init__(self, root, clip_frames: int, split: str = "train", seed: int = 0, audio_margin: int = 0,
                 cache: bool = False, _memory: list | None = None):
        if clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {split!r}")
        self.root = Path(root) if root is not None else None
        self.index = load_index(root) if _memory is None else _memory[0]
        self.fps, self.resolution = int(self.index["fps"]), int(self.index["resolution"])
        self.sample_rate = int(self.index["sample_rate"])
        self.spf = self.sample_rate // self.fps
        self.clip_frames, self.seed, self.audio_margin = clip_frames, seed, audio_margin
        self.cache = cache or _memory is not None
        chosen = [c for c in self.index["clips"] if split == "all" or c.get("split") == split]
        self.clips = []
        for c in chosen:
            if c["frames"] < clip_frames:
                log.info("clip %s has %d frames < clip_frames %d: not used", c["file"], c["frames"], clip_frames)
                continue
            if _memory is None and not (self.root / c["file"]).is_file():
                raise FileNotFoundError(f"{self.root / c['file']} listed in index.json is missing")
            self.clips.append(c)
        if len(self.clips) < len(chosen):
            log.warning("%d of %d %s clips are shorter than %d frames and are not used", len(chosen) - len(self.clips),
                        len(chosen), split, clip_frames)
        if not self.clips:
            raise ValueError(f"{root or 'the clips'}: no {split} clip has at least {clip_frames} frames "
                             f"({len(chosen)} {split} clips)")
        self._mem: dict[int, dict] = {}
        if _memory is not None:
            by_file = {c["file"]: t for c, t in zip(self.index["clips"], _memory[1])}
            self._mem = {i: by_file[c["file"]] for i, c in enumerate(self.clips)}
        self._rng, self._rng_key = None, None

    @classmethod
    def from_tensors(cls, clips, clip_frames: int, fps: int, sample_rate: int, audio_margin: int = 0,
                     seed: int = 0) -> "ClipDataset":
        """In-memory clips [(video uint8 [T, H, W, 3], audio [T * spf])] as a dataset (tests, experiments)."""
        entries = [dict(file=f"<memory {i}>", identity=f"clip{i}", frames=int(v.shape[0]), split="train")
                   for i, (v, _) in enumerate(clips)]
        index = dict(fps=fps, resolution=int(clips[0][0].shape[1]), sample_rate=sample_rate, clips=entries)
        tensors = [{"video": v, "audio": a} for v, a in clips]
        return cls(None, clip_frames, "train", seed, audio_margin, _memory=(index, tensors))

    def __len__(self) -> int:
        return len(self.clips)

    def rng(self) -> np.random.Generator:
        # a DataLoader worker gets a copy of the dataset: re-seed per worker (and per epoch, as the
        # loader's worker seeds change) so workers do not draw the same crops
        info = get_worker_info()
        key = (os.getpid(), info.seed if info is not None else None)
        if key != self._rng_key:
            self._rng = np.random.default_rng([self.seed, (info.seed % (1 << 32)) if info is not None else 0])
            self._rng_key = key
        return self._rng

    def _tensors(self, i):
        if i not in self._mem:
            with self._open(i) as f:
                self._mem[i] = {k: f.get_tensor(k) for k in f.keys()}
        return self._mem[i]

    @contextmanager
    def _open(self, i):
        """The clip's file for reading; a truncated or corrupt one is named, with what to do about it."""
        path = self.root / self.clips[i]["file"]
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                yield f
        except (SafetensorError, OSError, KeyError) as e:
            raise InputError(f"{path}: dataset clip unreadable (truncated or corrupt?): {type(e).__name__}: {e}. "
                             f"Run `python -m rest_model prepare` again for this dataset") from None

    def load(self, i: int, start: int, ref_frame: int) -> dict:
        """The item of clip i with the crop starting at `start` and the reference at `ref_frame`."""
        c, n, spf, m = self.clips[i], self.clip_frames, self.spf, self.audio_margin
        total = c["frames"]
        if not (0 <= start <= total - n and 0 <= ref_frame < total):
            raise IndexError(f"crop {start}+{n} or reference {ref_frame} outside clip of {total} frames")
        out = {"identity": c["identity"], "start": start}
        a0, a1 = max(0, start - m) * spf, min(total, start + n + m) * spf
        if self.cache:
            t = self._tensors(i)
            video, ref = t["video"][start:start + n], t["video"][ref_frame:ref_frame + 1]
            audio_full = t["audio"][a0:a1]
            extras = {k: t[k][start:start + n] for k in ("mouth_open", "mouth_width", "head_pose") if k in t}
        else:
            with self._open(i) as f:
                keys = set(f.keys())
                vs = f.get_slice("video")
                video, ref = vs[start:start + n], vs[ref_frame:ref_frame + 1]
                audio_full = f.get_slice("audio")[a0:a1]
                extras = {k: f.get_slice(k)[start:start + n] for k in ("mouth_open", "mouth_width", "head_pose")
                          if k in keys}
        out["video"] = video.permute(3, 0, 1, 2).float().mul_(1 / 127.5).sub_(1)
        out["ref"] = ref[0].permute(2, 0, 1).float().mul_(1 / 127.5).sub_(1)
        lo = (start - max(0, start - m)) * spf
        out["audio"] = audio_full[lo:lo + n * spf].float()
        if m:
            pad_l = (m - (start - max(0, start - m))) * spf
            padded = torch.zeros((n + 2 * m) * spf)
            padded[pad_l:pad_l + audio_full.numel()] = audio_full.float()
            out["audio_padded"] = padded
        out.update({k: v.float() for k, v in extras.items()})
        return out

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.clips):
            raise IndexError(f"clip {i} out of range ({len(self.clips)} clips)")
        rng = self.rng()
        total = self.clips[i]["frames"]
        return self.load(i, int(rng.integers(0, total - self.clip_frames + 1)), int(rng.integers(0, total)))
