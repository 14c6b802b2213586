"""Typed configs and the three presets (tiny / demo / base).

Every size in the package comes from here; a checkpoint stores its config as JSON in its metadata,
so a loader rebuilds the exact module from the file alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field


@dataclass
class VAEConfig:
    """Causal spatiotemporal VAE: video [B, 3, T, H, W] <-> latent [B, Cz, T/tc, H/s, W/s]."""
    latent_channels: int = 16  # Cz
    spatial_compression: int = 16  # s: 8, 16 or 32
    temporal_compression: int = 4  # tc: video frames per latent frame, 4 or 8
    patch_size: int = 4  # space-to-depth at the input; the remaining s / patch is done by 2x downsamples
    channels: tuple = (64, 128, 256)  # width per level; len == log2(s / patch) + 1
    blocks_per_level: int = 1  # residual blocks per level
    temporal_kernel: int = 3  # causal conv kernel along latent time (carried state = kernel - 1 frames)
    scaling_factor: float = 1.0  # latents are multiplied by this before the DiT sees them
    refine_channels: int = 0  # width of the full-resolution pixel refiner after the decoder (0 = none)
    # encoder level at which the tc frames of a latent frame merge: 0 stacks them at the input; L > 0 runs
    # levels < L on every frame apart, so each frame's mouth is seen in full before the pair is compressed.
    # The encoder runs only on the portrait when streaming, so a later merge costs training time, not speed.
    encoder_merge_level: int = 0
    # the decoder's mirror of it: 0 writes the tc frames of a latent frame together from one set of features
    # (its output conv); L > 0 splits the latent frame into its frames at the upsample into decoder level L
    # (levels count from the latent's resolution), so levels >= L draw each frame's mouth from features of its
    # own. It costs decode time, which streaming pays: the split levels run tc times.
    decoder_split_level: int = 0

    def __post_init__(self):
        self.channels = tuple(self.channels)
        levels = self.spatial_compression // self.patch_size
        if self.spatial_compression % self.patch_size or levels & (levels - 1):
            raise ValueError(f"spatial_compression {self.spatial_compression} must be patch_size "
                             f"{self.patch_size} times a power of two")
        if self.refine_channels != 0 and self.refine_channels < 2:
            raise ValueError(f"refine_channels {self.refine_channels} must be 0 (no pixel refiner) or at least 2")
        if len(self.channels) != int(math.log2(levels)) + 1:
            raise ValueError(f"VAE channels {self.channels} need {int(math.log2(levels)) + 1} levels for "
                             f"spatial_compression {self.spatial_compression} / patch {self.patch_size}")
        if not 0 <= self.encoder_merge_level < len(self.channels):
            raise ValueError(f"encoder_merge_level {self.encoder_merge_level} must be a level of the encoder, "
                             f"0..{len(self.channels) - 1}")
        if not 0 <= self.decoder_split_level < len(self.channels):
            raise ValueError(f"decoder_split_level {self.decoder_split_level} must be a level of the decoder, "
                             f"0..{len(self.channels) - 1}")

    @property
    def decoder_output_frames(self) -> int:
        """Frames the decoder's output conv writes per time step: all tc of a latent frame, or 1 once split."""
        return 1 if self.decoder_split_level else self.temporal_compression


@dataclass
class AudioConfig:
    """Log-mel front end + a small valid-convolution network, one feature vector per video frame.

    The encoder sample rate is fps * samples_per_frame, so video frames and mel hops align exactly.
    Feature of video frame i depends on audio of frames [i - context_frames, i + lookahead_frames].
    """
    samples_per_frame: int = 640  # 16 kHz at 25 fps
    mels_per_frame: int = 4  # hop = samples_per_frame / mels_per_frame
    n_fft: int = 400
    n_mels: int = 80
    dim: int = 128  # feature width handed to the DiT
    kernel: int = 3
    dilations: tuple = (1, 2, 4)  # receptive field = 1 + (kernel - 1) * sum(dilations) frames
    lookahead_frames: int = 2  # video frames of future audio each feature may see
    silence_db: float = -50.0  # frame RMS below this (dBFS) -> silence mode (learned null embedding)
    backbone: str = "mel"  # "mel" | "wav2vec2_base" | "hubert_base" (torchaudio.models, user weights)
    backbone_dim: int = 768  # width of the optional backbone's features

    def __post_init__(self):
        self.dilations = tuple(self.dilations)
        if self.samples_per_frame % self.mels_per_frame:
            raise ValueError("samples_per_frame must be a multiple of mels_per_frame")
        if self.lookahead_frames > self.receptive_field - 1:
            raise ValueError("lookahead_frames exceeds the audio network's receptive field")

    @property
    def hop(self) -> int:
        return self.samples_per_frame // self.mels_per_frame

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel - 1) * sum(self.dilations)

    @property
    def context_frames(self) -> int:
        return self.receptive_field - 1 - self.lookahead_frames


@dataclass
class StreamConfig:
    """How the streamer runs: chunk size, ID-Context Cache length, sampler steps."""
    chunk_frames: int = 2  # k: latent frames per chunk
    context_frames: int = 4  # latent frames of K/V kept in the rolling Context-Cache
    steps: int = 2  # Euler steps per chunk (distilled student: 2)
    shift: float = 1.0  # timestep shift of the flow schedule (SD3-style), 1 = uniform

    def __post_init__(self):
        # every entry point (generate's flags, the nodes, init-student, a checkpoint's header) builds one of these,
        # so a bad value is named here rather than as a shape error deep in the DiT
        if self.chunk_frames < 1 or self.steps < 1:
            raise ValueError(f"a stream needs chunk_frames >= 1 and steps >= 1, got chunk_frames {self.chunk_frames}, "
                             f"steps {self.steps}")
        if self.context_frames < 0:
            raise ValueError(f"context_frames must be >= 0 (0: the ID-Sink alone, no rolling Context-Cache), "
                             f"got {self.context_frames}")
        if not self.shift > 0:
            raise ValueError(f"the flow schedule's shift must be > 0, got {self.shift}")


@dataclass
class LatentLayout:
    """What a model over a VAE's latents was trained for: the video's size and rate, and the latent layout."""
    resolution: int = 128  # video H = W
    fps: int = 25
    latent_channels: int = 16
    spatial_compression: int = 16
    temporal_compression: int = 4

    def __post_init__(self):
        if self.resolution % self.spatial_compression:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the spatial compression "
                             f"{self.spatial_compression}")

    @property
    def latent_size(self) -> int:
        return self.resolution // self.spatial_compression


@dataclass
class DiTConfig(LatentLayout):
    """Causal DiT over VAE latent tokens. Holds the latent layout it was trained for."""
    dim: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    audio_context: int = 1  # latent frames of audio on each side of a latent frame's own window
    rope_theta: float = 10000.0
    audio: AudioConfig = field(default_factory=AudioConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)  # how this model was trained to stream

    def __post_init__(self):
        if isinstance(self.audio, dict):
            self.audio = AudioConfig(**self.audio)
        if isinstance(self.stream, dict):
            self.stream = StreamConfig(**self.stream)
        if self.dim % self.heads or (self.dim // self.heads) % 16:
            raise ValueError(f"dim {self.dim} / heads {self.heads} must give a head size divisible by 16 (3D rotary split)")
        super().__post_init__()

    @property
    def tokens_per_frame(self) -> int:
        return self.latent_size ** 2

    @property
    def audio_window(self) -> int:
        """Audio feature vectors (video frames) each latent frame attends to."""
        return (1 + 2 * self.audio_context) * self.temporal_compression


@dataclass
class SyncExpertConfig(LatentLayout):
    """Lip-sync expert over VAE latents (rest_model.sync_expert): the latent layout and audio rate it was trained
    for, and the size of what it judges: `span` latent frames of the latent cells around the mouth against the
    log-mel of the same video frames plus `pad` frames each side, the audio shifted by up to `max_shift` frames."""
    samples_per_frame: int = 640
    span: int = 3  # latent frames per judged window (odd: centred on the frame it scores)
    pad: int = 2  # video frames of audio on each side beyond the span's own
    max_shift: int = 8  # the misaligned candidates: audio shifted by +-shift_step..max_shift video frames
    shift_step: int = 2
    n_mels: int = 40
    mels_per_frame: int = 4
    n_fft: int = 400
    hidden: int = 512
    dim: int = 128  # embedding width of both towers

    def __post_init__(self):
        if self.span < 1 or self.span % 2 == 0:
            raise ValueError(f"span {self.span} must be an odd number of latent frames")
        if self.samples_per_frame % self.mels_per_frame:
            raise ValueError("samples_per_frame must be a multiple of mels_per_frame")
        if not 0 < self.shift_step <= self.max_shift:
            raise ValueError(f"need 0 < shift_step {self.shift_step} <= max_shift {self.max_shift}")
        super().__post_init__()
        if self.n_fft > self.window_frames * self.samples_per_frame:
            raise ValueError(f"n_fft {self.n_fft} is longer than the audio window")

    @property
    def window_frames(self) -> int:
        """Video frames of audio in one judged window."""
        return self.span * self.temporal_compression + 2 * self.pad

    @property
    def margin(self) -> int:
        """Video frames of audio needed beyond a clip's ends to judge its first and last windows at every shift."""
        return self.pad + self.max_shift

    @property
    def shifts(self) -> tuple[int, ...]:
        """Audio shifts of the candidates in video frames, the aligned one (0) in the middle."""
        k = self.max_shift // self.shift_step
        return tuple(i * self.shift_step for i in range(-k, k + 1))


def sync_expert_config(vae: VAEConfig, dit: "DiTConfig", **kw) -> SyncExpertConfig:
    """An expert for the latents of this VAE at the DiT's resolution, frame rate and audio rate."""
    kw.setdefault("hidden", min(2 * dit.dim, 1024))  # sized with the DiT it judges: small for tests, wide for base
    return SyncExpertConfig(resolution=dit.resolution, fps=dit.fps, samples_per_frame=dit.audio.samples_per_frame,
                            **latent_layout(vae), **kw)


@dataclass
class Preset:
    name: str
    vae: VAEConfig
    dit: DiTConfig


def latent_layout(cfg) -> dict:
    """The latent layout a VAE, DiT or lip-sync expert config was built for: what must agree between them."""
    return dict(latent_channels=cfg.latent_channels, spatial_compression=cfg.spatial_compression,
                temporal_compression=cfg.temporal_compression)


def _preset(name, resolution, vae, dit_kw, audio, stream):
    return Preset(name, vae, DiTConfig(resolution=resolution, audio=audio, stream=stream, **latent_layout(vae), **dit_kw))


def tiny() -> Preset:
    vae = VAEConfig(latent_channels=8, spatial_compression=8, temporal_compression=4, patch_size=4,
                    channels=(16, 32))
    audio = AudioConfig(n_mels=32, dim=32, dilations=(1, 2))
    return _preset("tiny", 32, vae, dict(dim=64, depth=2, heads=2, audio_context=1), audio,
                   StreamConfig(chunk_frames=2, context_frames=2, steps=2))


def demo() -> Preset:
    """The shipped out-of-the-box model: 128x128 @ 25 fps, real time on 2 CPU cores.

    Each choice below trades lip-sync against speed on a 12x6-pixel mouth; docs/demo_model.md has the
    measurements behind each. 64 latent channels (not 16): fewer cannot carry the mouth through the VAE, and
    the DiT's cost barely depends on them (only its input and output projections see the channels). 2 frames
    per latent frame (not 4): a latent's frames decode nearly as one still frame, so a coarser latent freezes
    the mouth between syllables. audio_context 2: the same 160 ms of look-ahead at 2 frames per latent.
    encoder_merge_level / decoder_split_level 2: the encoder and decoder see a latent's two frames apart
    through their first levels, so each frame keeps its own mouth.
    """
    vae = VAEConfig(latent_channels=64, spatial_compression=16, temporal_compression=2, patch_size=4,
                    channels=(48, 96, 192), encoder_merge_level=2, decoder_split_level=2)
    audio = AudioConfig(n_mels=64, dim=128)
    return _preset("demo", 128, vae, dict(dim=256, depth=6, heads=4, audio_context=2), audio,
                   StreamConfig(chunk_frames=2, context_frames=4, steps=2))


def base() -> Preset:
    """The paper's scale: 512x512 @ 25 fps, 32x32x8 VAE with 128 latent channels, 28-block DiT."""
    vae = VAEConfig(latent_channels=128, spatial_compression=32, temporal_compression=8, patch_size=4,
                    channels=(128, 256, 512, 512), blocks_per_level=2)
    audio = AudioConfig(n_mels=80, dim=512, dilations=(1, 2, 4, 8))
    return _preset("base", 512, vae, dict(dim=1536, depth=28, heads=24, audio_context=1), audio,
                   StreamConfig(chunk_frames=2, context_frames=4, steps=2))


PRESETS = {"tiny": tiny, "demo": demo, "base": base}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def from_json(cls, text: str):
    data = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**data)


def check_compatible(vae: VAEConfig, dit: DiTConfig) -> None:
    """Raise if the DiT was built for a different latent layout than this VAE produces."""
    want, have = latent_layout(vae), latent_layout(dit)
    diff = [f"{k}: VAE {want[k]} vs DiT {have[k]}" for k in want if want[k] != have[k]]
    if diff:
        raise ValueError("VAE and DiT latent layouts do not match (" + "; ".join(diff) + ")")
