"""Streaming Sampler: the one rest_model stream loop, with ComfyUI's progress bar, preview and interrupt."""
from __future__ import annotations

import math
import time

from ..rest_model.config import StreamConfig
from ..rest_model.streamer import AudioSource, stream
from . import host
from .loaders import precision_errors
from .payloads import AUDIO, CACHE, CHUNKS, DIT, LatentChunks, placement, source


def _check_inputs(dit, rc, audio) -> None:
    same = lambda m: (getattr(m, "rest_file", None), placement(m))  # noqa: E731
    if rc.dit is not dit and same(rc.dit) != same(dit):
        raise ValueError(f"the ID-Context Cache was computed with another DiT ({source(rc.dit)}) than the one "
                         f"wired into the Streaming Sampler ({source(dit)}); wire the same Load Causal DiT into both")
    if (audio.sample_rate, audio.fps) != (dit.audio_encoder.sample_rate, dit.cfg.fps):
        raise ValueError(f"the REST_AUDIO was prepared for {audio.fps} fps / {audio.sample_rate} Hz but this DiT "
                         f"needs {dit.cfg.fps} fps / {dit.audio_encoder.sample_rate} Hz; feed Audio Encode this DiT")


class RESTStreamingSampler:
    DESCRIPTION = ("Generates the talking head's latent video chunk by chunk for as long as the audio runs "
                   "(causal DiT + ID-Context Cache, few Euler steps per chunk). Memory per chunk is constant; "
                   "Cancel stops it between chunks.")
    CATEGORY = "REST"
    RETURN_TYPES = (CHUNKS, "STRING")
    RETURN_NAMES = ("chunks", "report")
    OUTPUT_TOOLTIPS = ("The generated latent chunks, for Decode Chunk.",
                       "Chunks, frames, speed and memory per chunk (first / last / peak): shows it stays bounded.")
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
            "preview": ("BOOLEAN", {"default": True, "tooltip": "Show each chunk's last decoded frame as a live "
                                    "preview (one extra VAE decode per chunk)."}),
        }}

    def sample(self, dit, cache, audio, seed=0, steps=2, chunk_frames=2, preview=True):
        _check_inputs(dit, cache, audio)
        cfg = StreamConfig(chunk_frames=chunk_frames, context_frames=cache.context_frames, steps=steps,
                           shift=dit.cfg.stream.shift)
        total = math.ceil(audio.num_frames / (chunk_frames * dit.cfg.temporal_compression))
        progress, device = host.Progress(total), placement(dit)[0]
        out = LatentChunks(fps=dit.cfg.fps, dit_cfg=dit.cfg)
        memory = []

        def on_chunk(chunk):
            out.latents.append(chunk.latent.cpu())
            out.num_frames.append(chunk.num_frames)
            memory.append(host.memory_mb(device))
            progress.update(chunk.index + 1, chunk.frames[-1] if chunk.frames is not None else None)
            host.check_interrupt()  # raising here stops the stream between chunks

        t0 = time.perf_counter()
        with precision_errors(dit):
            for _ in stream(cache.vae, dit, cache.portrait, AudioSource.whole(audio.waveform, audio.sample_rate), cfg,
                            seed=seed, decode=preview, callback=on_chunk, id_sink=cache.cache.sink):
                pass
        return (out, self._report(out, time.perf_counter() - t0, memory, device))

    @staticmethod
    def _report(out, seconds, memory, device):
        n = out.total_frames
        text = (f"{len(out.latents)} chunks, {n} frames ({n / out.fps:.2f} s at {out.fps} fps) generated in "
                f"{seconds:.2f} s ({n / max(seconds, 1e-9):.1f} frames/s)")
        if memory and memory[0] is not None:
            what = "CUDA memory allocated" if device.type == "cuda" else "process memory (RSS)"
            text += (f"\n{what} after chunk 1: {memory[0]:.0f} MiB, after chunk {len(memory)}: {memory[-1]:.0f} MiB, "
                     f"peak: {max(memory):.0f} MiB")
        return text
