"""REST: real-time streaming audio-driven talking heads (arXiv 2512.11229), as a plain PyTorch package.

Never imports ComfyUI; `python -m rest_model` is its command line.
"""
from .config import AudioConfig, DiTConfig, Preset, StreamConfig, VAEConfig, preset
from .vae import CausalVAE
from .dit import CausalDiT
from .id_context_cache import IDContextCache
from .streamer import AudioSource, Chunk, stream, decode_stream
from .checkpoint import CheckpointError, load_dit, load_pair, load_vae, save

__all__ = ["AudioConfig", "DiTConfig", "Preset", "StreamConfig", "VAEConfig", "preset", "CausalVAE",
           "CausalDiT", "IDContextCache", "AudioSource", "Chunk", "stream", "decode_stream",
           "CheckpointError", "load_dit", "load_pair", "load_vae", "save"]
