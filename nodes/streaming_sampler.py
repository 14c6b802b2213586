"""Streaming Sampler: the one rest_model stream loop, with ComfyUI's progress bar, preview and interrupt."""
from __future__ import annotations

import math
import time

import torch

from ..rest_model.config import StreamConfig
from ..rest_model.id_context_cache import LayerKV
from ..rest_model.streamer import AudioSource, stream
from . import host, managed
from .loaders import precision_errors
from .payloads import AUDIO, CACHE, CHUNKS, DIT, VAE, LatentChunks

PREVIEW_SECONDS = 1.0  # one preview frame per second of video


def check_inputs(dit, cache, audio) -> None:
    """Refuse a cache or speech prepared for another DiT, naming both."""
    if cache.dit != dit.identity:
        raise ValueError(f"the ID-Context Cache was computed with another DiT ({cache.dit}) than the one wired into "
                         f"the Streaming Sampler ({dit.identity}); wire the same Load Causal DiT into both")
    want = (dit.module.audio_encoder.sample_rate, dit.cfg.fps)
    if (audio.sample_rate, audio.fps) != want:
        raise ValueError(f"the REST_AUDIO was prepared for {audio.fps} fps / {audio.sample_rate} Hz but this DiT "
                         f"needs {want[1]} fps / {want[0]} Hz; feed Audio Encode this DiT")


def audio_pieces(audio, seconds: float = 1.0) -> AudioSource:
    """The speech as one-second views, as a live stream would get it: the stream's audio timeline then holds
    a window of it, not a second copy of the whole track (10 min of speech at 16 kHz is 38 MB a copy)."""
    return AudioSource.in_pieces(audio.waveform, audio.sample_rate, seconds)


def preview_every(dit_cfg, chunk_frames: int) -> int:
    """Chunks between two previews: about one per PREVIEW_SECONDS of video, whatever the chunk size."""
    return max(1, math.ceil(PREVIEW_SECONDS * dit_cfg.fps / (chunk_frames * dit_cfg.temporal_compression)))


@torch.no_grad()
def preview_frame(vae_module, latent: torch.Tensor) -> torch.Tensor:
    """A chunk's last frame for the live preview: its last latent frame decoded on its own (no carried
    decoder state, so a fraction of a chunk's decode; the exact frames come from Decode Chunk / Stream To
    Video, which decode every chunk once)."""
    p = next(vae_module.parameters())
    return vae_module.decode_chunk(latent[:, :, -1:].to(p.device, p.dtype), None)[0][0, :, -1]  # [3, H, W]


class RESTStreamingSampler:
    DESCRIPTION = ("Generates the talking head's latent video chunk by chunk for as long as the audio runs "
                   "(causal DiT + ID-Context Cache, few Euler steps per chunk). Memory per chunk is constant; "
                   "Cancel stops it between chunks. Decoding is left to Decode Chunk / Stream To Video.")
    CATEGORY = "REST"
    RETURN_TYPES = (CHUNKS, "STRING")
    RETURN_NAMES = ("chunks", "report")
    OUTPUT_TOOLTIPS = ("The generated latent chunks, for Decode Chunk or Stream To Video.",
                       "Chunks, frames, speed and memory per chunk (first / last / peak): shows it stays bounded; "
                       "plus what the ID-Context Cache noticed about the portrait.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (DIT, {"tooltip": "The causal DiT (the same one the ID-Context Cache was built with)."}),
            "cache": (CACHE, {"tooltip": "The portrait's ID-Context Cache (ID-Sink computed once)."}),
            "audio": (AUDIO, {"tooltip": "Speech from Audio Encode; the video lasts as long as it does."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed. Each chunk's noise depends only on (seed, chunk index)."}),
            "steps": ("INT", {"default": 2, "min": 1, "max": 100, "tooltip":
                              "Euler steps per chunk. The distilled student is trained for 2; more is slower."}),
            "chunk_frames": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip":
                                     "Latent frames generated per chunk (each is temporal-compression video "
                                     "frames). The model was trained with 2; bigger = fewer, longer steps."}),
            "preview": ("BOOLEAN", {"default": True, "tooltip": "Show a live preview frame about once per second "
                                    "of video (needs the VAE wired in; costs a small part of one chunk's decode)."}),
        }, "optional": {
            "vae": (VAE, {"tooltip": "The REST VAE, for the live preview only: the chunks are decoded once, "
                                     "downstream."}),
        }}

    def sample(self, dit, cache, audio, seed=0, steps=2, chunk_frames=2, preview=True, vae=None):
        check_inputs(dit, cache, audio)
        cfg = StreamConfig(chunk_frames=chunk_frames, context_frames=cache.context_frames, steps=steps,
                           shift=dit.cfg.stream.shift)
        total = math.ceil(audio.num_frames / (chunk_frames * dit.cfg.temporal_compression))
        dit_m, vae_m = managed.use(dit, vae if preview else None)
        device = next(dit_m.parameters()).device
        sink = [LayerKV(kv.k.to(device), kv.v.to(device)) for kv in cache.sink]  # no copy when already there
        progress, every = host.Progress(total), preview_every(dit.cfg, chunk_frames)
        out = LatentChunks(dit.cfg.fps, dit.cfg, spill_dir=host.temp_dir(), original=cache.original,
                           framing=cache.framing)
        memory = []

        def on_chunk(chunk):
            out.append(chunk.latent, chunk.num_frames)  # stays on the device (or spills to disk when long)
            memory.append(host.memory_mb(device))
            shown = vae_m is not None and (chunk.index % every == 0 or chunk.index + 1 == total)
            progress.update(chunk.index + 1, preview_frame(vae_m, chunk.latent) if shown else None)
            host.check_interrupt()  # raising here stops the stream between chunks

        t0 = time.perf_counter()
        with precision_errors(dit.dtype):
            for _ in stream(None, dit_m, None, audio_pieces(audio), cfg,
                            seed=seed, decode=False, callback=on_chunk, id_sink=sink):
                pass
        notes = list(cache.notes)
        if preview and vae is None:
            notes.append("No live preview: wire the VAE into the Streaming Sampler's vae input to see one.")
        return (out, self._report(out, time.perf_counter() - t0, memory, device, notes))

    @staticmethod
    def _report(out, seconds, memory, device, notes):
        n = out.total_frames
        text = (f"{len(out)} chunks, {n} frames ({n / out.fps:.2f} s at {out.fps} fps) generated in "
                f"{seconds:.2f} s ({n / max(seconds, 1e-9):.1f} frames/s)")
        if memory and memory[0] is not None:
            what = "CUDA memory allocated" if device.type == "cuda" else "process memory (RSS)"
            text += (f"\n{what} after chunk 1: {memory[0]:.0f} MiB, after chunk {len(memory)}: {memory[-1]:.0f} MiB, "
                     f"peak: {max(memory):.0f} MiB")
        return "\n".join([text, *notes])
