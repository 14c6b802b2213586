"""The live mode inside ComfyUI: the page and WebSocket of rest_model.live on ComfyUI's own server.

`register()` adds them to `PromptServer.instance.routes` (so they sit at /rest/live/ and /api/rest/live/
of the port ComfyUI already serves: no new process, no new port). The models are the pack's files in
models/rest/: the bundled demo pair first, else the first VAE and DiT found. They live under ComfyUI's
model management like the nodes' models: read from file on the first stream, then brought onto ComfyUI's
device with `load_models_gpu` before every stream (ComfyUI may have unloaded them for a workflow, or on
`/free`). Outside ComfyUI (no `server` module) it does nothing.
"""
from __future__ import annotations

import logging

from ..rest_model import live
from . import host, managed
from .loaders import check_pair, load_file

log = logging.getLogger("REST")

DEMO_PAIR = ("rest_vae_demo.safetensors", "rest_dit_demo.safetensors")


def pick_models(names: list[str]) -> tuple[str, str]:
    """(VAE, DiT) file names for the live page: the bundled demo first, else the first of each kind by name."""
    if all(n in names for n in DEMO_PAIR):
        return DEMO_PAIR
    vaes = [n for n in names if "vae" in n.lower()]
    dits = [n for n in names if "dit" in n.lower()]
    if not vaes or not dits:
        raise FileNotFoundError(f"the live page needs a REST VAE and DiT in {host.model_folders()} (file names "
                                f"containing 'vae' and 'dit'); found {names}")
    return vaes[0], dits[0]


_loaded: dict = {}  # the live page's pair: file names -> (RestModel, RestModel)


def load_models():
    """(vae, dit) modules for a live stream, on ComfyUI's device: loaded from file once per pair of names."""
    names = pick_models(host.list_models())
    if names not in _loaded:
        device = host.torch_device("auto")
        log.info("REST live: %s + %s on %s", *names, device)
        vae, dit = load_file(names[0], "vae", device, "auto")[0], load_file(names[1], "dit", device, "auto")[0]
        check_pair(vae, dit)
        _loaded.clear()
        _loaded[names] = (vae, dit)
    return tuple(managed.use(*_loaded[names]))


def register() -> bool:
    """Add the live routes to ComfyUI's server; False (and nothing done) when there is no ComfyUI server."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    live.add_live_routes(server.routes, load_models, max_streams=live.default_max_streams())
    return True
