"""Decode Chunk: latent chunks -> ComfyUI IMAGE frames, with the streaming VAE decoder."""
from __future__ import annotations

import torch

from ..rest_model.checkpoint import CheckpointError
from ..rest_model.config import check_compatible
from ..rest_model.streamer import decode_stream
from . import host
from .payloads import CHUNKS, VAE, placement, source


class RESTDecodeChunk:
    DESCRIPTION = ("Decodes the latent chunks one at a time with the streaming (causal) VAE decoder, so decoder "
                   "memory stays the same for a 5-second or a 5-hour video; frames go straight into one "
                   "preallocated IMAGE batch for Create Video.")
    CATEGORY = "REST"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames [N, H, W, 3] in [0, 1], N = the Audio Encode frame count.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, {"tooltip": "The REST VAE (the one the ID-Context Cache used)."}),
            "chunks": (CHUNKS, {"tooltip": "Latent chunks from the Streaming Sampler."}),
        }}

    def decode(self, vae, chunks):
        if chunks.dit_cfg is not None:
            try:
                check_compatible(vae.cfg, chunks.dit_cfg)
            except ValueError as e:
                raise CheckpointError(f"these latent chunks cannot be decoded by {source(vae)}: {e}") from None
        if not chunks.latents:
            raise ValueError("no latent chunks to decode (the Streaming Sampler produced none)")
        device, dtype = placement(vae)
        progress, frames, i = host.Progress(len(chunks.latents)), None, 0
        latents = (z.to(device, dtype) for z in chunks.latents)
        for j, (batch, n) in enumerate(zip(decode_stream(vae, latents), chunks.num_frames)):
            host.check_interrupt()
            rgb = ((batch[:n].float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()  # (n, H, W, 3)
            if frames is None:  # allocated once, so peak memory is the output plus one chunk
                frames = torch.empty(chunks.total_frames, *rgb.shape[1:])
            frames[i:i + n] = rgb
            i += n
            progress.update(j + 1)
        return (frames,)
