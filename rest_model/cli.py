"""Command line: `python -m rest_model generate | export | synth | prepare | train-vae | train-teacher |
init-student | distill | train-sync | eval`.

`generate` and `export` are the inference core's own and live here. The other sub-commands belong to
the wings (data/, train/, eval/): `rest_model/__main__.py` imports them and hands their `register`
functions to `main`, so the core never imports a wing.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, framing, media
from .config import preset
from .dit import CausalDiT
from .streamer import AudioSource, stream
from .vae import CausalVAE

log = logging.getLogger("rest_model")
ROOT = Path(__file__).resolve().parent.parent
DEMO_VAE = ROOT / "models" / "demo" / "rest_vae_demo.safetensors"
DEMO_DIT = ROOT / "models" / "demo" / "rest_dit_demo.safetensors"
DEMO_PORTRAIT = ROOT / "assets" / "portrait.png"
DEMO_SPEECH = ROOT / "assets" / "speech.wav"


def random_model(preset_name: str, seed: int = 0) -> tuple[CausalVAE, CausalDiT]:
    """Untrained VAE + DiT of a preset (tests, benchmarks, smoke runs); output is not a face."""
    torch.manual_seed(seed)
    p = preset(preset_name)
    return CausalVAE(p.vae).eval(), CausalDiT(p.dit).eval()


def _models(args):
    if args.random_weights:
        log.warning("RANDOM WEIGHTS (preset %s): the video will be noise, not a talking head", args.preset)
        return random_model(args.preset, args.seed)
    vae_path, dit_path = args.vae or DEMO_VAE, args.dit or DEMO_DIT
    for p in (vae_path, dit_path):
        if not Path(p).is_file():
            raise SystemExit(f"error: model file {p} not found. Pass --vae/--dit, or --random-weights "
                             f"for an untrained smoke run.")
    return checkpoint.load_pair(vae_path, dit_path, args.device)


def _device(flag: str, name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device (e.g. cpu, cuda, cuda:1)") from None


def cmd_generate(args) -> int:
    device = _device("--device", args.device)
    decode_device = _device("--decode-device", args.decode_device) if args.decode_device else device
    vae, dit = _models(args)
    if not args.random_weights:
        print(f"model: {checkpoint.describe(args.vae or DEMO_VAE)}\nmodel: {checkpoint.describe(args.dit or DEMO_DIT)}")
    vae.to(decode_device), dit.to(device)
    try:
        cfg = dataclasses.replace(dit.cfg.stream, **{k: v for k, v in dict(
            steps=args.steps, chunk_frames=args.chunk, context_frames=args.context).items() if v is not None})
    except ValueError as e:
        raise ValueError(f"--steps / --chunk / --context: {e}") from None
    image = media.load_image(args.image)
    portrait, framed = framing.frame_portrait(image, dit.cfg.resolution, args.crop)
    print(f"portrait: {framed.message}")
    db, warning = framing.domain_report(vae, portrait)
    print(f"warning: {warning}" if warning else
          f"portrait: the model's VAE reconstructs it at {db:.1f} dB (in the range of its training faces)")
    wave, sr = media.load_audio(args.audio)
    total = media_frames = None
    t0, first = time.perf_counter(), None
    fps = dit.cfg.fps
    media_frames = -(-wave.shape[-1] * fps // sr)
    total = -(-media_frames // (cfg.chunk_frames * dit.cfg.temporal_compression))

    def progress(chunk):
        nonlocal first
        first = first or time.perf_counter() - t0
        done = chunk.index + 1
        bar = "#" * int(30 * done / total)
        print(f"\r[{bar:<30}] chunk {done}/{total}", end="", file=sys.stderr, flush=True)

    chunks = stream(vae, dit, portrait, AudioSource.whole(wave, sr), cfg, seed=args.seed, callback=progress,
                    overlap_decode=args.overlap_decode)
    frames = (c.frames for c in chunks)
    if args.paste_back:  # one frame at a time (a photo's frames are large); H.264 wants even sides
        h, w = image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
        frames = (framing.paste_back(f[i:i + 1], image, framed)[:, :, :h, :w] for f in frames for i in range(len(f)))
    n = media.write_video(args.out, frames, fps, audio=wave, sample_rate=sr)
    dt = time.perf_counter() - t0
    print(file=sys.stderr)
    print(f"wrote {args.out}: {n} frames at {fps} fps ({n / fps:.2f} s), generated in {dt:.2f} s "
          f"({n / dt:.1f} fps, first frame after {first or 0:.2f} s)")
    return 0


def cmd_export(args) -> int:
    """Re-save a checkpoint (VAE or DiT) with its weights in another precision, e.g. to ship it."""
    module = checkpoint.load_any(args.input)
    checkpoint.save(module, args.out, dtype=getattr(torch, args.dtype),
                    trained_on=checkpoint.read_metadata(args.input).get("trained_on"))
    print(f"wrote {args.out} ({checkpoint.read_metadata(args.out)['kind']}, {args.dtype}, "
          f"{os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


def build_parser(wings=()) -> argparse.ArgumentParser:
    """The parser of the core's commands plus each wing module's (its `register(sub)` adds them)."""
    ap = argparse.ArgumentParser(prog="python -m rest_model", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="portrait + speech -> talking-head mp4 with the speech track")
    g.add_argument("--image", default=str(DEMO_PORTRAIT), help="portrait image (any size; RGBA/gray ok)")
    g.add_argument("--audio", default=str(DEMO_SPEECH), help="speech audio (any format PyAV reads)")
    g.add_argument("--out", default="out/talking_head.mp4")
    g.add_argument("--vae", help=f"VAE .safetensors (default: bundled demo {DEMO_VAE.name})")
    g.add_argument("--dit", help=f"DiT .safetensors (default: bundled demo {DEMO_DIT.name})")
    g.add_argument("--random-weights", action="store_true", help="untrained model of --preset (smoke test)")
    g.add_argument("--preset", default="tiny", help="preset for --random-weights (tiny/demo/base)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, help="Euler steps per chunk (default: the model's)")
    g.add_argument("--chunk", type=int, help="latent frames per chunk (default: the model's)")
    g.add_argument("--context", type=int, help="latent frames in the Context-Cache (default: the model's)")
    g.add_argument("--crop", default="face", choices=framing.CROP_MODES, help="face: find the face and frame it "
                   "as the training faces are (centre crop if none is found); center/pad/stretch: the whole picture")
    g.add_argument("--paste-back", action="store_true", help="write the video at the portrait's own resolution: "
                   "each generated frame composited into the portrait where the face was taken from")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--overlap-decode", action="store_true", help="decode each chunk with the VAE on a worker "
                   "while the DiT makes the next one (more throughput, one chunk more latency, same frames)")
    g.add_argument("--decode-device", help="device of the VAE decode, e.g. cuda:1 beside a DiT on cuda:0 "
                   "(default: --device)")
    g.set_defaults(fn=cmd_generate)
    e = sub.add_parser("export", help="re-save a VAE/DiT checkpoint in another weight precision")
    e.add_argument("--in", dest="input", required=True, help="checkpoint to read")
    e.add_argument("--out", required=True, help="checkpoint to write")
    e.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    e.set_defaults(fn=cmd_export)
    for wing in wings:
        wing.register(sub)
    return ap


def main(argv=None, wings=()) -> int:
    args = build_parser(wings).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "out", None):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        return args.fn(args)
    except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
