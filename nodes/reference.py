"""ID-Context Cache: the reference portrait IMAGE -> REST_CACHE, its ID-Sink computed once for the whole stream.

(The node of the pack's `ID-Context Cache`; rest_model/id_context_cache.py is the cache itself, which the
stream builds around the ID-Sink this node computes.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rest_model.framing import CROP_MODES, domain_report, frame_portrait
from ..rest_model.media import to_rgb
from ..rest_model.streamer import prepare_reference
from . import managed
from .host import log
from .loaders import check_pair, precision_errors
from .payloads import CACHE, DIT, VAE, IDSink


def portrait_chw(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, C] (C = 1..4) [+ MASK, 1 = transparent] -> [C, H, W] for frame_portrait."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"ID-Context Cache needs one image [1, H, W, C], got {tuple(image.shape)}")
    if image.shape[0] > 1:
        log.warning("REST ID-Context Cache: %d images given, the first is the portrait", image.shape[0])
    chw = image[0].permute(2, 0, 1).float().cpu()
    if mask is not None and chw.shape[0] in (1, 3):
        # Load Image returns alpha as a MASK; a 64x64 all-zero mask (no alpha) resizes to "opaque"
        m = mask.reshape(-1, *mask.shape[-2:])[:1, None].float().cpu()
        alpha = 1 - F.interpolate(m, size=chw.shape[1:], mode="bilinear", align_corners=False)[0]
        chw = torch.cat([chw, alpha.clamp(0, 1)])
    return chw


class RESTIDContextCache:
    DESCRIPTION = ("Frames the portrait for the model (face: find the face and frame it as the training faces "
                   "are; or center/pad/stretch; RGBA and grayscale handled), encodes it with the VAE and computes "
                   "the ID-Sink once: the identity anchor every chunk of the stream attends to, however long it "
                   "runs. Says (in the sampler's report) where the face was found and whether the portrait is far "
                   "from what the model was trained on.")
    CATEGORY = "REST"
    RETURN_TYPES = (CACHE, "IMAGE")
    RETURN_NAMES = ("cache", "portrait")
    OUTPUT_TOOLTIPS = ("The portrait's ID-Sink (K/V per DiT block) and the Context-Cache length, for the Streaming "
                       "Sampler; it remembers which DiT made it.",
                       "The portrait exactly as the model sees it (after crop and resize).")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The reference portrait, any size. Only the first image of a batch "
                                           "is used."}),
            "vae": (VAE, {"tooltip": "The REST VAE that encodes the portrait to its reference latent."}),
            "dit": (DIT, {"tooltip": "The causal DiT whose blocks compute the ID-Sink K/V (the Streaming "
                                     "Sampler must get the same one)."}),
            "context_frames": ("INT", {"default": 4, "min": 0, "max": 64, "tooltip":
                                       "Latent frames of recent K/V kept in the rolling Context-Cache "
                                       "(temporal coherence). Memory stays constant whatever the video length; "
                                       "0 keeps only the ID-Sink."}),
            "crop": (list(CROP_MODES), {"default": "face", "tooltip":
                                        "How the portrait becomes the model's square: face = find the face and "
                                        "frame it as the training faces are (no face found: center, and the "
                                        "report says so), center = crop the middle, pad = letterbox on white, "
                                        "stretch = resize as is."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Load Image's MASK output: transparent areas become white."}),
        }}

    def build(self, image, vae, dit, context_frames=4, crop="face", mask=None):
        check_pair(vae, dit)
        original = to_rgb(portrait_chw(image, mask)).clamp(0, 1)  # a new tensor: the IMAGE input is never changed
        portrait, framing = frame_portrait(original, dit.cfg.resolution, crop)
        vae_m, dit_m = managed.use(vae, dit)
        with torch.no_grad(), precision_errors(dit.dtype):
            # the VAE encodes on its own device and dtype, the reference latent moves to the DiT's
            sink = dit_m.id_sink(prepare_reference(vae_m, dit_m, portrait))
            psnr, warning = domain_report(vae_m, portrait)
        notes = [f"Portrait: {framing.message}.",
                 f"Warning: {warning}." if warning else f"Portrait: the VAE reconstructs it at {psnr:.1f} dB, in "
                                                        f"the range of the model's training faces."]
        log.info("REST ID-Context Cache: %s", " ".join(notes))
        cache = IDSink(sink, context_frames, dit.identity, original, framing, notes)
        shown = ((portrait + 1) / 2).permute(1, 2, 0)[None].float().cpu()
        return (cache, shown)
