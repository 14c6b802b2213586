"""A loaded REST model under ComfyUI's model management (what the REST_VAE / REST_DIT sockets carry).

Like ComfyUI's own VAE, CLIP vision and audio encoder objects, it holds the module and a
`comfy.model_patcher.ModelPatcher` around it. A node asks for the module with `use(...)`, which calls
`comfy.model_management.load_models_gpu`: the weights go to their device then, ComfyUI counts them, can
push them back to the offload device when another model needs the GPU, and `POST /free` with
`unload_models` unloads them. Outside ComfyUI the module simply stays where it was loaded.
"""
from __future__ import annotations

import torch

from .payloads import ModelIdentity


def _model_management():
    try:
        import comfy.model_management as mm
        import comfy.model_patcher  # noqa: F401  (the patcher class lives here)
    except ImportError:
        return None
    return mm if hasattr(mm, "load_models_gpu") else None


class RestModel:
    """One REST VAE or DiT: the module, the file it came from, the device it runs on."""

    def __init__(self, module: torch.nn.Module, file: str, load_device: torch.device, offload_device: torch.device):
        self.module, self.file = module, file
        self.load_device, self.offload_device = torch.device(load_device), torch.device(offload_device)
        self.dtype = next(module.parameters()).dtype
        self.patcher = None
        if _model_management() is not None:
            import comfy.model_patcher
            self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=self.load_device,
                                                            offload_device=self.offload_device)

    @property
    def cfg(self):
        return self.module.cfg

    @property
    def identity(self) -> ModelIdentity:
        from ..rest_model.config import to_json
        return ModelIdentity(self.file, to_json(self.cfg), str(self.load_device), str(self.dtype))

    def __str__(self) -> str:
        return self.file


def use(*models: RestModel | None) -> list[torch.nn.Module | None]:
    """The modules of `models`, loaded on their devices together (so loading one never evicts another)."""
    mm = _model_management()
    patchers = [m.patcher for m in models if m is not None and m.patcher is not None]
    if mm is not None and patchers:
        # our modules are plain torch layers, not comfy.ops: a partial (lowvram) load would leave some
        # weights on the CPU, so they load whole (they are small beside the models ComfyUI manages)
        mm.load_models_gpu(patchers, force_full_load=True)
    return [None if m is None else m.module for m in models]
