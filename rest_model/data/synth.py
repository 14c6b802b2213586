"""Procedural talking faces: `python -m rest_model synth --out DIR --n N`.

No face video can be downloaded here, so tests, benchmarks and the demo model learn from faces
drawn with OpenCV primitives: many identities (face shape, skin, hair, eyes, background,
glasses/earrings/beard/hat), natural head motion and blinks, and a mouth driven by the speech
audio through `mouth.audio_mouth_shape` (openness from the speech-band envelope and an F1 cue,
width from an F2 cue). Lip-sync is therefore learnable and measurable, and the ground truth of
every frame (mouth openness/width, head pose, blink) is written beside each clip.

Per clip: `<id>.mp4` (H.264 + AAC, 25 fps, --size square) and `<id>.json`. Clip `k` belongs to
identity `k % identities`, so identities recur across clips (a model learns identity conditioning
from a reference frame of the same clip). A voice belongs to its identity, so holding out an
identity also holds out its voice.

Speech: espeak-ng (Debian) with varied accents, voice variants, rates and pitches when installed;
otherwise (CI) a dependency-free formant "babble" synthesiser: voiced syllables with a pitch contour
and vowel formants, consonant noise, word gaps and phrase pauses.

Faces are centred with the mouth inside `mouth.MOUTH_ROI`: that is the framing `prepare` keeps
for synth clips (it centre-crops them rather than re-detecting the face).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave as wavmod
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .jobs import parallel_map
from .mouth import audio_mouth_shape, resample

log = logging.getLogger("rest_model.synth")

FPS = 25
SAMPLE_RATE = 16000  # the encoder rate of every preset (25 fps x 640)
SS = 2  # drawing supersampling: shapes are drawn at SS x size and area-averaged down
SUB = 3  # sub-pixel bits for cv2 drawing (smooth motion, not 1-pixel jumps)
GENERATOR = "rest_model.synth"
VERSION = 1

# ---------------------------------------------------------------------------------------------
# speech
# ---------------------------------------------------------------------------------------------
WORDS = ("the a my your our this that some every another people time year way day man woman child "
         "world life hand part place case week company system program question work government number "
         "night point home water room mother area money story fact month lot right study book eye job "
         "word business issue side kind head house service friend father power hour game line end member "
         "law car city community name president team minute idea kid body information back parent face "
         "others level office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education is was will can should might must would "
         "see know take make think come give look want find tell ask seem feel try leave call keep "
         "begin help talk turn start show hear play run move like live believe hold bring happen write "
         "sit stand lose pay meet include continue learn lead understand watch follow stop create speak "
         "read spend grow open walk win offer remember love consider appear buy wait serve die send "
         "expect build stay fall cut reach kill remain suggest raise pass sell require report decide "
         "good new first last long great little own other old big high different small large next early "
         "young important few public bad same able really very often always never quite already maybe "
         "today together again later soon still just almost enough perhaps usually slowly quickly "
         "and but because although while after before when if so then also").split()
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "adam", "Alex",
                   "Alicia", "Andrea", "Andy", "Annie", "aunty", "belinda", "benjamin", "boris", "caleb",
                   "david", "Denis", "ed", "edward", "grandma", "grandpa", "Hugo", "iven", "john", "linda",
                   "max", "Michael", "michel", "Mike", "paul", "quincy", "rob", "robert", "steph", "travis",
                   "victor", "zac", "klatt", "klatt3")
# (F1, F2, F3) in Hz for an adult male vocal tract (Peterson & Barney 1952)
VOWELS = np.array([(270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410),
                   (730, 1090, 2440), (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240),
                   (490, 1350, 1690), (520, 1190, 2390)], dtype=np.float32)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def resolve_speech(speech: str) -> str:
    """--speech auto -> the voice it means on this machine: espeak where espeak-ng is installed, else babble."""
    return speech if speech != "auto" else ("espeak" if have_espeak() else "babble")


def random_text(rng: np.random.Generator, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        k = int(min(left, rng.integers(4, 12)))
        words = [str(w) for w in rng.choice(WORDS, size=k)]
        if k > 5 and rng.random() < 0.5:  # a comma gives espeak a short phrase pause
            words[int(rng.integers(2, k - 2))] += ","
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + ("?" if rng.random() < 0.15 else "."))
        left -= k
    return " ".join(out)


def _read_wav(path) -> tuple[np.ndarray, int]:
    with wavmod.open(os.fspath(path), "rb") as f:
        sr, n, width, ch = f.getframerate(), f.getnframes(), f.getsampwidth(), f.getnchannels()
        raw = f.readframes(n)
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, ch).mean(1), sr


def espeak(text: str, voice: str, rate: int, pitch: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Speak `text` with espeak-ng -> mono float32 at `sr`."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.wav")
        r = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", path, text],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"espeak-ng -v {voice} failed: {r.stderr.strip()[:200]}")
        x, esr = _read_wav(path)
    return resample(x, esr, sr).astype(np.float32)


@dataclass
class BabbleVoice:
    f0: float  # mean pitch (Hz)
    tract: float  # formant scale: 1 = adult male, ~1.17 adult female, >1.3 child
    rate: float  # syllables per second
    breath: float  # aspiration noise mixed into voicing
    tilt: float  # spectral tilt of the glottal source (higher = softer voice)


def _ramp_env(n, sr, starts, ends, amps, rise_s=0.012):
    """Piecewise-constant amplitude with raised-cosine edges (no clicks, like real articulation)."""
    env = np.zeros(n, np.float32)
    for s, e, a in zip(starts, ends, amps):
        env[max(0, s):min(n, e)] = a
    k = max(1, int(rise_s * sr))
    w = np.hanning(2 * k + 1).astype(np.float32)
    return np.convolve(env, w / w.sum(), mode="same")


def babble(rng: np.random.Generator, seconds: float, voice: BabbleVoice, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-like signal with no dependency: syllables (consonant onset + voiced vowel with formants),
    word gaps and phrase pauses, a declining pitch contour with accents."""
    n = int(seconds * sr)
    f0 = np.zeros(n, np.float32)
    formants = np.zeros((3, n), np.float32)
    v_s, v_e, v_a, n_s, n_e, n_a, n_hi = [], [], [], [], [], [], []
    t = int(rng.uniform(0.05, 0.5) * sr)
    phrase_left = int(rng.integers(4, 12))
    phrase_t0 = t
    vowel = VOWELS[rng.integers(len(VOWELS))] * voice.tract
    while t < n:
        syl = rng.uniform(0.7, 1.3) / voice.rate
        cons = rng.uniform(0.04, 0.09) if rng.random() < 0.8 else 0.0
        c_end = t + int(cons * sr)
        if cons:
            n_s.append(t), n_e.append(c_end), n_a.append(rng.uniform(0.05, 0.25)), n_hi.append(rng.random() < 0.6)
        v_end = c_end + int((syl - cons) * rng.uniform(0.65, 0.9) * sr)
        stress = rng.random() < 0.3
        v_s.append(c_end), v_e.append(v_end), v_a.append(rng.uniform(0.6, 1.0) * (1.25 if stress else 1.0))
        target = VOWELS[rng.integers(len(VOWELS))] * voice.tract * rng.uniform(0.94, 1.06)
        seg = slice(t, min(n, v_end + int(0.05 * sr)))
        m = seg.stop - seg.start
        if m > 0:  # formants glide from the last vowel to this one (coarticulation)
            g = np.clip(np.linspace(0, 1.6, m), 0, 1)[None]
            formants[:, seg] = vowel[:, None] * (1 - g) + target[:, None] * g
            decl = 1.15 - 0.3 * min(1.0, (t - phrase_t0) / (2.5 * sr))
            f0[seg] = voice.f0 * decl * (1.15 if stress else 1.0) * rng.uniform(0.95, 1.05)
        vowel = target
        t = v_end
        phrase_left -= 1
        if phrase_left <= 0:  # phrase pause: the mouth closes, pitch resets
            t += int(rng.uniform(0.2, 0.55) * sr)
            phrase_left, phrase_t0 = int(rng.integers(4, 12)), t
        elif rng.random() < 0.35:  # word gap
            t += int(rng.uniform(0.03, 0.09) * sr)
    # fill pitch/formants through gaps so the glides stay smooth
    idx = np.flatnonzero(f0 > 0)
    if idx.size == 0:
        return np.zeros(n, np.float32)
    f0 = np.interp(np.arange(n), idx, f0[idx]).astype(np.float32)
    for k in range(3):
        formants[k] = np.interp(np.arange(n), idx, formants[k, idx])
    k = int(0.03 * sr)
    box = np.ones(k, np.float32) / k
    f0 = np.convolve(f0, box, mode="same") * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * np.arange(n) / sr))
    formants = np.stack([np.convolve(f, box, mode="same") for f in formants])
    # voiced source: harmonics weighted by the formant resonances at their frequencies
    phase = 2 * np.pi * np.cumsum(f0 / sr)
    harmonics = int(4000 / max(voice.f0 * 0.8, 60))
    voiced = np.zeros(n, np.float32)
    bw = np.array([80, 100, 140], np.float32)[:, None]
    gains = np.array([1.0, 0.6, 0.3], np.float32)[:, None]
    for h in range(1, harmonics + 1):
        fh = h * f0
        amp = (gains / (1 + ((fh[None] - formants) / bw) ** 2)).sum(0) / h ** voice.tilt
        amp[fh > sr / 2 - 200] = 0
        voiced += amp * np.sin(h * phase)
    noise = rng.standard_normal(n).astype(np.float32)
    hi = noise - np.convolve(noise, np.ones(4, np.float32) / 4, mode="same")  # fricative hiss
    v_env = _ramp_env(n, sr, v_s, v_e, v_a)
    n_env = _ramp_env(n, sr, n_s, n_e, n_a, 0.006)
    hi_mask = _ramp_env(n, sr, [s for s, h in zip(n_s, n_hi) if h], [e for e, h in zip(n_e, n_hi) if h], [1] * sum(n_hi))
    y = v_env * (voiced / (np.abs(voiced).max() + 1e-6) + voice.breath * noise * 0.1)
    y += n_env * (hi * hi_mask + 0.3 * noise * (1 - hi_mask))
    return (0.8 * y / (np.abs(y).max() + 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------
SKIN = [(255, 224, 196), (246, 208, 178), (241, 194, 167), (233, 190, 160), (224, 172, 138),
        (210, 160, 120), (198, 134, 66), (180, 130, 90), (161, 102, 62), (141, 85, 36), (120, 75, 50),
        (100, 62, 42), (86, 52, 35)]
HAIR = [(25, 20, 18), (40, 30, 25), (60, 40, 28), (105, 70, 45), (140, 65, 35), (180, 120, 70),
        (215, 180, 110), (170, 170, 165), (225, 225, 220), (50, 80, 170), (210, 110, 160), (60, 140, 90)]
HAIR_P = np.array([14, 12, 14, 12, 6, 6, 8, 6, 3, 2, 2, 2], float)
EYES = [(90, 55, 30), (50, 32, 20), (70, 120, 170), (80, 120, 70), (120, 100, 50), (120, 130, 140)]
HAIR_STYLES = ("short", "long", "bob", "curly", "bun", "fringe", "bald", "side")
BACKGROUNDS = ("gradient", "radial", "stripes", "bokeh", "room")


def _jitter(rng, c, amount):
    return tuple(float(np.clip(v + rng.uniform(-amount, amount), 0, 255)) for v in c)


def _mix(a, b, t):
    return tuple(float(x * (1 - t) + y * t) for x, y in zip(a, b))


def _scale(c, s):
    return tuple(float(np.clip(v * s, 0, 255)) for v in c)


@dataclass
class Identity:
    name: str
    skin: tuple
    hair: tuple
    hair_style: str
    eyes: tuple
    lips: tuple
    clothes: tuple
    bg_kind: str
    bg_colors: tuple
    bg_seed: int
    face_h: float  # half-height of the face as a fraction of the frame
    face_ratio: float  # half-width / half-height
    jaw: float  # superellipse exponent of the lower face (<2 pointed chin, >2 square jaw)
    centre: tuple  # face centre (fractions of the frame)
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    brow_thick: float
    brow_arch: float
    nose_len: float
    mouth_w: float
    mouth_open_max: float
    lip_thick: float
    glasses: str  # "", "round", "square"
    glasses_color: tuple
    earrings: bool
    beard: str  # "", "stubble", "full", "moustache"
    hat: bool
    mole: tuple | None
    voice: dict
    blink_rate: float
    motion: float  # head motion amplitude multiplier

    @property
    def voice_name(self) -> str:
        v = self.voice
        if v["kind"] == "espeak":
            return f"espeak:{v['accent']}+{v['variant']}:p{v['pitch']}:s{v['rate']}"
        return f"babble:f{v['f0']:.0f}:t{v['tract']:.2f}:r{v['rate']:.1f}"


def make_identity(seed: int, index: int, speech: str) -> Identity:
    rng = np.random.default_rng([seed, 1, index])
    skin = _jitter(rng, SKIN[rng.integers(len(SKIN))], 8)
    hair = _jitter(rng, HAIR[rng.choice(len(HAIR), p=HAIR_P / HAIR_P.sum())], 10)
    lipstick = rng.random() < 0.15
    lips = (float(rng.uniform(150, 200)), float(rng.uniform(30, 70)), float(rng.uniform(50, 90))) if lipstick \
        else _mix(_scale(skin, 0.78), (170, 80, 85), 0.45)
    bg = tuple(tuple(float(v) for v in rng.uniform(30, 235, 3)) for _ in range(3))
    female = rng.random() < 0.5
    if speech == "espeak":
        fv = [v for v in ESPEAK_VARIANTS if v[0] == "f" or v in ("Alicia", "Andrea", "Annie", "aunty", "belinda",
                                                                   "grandma", "linda", "steph")]
        mv = [v for v in ESPEAK_VARIANTS if v not in fv]
        voice = dict(kind="espeak", accent=str(rng.choice(ESPEAK_ACCENTS)), variant=str(rng.choice(fv if female else mv)),
                     pitch=int(rng.integers(25, 80)), rate=int(rng.integers(140, 195)))
    else:
        voice = dict(kind="babble", f0=float(rng.uniform(170, 250) if female else rng.uniform(85, 150)),
                     tract=float(rng.uniform(1.1, 1.25) if female else rng.uniform(0.9, 1.05)),
                     rate=float(rng.uniform(3.5, 6.0)), breath=float(rng.uniform(0.0, 0.6)),
                     tilt=float(rng.uniform(0.6, 1.2)))
    beard = "" if female or rng.random() < 0.6 else str(rng.choice(["stubble", "full", "moustache"]))
    hair_style = str(rng.choice(HAIR_STYLES, p=[0.12, 0.22, 0.14, 0.1, 0.08, 0.12, 0.08, 0.14] if female else
                                [0.3, 0.06, 0.06, 0.12, 0.02, 0.12, 0.18, 0.14]))
    return Identity(
        name=f"s{seed}-id{index:03d}", skin=skin, hair=hair, hair_style=hair_style,
        eyes=_jitter(rng, EYES[rng.integers(len(EYES))], 12), lips=lips,
        clothes=tuple(float(v) for v in rng.uniform(20, 230, 3)),
        bg_kind=str(rng.choice(BACKGROUNDS)), bg_colors=bg, bg_seed=int(rng.integers(1 << 30)),
        face_h=float(rng.uniform(0.25, 0.29)), face_ratio=float(rng.uniform(0.72, 0.86)),
        jaw=float(rng.uniform(1.7, 3.0)), centre=(float(0.5 + rng.uniform(-0.015, 0.015)), float(0.44 + rng.uniform(-0.01, 0.01))),
        eye_dx=float(rng.uniform(0.36, 0.44)), eye_y=float(rng.uniform(-0.14, -0.06)),
        eye_w=float(rng.uniform(0.13, 0.18)), eye_h=float(rng.uniform(0.38, 0.58)),
        brow_thick=float(rng.uniform(0.025, 0.05)), brow_arch=float(rng.uniform(0.02, 0.08)),
        nose_len=float(rng.uniform(0.22, 0.32)), mouth_w=float(rng.uniform(0.27, 0.36)),
        mouth_open_max=float(rng.uniform(0.18, 0.24)), lip_thick=float(rng.uniform(0.03, 0.06)),
        glasses=str(rng.choice(["", "round", "square"], p=[0.7, 0.15, 0.15])),
        glasses_color=tuple(float(v) for v in (rng.choice([20, 120, 200]), rng.uniform(20, 120), rng.uniform(20, 60))),
        earrings=bool(female and rng.random() < 0.4), beard=beard, hat=bool(rng.random() < 0.08),
        mole=(float(rng.uniform(-0.5, 0.5)), float(rng.uniform(0.1, 0.45))) if rng.random() < 0.15 else None,
        voice=voice, blink_rate=float(rng.uniform(0.15, 0.45)), motion=float(rng.uniform(0.6, 1.3)))


def background(ident: Identity, size: int) -> np.ndarray:
    """Static per identity (flicker is measured on it), drawn once per clip at the canvas size."""
    rng = np.random.default_rng(ident.bg_seed)
    c1, c2, c3 = (np.array(c, np.float32) for c in ident.bg_colors)
    y = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    kind = ident.bg_kind
    if kind == "radial":
        r = np.sqrt((x - 0.5) ** 2 + (y - 0.4) ** 2) / 0.7
        img = c1 * (1 - r) + c2 * r
    else:
        img = c1 * (1 - y) + c2 * y + 0 * x
    img = np.broadcast_to(img, (size, size, 3)).astype(np.float32)  # a writable copy
    if kind == "stripes":
        w = int(rng.integers(size // 16, size // 6))
        for x0 in range(int(rng.integers(0, w)), size, 2 * w):
            img[:, x0:x0 + w] *= 0.88
    elif kind == "bokeh":
        for _ in range(int(rng.integers(6, 16))):
            col = tuple(float(v) for v in np.clip(c3 + rng.uniform(-40, 40, 3), 0, 255))
            cv2.circle(img, (int(rng.integers(size)), int(rng.integers(size))), int(rng.integers(size // 20, size // 7)),
                       col, -1, cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (0, 0), size / 60)
    elif kind == "room":
        for _ in range(int(rng.integers(2, 5))):
            x0, y0 = int(rng.integers(0, size)), int(rng.integers(0, size // 2))
            w, h = int(rng.integers(size // 8, size // 2)), int(rng.integers(size // 8, size // 2))
            col = tuple(float(v) for v in np.clip(c3 * rng.uniform(0.6, 1.2), 0, 255))
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), col, -1, cv2.LINE_AA)
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), _scale(col, 0.7), max(1, size // 100), cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (0, 0), size / 200)
    return img


# ---------------------------------------------------------------------------------------------
# motion
# ---------------------------------------------------------------------------------------------
def _wander(rng, t, amp, lo=0.08, hi=0.5, k=3):
    """Smooth random motion: a few sinusoids of random frequency and phase, normalised to `amp`."""
    f = rng.uniform(lo, hi, k)
    ph = rng.uniform(0, 2 * np.pi, k)
    w = rng.uniform(0.5, 1.0, k)
    s = (w[:, None] * np.sin(2 * np.pi * f[:, None] * t[None] + ph[:, None])).sum(0)
    return amp * s / w.sum() * 1.6


def blinks(rng, n_frames: int, fps: int, rate: float) -> np.ndarray:
    """Eyelid closure per frame: Poisson blink times, ~60 ms closing, ~30 ms shut, ~130 ms opening."""
    t = np.arange(n_frames) / fps
    out = np.zeros(n_frames, np.float32)
    s = rng.uniform(0.2, 2.0)
    while s < t[-1] + 1 if n_frames else False:
        c, h, o = rng.uniform(0.05, 0.08), rng.uniform(0.0, 0.06), rng.uniform(0.1, 0.17)
        d = t - s
        prof = np.where(d < 0, 0, np.where(d < c, d / c, np.where(d < c + h, 1, np.clip(1 - (d - c - h) / o, 0, 1))))
        out = np.maximum(out, prof)
        s += max(0.8, rng.exponential(1 / rate))
    return out


@dataclass
class Motion:
    yaw: np.ndarray  # degrees, + = turning to the viewer's right
    pitch: np.ndarray  # degrees, + = nodding down
    roll: np.ndarray  # degrees
    tx: np.ndarray  # fractions of the frame
    ty: np.ndarray
    blink: np.ndarray
    gaze: np.ndarray  # [T, 2] iris offset (-1..1)
    brow: np.ndarray  # brow raise (0..1)


def make_motion(rng, n_frames: int, fps: int, ident: Identity, mouth_open: np.ndarray) -> Motion:
    t = np.arange(n_frames) / fps
    a = ident.motion
    # speakers nod and raise their brows on stressed syllables: follow a slow envelope of the speech
    k = max(1, int(0.3 * fps))
    emph = np.convolve(mouth_open, np.ones(k) / k, mode="same")
    emph = emph - emph.mean()
    yaw = _wander(rng, t, rng.uniform(4, 12) * a)
    pitch = _wander(rng, t, rng.uniform(2, 6) * a) + 6 * a * emph
    roll = _wander(rng, t, rng.uniform(1, 4) * a)
    tx = _wander(rng, t, 0.008 * a) + 0.0006 * yaw
    ty = _wander(rng, t, 0.006 * a) + 0.0006 * pitch
    gaze = np.zeros((n_frames, 2), np.float32)
    g, i = rng.uniform(-0.3, 0.3, 2), 0
    while i < n_frames:  # fixations of 0.5-2 s with saccades between them
        j = i + int(rng.uniform(0.5, 2.0) * fps)
        gaze[i:j] = g
        g, i = np.clip(g * 0.3 + rng.uniform(-0.45, 0.45, 2), -0.6, 0.6), j
    brow = np.clip(3 * emph, 0, 1)
    return Motion(*(x.astype(np.float32) for x in (yaw, pitch, roll, tx, ty)),
                  blinks(rng, n_frames, fps, ident.blink_rate), gaze, brow.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _arc(ax, ay, t0=0.0, t1=2 * np.pi, n=40, cx=0.0, cy=0.0, p=2.0):
    """Points of a superellipse |x/ax|^p + |y/ay|^p = 1 from angle t0 to t1 (p = 2: ellipse)."""
    t = np.linspace(t0, t1, n)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / p
    return np.stack([cx + ax * np.sign(c) * np.abs(c) ** e, cy + ay * np.sign(s) * np.abs(s) ** e], 1)


class Painter:
    """Draws head-local polygons into the canvas through the head's similarity transform."""

    def __init__(self, img: np.ndarray):
        self.img = img
        self.m = np.eye(2, 3)

    def set_transform(self, centre, roll_deg, pivot):
        r = math.radians(roll_deg)
        c, s = math.cos(r), math.sin(r)
        rot = np.array([[c, -s], [s, c]])
        px, py = pivot
        t = np.array(centre) + np.array(pivot) - rot @ np.array([px, py])
        self.m = np.concatenate([rot, t[:, None]], 1)

    def _pts(self, pts, local=True):
        p = np.asarray(pts, np.float64)
        if local:
            p = p @ self.m[:, :2].T + self.m[:, 2]
        return np.round(p * (1 << SUB)).astype(np.int32)

    def fill(self, pts, color, local=True):
        cv2.fillPoly(self.img, [self._pts(pts, local)], color, cv2.LINE_AA, SUB)

    def line(self, pts, color, thick, closed=False, local=True):
        cv2.polylines(self.img, [self._pts(pts, local)], closed, color, max(1, int(round(thick))), cv2.LINE_AA, SUB)


def render_frame(ident: Identity, bg: np.ndarray, size: int, mot: Motion, i: int, mouth_open: float,
                 mouth_width: float) -> np.ndarray:
    S = size * SS
    img = bg.copy()
    P = Painter(img)
    ay = ident.face_h * S
    ax = ay * ident.face_ratio
    yaw, pitch, roll = (math.radians(float(v)) for v in (mot.yaw[i], mot.pitch[i], mot.roll[i]))
    centre = ((ident.centre[0] + mot.tx[i]) * S, (ident.centre[1] + mot.ty[i]) * S)
    sy, sp = math.sin(yaw), math.sin(pitch)
    fx = lambda depth: sy * ax * depth  # noqa: E731  features nearer the camera move more when turning
    fy = lambda depth: sp * ay * depth  # noqa: E731
    oh = mouth_open * ident.mouth_open_max * ay  # mouth opening (canvas px)
    jaw = 0.6 * oh  # the jaw drops with the opening
    skin, hair = ident.skin, ident.hair

    # body (frame coordinates): shoulders, neck joined to the moving head
    sh_y = 0.92 * S
    P.fill(_arc(0.44 * S, 0.2 * S, np.pi, 2 * np.pi, 40, S / 2, sh_y + 0.18 * S, p=3.0).tolist()
           + [(S, S), (0, S)], ident.clothes, local=False)
    P.set_transform(centre, math.degrees(roll), (0, 0.9 * ay))
    neck_top = P.m[:, :2] @ np.array([[-0.5 * ax, 0.5 * ay], [0.5 * ax, 0.5 * ay]]).T + P.m[:, 2:3]
    neck = [tuple(neck_top[:, 0]), tuple(neck_top[:, 1]), (S / 2 + 0.55 * ax, sh_y), (S / 2 - 0.55 * ax, sh_y)]
    P.fill(neck, _scale(skin, 0.82), local=False)
    P.fill(_arc(0.6 * ax, 0.06 * S, 0, np.pi, 20, S / 2, sh_y - 0.005 * S), _scale(skin, 0.82), local=False)

    # hair behind the head
    hs = ident.hair_style
    hair_dx = -fx(0.15)
    if hs == "long":
        P.fill(_arc(1.28 * ax, 1.1 * ay, np.pi, 2 * np.pi, 30, hair_dx, -0.1 * ay).tolist()
               + [(hair_dx + 1.3 * ax, 1.5 * ay), (hair_dx - 1.3 * ax, 1.5 * ay)], hair)
    elif hs == "bob":
        P.fill(_arc(1.22 * ax, 1.0 * ay, np.pi, 2 * np.pi, 30, hair_dx, -0.05 * ay).tolist()
               + [(hair_dx + 1.22 * ax, 0.55 * ay), (hair_dx - 1.22 * ax, 0.55 * ay)], hair)
    elif hs == "curly":
        for a in np.linspace(np.pi * 0.9, np.pi * 2.1, 11):
            P.fill(_arc(0.42 * ax, 0.42 * ax, cx=hair_dx + 1.0 * ax * math.cos(a), cy=-0.35 * ay + 0.85 * ay * math.sin(a), n=20), hair)
        P.fill(_arc(1.1 * ax, 0.95 * ay, cx=hair_dx, cy=-0.25 * ay), hair)
    elif hs == "bun":
        P.fill(_arc(0.4 * ax, 0.35 * ax, cx=hair_dx, cy=-1.15 * ay), hair)

    # ears
    ear_x = ax * 0.97 * math.cos(yaw) ** 0.5
    for side in (-1, 1):
        ex = side * ear_x - fx(0.25)
        P.fill(_arc(0.16 * ax, 0.22 * ay, cx=ex, cy=0.0, n=24), _scale(skin, 0.93))
        P.fill(_arc(0.08 * ax, 0.13 * ay, cx=ex, cy=0.0, n=16), _scale(skin, 0.78))
        if ident.earrings:
            P.fill(_arc(0.05 * ax, 0.05 * ax, cx=ex, cy=0.26 * ay, n=12), (230, 200, 90))

    # face: upper half an ellipse, lower half a superellipse (jaw), narrowed by the turn
    fw = ax * math.cos(yaw) ** 0.35
    face = np.concatenate([_arc(fw, ay, np.pi, 2 * np.pi, 40),
                           _arc(fw, ay + jaw, 0, np.pi, 40, p=ident.jaw)])
    face[:, 0] += fx(0.05)
    P.fill(face, skin)
    if ident.beard in ("full", "stubble"):
        col = _mix(hair, skin, 0.4 if ident.beard == "full" else 0.72)
        low = _arc(fw, ay + jaw, 0.05 * np.pi, 0.95 * np.pi, 30, p=ident.jaw)
        inner = _arc(0.65 * fw, 0.58 * ay + jaw, 0.95 * np.pi, 0.05 * np.pi, 30, cx=fx(0.4), cy=0.3 * ay + fy(0.4))
        P.fill(np.concatenate([low, inner]), col)

    # eyes, lids, brows
    eh_base = ident.eye_w * ax * ident.eye_h
    for side in (-1, 1):
        ex, ey = side * ident.eye_dx * ax + fx(0.55), ident.eye_y * ay + fy(0.5)
        ew, eh = ident.eye_w * ax * (1 - 0.25 * side * sy), eh_base
        P.fill(_arc(ew, eh, n=30, cx=ex, cy=ey), (245, 245, 240))
        ir = min(eh * 0.95, ew * 0.55)
        gx, gy = float(mot.gaze[i, 0]) * (ew - ir) * 0.8 + fx(0.1), float(mot.gaze[i, 1]) * eh * 0.3
        P.fill(_arc(ir, ir, n=24, cx=ex + gx, cy=ey + gy), ident.eyes)
        P.fill(_arc(ir * 0.45, ir * 0.45, n=16, cx=ex + gx, cy=ey + gy), (15, 12, 12))
        P.fill(_arc(ir * 0.18, ir * 0.18, n=10, cx=ex + gx + ir * 0.3, cy=ey + gy - ir * 0.3), (250, 250, 250))
        # the skin around the eye hides the iris outside the eye opening
        ring = np.concatenate([_arc(ew, eh, 0, 2 * np.pi, 30, cx=ex, cy=ey), _arc(ew * 1.6, eh * 2.2, 2 * np.pi, 0, 30, cx=ex, cy=ey)])
        P.fill(ring, skin)
        b = float(mot.blink[i])
        th = np.linspace(np.pi, 2 * np.pi, 24)
        top = np.stack([ex + ew * np.cos(th), ey + eh * np.sin(th)], 1)
        lid_edge = np.stack([ex + ew * np.cos(th), ey + eh * np.sin(th) * (1 - 2 * b)], 1)
        if b > 0.02:
            P.fill(np.concatenate([top, lid_edge[::-1]]), _scale(skin, 0.95))
        P.line(lid_edge, (35, 25, 25), max(1.5, 0.012 * S))
        by = ey - (0.2 + ident.brow_arch) * ay - 0.04 * ay * float(mot.brow[i])
        bx = np.linspace(-1.1, 1.1, 9) * ew
        brow = np.stack([ex + bx, by + ident.brow_arch * ay * (bx / ew) ** 2 * 0.8 + side * bx / ew * 0.02 * ay], 1)
        P.line(brow, _scale(hair, 0.9), ident.brow_thick * ay)

    # nose: a soft ridge shadow and nostrils, not dark enough to read as a mouth
    nx, ny = fx(0.75), ident.nose_len * ay + fy(0.6)
    P.line([(nx - 0.02 * ax, 0.0 + fy(0.55)), (nx + 0.03 * ax, ny - 0.05 * ay)], _scale(skin, 0.88), 0.012 * S)
    P.fill(_arc(0.16 * ax, 0.07 * ay, 0, np.pi, 16, cx=nx, cy=ny - 0.02 * ay), _scale(skin, 0.85))
    for side in (-1, 1):
        P.fill(_arc(0.05 * ax, 0.025 * ay, cx=nx + side * 0.08 * ax, cy=ny), _scale(skin, 0.68))
    if ident.beard == "moustache":
        my0 = (ident.nose_len + 0.09) * ay + fy(0.55)
        P.fill(_arc(ident.mouth_w * ax * 1.1, 0.07 * ay, np.pi, 2 * np.pi, 20, cx=fx(0.55), cy=my0 + 0.05 * ay), _mix(hair, skin, 0.25))

    # mouth: lips around a dark opening with the upper teeth showing; upper lip rises 30% of the
    # opening, the lower lip and jaw take the rest
    mx, my = fx(0.55), (ident.nose_len + 0.25) * ay + fy(0.5)
    mw = ident.mouth_w * ax * (0.8 + 0.4 * mouth_width) * math.cos(yaw) ** 0.5
    ut, lt = ident.lip_thick * ay * 0.8, ident.lip_thick * ay
    th = np.linspace(0, np.pi, 24)
    up_in = -0.3 * oh * np.sin(th)
    lo_in = 0.7 * oh * np.sin(th)
    bow = 0.25 * ut * np.exp(-((np.cos(th)) / 0.15) ** 2)  # cupid's bow dip
    upper = np.stack([mx + mw * np.cos(th), my + up_in - ut * np.sin(th) ** 0.7 + bow], 1)
    lower = np.stack([mx + mw * np.cos(th), my + lo_in + lt * np.sin(th) ** 0.8], 1)
    P.fill(np.concatenate([upper, lower[::-1]]), ident.lips)
    if oh > 0.4:
        inner_up = np.stack([mx + 0.88 * mw * np.cos(th), my + up_in * 0.95], 1)
        inner_lo = np.stack([mx + 0.88 * mw * np.cos(th), my + lo_in * 0.95], 1)
        P.fill(np.concatenate([inner_up, inner_lo[::-1]]), (28, 6, 10))
        teeth_lo = np.stack([inner_up[:, 0], np.minimum(inner_up[:, 1] + 0.045 * ay, inner_lo[:, 1])], 1)
        P.fill(np.concatenate([inner_up, teeth_lo[::-1]]), (235, 232, 225))
    P.line(np.stack([mx + 0.9 * mw * np.cos(th), my + 0.2 * oh * np.sin(th)], 1), _scale(ident.lips, 0.55), 0.008 * S)

    # front hair, hat, glasses, mole
    if hs in ("short", "long", "bob", "curly", "bun", "fringe", "side"):
        top = _arc(fw * 1.06, ay * 1.05, np.pi, 2 * np.pi, 40, cx=fx(0.05), cy=-0.02 * ay)
        hairline = {"fringe": -0.32, "side": -0.5, "bob": -0.45}.get(hs, -0.55)
        xs = np.linspace(1, -1, 21)
        if hs == "side":  # parting on one side: the hairline sweeps across the forehead
            edge_y = (hairline + 0.18 * xs) * ay
        else:
            edge_y = (hairline + 0.12 * xs ** 4) * ay
        edge = np.stack([fx(0.05) + xs * fw * 1.06, edge_y + (0.25 * ay) * (np.abs(xs) > 0.92)], 1)
        P.fill(np.concatenate([top, edge]), hair)
    if ident.hat:
        P.fill(_arc(fw * 1.12, ay * 1.1, np.pi, 2 * np.pi, 40, cx=fx(0.05), cy=-0.15 * ay), _scale(ident.clothes, 0.8))
        P.fill([(-1.15 * fw + fx(0.05), -0.5 * ay), (1.15 * fw + fx(0.05), -0.5 * ay),
                (1.15 * fw + fx(0.05), -0.35 * ay), (-1.15 * fw + fx(0.05), -0.35 * ay)], _scale(ident.clothes, 0.6))
    if ident.mole is not None:
        P.fill(_arc(0.025 * ax, 0.025 * ax, cx=ident.mole[0] * ax + fx(0.4), cy=ident.mole[1] * ay + fy(0.4), n=10),
               _scale(skin, 0.55))
    if ident.glasses:
        for side in (-1, 1):
            ex, ey = side * ident.eye_dx * ax + fx(0.6), ident.eye_y * ay + fy(0.55)
            r = ident.eye_w * ax * 1.45
            if ident.glasses == "round":
                P.line(_arc(r, r * 0.85, n=30, cx=ex, cy=ey), ident.glasses_color, 0.012 * S, closed=True)
            else:
                P.line(_arc(r, r * 0.7, n=30, cx=ex, cy=ey, p=4), ident.glasses_color, 0.012 * S, closed=True)
            P.line([(ex + side * r, ey), (side * ear_x - fx(0.25), ey - 0.02 * ay)], ident.glasses_color, 0.01 * S)
        P.line([(-ident.eye_dx * ax + ident.eye_w * ax * 1.45 + fx(0.6), ident.eye_y * ay + fy(0.55)),
                (ident.eye_dx * ax - ident.eye_w * ax * 1.45 + fx(0.6), ident.eye_y * ay + fy(0.55))],
               ident.glasses_color, 0.01 * S)
    out = cv2.resize(np.clip(img, 0, 255), (size, size), interpolation=cv2.INTER_AREA)
    return np.round(out).astype(np.uint8)


def portrait(seed: int, index: int, size: int = 256, speech: str = "espeak") -> np.ndarray:
    """A still, frontal, neutral portrait of identity `index` (mouth shut, eyes open) -> [size, size, 3] uint8."""
    ident = make_identity(seed, index, speech)
    z = np.zeros(1, np.float32)
    still = Motion(z, z, z, z, z, z, np.zeros((1, 2), np.float32), z)
    return render_frame(ident, background(ident, size * SS), size, still, 0, 0.0, 0.5)


# ---------------------------------------------------------------------------------------------
# clips
# ---------------------------------------------------------------------------------------------
def clip_speech(rng, ident: Identity, seconds: float, sr: int = SAMPLE_RATE) -> tuple[np.ndarray, str, dict]:
    """Speech for one clip: silence lead-in, then speech, cut or padded to exactly `seconds`."""
    n = int(round(seconds * sr))
    lead = int(rng.uniform(0.05, 0.6) * sr)
    v = ident.voice
    text = ""
    if v["kind"] == "espeak":
        pitch = int(np.clip(v["pitch"] + rng.integers(-6, 7), 0, 99))
        rate = int(v["rate"] + rng.integers(-12, 13))
        text = random_text(rng, int(seconds * 3.2) + 4)
        try:
            speech = espeak(text, f"{v['accent']}+{v['variant']}", rate, pitch, sr)
            params = dict(pitch=pitch, rate=rate)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            log.warning("espeak failed (%s): babble for this clip", e)
            speech = babble(rng, seconds, BabbleVoice(140, 1.0, 4.5, 0.2, 0.9), sr)
            params = dict(fallback="babble")
    else:
        speech = babble(rng, seconds, BabbleVoice(v["f0"], v["tract"], v["rate"], v["breath"], v["tilt"]), sr)
        params = {}
    out = np.zeros(n, np.float32)
    seg = speech[: max(0, n - lead)]
    out[lead:lead + seg.size] = seg
    fade = min(int(0.02 * sr), seg.size)
    if seg.size >= n - lead and fade:  # cut mid-word: fade out instead of a click
        out[n - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    peak = np.abs(out).max()
    if peak > 0:
        out *= rng.uniform(0.4, 0.9) / peak  # recordings differ in level; the mouth must not
    return out, text, params


class AlignedVideoWriter:
    """media.VideoWriter whose audio frame carries pts 0, so the AAC encoder's priming (1024 samples)
    goes out at negative time and the muxer writes an edit list; without it a reader hears the speech
    64 ms late, which would teach the models a 1.6-frame lip-sync error."""

    def __new__(cls, *args, **kwargs):
        from fractions import Fraction
        from ..media import VideoWriter

        class Writer(VideoWriter):
            def close(self):
                for packet in self.video.encode():
                    self.container.mux(packet)
                if self.audio_stream is not None:
                    import av
                    frame = av.AudioFrame.from_ndarray(self.wave, format="fltp", layout=self.layout)
                    frame.sample_rate, frame.pts, frame.time_base = self.rate, 0, Fraction(1, self.rate)
                    for packet in self.audio_stream.encode(frame):
                        self.container.mux(packet)
                    for packet in self.audio_stream.encode(None):
                        self.container.mux(packet)
                self.container.close()

        return Writer(*args, **kwargs)


def make_clip(out_dir: str, k: int, seed: int, identities: int, seconds: float, size: int, speech: str,
              fps: int = FPS) -> str:
    """Render clip `k` (its identity is k % identities) -> writes <id>.mp4 and <id>.json, returns id."""
    import torch
    ident = make_identity(seed, k % identities, speech)
    rng = np.random.default_rng([seed, 2, k])
    n_frames = int(round(seconds * fps))
    spf = SAMPLE_RATE // fps
    audio, text, vparams = clip_speech(rng, ident, n_frames / fps)
    audio = audio[: n_frames * spf]
    mouth_open, mouth_width = audio_mouth_shape(audio, SAMPLE_RATE, fps, n_frames)
    mot = make_motion(rng, n_frames, fps, ident, mouth_open)
    bg = background(ident, size * SS)
    name = f"{ident.name}_c{k:05d}"
    mp4 = os.path.join(out_dir, name + ".mp4")
    tmp = os.path.join(out_dir, name + ".tmp.mp4")
    writer = AlignedVideoWriter(tmp, fps, size, size, torch.from_numpy(audio), SAMPLE_RATE, crf=17)
    try:
        for i in range(n_frames):
            writer.write(render_frame(ident, bg, size, mot, i, float(mouth_open[i]), float(mouth_width[i]))[None])
    finally:
        writer.close()
    os.replace(tmp, mp4)
    r4 = lambda a: [round(float(x), 4) for x in a]  # noqa: E731
    gt = dict(generator=GENERATOR, version=VERSION, identity=ident.name, voice=ident.voice_name, fps=fps,
              size=size, frames=n_frames, sample_rate=SAMPLE_RATE, text=text, voice_params=vparams,
              mouth_open=r4(mouth_open), mouth_width=r4(mouth_width),
              head_pose=[[round(float(a), 3) for a in p] for p in zip(mot.yaw, mot.pitch, mot.roll)],
              head_pose_order=["yaw", "pitch", "roll"], head_pose_units="degrees",
              blink=r4(mot.blink), identity_params={k_: v for k_, v in asdict(ident).items() if k_ != "voice"})
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(gt, f)
    return name


def _make_clip_star(a):
    return make_clip(*a)


def synthesize(out_dir: str, n: int, seconds: float = 5.0, size: int = 128, seed: int = 0,
               identities: int | None = None, speech: str = "auto", jobs: int | None = None,
               progress: bool = False) -> list[str]:
    """Write n clips into out_dir; returns their ids. Deterministic given the arguments."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if seconds < 0.5:
        raise ValueError(f"--seconds must be at least 0.5, got {seconds}")
    if size < 32 or size % 2:
        raise ValueError(f"--size must be an even number of at least 32 pixels, got {size}")
    identities = identities or max(1, n // 4)
    if identities < 1:
        raise ValueError(f"--identities must be at least 1, got {identities}")
    speech = resolve_speech(speech)
    if speech == "espeak" and not have_espeak():
        raise ValueError("--speech espeak: espeak-ng is not installed (apt-get install espeak-ng), use babble")
    if speech not in ("espeak", "babble"):
        raise ValueError(f"--speech must be auto, espeak or babble, got {speech!r}")
    os.makedirs(out_dir, exist_ok=True)
    tasks = [(out_dir, k, seed, identities, seconds, size, speech) for k in range(n)]
    return parallel_map(_make_clip_star, tasks, jobs, progress)


def cmd_synth(args) -> int:
    t0 = time.perf_counter()
    speech = resolve_speech(args.speech)
    if args.speech == "auto" and speech == "babble":
        # the two voices make different datasets (and held-out sets): a silent fallback makes figures irreproducible
        print("synth: espeak-ng is not installed (apt-get install espeak-ng), so the clips get babble speech; "
              "pass --speech babble to choose it, --speech espeak to require espeak-ng", file=sys.stderr)
    names = synthesize(args.out, args.n, args.seconds, args.size, args.seed, args.identities, speech,
                       args.jobs, progress=True)
    print(f"wrote {len(names)} clips ({args.seconds:g} s, {args.size}x{args.size}, {FPS} fps, speech: {speech}) "
          f"to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("synth", help="procedural talking-face clips with speech and per-frame ground truth")
    p.add_argument("--out", required=True, help="output folder (<id>.mp4 + <id>.json per clip)")
    p.add_argument("--n", type=int, required=True, help="number of clips")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each clip (default 5)")
    p.add_argument("--size", type=int, default=128, help="frame side in pixels (default 128)")
    p.add_argument("--identities", type=int, help="distinct faces (and voices) shared by the clips (default n/4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech", default="auto", choices=("auto", "espeak", "babble"),
                   help="auto: espeak-ng when installed, else the built-in babble synthesiser")
    p.add_argument("--jobs", type=int, help="worker processes (default: all cores)")
    p.set_defaults(fn=cmd_synth)
