"""Stream To Video: latent chunks -> an mp4 (H.264 + AAC) encoded chunk by chunk -> a core VIDEO.

Each chunk is decoded once and its frames are encoded straight away, so no frame batch is ever held:
memory is one chunk of frames whatever the length. The file goes to ComfyUI's temp folder and is handed
on as comfy_api's `VideoFromFile`, which core Save Video copies packet by packet (no re-encode, no frames
in memory) when its format and codec are auto / mp4 / h264.
"""
from __future__ import annotations

import os
import uuid

import av
import torch

from ..rest_model import media
from . import host
from .decode_chunk import DECODE_INPUTS, PASTE_BACK_TIP, decoded_chunks, pasted


class StreamedVideo:
    """What the pack returns for VIDEO outside ComfyUI: the part of comfy_api's VideoInput the pack and its
    tests use (a file on disk, copied packet by packet)."""

    def __init__(self, path: str):
        self.path = path

    def get_stream_source(self) -> str:
        return self.path

    def get_dimensions(self) -> tuple[int, int]:
        with av.open(self.path) as c:
            s = c.streams.video[0]
            return s.width, s.height

    def get_duration(self) -> float:
        with av.open(self.path) as c:
            return float(c.duration / av.time_base)

    def get_container_format(self) -> str:
        with av.open(self.path) as c:
            return c.format.name

    def save_to(self, path: str, format="auto", codec="auto", metadata=None) -> None:
        with av.open(self.path) as src, av.open(path, "w", format="mp4") as dst:
            for k, v in (metadata or {}).items():
                dst.metadata[k] = v if isinstance(v, str) else str(v)
            streams = {s: dst.add_stream_from_template(s) for s in src.streams if s.type in ("video", "audio")}
            for packet in src.demux():
                if packet.stream in streams and packet.dts is not None:
                    packet.stream = streams[packet.stream]
                    dst.mux(packet)


def video_from_file(path: str):
    """ComfyUI's own VIDEO type for a file (comfy_api.input_impl in ComfyUI 0.3.x), or StreamedVideo."""
    try:
        from comfy_api.input_impl import VideoFromFile
    except ImportError:
        return StreamedVideo(path)
    return VideoFromFile(path)


def encode_chunks(vae, chunks, path: str, audio: dict | None = None, paste_back: bool = False) -> int:
    """Decode the chunks and encode their frames into `path` as they come (media.atomic_video: the file
    appears only when complete, an interrupted run leaves nothing); returns the frame count."""
    wave = sr = None
    if audio is not None:
        wave, sr = audio["waveform"][0], int(audio["sample_rate"])  # [C, S] of the one clip
    with torch.no_grad(), media.atomic_video(path, chunks.fps, wave, sr) as writer:
        for frames in decoded_chunks(vae, chunks):
            for batch in (pasted(frames, chunks, even=True) if paste_back else [frames]):
                writer.write(batch)
    return writer.frames


class RESTStreamToVideo:
    DESCRIPTION = ("Decodes the latent chunks one at a time and encodes each chunk's frames into an mp4 (H.264 + "
                   "AAC with the speech) as soon as they exist, so a one-hour video needs the memory of one "
                   "chunk. Hands on a VIDEO for Save Video, which copies the file without re-encoding.")
    CATEGORY = "REST"
    RETURN_TYPES = ("VIDEO", "INT")
    RETURN_NAMES = ("video", "frames")
    OUTPUT_TOOLTIPS = ("The talking-head video with its sound, as a file in ComfyUI's temp folder (Save Video "
                       "copies it to output/).",
                       "Frames written.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(DECODE_INPUTS), "optional": {
            "audio": ("AUDIO", {"tooltip": "The original speech (e.g. Load Audio's output): the video's sound "
                                           "track. Without it the video is silent."}),
            "paste_back": ("BOOLEAN", {"default": False, "tooltip": PASTE_BACK_TIP + " An odd last row or column "
                                       "of the portrait is left out (H.264 needs even sides)."}),
        }}

    def encode(self, vae, chunks, audio=None, paste_back=False):
        path = os.path.join(host.temp_dir(), f"rest_talking_head_{uuid.uuid4().hex[:12]}.mp4")
        n = encode_chunks(vae, chunks, path, audio, paste_back)
        host.log.info("REST Stream To Video: %d frames -> %s", n, path)
        return (video_from_file(path), n)
