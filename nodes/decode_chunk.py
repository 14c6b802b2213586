"""Decode Chunk: latent chunks -> ComfyUI IMAGE frames, with the streaming VAE decoder."""
from __future__ import annotations

from typing import Iterator

import torch

from ..rest_model.checkpoint import CheckpointError
from ..rest_model.config import check_compatible
from ..rest_model.framing import paste_back
from ..rest_model.streamer import decode_stream
from . import host, managed
from .payloads import CHUNKS, VAE


def decoded_chunks(vae, chunks) -> Iterator[torch.Tensor]:
    """Each chunk's video frames [n, 3, H, W] in [-1, 1], on the VAE's device, decoded once in order with the
    carried decoder state; with a progress bar and Cancel between chunks."""
    try:
        check_compatible(vae.cfg, chunks.dit_cfg)
    except ValueError as e:
        raise CheckpointError(f"these latent chunks cannot be decoded by {vae.file}: {e}") from None
    if not len(chunks):
        raise ValueError("no latent chunks to decode (the Streaming Sampler produced none)")
    vae_m, = managed.use(vae)
    p = next(vae_m.parameters())
    progress = host.Progress(len(chunks))
    latents = (z.to(p.device, p.dtype) for z in chunks)  # a no-op for chunks already there
    for j, (frames, n) in enumerate(zip(decode_stream(vae_m, latents), chunks.num_frames)):
        host.check_interrupt()
        yield frames[:n]
        progress.update(j + 1)


# the inputs Decode Chunk and Stream To Video share
DECODE_INPUTS = {
    "vae": (VAE, {"tooltip": "The REST VAE (the one the ID-Context Cache used)."}),
    "chunks": (CHUNKS, {"tooltip": "Latent chunks from the Streaming Sampler."}),
}
PASTE_BACK_TIP = ("Composite the generated face into the original portrait at its full resolution, with a "
                  "feathered edge (the framing the ID-Context Cache chose). Off: the model's square.")


def pasted(frames: torch.Tensor, chunks, even: bool = False) -> Iterator[torch.Tensor]:
    """Frames [n, 3, s, s] -> each as the original portrait [1, 3, H, W] with the frame pasted where the face
    was framed (CPU, where the original is), one at a time: a photo's frames are large. `even`: H.264 wants
    even sides, an odd last row/column is left out."""
    h, w = chunks.original.shape[1:]
    if even:
        h, w = h // 2 * 2, w // 2 * 2
    for i in range(len(frames)):
        yield paste_back(frames[i:i + 1].float().cpu(), chunks.original, chunks.framing)[:, :, :h, :w]


class RESTDecodeChunk:
    DESCRIPTION = ("Decodes the latent chunks one at a time with the streaming (causal) VAE decoder, so decoder "
                   "memory stays the same for a 5-second or a 5-hour video; frames go into one preallocated "
                   "IMAGE batch for graphs that post-process frames. For long videos use Stream To Video, which "
                   "never holds the frames.")
    CATEGORY = "REST"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video frames [N, H, W, 3] in [0, 1], N = the Audio Encode frame count.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(DECODE_INPUTS), "optional": {
            "paste_back": ("BOOLEAN", {"default": False, "tooltip": PASTE_BACK_TIP}),
        }}

    def decode(self, vae, chunks, paste_back=False):
        frames, i = None, 0
        with torch.no_grad():
            for chunk in decoded_chunks(vae, chunks):
                for batch in (pasted(chunk, chunks) if paste_back else [chunk]):
                    rgb = ((batch.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()  # (n, H, W, 3)
                    if frames is None:  # allocated once, so peak memory is the output plus one chunk
                        frames = torch.empty(chunks.total_frames, *rgb.shape[1:])
                    frames[i:i + len(rgb)] = rgb
                    i += len(rgb)
        return (frames,)
