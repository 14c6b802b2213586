"""Audio encoder: waveform at any sample rate -> one feature vector per video frame.

Timeline: video frame i owns samples [i * spf, (i + 1) * spf) at the encoder rate fps * spf. Audio
before time 0 is digital silence, and so is audio after the end once the source has finished.
The network is a causal log-mel front end (each mel hop sees only past samples) followed by
*valid* dilated convolutions, so the feature of frame i depends on exactly the audio of frames
[i - context_frames, i + lookahead_frames]: a fixed, documented look-ahead (AudioConfig.lookahead_frames).
Whole-file and incremental encoding both go through `SampleTimeline.segment` -> `AudioEncoder.frames`,
so they compute the same numbers.

Optional backbone (`AudioConfig.backbone`): a wav2vec2 or HuBERT base network from torchaudio.models
replaces the log-mel front end and the convolutions. Its transformer is bidirectional, so to keep the
same fixed look-ahead each frame's feature comes from the backbone run over that frame's own window
of audio, frames [i - context_frames, i + lookahead_frames], with a learned mix of its layers. The
weights are the user's (`load_backbone_weights`, a .safetensors of the torchaudio model's state
dict); nothing is downloaded. The backbone is frozen; only the mix and projection train.

Silence mode (TalkingMachines): a frame whose RMS is below `silence_db` gets a learned null embedding
instead of the network's feature, and training drops audio to the same embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from einops import rearrange

from .config import AudioConfig, DiTConfig


def check_waveform(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Validate and mix down to mono float [S]. Accepts [S], [C, S] or [1, C, S]."""
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"audio sample rate must be a positive integer, got {sample_rate!r}")
    w = torch.as_tensor(waveform)
    if w.ndim == 3:
        if w.shape[0] != 1:
            raise ValueError(f"audio batch of {w.shape[0]} streams: pass one stream at a time")
        w = w[0]
    if w.ndim == 2:  # channels -> mono; a mono track stays a view (an hour of speech is not copied)
        w = w[0] if w.shape[0] == 1 else w.float().mean(0)
    if w.ndim != 1:
        raise ValueError(f"audio waveform must be [samples] or [channels, samples], got {tuple(waveform.shape)}")
    if w.numel() == 0:
        raise ValueError("audio is empty (0 samples)")
    w = w.float()
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"audio contains {bad} NaN or infinite samples")
    return w


class StreamingResampler:
    """Incremental torchaudio resampling whose output equals resampling the whole signal at once.

    torchaudio's polyphase kernel maps each block of `o` input samples to `n` output samples from a
    window of +-width input samples; we resample a window of whole blocks and emit only blocks whose
    window lies inside it, holding back the last few until more input (or the end) arrives.
    """

    def __init__(self, orig_freq: int, new_freq: int):
        g = math.gcd(orig_freq, new_freq)
        self.o, self.n = orig_freq // g, new_freq // g
        self.identity = orig_freq == new_freq
        self.resample = torchaudio.transforms.Resample(orig_freq, new_freq)
        width = getattr(self.resample, "width", 0)
        self.margin = -(-width // self.o) + 1  # blocks of support on each side
        self.buf = torch.zeros(self.margin * self.o)  # blocks [-margin, 0) are silence, as in torchaudio
        self.buf_block = -self.margin  # global block index of buf[0]
        self.next_block = 0
        self.total_in = 0

    def _emit(self, upto_block: int) -> torch.Tensor:
        if upto_block <= self.next_block:
            return torch.zeros(0)
        blocks = self.buf.numel() // self.o
        out = self.resample(self.buf[: blocks * self.o])
        lo, hi = self.next_block - self.buf_block, upto_block - self.buf_block
        y = out[lo * self.n: hi * self.n]
        self.next_block = upto_block
        keep_from = self.next_block - self.margin  # earliest block still needed as support
        drop = keep_from - self.buf_block
        self.buf, self.buf_block = self.buf[drop * self.o:], keep_from
        return y

    def push(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        self.total_in += x.numel()
        self.buf = torch.cat([self.buf, x])
        return self._emit(self.buf_block + self.buf.numel() // self.o - self.margin)

    def finish(self) -> torch.Tensor:
        if self.identity:
            return torch.zeros(0)
        end_block = -(-self.total_in // self.o)
        self.buf = torch.cat([self.buf, torch.zeros((end_block + self.margin) * self.o - self.buf_block * self.o
                                                    - self.buf.numel())])
        y = self._emit(end_block)
        target = -(-self.n * self.total_in // self.o)
        emitted = end_block * self.n
        return y[: y.numel() - (emitted - target)] if emitted > target else y


class SampleTimeline:
    """Bounded buffer of encoder-rate samples addressed by video frame index.

    Frames before 0 read as silence; frames past the end read as silence once `finished`. Memory is
    bounded by `trim`, which the streamer calls with the earliest frame it will still ask for.
    """

    def __init__(self, samples_per_frame: int, lead: int):
        self.spf, self.lead = samples_per_frame, lead  # lead: extra samples before a segment (mel window)
        self.buf = torch.zeros(0)
        self.start = 0  # global sample index of buf[0]
        self.finished = False

    @property
    def end(self) -> int:
        return self.start + self.buf.numel()

    def push(self, samples: torch.Tensor):
        if self.finished:
            raise RuntimeError("audio source already finished")
        self.buf = torch.cat([self.buf, samples])

    def finish(self):
        self.finished = True

    @property
    def frames(self) -> int:
        """Frames the source covers so far (a partial last frame counts once finished)."""
        return -(-self.end // self.spf) if self.finished else self.end // self.spf

    def available(self, upto_frame: int) -> bool:
        return self.finished or self.end >= upto_frame * self.spf

    def segment(self, f0: int, f1: int) -> torch.Tensor:
        """Samples [f0 * spf - lead, f1 * spf), zero outside the known audio."""
        a, b = f0 * self.spf - self.lead, f1 * self.spf
        if a < self.start and a >= 0:
            raise RuntimeError(f"samples from {a} were trimmed (buffer starts at {self.start})")
        if not self.available(f1):
            raise RuntimeError(f"audio up to frame {f1} has not arrived yet")
        lo, hi = max(a, self.start), min(b, self.end)
        mid = self.buf[lo - self.start: hi - self.start] if hi > lo else torch.zeros(0)
        return torch.cat([torch.zeros(max(0, min(b, self.start) - a) if a < 0 else 0), mid,
                          torch.zeros(max(0, b - max(hi, a, 0)))])[: b - a]

    def trim(self, keep_from_frame: int):
        cut = keep_from_frame * self.spf - self.lead - self.start
        if cut > 0:
            self.buf, self.start = self.buf[cut:], self.start + cut


BACKBONES = {"wav2vec2_base": torchaudio.models.wav2vec2_base, "hubert_base": torchaudio.models.hubert_base}
BACKBONE_RATE = 16000  # both were trained on 16 kHz speech


def build_backbone(name: str) -> nn.Module:
    """The frozen torchaudio architecture, with dropout and layer drop off so it is deterministic."""
    if name not in BACKBONES:
        raise ValueError(f"unknown audio backbone {name!r}; choose mel or one of {sorted(BACKBONES)}")
    model = BACKBONES[name](encoder_projection_dropout=0.0, encoder_attention_dropout=0.0,
                            encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_drop=0.0)
    return model.eval().requires_grad_(False)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig, fps: int):
        super().__init__()
        self.cfg, self.fps = cfg, fps
        self.sample_rate = fps * cfg.samples_per_frame
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels,
            center=False, power=2.0)
        self.backbone = None
        if cfg.backbone != "mel":
            if self.sample_rate != BACKBONE_RATE:
                raise ValueError(f"audio backbone {cfg.backbone} needs a {BACKBONE_RATE} Hz encoder rate; "
                                 f"fps {fps} x samples_per_frame {cfg.samples_per_frame} = {self.sample_rate}")
            self.backbone = build_backbone(cfg.backbone)
            n_layers = len(self.backbone.encoder.transformer.layers)
            self.layer_mix = nn.Parameter(torch.zeros(n_layers))  # softmax weights over layers (SUPERB)
            self.proj_in = nn.Linear(cfg.backbone_dim, cfg.dim)
        else:
            self.proj_in = nn.Linear(cfg.mels_per_frame * cfg.n_mels, cfg.dim)
        convs = cfg.dilations if self.backbone is None else ()
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in convs)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.dim, cfg.dim, cfg.kernel, dilation=d) for d in convs)
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.null = nn.Parameter(torch.zeros(cfg.dim))  # silence-mode embedding

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # frozen: never in training mode
        return self

    def load_backbone_weights(self, path: str) -> None:
        """User-supplied backbone weights: a .safetensors of the torchaudio model's state dict."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        if self.backbone is None:
            raise ValueError("this audio encoder has no backbone (AudioConfig.backbone is 'mel')")
        try:
            sd = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"audio backbone weights {path}: not a readable .safetensors file: {e}") from None
        missing, unexpected = self.backbone.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"audio backbone weights {path} do not fit {self.cfg.backbone}: "
                             f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:2]})")

    def _backbone_frames(self, seg: torch.Tensor, n: int) -> torch.Tensor:
        """Samples of frames [f0 - context, f1 + lookahead) -> [1, n, dim], one backbone window per frame."""
        c, spf = self.cfg, self.cfg.samples_per_frame
        span = c.context_frames + 1 + c.lookahead_frames
        windows = seg.unfold(0, span * spf, spf)[:n]  # (n, span * spf): frame i's own window
        layers, _ = self.backbone.extract_features(windows)
        h = torch.einsum("l,lntd->ntd", self.layer_mix.softmax(0), torch.stack(layers))
        # the conv front end's output j reads samples [320 j, 320 j + 400): keep those centred in the frame
        centres = torch.arange(h.shape[1], device=h.device) * 320 + 200
        own = (centres >= c.context_frames * spf) & (centres < (c.context_frames + 1) * spf)
        return self.proj_in(h[:, own].mean(1))[None]

    @property
    def lead(self) -> int:
        """Samples before a frame's own that its first mel window reads (causal STFT)."""
        return self.cfg.n_fft - self.cfg.hop

    def timeline(self) -> SampleTimeline:
        return SampleTimeline(self.cfg.samples_per_frame, self.lead)

    def frames(self, tl: SampleTimeline, f0: int, f1: int) -> torch.Tensor:
        """Features of video frames [f0, f1) -> [1, f1 - f0, dim]."""
        c = self.cfg
        seg = tl.segment(f0 - c.context_frames, f1 + c.lookahead_frames).to(self.null.device)
        if self.backbone is not None:
            x = self.norm_out(self._backbone_frames(seg[self.lead:], f1 - f0))
        else:
            x = self._mel_frames(seg)
        own = rearrange(seg[self.lead + c.context_frames * c.samples_per_frame:][: (f1 - f0) * c.samples_per_frame],
                        "(t s) -> t s", s=c.samples_per_frame)
        rms_db = 10 * torch.log10(own.pow(2).mean(-1).clamp_min(1e-12))
        speaking = (rms_db > c.silence_db)[None, :, None]
        return torch.where(speaking, x, self.null.expand_as(x))

    def _mel_frames(self, seg: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        mel = self.mel(seg[None])  # (1, n_mels, frames * m): hop j reads samples up to its own end
        logmel = (torch.log10(mel.clamp_min(1e-8)) + 4.0) / 4.0
        x = self.proj_in(rearrange(logmel, "b f (t m) -> b t (m f)", m=c.mels_per_frame))
        for norm, conv in zip(self.norms, self.convs):
            shrink = (c.kernel - 1) * conv.dilation[0]
            h = conv(F.gelu(norm(x)).transpose(1, 2)).transpose(1, 2)
            x = x[:, shrink:] + h  # valid conv: output p is aligned with the last input of its window
        return self.norm_out(x)  # (1, f1 - f0, dim)

    def encode(self, waveform: torch.Tensor, sample_rate: int, n_frames: int | None = None) -> torch.Tensor:
        """Whole waveform -> features [1, n_frames, dim]; n_frames defaults to the audio's duration."""
        tl = self.timeline()
        tl.push(prepare_audio(waveform, sample_rate, self.sample_rate))
        tl.finish()
        return self.frames(tl, 0, n_frames if n_frames is not None else tl.frames)


def prepare_audio(waveform, sample_rate: int, target_rate: int) -> torch.Tensor:
    w = check_waveform(waveform, sample_rate)
    return w if sample_rate == target_rate else torchaudio.functional.resample(w, sample_rate, target_rate)


def num_video_frames(num_samples: int, sample_rate: int, fps: int) -> int:
    """Video frames that cover the audio: ceil(duration * fps), at least 1."""
    return max(1, -(-num_samples * fps // sample_rate))


def chunk_lookahead_frames(cfg: DiTConfig) -> int:
    """Video frames of audio past a chunk's last frame that generating the chunk needs."""
    return cfg.audio_context * cfg.temporal_compression + cfg.audio.lookahead_frames
