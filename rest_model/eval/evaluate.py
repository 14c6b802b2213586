"""Quality report: `python -m rest_model eval --vae F --dit F [--dit F ...] --data DATASET`.

For held-out identities and voices (the dataset's test split) it prints, side by side for every
model and for the ground truth:

- lip-sync: `metrics.lip_sync` between the generated mouth and the speech (score = correlation at
  the best offset, the offset in frames, SyncNet-style confidence), on each test clip generated from
  its first frame and its audio, and beside it the chance level: the same frames scored against
  another test clip's speech (the best-offset search finds some correlation in unrelated signals,
  so a score means lip-sync only where it stands clear of this);
- temporal stability: flicker (mean absolute frame-to-frame change, 0-255) inside the regions that
  stand still in the ground-truth clip (background, shoulders);
- identity retention over a long stream: the test clips' speech played back to back for --minutes
  (default 10), streamed from one portrait (--long-portraits: several, pooled), its first 10 s of
  speech replayed every minute and as its last 10 s; face-region PSNR/SSIM to the portrait and
  lip-sync over the first and last windows, the drift (the PSNR lost from the first window to the
  last, frame by frame on the same speech, with its standard error), the PSNR of every window and
  its slope, and the generation speed.

The teacher (--teacher, one of the --dit files) is sampled the non-streaming way (the whole clip in
one bidirectional sequence, --teacher-steps Euler steps, audio guidance --teacher-guidance) and has
no long-stream column: it cannot stream. Before the models, a metric check shows the lip-sync measure
is real on the ground truth: high at the true alignment, the known offset recovered when the audio is
shifted by -0.5..+0.5 s, low with another clip's audio.
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from .. import checkpoint
from . import metrics
from ..audio import prepare_audio
from ..data.prepare import load_index
from ..dit import audio_windows
from ..sampler import flow_schedule, sample_clip
from ..streamer import AudioSource, stream

SHIFTS_S = (-0.5, -0.25, -0.12, 0.12, 0.25, 0.5)
PROBE_CLIPS = 32  # training clips the latent probe is fit on
DRIFT_WINDOW_S = 10.0  # the long stream is judged over its first and last this many seconds (the same speech)


@dataclass
class TestClip:
    name: str
    identity: str
    frames: np.ndarray  # uint8 [T, H, W, 3] at the model resolution
    audio: np.ndarray  # float32 [T * spf] at the dataset rate
    mask: np.ndarray  # bool [H, W]: static pixels of the ground truth


@dataclass
class Row:
    name: str
    kind: str  # "ground truth" | "VAE ceiling" | "streaming" | "teacher (non-streaming)"
    sync: list = field(default_factory=list)
    chance: list = field(default_factory=list)  # sync of the same frames with another clip's speech
    offset: list = field(default_factory=list)
    conf: list = field(default_factory=list)
    flicker: list = field(default_factory=list)
    in_group: list = field(default_factory=list)  # mouth motion inside a latent's frames / the ground truth's
    long: dict = field(default_factory=dict)
    fps: float = float("nan")

    def add_sync(self, frames: np.ndarray, clips: list, i: int, sr: int, fps: int, max_offset: int):
        """Score frames made for clips[i] against its speech and, for the chance level, another clip's."""
        spf = sr // fps
        r = metrics.lip_sync(frames, clips[i].audio[: len(frames) * spf], sr, fps, max_offset)
        self.sync.append(r.score), self.offset.append(r.offset), self.conf.append(r.confidence)
        if len(clips) > 1:
            other = other_speech(clips, i)[: len(frames) * spf]
            self.chance.append(metrics.lip_sync(frames, other, sr, fps, max_offset).score)

    def add_motion(self, frames: np.ndarray, truth: np.ndarray, group: int):
        n = min(len(frames), len(truth))
        self.in_group.append(metrics.mouth_motion(frames[:n], group)[0] /
                             max(metrics.mouth_motion(truth[:n], group)[0], 1e-6))

    def summary(self) -> dict:
        m = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
        return dict(name=self.name, kind=self.kind, sync=m(self.sync), sync_chance=m(self.chance),
                    abs_offset=m(np.abs(self.offset)), confidence=m(self.conf), flicker=m(self.flicker),
                    mouth_motion_in_group=m(self.in_group),
                    gen_fps=self.fps, **self.long)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] -> [n, H, W, 3] uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[1] == size:
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def load_test_clips(root, resolution: int, split: str = "test", limit: int = 8) -> tuple[list[TestClip], dict]:
    """Up to `limit` clips of the split, spread over its identities (round robin), deterministic."""
    index = load_index(root)
    chosen = [c for c in index["clips"] if split == "all" or c.get("split") == split]
    if not chosen:
        raise ValueError(f"{root} has no '{split}' clips (prepare holds out identities as 'test'; "
                         f"pass --split all to use every clip)")
    by_id: dict[str, list] = collections.OrderedDict()
    for c in sorted(chosen, key=lambda c: (c["identity"], c["file"])):
        by_id.setdefault(c["identity"], []).append(c)
    order = []
    for k in range(max(len(v) for v in by_id.values())):
        order += [v[k] for v in by_id.values() if k < len(v)]
    clips = []
    for c in order[:limit]:
        with safe_open(os.path.join(root, c["file"]), framework="pt") as f:
            frames = _resize(f.get_tensor("video").numpy(), resolution)
            audio = f.get_tensor("audio").numpy()
        clips.append(TestClip(c["file"].rsplit(".", 1)[0], c["identity"], frames, audio, metrics.static_mask(frames)))
    return clips, index


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def other_speech(clips: list[TestClip], i: int) -> np.ndarray:
    """The next test clip's speech, cut or padded with silence to clip i's length (a chance-level control)."""
    own, other = clips[i].audio, clips[(i + 1) % len(clips)].audio
    return np.pad(other, (0, max(0, own.size - other.size)))[: own.size]


def portrait_of(clip: TestClip) -> torch.Tensor:
    return torch.from_numpy(clip.frames[0]).permute(2, 0, 1).float() / 127.5 - 1


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def generate_streaming(vae, dit, portrait: torch.Tensor, wave: np.ndarray, sr: int, seed: int = 0) -> np.ndarray:
    """The streamer, exactly as at inference -> uint8 [T, H, W, 3]."""
    chunks = stream(vae, dit, portrait, AudioSource.whole(torch.from_numpy(wave), sr), dit.cfg.stream, seed=seed)
    return np.concatenate([_to_uint8(c.frames) for c in chunks])


def clip_windows(dit, wave: torch.Tensor, sr: int, n_latent: int) -> torch.Tensor:
    """Audio windows of a whole clip's latent frames, built as the streamer builds them (audio before
    the start and after the end is silence) -> (1, n_latent, W, A)."""
    d, enc = dit.cfg, dit.audio_encoder
    tc, a = d.temporal_compression, d.audio_context
    tl = enc.timeline()
    tl.push(prepare_audio(wave, sr, enc.sample_rate).to(_device_of(dit)))
    tl.finish()
    feats = enc.frames(tl, -a * tc, (n_latent + a) * tc)
    return audio_windows(feats, d)


@torch.no_grad()
def generate_teacher(vae, dit, portrait: torch.Tensor, wave: np.ndarray, sr: int, steps: int = 16,
                     seed: int = 0, guidance: float = 1.0) -> np.ndarray:
    """Non-streaming: the whole clip denoised in one bidirectional sequence -> uint8 [T, H, W, 3]."""
    d = dit.cfg
    p = next(dit.parameters())
    n_frames = -(-len(wave) * d.fps // sr)
    n_latent = -(-n_frames // d.temporal_compression)
    ref = vae.encode_image(portrait[None].to(p.device, p.dtype))
    windows = clip_windows(dit, torch.from_numpy(wave), sr, n_latent).to(p.dtype)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, d.latent_channels, n_latent, d.latent_size, d.latent_size), generator=g).to(p.device, p.dtype)
    x0 = sample_clip(dit, ref, windows, noise, flow_schedule(steps, d.stream.shift, p.device), guidance=guidance)
    video = vae.decode(x0)[0].transpose(0, 1)  # (T, 3, H, W)
    return _to_uint8(video[:n_frames])


def long_stream_audio(waves: list[np.ndarray], sr: int, fps: int, minutes: float, window_s: float = DRIFT_WINDOW_S,
                      every_s: float = 60.0) -> tuple[np.ndarray, int, list[int]]:
    """The long stream's speech: the test clips' speech back to back for `minutes`, with its first window
    replayed at every `every_s` seconds and as its last window, so that identity and lip-sync are judged on the
    same speech throughout (an open mouth lowers face PSNR to the closed-mouthed portrait, so other speech
    later would read as drift). -> (wave, frames per window, the frames at which the windows start: 0 first,
    the last window last)."""
    spf = sr // fps
    total = int(minutes * 60 * fps)
    if total < 2:
        raise ValueError(f"a long stream of {minutes:g} min is under 2 frames at {fps} fps")
    if not any(w.size for w in waves):
        raise ValueError("the test clips have no speech to stream")
    window = min(int(window_s * fps), total // 2)
    last = total - window
    step = max(int(every_s * fps), window)
    marks = [m for m in range(0, last, step) if m + window <= last] + [last]
    loop, n = [], 0
    while n < total * spf:
        for w in waves:
            loop.append(w)
            n += w.size
    loop = np.concatenate(loop)
    first = loop[: window * spf]
    # the speech between windows runs on through the clips, as if the replays were not there
    pieces = [np.concatenate([first, loop[(m + window) * spf: nxt * spf]]) for m, nxt in zip(marks, marks[1:])]
    return np.concatenate(pieces + [first]), window, marks


def paired_drift(start: np.ndarray, end: np.ndarray, fps: int) -> tuple[float, float]:
    """mean(end - start) of per-frame scores over two windows of the same speech, and its standard error over
    one-second blocks (neighbouring frames are far from independent; seconds are close to it)."""
    d = np.asarray(end, np.float64) - np.asarray(start, np.float64)
    blocks = len(d) // fps
    se = float(d[:blocks * fps].reshape(blocks, fps).mean(1).std(ddof=1) / math.sqrt(blocks)) if blocks >= 2 \
        else float("nan")
    return float(d.mean()), se


@torch.no_grad()
def long_stream(vae, dit, clips: list[TestClip], sr: int, minutes: float, seed: int = 0,
                progress: bool = False, portrait: int = 0) -> dict:
    """Stream `minutes` of the test speech from clip `portrait`'s first frame, the speech starting with that
    clip's. Its first window of speech comes back every minute and at the end (`long_stream_audio`); each is
    compared to the portrait frame by frame (the drift: what the last window lost against the first; the curve:
    every window's face PSNR), with the first and last windows' lip-sync; flicker throughout. Frames are
    consumed as they come: memory stays flat however long the stream."""
    fps = dit.cfg.fps
    order = clips[portrait:] + clips[:portrait]
    wave, window, marks = long_stream_audio([c.audio for c in order], sr, fps, minutes)
    ref_clip = order[0]
    portrait = portrait_of(ref_clip)
    ref_u8 = ref_clip.frames[0]
    psnr: dict[int, list] = {m: [] for m in marks}
    kept: dict[int, list] = {marks[0]: [], marks[-1]: []}  # whole frames only where SSIM and lip-sync are read
    meter = metrics.FlickerMeter(ref_clip.mask)
    n, t0 = 0, time.perf_counter()
    n_total = -(-wave.size * fps // sr)
    for chunk in stream(vae, dit, portrait, AudioSource.whole(torch.from_numpy(wave), sr), dit.cfg.stream, seed=seed):
        frames = _to_uint8(chunk.frames)
        meter.update(frames)
        for f in frames:
            m = next((m for m in marks if m <= n < m + window), None)
            if m is not None:
                psnr[m].append(metrics.psnr(f, ref_u8, metrics.FACE_BOX))
                if m in kept:
                    kept[m].append(f)
            n += 1
        if progress:
            print(f"\r  long stream: {n / fps / 60:.2f}/{minutes:g} min ({n / (time.perf_counter() - t0):.1f} fps)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    dt = time.perf_counter() - t0
    if len(psnr[marks[-1]]) != window:
        raise RuntimeError(f"the long stream gave {n} frames, {n_total} expected: its last window is incomplete")
    spf = sr // fps
    speech = wave[: window * spf]
    out = {"long_flicker": meter.value, "long_minutes": n / fps / 60, "long_fps": n / dt, "long_frames": n,
           "expected_frames": int(n_total), "drift_window_s": window / fps,
           "id_psnr_curve": [(m / fps / 60, float(np.mean(psnr[m]))) for m in marks]}
    for at, m in (("start", marks[0]), ("end", marks[-1])):
        frames = np.stack(kept[m])
        out[f"id_psnr_{at}"] = float(np.mean(psnr[m]))
        out[f"id_ssim_{at}"] = metrics.face_similarity(frames, ref_u8)["ssim"]
        out[f"sync_{at}"] = metrics.lip_sync(frames, speech, sr, fps).score if window >= 16 else float("nan")
    out["id_drift"], out["id_drift_se"] = paired_drift(psnr[marks[0]], psnr[marks[-1]], fps)
    out["id_slope_10min"], out["id_slope_10min_se"] = curve_slope(out["id_psnr_curve"])
    return out


POOLED_MEANS = ("id_psnr_start", "id_ssim_start", "id_psnr_end", "id_ssim_end", "sync_start", "sync_end",
                "long_flicker", "long_fps", "id_drift", "id_slope_10min")


def pool_long_streams(streams: list[dict]) -> dict:
    """The long streams of several portraits as one row: means, and the standard errors of the mean drift and
    slope (the streams are independent: sqrt(sum se^2) / n)."""
    if len(streams) == 1:
        return dict(streams[0])
    n = len(streams)
    out = {k: float(np.mean([s[k] for s in streams])) for k in POOLED_MEANS}
    for k in ("id_drift_se", "id_slope_10min_se"):
        out[k] = math.sqrt(sum(s[k] ** 2 for s in streams)) / n
    curves = [s["id_psnr_curve"] for s in streams]
    out["id_psnr_curve"] = [(t, float(np.mean([c[i][1] for c in curves]))) for i, (t, _) in enumerate(curves[0])]
    for k in ("long_minutes", "drift_window_s", "long_frames", "expected_frames"):
        out[k] = streams[0][k]
    out["long_streams"] = streams
    return out


def curve_slope(curve: list, after_min: float = 1.0) -> tuple[float, float]:
    """Least-squares slope of face PSNR against time, in dB per 10 minutes, over the windows from `after_min`
    on, and its standard error from the fit's residuals: error that accumulates keeps falling there; a
    settling-in of the first seconds (the rolling cache filling) does not."""
    pts = np.array([(t, v) for t, v in curve if t >= after_min])
    if len(pts) < 3:
        return float("nan"), float("nan")
    (slope, icept), t = np.polyfit(pts[:, 0], pts[:, 1], 1), pts[:, 0]
    resid = pts[:, 1] - (slope * t + icept)
    se = math.sqrt((resid ** 2).sum() / (len(t) - 2) / ((t - t.mean()) ** 2).sum())
    return float(slope * 10), float(se * 10)


def _video(vae, frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [1, 3, T', H, W] in [-1, 1] on the VAE's device, T' whole latent frames (the
    last frame repeated)."""
    p = next(vae.parameters())
    x = torch.from_numpy(frames).to(p.device).permute(3, 0, 1, 2)[None].to(p.dtype) / 127.5 - 1
    pad = -x.shape[2] % vae.cfg.temporal_compression
    return torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], 2)


@torch.no_grad()
def vae_ceiling(vae, clips: list[TestClip], sr: int, fps: int, max_offset: int) -> Row:
    """The ground truth through the VAE (encode + decode): the best lip-sync and flicker any DiT can reach
    with this VAE, so a low score can be put on the VAE or on the DiT."""
    row = Row("VAE reconstruction", "VAE ceiling")
    for i, c in enumerate(clips):
        rec = _to_uint8(vae.decode(vae.encode(_video(vae, c.frames)))[0].transpose(0, 1))[: len(c.frames)]
        row.add_sync(rec, clips, i, sr, fps, max_offset)
        row.add_motion(rec, c.frames, vae.cfg.temporal_compression)
        row.flicker.append(metrics.flicker(rec, c.mask))
    return row


@torch.no_grad()
def latent_mouth_probe(vae, train: list[TestClip], test: list[TestClip]) -> dict:
    """Which half of the VAE limits the ceiling's lip-sync: a linear read-out of the ground truth's mouth
    openness from the latent cells over the mouth (`metrics.latent_probe`), fit on training clips and
    scored on the test clips, per frame of a latent and for the change inside one."""
    tc = vae.cfg.temporal_compression

    def features(clips):
        xs, ys = [], []
        for c in clips:
            n = len(c.frames) // tc * tc
            z = vae.encode(_video(vae, c.frames[:n]))[0]  # [Cz, t, h, w]
            h, w = z.shape[-2:]
            top, bottom, left, right = metrics.MOUTH_ROI  # every cell the mouth region touches
            cells = z[:, :, math.floor(top * h):math.ceil(bottom * h), math.floor(left * w):math.ceil(right * w)]
            xs.append(cells.permute(1, 0, 2, 3).flatten(1).float().cpu().numpy())
            ys.append(metrics.mouth_openness(c.frames[:n]).reshape(-1, tc))
        return np.concatenate(xs), np.concatenate(ys)

    return metrics.latent_probe(*features(train), *features(test)) | dict(train_clips=len(train))


# ---------------------------------------------------------------------------------------------
# metric check and the report
# ---------------------------------------------------------------------------------------------
def metric_check(clips: list[TestClip], gt: Row, sr: int, fps: int, max_offset: int) -> dict:
    """Lip-sync on the ground truth: aligned and with another clip's audio (the ground-truth row's sync and
    chance, already measured), and shifted by known amounts."""
    errors, found = [], {}
    for c in clips:
        for s in SHIFTS_S:
            r = metrics.lip_sync(c.frames, metrics.shift_audio(c.audio, int(round(s * sr))), sr, fps, max_offset)
            errors.append(abs(r.offset - s * fps))
            found.setdefault(s, []).append(r.offset)
    return dict(gt_sync=float(np.mean(gt.sync)), gt_sync_min=float(np.min(gt.sync)),
                shift_found={f"{s:+.2f}s={s * fps:+.1f}f": float(np.median(v)) for s, v in found.items()},
                shift_mean_abs_error_frames=float(np.mean(errors)),
                shift_within_1_frame=float(np.mean(np.asarray(errors) <= 1.0)),
                mismatched_sync=float(np.mean(gt.chance)) if gt.chance else float("nan"))


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _drift(r: dict) -> str:
    if r.get("id_drift") is None:
        return "-"
    return f"{r['id_drift']:+.2f}+-{_fmt(r.get('id_drift_se'), '.2f')}"


def _curve_line(who: str, r: dict) -> str:
    return (f"  {who[:40]:<40} " + ", ".join(f"{t:.1f} min: {v:.2f}" for t, v in r["id_psnr_curve"])
            + f"; drift {_drift(r)}; slope {_fmt(r.get('id_slope_10min'), '+.2f')} +- "
            f"{_fmt(r.get('id_slope_10min_se'), '.2f')} dB per 10 min")


def _streams(rows: list[dict]) -> str:
    n = max((len(r.get("long_streams", [r])) for r in rows if r.get("id_psnr_curve")), default=1)
    return f", pooled over {n} streams from {n} portraits" if n > 1 else ""


def format_report(check: dict, rows: list[dict], minutes: float) -> str:
    lines = ["metric check on ground-truth test clips:",
             f"  lip-sync at true alignment {check['gt_sync']:.3f} (min {check['gt_sync_min']:.3f}); "
             f"with another clip's audio {_fmt(check['mismatched_sync'])}",
             "  audio shifted by: " + ", ".join(f"{k} -> found {v:+.0f}f" for k, v in check["shift_found"].items()),
             f"  offset error {check['shift_mean_abs_error_frames']:.2f} frames on average, "
             f"{100 * check['shift_within_1_frame']:.0f}% within one frame", ""]
    w = max(28, *(len(r["name"]) for r in rows))  # never cut a name: runs told apart by folder differ at the end
    head = (f"{'model':<{w}} {'kind':<24} {'sync':>6} {'chance':>6} {'|off|':>5} {'conf':>6} {'in-grp':>6} "
            f"{'flicker':>7} "
            f"{'PSNR@0':>7} {'SSIM@0':>6} {'PSNR@end':>8} {'SSIM@end':>8} {'drift dB':>12} {'sync@0':>6} "
            f"{'sync@end':>8} {'fps':>6}")
    lines += [f"side by side (clip metrics on {rows[0].get('clips', '?')} held-out clips; "
              f"@end = the last "
              f"{_fmt(next((r['drift_window_s'] for r in rows if r.get('drift_window_s')), None), 'g')} s of "
              f"{minutes:g} min of streaming{_streams(rows)}):", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<{w}} {r['kind'][:24]:<24} {_fmt(r['sync']):>6} {_fmt(r.get('sync_chance')):>6} "
                     f"{_fmt(r['abs_offset'], '.1f'):>5} "
                     f"{_fmt(r['confidence']):>6} {_fmt(r.get('mouth_motion_in_group'), '.2f'):>6} "
                     f"{_fmt(r['flicker'], '.2f'):>7} {_fmt(r.get('id_psnr_start'), '.2f'):>7} "
                     f"{_fmt(r.get('id_ssim_start')):>6} {_fmt(r.get('id_psnr_end'), '.2f'):>8} "
                     f"{_fmt(r.get('id_ssim_end')):>8} {_drift(r):>12} {_fmt(r.get('sync_start')):>6} "
                     f"{_fmt(r.get('sync_end')):>8} {_fmt(r.get('gen_fps'), '.1f'):>6}")
    curves = [r for r in rows if r.get("id_psnr_curve")]
    if curves:
        lines += ["", "face PSNR to the portrait on the same speech through the long stream (window start: PSNR), "
                  "and its least-squares slope from the first minute on:"]
        for r in curves:
            parts = r.get("long_streams", [])
            lines += [_curve_line(f"{r['name']} / {q['portrait']}", q) for q in parts]
            lines.append(_curve_line(r["name"] + (", pooled" if parts else ""), r))
    probe = next((r["latent_probe"] for r in rows if r.get("latent_probe")), None)
    if probe:
        lines += ["", f"mouth openness read linearly from the VAE's latents (fit on {probe['train_clips']} training "
                  f"clips, scored on the test clips): per frame of a latent r = "
                  + ", ".join(f"{v:.2f}" for v in probe["frames"])
                  + f"; its change inside a latent r = {_fmt(probe['in_group'], '.2f')}"]
    lines += ["", "sync: correlation of mouth opening with the speech at the best offset (1 = perfect); |off|: that "
              "offset in frames; chance: the same frames scored against another clip's speech (lip-sync is real only "
              "well above it); conf: best minus median over offsets; in-grp: mouth motion between the frames that "
              "share a latent frame, as a fraction of the ground truth's (0: the VAE decodes a latent as one still "
              "frame, and the mouth moves only once per latent; noise counts as motion too, so read it beside "
              "flicker); flicker: mean |frame-to-frame change| (0-255) "
              "in regions static in the ground truth; PSNR/SSIM (@0 / @end): face region vs the portrait over the "
              "first / last window of the long stream, which play the same speech (ground truth: its clip's first "
              "second); drift: PSNR@end - PSNR@0 +- its standard error over one-second blocks of the paired windows; "
              "sync@0 / sync@end: lip-sync over those windows; fps: generation speed of the long stream."]
    return "\n".join(lines)


def evaluate(vae_path: str, dit_paths: list[str], data: str, *, teacher: str | None = None, minutes: float = 10.0,
             n_clips: int = 8, split: str = "test", teacher_steps: int = 16, max_offset: int = 15, seed: int = 0,
             device: str = "cpu", progress: bool = False, teacher_guidance: float = 1.0,
             long_portraits: int = 1) -> dict:
    if not dit_paths:
        raise ValueError("give at least one --dit")
    if not 1 <= long_portraits <= n_clips:
        raise ValueError(f"--long-portraits must be 1..--clips ({n_clips}), got {long_portraits}")
    if minutes < 0:
        raise ValueError(f"--minutes must be >= 0, got {minutes}")
    if teacher is not None:
        match = [p for p in dit_paths if p == teacher or Path(p).name == teacher or Path(p).stem == teacher]
        if not match:
            dit_paths = [teacher, *dit_paths]
        teacher = match[0] if match else teacher
    vae = checkpoint.load_vae(vae_path, device)
    first_dit = checkpoint.load_dit(dit_paths[0], device)
    res, fps = first_dit.cfg.resolution, first_dit.cfg.fps
    index = load_index(data)
    if index["fps"] != fps:
        raise ValueError(f"{data} is at {index['fps']} fps but the models run at {fps} fps; prepare it with their preset")
    clips, index = load_test_clips(data, res, split, n_clips)
    if long_portraits > len(clips):
        raise ValueError(f"--long-portraits {long_portraits} needs as many {split} clips; {data} has {len(clips)}")
    sr = index["sample_rate"]
    gt = Row("ground truth", "ground truth")
    for i, c in enumerate(clips):
        gt.add_sync(c.frames, clips, i, sr, fps, max_offset)
        gt.add_motion(c.frames, c.frames, vae.cfg.temporal_compression)
        gt.flicker.append(metrics.flicker(c.frames, c.mask))
    check = metric_check(clips, gt, sr, fps, max_offset)
    sim = metrics.face_similarity(clips[0].frames[1:fps + 1], clips[0].frames[0])
    gt.long = {"id_psnr_start": sim["psnr"], "id_ssim_start": sim["ssim"]}
    ceiling = vae_ceiling(vae, clips, sr, fps, max_offset).summary()
    if any(c.get("split") == "train" for c in index["clips"]):
        ceiling["latent_probe"] = latent_mouth_probe(vae, load_test_clips(data, res, "train", PROBE_CLIPS)[0], clips)
    rows = [gt.summary(), ceiling]
    names = model_names(dit_paths)
    for path in dit_paths:
        dit = first_dit if path == dit_paths[0] else checkpoint.load_dit(path, device)
        try:
            checkpoint.check_compatible(vae.cfg, dit.cfg)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"{path} does not fit {vae_path}: {e}") from None
        if dit.cfg.resolution != res or dit.cfg.fps != fps:
            raise ValueError(f"{path} runs at {dit.cfg.resolution}px {dit.cfg.fps} fps, {dit_paths[0]} at "
                             f"{res}px {fps} fps: compare models of one preset")
        is_teacher = teacher is not None and path == teacher
        name = names[path] + (f" cfg {teacher_guidance:g}" if is_teacher and teacher_guidance != 1 else "")
        row = Row(name, "teacher (non-streaming)" if is_teacher else "streaming")
        t0, frames_made = time.perf_counter(), 0
        for i, c in enumerate(clips):
            if progress:
                print(f"\r{row.name}: clip {i + 1}/{len(clips)}", end="", file=sys.stderr, flush=True)
            portrait = portrait_of(c)
            gen = (generate_teacher(vae, dit, portrait, c.audio, sr, teacher_steps, seed, teacher_guidance)
                   if is_teacher else generate_streaming(vae, dit, portrait, c.audio, sr, seed))
            gen = gen[: len(c.frames)]
            frames_made += len(gen)
            row.add_sync(gen, clips, i, sr, fps, max_offset)
            row.add_motion(gen, c.frames, vae.cfg.temporal_compression)
            row.flicker.append(metrics.flicker(gen, c.mask))
        row.fps = frames_made / (time.perf_counter() - t0)
        if progress:
            print(file=sys.stderr)
        if not is_teacher and minutes > 0:
            row.long = pool_long_streams([dict(long_stream(vae, dit, clips, sr, minutes, seed, progress, i),
                                               portrait=clips[i].name) for i in range(long_portraits)])
            row.fps = row.long["long_fps"]
        rows.append(row.summary())
    for r in rows:
        r["clips"] = len(clips)
    return dict(metric_check=check, models=rows, minutes=minutes, clips=[c.name for c in clips],
                identities=sorted({c.identity for c in clips}), split=split, data=str(data))


def model_names(paths: list[str]) -> dict:
    """Each model's row name: its file's stem, or with its folder where stems repeat (runs of one stage write
    files of one name)."""
    stems = [Path(p).stem for p in paths]
    return {p: f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)}


def cmd_eval(args) -> int:
    torch.manual_seed(args.seed)
    report = evaluate(args.vae, args.dit, args.data, teacher=args.teacher, minutes=args.minutes, n_clips=args.clips,
                      split=args.split, teacher_steps=args.teacher_steps, max_offset=args.max_offset, seed=args.seed,
                      device=args.device, progress=True, teacher_guidance=args.teacher_guidance,
                      long_portraits=args.long_portraits)
    print(f"held-out {report['split']} clips: {len(report['clips'])} from identities {', '.join(report['identities'])}")
    print(format_report(report["metric_check"], report["models"], report["minutes"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality report: lip-sync, identity retention, flicker; models side by side")
    p.add_argument("--vae", required=True, help="VAE .safetensors shared by the models")
    p.add_argument("--dit", action="append", required=True, help="DiT .safetensors; repeat to compare models")
    p.add_argument("--teacher", help="which --dit is the bidirectional teacher (sampled non-streaming)")
    p.add_argument("--data", required=True, help="prepared dataset (python -m rest_model prepare)")
    p.add_argument("--split", default="test", choices=("test", "train", "all"),
                   help="clips to evaluate on (default: the held-out identities and voices)")
    p.add_argument("--clips", type=int, default=8, help="test clips, spread over identities (default 8)")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the long stream (default 10; 0 = skip)")
    p.add_argument("--long-portraits", type=int, default=1,
                   help="long streams, each from another test clip's portrait; the report pools them (default 1)")
    p.add_argument("--teacher-steps", type=int, default=16, help="Euler steps for the teacher (default 16)")
    p.add_argument("--teacher-guidance", type=float, default=1.0,
                   help="audio classifier-free guidance scale for the teacher (default 1 = off)")
    p.add_argument("--max-offset", type=int, default=15, help="lip-sync offset search, +- frames (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every number to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(fn=cmd_eval)
