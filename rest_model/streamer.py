"""The streamer: the one loop that turns a portrait and a speech track into video, chunk by chunk.

Nodes, the command line, benchmarks and any live server call `stream`; none reimplements it.

    1. encode the portrait to one latent frame and compute the ID-Sink once (ID-Context Cache);
    2. for each chunk of k latent frames, as soon as its audio (plus the fixed look-ahead) is there:
       a. encode the audio windows the chunk attends to;
       b. denoise the chunk from noise in `steps` Euler steps, reading the cache;
       c. run the clean chunk once more at t = 0 and commit its K/V to the Context-Cache;
       d. decode it with the streaming VAE decoder (carried state) and yield the frames.

Memory is constant: the cache keeps a fixed window, the audio timeline is trimmed behind the chunk,
and the decoder carries a fixed number of frames.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .audio import StreamingResampler, check_waveform, chunk_lookahead_frames
from .config import StreamConfig, check_compatible
from .dit import CausalDiT, audio_windows
from .id_context_cache import IDContextCache, LayerKV
from .sampler import flow_schedule, sample_euler
from .vae import CausalVAE


@dataclass
class AudioSource:
    """Speech for a stream: the whole waveform, or pieces that arrive while the stream runs."""
    pieces: Iterable[torch.Tensor]  # each [samples] or [channels, samples]
    sample_rate: int

    @classmethod
    def whole(cls, waveform: torch.Tensor, sample_rate: int) -> "AudioSource":
        check_waveform(waveform, sample_rate)
        return cls([waveform], sample_rate)


@dataclass
class Chunk:
    index: int  # chunk number in this stream
    first_frame: int  # absolute video frame index of frames[0]
    latent: torch.Tensor  # [1, Cz, k, h, w]
    frames: torch.Tensor | None  # [n, 3, H, W] in [-1, 1]; n < k*tc only for the last chunk
    num_frames: int  # video frames this chunk contributes (the last chunk is cut to the audio)
    state_bytes: int = 0  # everything the stream carries to the next chunk: cache, audio, decoder


def prepare_reference(vae: CausalVAE, dit: CausalDiT, portrait: torch.Tensor) -> torch.Tensor:
    """Portrait [3, H, W] or [1, 3, H, W] in [-1, 1] at the model resolution -> reference latent."""
    check_compatible(vae.cfg, dit.cfg)
    img = portrait if portrait.ndim == 4 else portrait[None]
    r = dit.cfg.resolution
    if img.shape[1:] != (3, r, r):
        raise ValueError(f"portrait must be [3, {r}, {r}] for this model, got {tuple(portrait.shape)}; "
                         f"use media.fit_portrait to crop/resize it")
    p = next(dit.parameters())
    return vae.encode_image(img.to(p.device, p.dtype))


def new_cache(dit: CausalDiT, ref: torch.Tensor, cfg: StreamConfig, start_frame: int = 0) -> IDContextCache:
    """ID-Context Cache for a stream: the ID-Sink computed once from the reference latent."""
    return IDContextCache(dit.id_sink(ref), cfg.context_frames, dit.cfg.tokens_per_frame, start_frame)


def generate_chunk(dit: CausalDiT, cache: IDContextCache, noise: torch.Tensor, audio: torch.Tensor,
                   times: torch.Tensor) -> torch.Tensor:
    """Denoise one chunk with Euler steps over the cache, then commit its clean K/V (t = 0)."""
    b, k = noise.shape[0], noise.shape[2]

    def velocity(x, t):
        return dit.chunk(x, t.expand(b, k), audio, cache)[0]

    x0 = sample_euler(velocity, noise, times)
    commit_chunk(dit, cache, x0, audio)
    return x0


def commit_chunk(dit: CausalDiT, cache: IDContextCache, x0: torch.Tensor, audio: torch.Tensor) -> None:
    """Run a finished (clean) chunk once at t = 0 and append its K/V to the Context-Cache."""
    b, k = x0.shape[0], x0.shape[2]
    cache.append(dit.chunk(x0, torch.zeros(b, k, device=x0.device), audio, cache)[1], k)


def chunk_noise(seed: int, index: int, shape, device, dtype) -> torch.Tensor:
    """Noise of chunk `index`: a function of (seed, index) only, so a stream is reproducible piecewise."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))
    return torch.randn(shape, generator=g).to(device, dtype)


@torch.no_grad()
def stream(vae: CausalVAE, dit: CausalDiT, portrait: torch.Tensor, audio: AudioSource, cfg: StreamConfig,
           seed: int = 0, decode: bool = True, start_frame: int = 0,
           callback: Callable[[Chunk], None] | None = None,
           id_sink: list[LayerKV] | None = None) -> Iterator[Chunk]:
    """Yield the talking-head video chunk by chunk for as long as the audio runs.

    `start_frame` is the absolute latent-frame index the stream starts at (positions are relative, so
    it changes nothing but the bookkeeping; a stream hours long behaves like one that just began).
    `callback(chunk)` is called after each chunk: progress bars and interrupts plug in there.
    `id_sink`: the portrait's ID-Sink K/V when already computed (the ID-Context Cache node), so it is
    computed once per portrait, not once per run; the Context-Cache always starts empty.
    """
    d = dit.cfg
    k, tc, a = cfg.chunk_frames, d.temporal_compression, d.audio_context
    p = next(dit.parameters())
    enc = dit.audio_encoder
    check_compatible(vae.cfg, dit.cfg)
    if id_sink is None:
        id_sink = dit.id_sink(prepare_reference(vae, dit, portrait))
    cache = IDContextCache(id_sink, cfg.context_frames, d.tokens_per_frame, start_frame)
    times = flow_schedule(cfg.steps, cfg.shift, p.device)
    lookahead = chunk_lookahead_frames(d)

    timeline, resampler = enc.timeline(), StreamingResampler(audio.sample_rate, enc.sample_rate)
    pieces = iter(audio.pieces)
    decoder_state = None

    for j in itertools.count():
        f0, f1 = j * k * tc, (j + 1) * k * tc  # this chunk's video frames
        while not timeline.available(f1 + lookahead):  # wait for the audio the chunk needs
            piece = next(pieces, None)
            if piece is None:
                timeline.push(resampler.finish())
                timeline.finish()
            else:
                timeline.push(resampler.push(check_waveform(piece, audio.sample_rate)))
        if timeline.finished and f0 >= max(timeline.frames, 1):
            return
        feats = enc.frames(timeline, f0 - a * tc, f1 + a * tc)  # own windows + neighbours
        windows = audio_windows(feats, d).to(p.dtype)
        noise = chunk_noise(seed, j, (1, d.latent_channels, k, d.latent_size, d.latent_size), p.device, p.dtype)
        latent = generate_chunk(dit, cache, noise, windows, times)
        timeline.trim(f1 - a * tc - d.audio.context_frames)  # the next chunk reads nothing earlier
        frames = None
        if decode:
            frames, decoder_state = vae.decode_chunk(latent, decoder_state)
            frames = frames[0].transpose(0, 1)  # (n, 3, H, W)
        n = min(k * tc, timeline.frames - f0) if timeline.finished else k * tc
        carried = cache.nbytes() + timeline.buf.numel() * timeline.buf.element_size() \
            + sum(t.numel() * t.element_size() for t in decoder_state or [])
        chunk = Chunk(j, f0, latent, frames[:n] if frames is not None else None, n, carried)
        if callback is not None:
            callback(chunk)
        yield chunk


@torch.no_grad()
def decode_stream(vae: CausalVAE, latents: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Streaming VAE decode of consecutive latent chunks -> frames [n, 3, H, W] per chunk."""
    state = None
    for latent in latents:
        frames, state = vae.decode_chunk(latent, state)
        yield frames[0].transpose(0, 1)
