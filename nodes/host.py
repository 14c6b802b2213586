"""Everything nodes/ needs from the ComfyUI host, imported lazily so the pack runs (and is tested)
without ComfyUI: model folders (folder_paths), the input and temp folders, progress bar with preview,
interrupt, default devices.

Outside ComfyUI the model folders are `$REST_MODELS_DIR` (or the pack's `models/rest/`) and the pack's
`models/demo/`, the temp folder is the system's; progress, preview and interrupt are no-ops.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from ..rest_model import checkpoint

log = logging.getLogger("REST")

FOLDER = "rest"  # models/rest/ in ComfyUI, also a key for extra_model_paths.yaml
EXTENSIONS = {".safetensors"}
PACK_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = PACK_ROOT / "models" / "demo"  # the bundled demo model, listed next to models/rest/
DEMO_FILES = {"vae": "rest_vae_demo.safetensors", "dit": "rest_dit_demo.safetensors"}
PREVIEW_SIZE = 512
# the files the shipped templates name, placed in ComfyUI's input/ on first start (never overwritten)
TEMPLATE_INPUTS = {"rest_portrait.png": PACK_ROOT / "assets" / "portrait.png",
                   "rest_speech.wav": PACK_ROOT / "assets" / "speech.wav"}
LONG_SPEECH, LONG_SPEECH_SECONDS = "rest_speech_long.wav", 60


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


def _all_models() -> list[str]:
    fp = _folder_paths()
    if fp is not None:
        register_model_folder()
        return fp.get_filename_list(FOLDER)
    names = set()
    for d in _fallback_dirs():
        if d.is_dir():
            names.update(p.relative_to(d).as_posix() for p in d.rglob("*") if p.suffix in EXTENSIONS and p.is_file())
    return sorted(names)


_KINDS: dict[str, tuple[float, int, str | None]] = {}  # path -> (mtime, size, kind): headers read once


def model_kind(path: str) -> str | None:
    """'vae' / 'dit' / ... from the file's safetensors header (a few KB read), None if not a REST file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    hit = _KINDS.get(path)
    if hit is None or hit[:2] != (st.st_mtime, st.st_size):
        try:
            kind = checkpoint.read_metadata(path)["kind"]
        except checkpoint.CheckpointError:
            kind = None
        _KINDS[path] = hit = (st.st_mtime, st.st_size, kind)
    return hit[2]


def list_models(kind: str | None = None) -> list[str]:
    """Names for a loader's file picker (relative to a model folder, as ComfyUI shows them): only the
    files of `kind`, the bundled demo file first, so a freshly added loader node runs as it is."""
    names = _all_models()
    if kind is None:
        return names
    found = {}
    for name in names:
        try:
            path = model_path(name)
        except FileNotFoundError:
            continue
        found[name] = model_kind(path)
    demo = DEMO_FILES.get(kind)
    return sorted((n for n, k in found.items() if k == kind), key=lambda n: (n != demo, n.lower()))


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


def offload_device(load_device: torch.device, kind: str) -> torch.device:
    """Where ComfyUI parks a model it is not using (the CPU, unless --highvram / --gpu-only)."""
    try:
        import comfy.model_management as mm
        return mm.unet_offload_device() if kind == "dit" else mm.vae_offload_device()
    except (ImportError, AttributeError):
        return load_device


def temp_dir() -> str:
    """ComfyUI's temp folder (emptied at each start), or the system's outside ComfyUI."""
    fp = _folder_paths()
    if fp is not None and hasattr(fp, "get_temp_directory"):
        path = fp.get_temp_directory()
    else:
        path = os.path.join(tempfile.gettempdir(), "rest_node_pack")
    os.makedirs(path, exist_ok=True)
    return path


def install_template_inputs(input_dir: str | os.PathLike | None = None) -> list[str]:
    """Copy the files the shipped templates name into ComfyUI's input/ folder, each only if absent (a user's
    file of the same name is never touched), and make the long speech by tiling the bundled one. Returns the
    names written. Called once when ComfyUI imports the pack; a failure is logged, never fatal."""
    if input_dir is None:
        fp = _folder_paths()
        if fp is None or not hasattr(fp, "get_input_directory"):
            return []
        input_dir = fp.get_input_directory()
    written = []
    try:
        os.makedirs(input_dir, exist_ok=True)
        for name, source in TEMPLATE_INPUTS.items():
            if _write_new(Path(input_dir) / name, lambda tmp, src=source: tmp.write_bytes(src.read_bytes())):
                written.append(name)
        if _write_new(Path(input_dir) / LONG_SPEECH, lambda tmp: tile_speech(
                TEMPLATE_INPUTS["rest_speech.wav"], tmp, LONG_SPEECH_SECONDS)):
            written.append(LONG_SPEECH)
    except (OSError, ValueError) as e:
        log.warning("REST: could not place the template inputs in %s: %s", input_dir, e)
    if written:
        log.info("REST: placed %s in %s for the shipped templates", ", ".join(written), input_dir)
    return written


def tile_speech(source: Path, target: Path, seconds: float) -> None:
    """A long speech track for the long-audio template: the bundled speech repeated to `seconds`, written
    as 16-bit wav (about 2 MB a minute at 16 kHz mono) rather than shipped in git."""
    import av
    import numpy as np

    from ..rest_model import media
    wave, sr = media.load_audio(source)
    reps = -(-int(seconds * sr) // wave.shape[-1])
    pcm = (wave.repeat(1, reps)[:, :int(seconds * sr)].clamp(-1, 1) * 32767).round().short().numpy()
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    with av.open(str(target), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:2].T.reshape(1, -1)), format="s16", layout=layout)
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _write_new(target: Path, write) -> bool:
    """Write `target` through a temp name beside it, only if it does not exist yet (no partial file left)."""
    if target.exists():
        return False
    tmp = target.with_name(f".{target.stem}.partial{target.suffix}")
    try:
        write(tmp)
        try:
            os.link(tmp, target)  # fails if the name appeared meanwhile: a user's file always wins
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


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
