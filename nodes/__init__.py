"""The REST node pack: six thin ComfyUI nodes over rest_model (classic node API, category REST)."""
from .audio_encode import RESTAudioEncode
from .decode_chunk import RESTDecodeChunk
from .id_context_cache import RESTIDContextCache
from .loaders import LoadCausalDiT, LoadRESTVAE
from .streaming_sampler import RESTStreamingSampler

NODE_CLASS_MAPPINGS = {
    "RESTLoadVAE": LoadRESTVAE,
    "RESTLoadCausalDiT": LoadCausalDiT,
    "RESTAudioEncode": RESTAudioEncode,
    "RESTIDContextCache": RESTIDContextCache,
    "RESTStreamingSampler": RESTStreamingSampler,
    "RESTDecodeChunk": RESTDecodeChunk,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "RESTLoadVAE": "Load REST VAE",
    "RESTLoadCausalDiT": "Load Causal DiT",
    "RESTAudioEncode": "Audio Encode",
    "RESTIDContextCache": "ID-Context Cache",
    "RESTStreamingSampler": "Streaming Sampler",
    "RESTDecodeChunk": "Decode Chunk",
}
