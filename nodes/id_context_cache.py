"""ID-Context Cache: portrait IMAGE -> REST_CACHE, the ID-Sink computed once for the whole stream."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rest_model.config import StreamConfig
from ..rest_model.media import CROP_MODES, fit_portrait
from ..rest_model.streamer import new_cache, prepare_reference
from .host import log
from .loaders import check_pair, precision_errors
from .payloads import CACHE, DIT, VAE, RestCache, placement, source


def portrait_chw(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, C] (C = 1..4) [+ MASK, 1 = transparent] -> [C, H, W] for fit_portrait."""
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
    DESCRIPTION = ("Fits the portrait to the model (crop/pad/stretch; RGBA and grayscale handled), encodes "
                   "it with the VAE and computes the ID-Sink once: the identity anchor every chunk of the "
                   "stream attends to, however long it runs.")
    CATEGORY = "REST"
    RETURN_TYPES = (CACHE, "IMAGE")
    RETURN_NAMES = ("cache", "portrait")
    OUTPUT_TOOLTIPS = ("ID-Sink + rolling Context-Cache for the Streaming Sampler.",
                       "The portrait exactly as the model sees it (after crop and resize).")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The reference portrait, any size. Only the first image of a batch "
                                           "is used."}),
            "vae": (VAE, {"tooltip": "The REST VAE that encodes the portrait to its reference latent."}),
            "dit": (DIT, {"tooltip": "The causal DiT whose blocks compute the ID-Sink K/V."}),
            "context_frames": ("INT", {"default": 4, "min": 0, "max": 64, "tooltip":
                                       "Latent frames of recent K/V kept in the rolling Context-Cache "
                                       "(temporal coherence). Memory stays constant whatever the video length; "
                                       "0 keeps only the ID-Sink."}),
            "crop": (list(CROP_MODES), {"default": "center", "tooltip":
                                        "How a non-square portrait becomes the model's square: center = crop "
                                        "the middle, pad = letterbox on white, stretch = resize as is."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Load Image's MASK output: transparent areas become white."}),
        }}

    def build(self, image, vae, dit, context_frames=4, crop="center", mask=None):
        check_pair(vae, dit)
        device, dtype = placement(dit)
        if placement(vae) != (device, dtype):
            # the one stream loop runs VAE and DiT on one device and dtype
            log.info("REST: moving the VAE %s to the DiT's %s / %s", source(vae), device, dtype)
            vae.to(device, dtype)
        portrait = fit_portrait(portrait_chw(image, mask), dit.cfg.resolution, crop)
        with torch.no_grad(), precision_errors(dit):
            reference = prepare_reference(vae, dit, portrait)
            cache = new_cache(dit, reference, StreamConfig(context_frames=context_frames))
        shown = ((portrait + 1) / 2).permute(1, 2, 0)[None].float().cpu()
        return (RestCache(vae, dit, portrait, reference, cache, context_frames), shown)
