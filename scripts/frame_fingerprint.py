"""Fingerprints of what the pack generates with a fixed seed: SHA-256 of the frames the bundled demo model
makes from the bundled portrait and speech, through the command line and through each shipped workflow.

A refactor that must not change behaviour is checked by running this before and after it (e.g. in a
`git worktree` of the older commit) and comparing the lines:

    .venv/bin/python scripts/frame_fingerprint.py

Lines: `cli-stream` (the frames the streamer hands to the mp4 writer), `cli-mp4` (the frames decoded back
from the mp4 `generate` writes), and `workflow:<name>` (the IMAGE batch the workflow hands to Create Video,
or the frames of the video file it hands on). A workflow that streams its video (Stream To Video) encodes the
streamer's frames as `generate` does, so its line must equal `cli-mp4`; one that hands an IMAGE batch to
Create Video is compared with its own line from before a change.

`--pictures` also writes what the shipped model makes on the shipped portrait: each workflow's thumbnail
(workflows/<name>.jpg, a contact sheet of its frames) and docs/comfyui_frames.png (a strip of 8 frames).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PACK = "rest_pack_fingerprint"


def digest(frames) -> str:
    h = hashlib.sha256()
    for f in frames:
        h.update(np.ascontiguousarray(f).tobytes())
    return h.hexdigest()[:16]


def mp4_frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def import_pack():
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack


def cli_lines(tmp: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from rest_model import checkpoint, media
    from rest_model.cli import DEMO_DIT, DEMO_PORTRAIT, DEMO_SPEECH, DEMO_VAE, main
    from rest_model.streamer import AudioSource, stream
    speech = DEMO_SPEECH
    wave, sr = media.load_audio(speech)
    vae, dit = checkpoint.load_pair(DEMO_VAE, DEMO_DIT)
    portrait = media.fit_portrait(media.load_image(DEMO_PORTRAIT), dit.cfg.resolution, "center")
    frames = [c.frames.numpy() for c in stream(vae, dit, portrait, AudioSource.whole(wave, sr), dit.cfg.stream, seed=0)]
    out = tmp / "cli.mp4"
    assert main(["generate", "--audio", str(speech), "--out", str(out), "--device", "cpu"]) == 0
    return [f"cli-stream {digest(frames)} ({sum(len(f) for f in frames)} frames)",
            f"cli-mp4    {digest(mp4_frames(out))} ({len(mp4_frames(out))} frames)"]


def contact_sheet(frames, cols: int, rows: int, size: int, labels: bool = True):
    """Evenly spaced frames (uint8 [H, W, 3]) on a white sheet, each `size` px, with its frame number."""
    from PIL import Image, ImageDraw
    count = cols * rows
    picks = [round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(count)]
    pad, text = 8, (18 if labels else 0)
    sheet = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad + text) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(picks):
        x, y = pad + (k % cols) * (size + pad), pad + (k // cols) * (size + pad + text)
        sheet.paste(Image.fromarray(frames[i]).resize((size, size), Image.BICUBIC), (x, y))
        if labels:
            draw.text((x, y + size + 3), f"frame {i}", fill="black")
    return sheet


def save_pictures(name: str, frames) -> None:
    """The template browser's thumbnail of a workflow and, for the short one, the docs' strip of frames."""
    contact_sheet(frames, 4, 2, 150).save(ROOT / "workflows" / f"{name}.jpg", quality=90)
    if "long" not in name:
        contact_sheet(frames, 8, 1, 160).save(ROOT / "docs" / "comfyui_frames.png")


def workflow_lines(pictures: bool = False) -> list[str]:
    from PIL import Image
    pack = import_pack()
    check = importlib.import_module("comfy_host_check") if "comfy_host_check" in sys.modules else None
    if check is None:
        spec = importlib.util.spec_from_file_location("comfy_host_check", ROOT / "scripts" / "comfy_host_check.py")
        check = importlib.util.module_from_spec(spec)
        sys.modules["comfy_host_check"] = check
        spec.loader.exec_module(check)
    media = importlib.import_module(f"{PACK}.rest_model.media")
    defs = {**check.CORE_NODES, **check.pack_object_info(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)}
    lines = []
    for name, wf in check.load_workflows().items():
        record = {}

        def load_image(image):  # as ComfyUI's LoadImage: RGB in [0, 1] and a MASK (1 = transparent)
            with Image.open(ROOT / "assets" / "portrait.png") as im:
                rgb = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)[None]
            return rgb, torch.zeros(1, 64, 64)

        def load_audio(audio):
            wave, sr = media.load_audio(ROOT / "assets" / "speech.wav")
            return ({"waveform": wave[None], "sample_rate": sr},)

        def create_video(images, fps, audio=None):
            record["frames"] = [(images.numpy() * 255).round().astype(np.uint8)]
            return ({"images": images, "fps": fps, "audio": audio},)

        def save_video(video, **_):
            if "frames" not in record:  # a video handed on as a file (the streamed output)
                record["frames"] = [np.stack(mp4_frames(video.get_stream_source()
                                                        if hasattr(video, "get_stream_source") else video))]
            return ()

        stand_ins = {"LoadImage": load_image, "LoadAudio": load_audio, "CreateVideo": create_video,
                     "SaveVideo": save_video, "PreviewAny": lambda source: ()}
        prompt = check.to_api_prompt(wf, defs)
        results = {}

        def outputs(node_id):
            if node_id not in results:
                node = prompt[node_id]
                kw = {k: outputs(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
                cls = pack.NODE_CLASS_MAPPINGS.get(node["class_type"])
                results[node_id] = getattr(cls(), cls.FUNCTION)(**kw) if cls else stand_ins[node["class_type"]](**kw)
            return results[node_id]

        for node_id in prompt:
            outputs(node_id)
        n = sum(len(f) for f in record["frames"])
        if pictures:
            save_pictures(name, [f for batch in record["frames"] for f in batch])
        lines.append(f"workflow:{name} {digest(record['frames'])} ({n} frames)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pictures", action="store_true", help="also write the workflows' thumbnails and "
                    "docs/comfyui_frames.png from the frames")
    ap.add_argument("--workflows-only", action="store_true", help="skip the two command-line lines")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = [] if args.workflows_only else cli_lines(Path(tmp))
        for line in lines + workflow_lines(args.pictures):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
