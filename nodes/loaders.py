"""Load REST VAE / Load Causal DiT: a file from models/rest/ -> a RestModel under ComfyUI's model management."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..rest_model import checkpoint
from ..rest_model.config import check_compatible
from . import host
from .managed import RestModel
from .payloads import DIT, VAE

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
DTYPE_TIP = ("Weights' precision. auto = float32, which runs everywhere; bfloat16/float16 halve memory "
             "on a GPU.")


def _dtype(choice: str):
    return getattr(torch, DTYPES[choice] or "float32")


def check_pair(vae: RestModel, dit: RestModel) -> None:
    """Refuse a DiT built for another latent layout than the VAE's, naming both files."""
    try:
        check_compatible(vae.cfg, dit.cfg)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{dit.file} does not fit the VAE {vae.file}: {e}") from None


@contextmanager
def precision_errors(dtype: torch.dtype):
    """Turn rest_model's dtype-mismatch crash under half precision into advice the user can act on."""
    try:
        yield
    except RuntimeError as e:
        if "dtype" in str(e) and dtype != torch.float32:
            raise RuntimeError(f"the REST model failed in {str(dtype).replace('torch.', '')} ({e}); load the VAE and "
                               f"DiT with dtype float32 (or auto)") from e
        raise


def load_file(name: str, kind: str, device: torch.device, dtype: str) -> tuple[RestModel, str]:
    """A file of models/rest/ -> (a RestModel parked on its offload device, what the file is)."""
    path = host.model_path(name)
    offload = host.offload_device(device, kind)
    module = checkpoint.load(path, kind, offload, _dtype(dtype))  # parked; `managed.use` brings it to `device`
    info = checkpoint.describe(path)  # from the header: kind, size, what it was trained on
    host.log.info("REST: loaded %s", info)
    return RestModel(module, path, device, offload), info


class LoadRESTVAE:
    DESCRIPTION = ("Loads a REST causal spatiotemporal VAE (.safetensors) from models/rest/. Lists only VAE "
                   "files, the bundled demo first; ComfyUI's model management loads and unloads it.")
    CATEGORY = "REST"
    RETURN_TYPES = (VAE, "STRING")
    RETURN_NAMES = ("vae", "info")
    OUTPUT_TOOLTIPS = ("The VAE: encodes the portrait, decodes latent chunks to frames.",
                       "What the file is and what it was trained on (from its metadata).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.list_models("vae"), {"tooltip": "A REST VAE file in models/rest/ (only VAE files are "
                                                              "listed; rest_vae_demo.safetensors is bundled)."}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, vae_name, dtype="auto"):
        return load_file(vae_name, "vae", host.torch_device("auto"), dtype)


class LoadCausalDiT:
    DESCRIPTION = ("Loads a REST causal DiT (.safetensors, with its audio encoder) from models/rest/. Lists only "
                   "DiT files, the bundled demo first. Given the VAE, refuses a DiT trained for another latent "
                   "layout.")
    CATEGORY = "REST"
    RETURN_TYPES = (DIT, "STRING")
    RETURN_NAMES = ("dit", "info")
    OUTPUT_TOOLTIPS = ("The causal DiT that generates latent chunks, and the audio encoder it owns.",
                       "What the file is and what it was trained on (from its metadata).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (host.list_models("dit"), {"tooltip": "A REST causal DiT file in models/rest/ (only DiT "
                                                              "files are listed; rest_dit_demo.safetensors is "
                                                              "bundled)."}),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "Where the DiT runs. auto = "
                                                 "ComfyUI's device (the GPU, or the CPU under --cpu)."}),
        }, "optional": {
            "vae": (VAE, {"tooltip": "The VAE this DiT will run with: checked now, so a mismatched pair "
                                     "fails at load with both file names."}),
        }}

    def load(self, dit_name, dtype="auto", device="auto", vae=None):
        dit, info = load_file(dit_name, "dit", host.torch_device(device), dtype)
        if vae is not None:
            check_pair(vae, dit)
        return (dit, info)
