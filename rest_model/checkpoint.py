"""Checkpoints: `.safetensors` whose metadata carries the format, its version, the kind of model and
its full config as JSON, so a loader needs nothing but the file. Never unpickles anything.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from .config import DiTConfig, VAEConfig, check_compatible, from_json, to_json
from .dit import CausalDiT
from .errors import NonFiniteError
from .vae import CausalVAE

FORMAT = "rest-node-pack"
FORMAT_VERSION = 1
# kind -> (config class, module class). The core knows the two models inference needs; the training wing
# adds its lip-sync expert with `register_kind` when rest_model.train.sync_expert is imported, so loading
# a model for inference never imports training code.
KINDS: dict[str, tuple[type, type]] = {"vae": (VAEConfig, CausalVAE), "dit": (DiTConfig, CausalDiT)}
NAMES = {"vae": "REST VAE", "dit": "causal DiT", "sync": "lip-sync expert"}


def register_kind(kind: str, cfg_cls: type, cls: type) -> None:
    """Let `save`/`load` handle another model class (a training-only one) under the name `kind`."""
    KINDS[kind] = (cfg_cls, cls)


class CheckpointError(ValueError):
    """A model file that cannot be used, with the file and the reason in the message."""


def kind_of(module: torch.nn.Module) -> str:
    for kind, (_, cls) in KINDS.items():
        if isinstance(module, cls):
            return kind
    raise TypeError(f"not a REST model: {type(module).__name__}")


def save(module: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None,
         dtype: torch.dtype | None = None, trained_on: str | None = None) -> None:
    """Write weights + {format, format_version, kind, config[, trained_on][, extra]} metadata atomically.

    `dtype` stores floating-point weights in another precision (float16 halves a shipped file); the
    loaders cast them back to the module's dtype, so a float16 file runs in float32 on a CPU.
    `trained_on` says in plain words what data the weights learned from (the training stages write it):
    a model is only good near its training data, and a user choosing a file should see which that is.
    """
    kind = kind_of(module)
    for k, v in module.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NonFiniteError(f"refusing to write {path}: {k} holds NaN/inf weights (a diverged model)")
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind, "config": to_json(module.cfg)}
    if trained_on:
        meta["trained_on"] = str(trained_on)
    if extra:
        meta["extra"] = json.dumps(extra)
    tensors = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
               for k, v in module.state_dict().items()}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint under the real name


def read_metadata(path: str | os.PathLike) -> dict:
    """The REST metadata of a file, or a CheckpointError saying why it is not a usable REST file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file (truncated, corrupt, or another "
                              f"format such as a pickle, which is never loaded): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a .safetensors file but not a REST checkpoint "
                              f"(no '{FORMAT}' format in its metadata)")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; this pack reads up to {FORMAT_VERSION}")
    if meta.get("kind") not in NAMES or "config" not in meta:
        raise CheckpointError(f"{path}: REST metadata lacks a valid kind/config")
    return meta


def describe(path: str | os.PathLike) -> str:
    """One line about a model file from its header alone (no weights are read): its kind, size and
    what it was trained on ("not stated" for files written before the field existed)."""
    meta = read_metadata(path)
    kind = meta["kind"]
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys()]
        params = sum(math.prod(s) for s in shapes)
        cfg = json.loads(meta["config"])
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: header unreadable: {e}") from None
    what = f"{NAMES[kind]}, {params / 1e6:.1f} M parameters"
    if kind == "dit" and isinstance(cfg, dict) and "resolution" in cfg:
        what += f", {cfg['resolution']}x{cfg['resolution']} at {cfg.get('fps', '?')} fps"
    return f"{os.path.basename(os.fspath(path))}: {what}; trained on: {meta.get('trained_on') or 'not stated'}"


def load(path: str | os.PathLike, kind: str, device="cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a checkpoint of the given kind ('vae' or 'dit'), checking that the file matches it."""
    path = os.fspath(path)
    meta = read_metadata(path)
    if meta["kind"] != kind:
        raise CheckpointError(f"{path} is a {NAMES[meta['kind']]} checkpoint, but a {NAMES[kind]} was expected")
    if kind not in KINDS:
        raise CheckpointError(f"{path} is a {NAMES[kind]} checkpoint, which only the training commands load")
    cfg_cls, cls = KINDS[kind]
    try:
        cfg = from_json(cfg_cls, meta["config"])
        expected = expected_shapes(cls, cfg)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: its config cannot build a {NAMES[kind]}: {e}") from None
    # the metadata is only a claim: its sizes must match the file's own tensors before anything is
    # allocated, or a tiny file claiming a huge model is a memory bomb
    _check_shapes(path, expected, file_shapes(path))
    module = cls(cfg)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
                check_finite(path, k, tensors[k])
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: weights cannot be read (truncated or corrupt?): {e}") from None
    module.load_state_dict(tensors)
    module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    return module.eval().requires_grad_(False)


class _MetaBools(TorchFunctionMode):
    """Answers `bool(meta tensor)` with False. torchaudio's mel filterbank warns `if (fb.max(0).values ==
    0).any()` while it is built, which a meta tensor cannot answer; the check changes no shape."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return False
        return func(*args, **(kwargs or {}))


def expected_shapes(cls: type, cfg) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a module of `cfg` has, from a build on the meta device: no memory, however
    large the config claims to be."""
    with torch.device("meta"), _MetaBools():
        module = cls(cfg)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a .safetensors header alone (no tensor is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: weights cannot be read (truncated or corrupt?): {e}") from None


def check_finite(path, name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN/inf weights (a diverged training run), naming the first bad tensor."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN/infinite value(s) of {tensor.numel()}: "
                              f"the model diverged in training or the file is damaged")


def _check_shapes(path, want: dict[str, tuple], have: dict[str, tuple]) -> None:
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f"{k} {have[k]} in the file vs {v} by the config" for k, v in want.items()
              if k in have and have[k] != v]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} of the wrong shape (e.g. {shapes[:3]})")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the config in its metadata: " + "; ".join(problems))


def load_any(path, device="cpu", dtype=None) -> torch.nn.Module:
    """A VAE or a DiT, whichever the file holds."""
    return load(path, read_metadata(path)["kind"], device, dtype)


def load_vae(path, device="cpu", dtype=None) -> CausalVAE:
    return load(path, "vae", device, dtype)


def load_dit(path, device="cpu", dtype=None) -> CausalDiT:
    return load(path, "dit", device, dtype)


def load_pair(vae_path, dit_path, device="cpu", dtype=None) -> tuple[CausalVAE, CausalDiT]:
    """Load a VAE and a DiT and refuse the pair if the DiT expects another latent layout."""
    vae, dit = load_vae(vae_path, device, dtype), load_dit(dit_path, device, dtype)
    try:
        check_compatible(vae.cfg, dit.cfg)
    except ValueError as e:
        raise CheckpointError(f"{dit_path} does not fit {vae_path}: {e}") from None
    return vae, dit
