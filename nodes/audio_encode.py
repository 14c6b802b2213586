"""Audio Encode: ComfyUI AUDIO -> REST_AUDIO at the DiT's audio-encoder rate, aligned to video frames."""
from __future__ import annotations

from ..rest_model.audio import num_video_frames, prepare_audio
from .host import log
from .payloads import AUDIO, DIT, RestAudio


class RESTAudioEncode:
    DESCRIPTION = ("Prepares speech for the DiT's streaming audio encoder: mono, resampled so each video "
                   "frame owns a fixed slice of samples. Reports the duration and the frame count the video "
                   "will have. (Features are computed chunk by chunk inside the stream, with a fixed "
                   "look-ahead, so hours of audio cost no more than seconds.)")
    CATEGORY = "REST"
    RETURN_TYPES = (AUDIO, "INT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("rest_audio", "frames", "duration_s", "fps")
    OUTPUT_TOOLTIPS = ("Speech aligned to video frames, for the Streaming Sampler.",
                       "Video frames the talking head will have: ceil(duration x fps).",
                       "Duration of the speech in seconds.",
                       "The model's frame rate: wire it into Create Video's fps.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "Speech (e.g. from Load Audio), any sample rate; stereo is mixed "
                                           "down. One clip, not a batch."}),
            "dit": (DIT, {"tooltip": "The causal DiT whose audio encoder (sample rate, fps) the speech is "
                                     "prepared for."}),
        }}

    def encode(self, audio, dit):
        wave, sr = audio["waveform"].cpu(), int(audio["sample_rate"])
        enc, fps = dit.module.audio_encoder, dit.cfg.fps  # its rate only: nothing runs here
        mono = prepare_audio(wave, sr, enc.sample_rate)  # raises ValueError for empty / NaN / batched audio
        rest_audio = RestAudio(mono, enc.sample_rate, fps, num_video_frames(wave.shape[-1], sr, fps))
        log.info("REST Audio Encode: %.2f s of speech -> %d frames at %d fps", rest_audio.duration,
                 rest_audio.num_frames, fps)
        return (rest_audio, rest_audio.num_frames, wave.shape[-1] / sr, float(fps))
