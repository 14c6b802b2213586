"""Load REST VAE / Load Causal DiT: a file from models/rest/ -> a rest_model module."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..rest_model import checkpoint
from ..rest_model.config import check_compatible
from . import host
from .payloads import DIT, VAE, placement, source

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
DTYPE_TIP = ("Weights' precision. auto = float32, which runs everywhere; bfloat16/float16 halve memory "
             "on a GPU.")


def _dtype(choice: str):
    return getattr(torch, DTYPES[choice] or "float32")


def check_pair(vae, dit) -> None:
    """Refuse a DiT built for another latent layout than the VAE's, naming both files."""
    try:
        check_compatible(vae.cfg, dit.cfg)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{source(dit)} does not fit the VAE {source(vae)}: {e}") from None


@contextmanager
def precision_errors(dit):
    """Turn rest_model's dtype-mismatch crash under half precision into advice the user can act on."""
    try:
        yield
    except RuntimeError as e:
        dtype = placement(dit)[1]
        if "dtype" in str(e) and dtype != torch.float32:
            raise RuntimeError(f"the REST model failed in {str(dtype).replace('torch.', '')} ({e}); load the VAE and "
                               f"DiT with dtype float32 (or auto)") from e
        raise


class LoadRESTVAE:
    DESCRIPTION = "Loads a REST causal spatiotemporal VAE (.safetensors) from models/rest/."
    CATEGORY = "REST"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE: encodes the portrait, decodes latent chunks to frames.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.list_models(), {"tooltip": "A REST VAE file in models/rest/ "
                                                         "(e.g. rest_vae_demo.safetensors)."}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, vae_name, dtype="auto"):
        path = host.model_path(vae_name)
        vae = checkpoint.load_vae(path, host.torch_device("auto"), _dtype(dtype))
        vae.rest_file = path
        return (vae,)


class LoadCausalDiT:
    DESCRIPTION = ("Loads a REST causal DiT (.safetensors, with its audio encoder) from models/rest/. "
                   "Given the VAE, refuses a DiT trained for another latent layout.")
    CATEGORY = "REST"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The causal DiT that generates latent chunks, and the audio encoder it owns.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (host.list_models(), {"tooltip": "A REST causal DiT file in models/rest/ "
                                                         "(e.g. rest_dit_demo.safetensors)."}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "Where the DiT runs. auto = "
                                                 "ComfyUI's device (the GPU, or the CPU under --cpu)."}),
        }, "optional": {
            "vae": (VAE, {"tooltip": "The VAE this DiT will run with: checked now, so a mismatched pair "
                                     "fails at load with both file names."}),
        }}

    def load(self, dit_name, dtype="auto", device="auto", vae=None):
        path = host.model_path(dit_name)
        dit = checkpoint.load_dit(path, host.torch_device(device), _dtype(dtype))
        dit.rest_file = path
        if vae is not None:
            check_pair(vae, dit)
        return (dit,)
