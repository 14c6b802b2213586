"""The REST node pack: seven thin ComfyUI nodes over rest_model (classic node API, category REST).

The keys are the ones saved in users' workflows: they never change. A node whose inputs changed keeps
its key and accepts what old workflows send (new inputs are optional).
"""
from .audio_encode import RESTAudioEncode
from .decode_chunk import RESTDecodeChunk
from .loaders import LoadCausalDiT, LoadRESTVAE
from .reference import RESTIDContextCache
from .streaming_sampler import RESTStreamingSampler
from .video_output import RESTStreamToVideo

NODE_CLASS_MAPPINGS = {
    "RESTLoadVAE": LoadRESTVAE,
    "RESTLoadCausalDiT": LoadCausalDiT,
    "RESTAudioEncode": RESTAudioEncode,
    "RESTIDContextCache": RESTIDContextCache,
    "RESTStreamingSampler": RESTStreamingSampler,
    "RESTDecodeChunk": RESTDecodeChunk,
    "RESTStreamToVideo": RESTStreamToVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "RESTLoadVAE": "Load REST VAE",
    "RESTLoadCausalDiT": "Load Causal DiT",
    "RESTAudioEncode": "Audio Encode",
    "RESTIDContextCache": "ID-Context Cache",
    "RESTStreamingSampler": "Streaming Sampler",
    "RESTDecodeChunk": "Decode Chunk",
    "RESTStreamToVideo": "Stream To Video",
}
