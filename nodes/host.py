"""Everything nodes/ needs from the ComfyUI host, imported lazily so the pack runs (and is tested)
without ComfyUI: model folders (folder_paths), progress bar with preview, interrupt, default device.

Outside ComfyUI the model folders are `$REST_MODELS_DIR` (or the pack's `models/rest/`) and the pack's
`models/demo/`; progress, preview and interrupt are no-ops.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("REST")

FOLDER = "rest"  # models/rest/ in ComfyUI, also a key for extra_model_paths.yaml
EXTENSIONS = {".safetensors"}
PACK_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = PACK_ROOT / "models" / "demo"  # the bundled demo model, listed next to models/rest/
PREVIEW_SIZE = 512


def _folder_paths():
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_model_folder() -> None:
    """Add models/rest/ (and the bundled demo folder) to ComfyUI's model folders. Idempotent.

    Appends instead of replacing, so `rest:` paths from extra_model_paths.yaml (loaded before custom
    nodes, possibly with is_default) keep their place.
    """
    fp = _folder_paths()
    if fp is None:
        return
    default = os.path.join(fp.models_dir, FOLDER)
    try:
        os.makedirs(default, exist_ok=True)  # so a user sees where the files go
    except OSError:
        pass
    fp.add_model_folder_path(FOLDER, default)
    fp.add_model_folder_path(FOLDER, str(DEMO_DIR))
    paths, _ = fp.folder_names_and_paths[FOLDER]
    # extra_model_paths.yaml creates the entry with no extension filter: allow only checkpoints
    fp.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def _fallback_dirs() -> list[Path]:
    return [Path(os.environ.get("REST_MODELS_DIR", PACK_ROOT / "models" / FOLDER)), DEMO_DIR]


def model_folders() -> list[str]:
    fp = _folder_paths()
    if fp is None:
        return [str(d) for d in _fallback_dirs()]
    register_model_folder()
    return fp.get_folder_paths(FOLDER)


def list_models() -> list[str]:
    """Names for the loaders' file pickers (relative to a model folder, as ComfyUI shows them)."""
    fp = _folder_paths()
    if fp is not None:
        register_model_folder()
        return fp.get_filename_list(FOLDER)
    names = set()
    for d in _fallback_dirs():
        if d.is_dir():
            names.update(p.relative_to(d).as_posix() for p in d.rglob("*") if p.suffix in EXTENSIONS and p.is_file())
    return sorted(names)


def model_path(name: str) -> str:
    fp = _folder_paths()
    path = None
    if fp is not None:
        register_model_folder()
        path = fp.get_full_path(FOLDER, name)
    else:
        path = next((str(d / name) for d in _fallback_dirs() if (d / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"REST model file {name!r} not found in {model_folders()}. Put the .safetensors "
                                f"file in ComfyUI's models/{FOLDER}/ folder (see the README), then refresh.")
    return path


def torch_device(choice: str) -> torch.device:
    """'auto' is ComfyUI's compute device (so --cpu is honoured), else CUDA when present."""
    if choice == "auto":
        try:
            import comfy.model_management as mm
            return mm.get_torch_device()
        except (ImportError, AttributeError):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was chosen but torch sees no CUDA GPU here; choose 'auto' or 'cpu'")
    return torch.device(choice)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (between chunks)."""
    try:
        from comfy.model_management import throw_exception_if_processing_interrupted
    except ImportError:
        return
    throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (with an optional preview frame), or nothing outside ComfyUI."""

    def __init__(self, total: int):
        try:
            import comfy.utils
            self.bar = comfy.utils.ProgressBar(total)
        except (ImportError, AttributeError):  # no ComfyUI (or an unrelated `comfy` on sys.path)
            self.bar = None
        self.total = total

    def update(self, done: int, frame: torch.Tensor | None = None) -> None:
        """`frame`: [3, H, W] in [-1, 1] shown as the node's live preview."""
        if self.bar is None:
            return
        preview = None
        if frame is not None:
            from PIL import Image
            arr = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            preview = ("JPEG", Image.fromarray(arr), PREVIEW_SIZE)
        self.bar.update_absolute(min(done, self.total), self.total, preview)


def memory_mb(device: torch.device) -> float | None:
    """Memory in use now: allocated CUDA memory, or this process's resident set on CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None
