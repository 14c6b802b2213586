"""The streamer: the one loop that turns a portrait and a speech track into video, chunk by chunk.

Nodes, the command line, benchmarks and any live server call `stream`; none reimplements it.

    1. encode the portrait to one latent frame and compute the ID-Sink once (ID-Context Cache);
    2. for each chunk of k latent frames, as soon as its audio (plus the fixed look-ahead) is there:
       a. encode the audio windows the chunk attends to;
       b. denoise the chunk from noise in `steps` Euler steps, reading the cache;
       c. decode it with the streaming VAE decoder (carried state) and yield the frames;
       d. run the clean chunk once more at t = 0 and commit its K/V to the Context-Cache (after the yield:
          only the next chunk needs it, so live it runs while that chunk's audio arrives).

With `overlap_decode` step c runs on a worker thread (on its own CUDA stream, or on the VAE's own device
when the VAE sits on another GPU than the DiT: TalkingMachines' disaggregation), so the DiT denoises
chunk j + 1 while the VAE decodes chunk j; bit-identical. A chunk comes out as soon as its decode is done
when the stream is waiting for audio anyway (live: no added latency), else after the next chunk is made.

Memory is constant: the cache keeps a fixed window, the audio timeline is trimmed behind the chunk,
and the decoder carries a fixed number of frames.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .audio import StreamingResampler, check_waveform, chunk_lookahead_frames
from .config import StreamConfig, check_compatible
from .dit import CausalDiT, audio_windows
from .errors import NonFiniteError
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

    @classmethod
    def in_pieces(cls, waveform: torch.Tensor, sample_rate: int, seconds: float = 1.0) -> "AudioSource":
        """A whole track handed over as views of `seconds` each, as a live stream gets it: the stream's audio
        timeline then holds a window of it, not a second copy of the whole track (the same frames)."""
        check_waveform(waveform, sample_rate)
        step = max(1, int(sample_rate * seconds))
        return cls((waveform[..., i:i + step] for i in range(0, waveform.shape[-1], step)), sample_rate)


@dataclass
class Chunk:
    index: int  # chunk number in this stream
    first_frame: int  # absolute video frame index of frames[0]
    latent: torch.Tensor  # [1, Cz, k, h, w]
    frames: torch.Tensor | None  # [n, 3, H, W] in [-1, 1]; n < k*tc only for the last chunk
    num_frames: int  # video frames this chunk contributes (the last chunk is cut to the audio)
    state_bytes: int = 0  # what the stream carries: the cache as this chunk was made, the audio, the decoder


def prepare_reference(vae: CausalVAE, dit: CausalDiT, portrait: torch.Tensor) -> torch.Tensor:
    """Portrait [3, H, W] or [1, 3, H, W] in [-1, 1] at the model resolution -> reference latent."""
    check_compatible(vae.cfg, dit.cfg)
    img = portrait if portrait.ndim == 4 else portrait[None]
    r = dit.cfg.resolution
    if img.shape[1:] != (3, r, r):
        raise ValueError(f"portrait must be [3, {r}, {r}] for this model, got {tuple(portrait.shape)}; "
                         f"use media.fit_portrait to crop/resize it")
    p, v = next(dit.parameters()), next(vae.parameters())
    return vae.encode_image(img.to(v.device, v.dtype)).to(p.device, p.dtype)


def new_cache(dit: CausalDiT, ref: torch.Tensor, cfg: StreamConfig, start_frame: int = 0) -> IDContextCache:
    """ID-Context Cache for a stream: the ID-Sink computed once from the reference latent."""
    return IDContextCache(dit.id_sink(ref), cfg.context_frames, dit.cfg.tokens_per_frame, start_frame)


def generate_chunk(dit: CausalDiT, cache: IDContextCache, noise: torch.Tensor, audio: torch.Tensor,
                   times: torch.Tensor) -> torch.Tensor:
    """Denoise one chunk with Euler steps over the cache, then commit its clean K/V (t = 0)."""
    x0 = denoise_chunk(dit, cache, noise, audio, times)
    commit_chunk(dit, cache, x0, audio)
    return x0


def denoise_chunk(dit: CausalDiT, cache: IDContextCache, noise: torch.Tensor, audio: torch.Tensor,
                  times: torch.Tensor) -> torch.Tensor:
    """Denoise one chunk with Euler steps over the cache (which it leaves as it was)."""
    b, k = noise.shape[0], noise.shape[2]

    def velocity(x, t):
        return dit.chunk(x, t.expand(b, k), audio, cache)[0]

    return sample_euler(velocity, noise, times)


def commit_chunk(dit: CausalDiT, cache: IDContextCache, x0: torch.Tensor, audio: torch.Tensor) -> None:
    """Run a finished (clean) chunk once at t = 0 and append its K/V to the Context-Cache."""
    b, k = x0.shape[0], x0.shape[2]
    cache.append(dit.chunk(x0, torch.zeros(b, k, device=x0.device), audio, cache, kv_only=True)[1], k)


# torch's CPU generator (mt19937) keeps only the low 32 bits of its seed; a seed >= 2^63 flips them with this
HIGH_SEED_MIX = 0x9E3779B9


def noise_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index` of a stream of `seed` (0 <= seed < 2^64, the nodes' range).

    Seeds below 2^63 keep their original formula, so their videos stay bit-identical. For s >= 2^63 that
    formula gives exactly what s - 2^63 gives (2^63 * 1_000_003 vanishes modulo 2^63): it is XORed with a
    constant whose low 32 bits are non-zero, the bits the generator actually keeps, so s and s - 2^63
    never share noise.
    """
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2^64 - 1], got {seed}")
    base = (seed * 1_000_003 + index) % (2 ** 63)
    return base if seed < 2 ** 63 else (base ^ HIGH_SEED_MIX) | 2 ** 63


def chunk_noise(seed: int, index: int, shape, device, dtype) -> torch.Tensor:
    """Noise of chunk `index`: a function of (seed, index) only, so a stream is reproducible piecewise."""
    g = torch.Generator().manual_seed(noise_seed(seed, index))
    return torch.randn(shape, generator=g).to(device, dtype)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors or [])


def chunk_decoder(vae: CausalVAE, overlap: bool = False):
    """The streaming VAE decode of consecutive latent chunks as `submit(latent) -> Future((frames [n, 3, H, W],
    carried state bytes))`, and `close()`. Inline, the future is already done. With `overlap`, one worker
    thread decodes in submission order (the carried state chains the chunks) while the caller goes on; on a
    GPU it works on a CUDA stream of its own, which waits for the DiT's kernels that made the latent."""
    device = next(vae.parameters()).device
    side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
    state = None

    @torch.no_grad()  # grad mode is per thread
    def decode(latent: torch.Tensor, ready=None):
        nonlocal state
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if ready is not None:
                side.wait_event(ready)
            frames, state = vae.decode_chunk(latent.to(device), state)
        if side is not None:
            side.synchronize()  # the frames are complete when the future says so
        return frames[0].transpose(0, 1), _nbytes(state)

    if not overlap:
        def submit_inline(latent):
            done = Future()
            done.set_result(decode(latent))
            return done
        return submit_inline, lambda: None
    worker = ThreadPoolExecutor(1, thread_name_prefix="rest-vae-decode")

    def submit(latent):
        ready = None
        if side is not None and latent.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latent.device))
        return worker.submit(decode, latent, ready)
    return submit, worker.shutdown


@torch.no_grad()
def stream(vae: CausalVAE | None, dit: CausalDiT, portrait: torch.Tensor | None, audio: AudioSource, cfg: StreamConfig,
           seed: int = 0, decode: bool = True, start_frame: int = 0,
           callback: Callable[[Chunk], None] | None = None,
           id_sink: list[LayerKV] | None = None, overlap_decode: bool = False) -> Iterator[Chunk]:
    """Yield the talking-head video chunk by chunk for as long as the audio runs.

    `start_frame` is the absolute latent-frame index the stream starts at (positions are relative, so
    it changes nothing but the bookkeeping; a stream hours long behaves like one that just began).
    `callback(chunk)` is called after each chunk: progress bars and interrupts plug in there.
    `id_sink`: the portrait's ID-Sink K/V when already computed (the ID-Context Cache node), so it is
    computed once per portrait, not once per run; the Context-Cache always starts empty.
    `overlap_decode`: decode chunk j on a worker while the DiT makes chunk j + 1 (throughput; the frames are
    the same; offline a chunk comes out one chunk later, live as soon as it is decoded). The VAE may sit on
    another device than the DiT.
    With `decode=False` and an `id_sink`, neither the VAE nor the portrait is needed (None): the stream
    makes latent chunks only, which whoever holds the VAE decodes (the ComfyUI sampler node).
    """
    d = dit.cfg
    k, tc, a = cfg.chunk_frames, d.temporal_compression, d.audio_context
    p = next(dit.parameters())
    enc = dit.audio_encoder
    if vae is not None:
        check_compatible(vae.cfg, dit.cfg)
    elif decode or id_sink is None:
        raise ValueError("stream needs the VAE to encode the portrait or decode the chunks")
    if id_sink is None:
        id_sink = dit.id_sink(prepare_reference(vae, dit, portrait))
    cache = IDContextCache(id_sink, cfg.context_frames, d.tokens_per_frame, start_frame)
    times = flow_schedule(cfg.steps, cfg.shift, p.device)
    lookahead = chunk_lookahead_frames(d)

    timeline, resampler = enc.timeline(), StreamingResampler(audio.sample_rate, enc.sample_rate)
    pieces = iter(audio.pieces)
    submit, close = chunk_decoder(vae, overlap_decode) if decode else (None, lambda: None)
    pending = collections.deque()  # (chunk, its decode): chunks made and not yet handed out
    lag = 1 if overlap_decode and decode else 0

    def hand_out(chunk: Chunk, decoded: Future | None) -> Chunk:
        if decoded is not None:
            frames, decoder_bytes = decoded.result()
            if not torch.isfinite(frames).all():
                raise NonFiniteError(f"chunk {chunk.index}: the VAE decoded NaN/infinite frames (video frames from "
                                     f"{chunk.first_frame}); the VAE's weights are broken: stopped, nothing written")
            chunk.frames, chunk.state_bytes = frames[:chunk.num_frames], chunk.state_bytes + decoder_bytes
        if callback is not None:
            callback(chunk)
        return chunk

    try:
        for j in itertools.count():
            f0, f1 = j * k * tc, (j + 1) * k * tc  # this chunk's video frames
            while not timeline.available(f1 + lookahead):  # wait for the audio the chunk needs
                while pending and pending[0][1] is not None and pending[0][1].done():
                    yield hand_out(*pending.popleft())  # decoded while the audio came: out now, not a chunk later
                piece = next(pieces, None)
                if piece is None:
                    timeline.push(resampler.finish())
                    timeline.finish()
                else:
                    timeline.push(resampler.push(check_waveform(piece, audio.sample_rate)))
            if timeline.finished and f0 >= max(timeline.frames, 1):
                break
            feats = enc.frames(timeline, f0 - a * tc, f1 + a * tc)  # own windows + neighbours
            windows = audio_windows(feats, d).to(p.dtype)
            noise = chunk_noise(seed, j, (1, d.latent_channels, k, d.latent_size, d.latent_size), p.device, p.dtype)
            latent = denoise_chunk(dit, cache, noise, windows, times)
            if not torch.isfinite(latent).all():  # a diverged model would otherwise stream a black video
                raise NonFiniteError(f"chunk {j}: the DiT produced NaN/infinite latents (video frames from {f0}); "
                                     f"the model's weights are broken: stopped, nothing written")
            timeline.trim(f1 - a * tc - d.audio.context_frames)  # the next chunk reads nothing earlier
            n = min(k * tc, timeline.frames - f0) if timeline.finished else k * tc
            carried = cache.nbytes() + _nbytes([timeline.buf])  # + the decoder's, once decoded
            pending.append((Chunk(j, f0, latent, None, n, carried), submit(latent) if decode else None))
            while len(pending) > lag:  # overlapped: chunk j - 1 goes out while chunk j decodes
                yield hand_out(*pending.popleft())
            # the commit pass only serves the next chunk, so it runs after this one went out: live, while the
            # next chunk's audio arrives (a third of the DiT's work off every frame's latency); none after the last
            if not (timeline.finished and f1 >= max(timeline.frames, 1)):
                commit_chunk(dit, cache, latent, windows)
        while pending:
            yield hand_out(*pending.popleft())
    finally:
        close()


def decode_stream(vae: CausalVAE, latents: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Streaming VAE decode of consecutive latent chunks -> frames [n, 3, H, W] per chunk."""
    submit, _ = chunk_decoder(vae)
    for latent in latents:
        yield submit(latent).result()[0]
