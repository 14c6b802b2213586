"""Command line: `python -m rest_model generate | export | synth | prepare | train-vae | train-teacher |
init-student | distill | train-sync | eval`.

`generate` and `export` are the inference core's own and live here. The other sub-commands belong to
the wings (data/, train/, eval/): `rest_model/__main__.py` imports them and hands their `register`
functions to `main`, so the core never imports a wing.

Errors come out as one line naming the file or flag at fault, and one exit code per kind of error
(rest_model/errors.py, docs/cli.md):

    0    success
    1    internal error: a bug (traceback printed)
    2    bad input or usage: a flag's value, a missing/unreadable/corrupt input file (portrait, audio, model,
         training snapshot, dataset clip), an output path that cannot be a video (unsupported extension,
         a folder in its place, its parent a file)
    3    the system refused: output not writable (read-only, permission, disk full), device not there
         (--device cuda without a GPU)
    4    numerical failure: NaN or infinity in a generated chunk or a training step
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM). The output is written to a hidden temporary file
         and renamed when complete, so an interrupted run leaves an earlier file untouched and no debris
         (after SIGKILL, which cannot be caught, only the temporary `.NAME.XXXX.part` file remains).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import checkpoint, errors, framing, media
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
            raise FileNotFoundError(f"model file {p} not found. Pass --vae/--dit, or --random-weights "
                                    f"for an untrained smoke run.")
    return checkpoint.load_pair(vae_path, dit_path, args.device)


def _device(flag: str, name: str) -> torch.device:
    """The device a flag names, refused here (not mid-run) when it is not on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise errors.DeviceError(f"{flag} {name}: no CUDA GPU is available (PyTorch {torch.__version__}, "
                                     f"{build}); use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise errors.DeviceError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise errors.DeviceError(f"{flag} {name}: Apple MPS is not available here; use {flag} cpu")
    return device


def cmd_generate(args) -> int:
    media.check_output(args.out, writable=True)  # a bad --out fails now, not after the model has run
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

    chunks = stream(vae, dit, portrait, AudioSource.in_pieces(wave, sr), cfg, seed=args.seed, callback=progress,
                    overlap_decode=args.overlap_decode)
    frames = (c.frames for c in chunks)
    if args.paste_back:  # one frame at a time (a photo's frames are large); H.264 wants even sides
        h, w = image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
        frames = (framing.paste_back(f[i:i + 1], image, framed)[:, :, :h, :w] for f in frames for i in range(len(f)))
    try:
        with media.atomic_video(args.out, fps, audio=wave, sample_rate=sr) as writer:
            for batch in frames:
                writer.write(batch)
    finally:
        print(file=sys.stderr)  # end the progress bar's line, before the summary or an error
    n = writer.frames
    dt = time.perf_counter() - t0
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


def cmd_serve(args) -> int:
    """The live mode's standalone front door: the page and WebSocket of rest_model.live on one port."""
    from aiohttp import web

    from . import live
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device("--device", args.device)
    # a missing or broken model file is reported now, not at the first visitor; loaded on a thread that ends,
    # so the main thread keeps no OpenMP team to slow the stream threads down (live.on_passing_thread)
    with ThreadPoolExecutor(1) as pool:
        vae, dit = pool.submit(_models, args).result()
    vae.to(device), dit.to(device)
    if args.chunk is not None:
        try:
            dataclasses.replace(dit.cfg.stream, chunk_frames=args.chunk)
        except ValueError as e:
            raise ValueError(f"--chunk: {e}") from None
    max_streams = live.default_max_streams() if args.max_streams is None else args.max_streams
    app = live.make_app(lambda: (vae, dit), max_streams, record_dir=args.record_dir,
                        max_audio_ahead_s=args.max_audio_ahead, chunk_frames=args.chunk,
                        overlap_decode=args.overlap_decode)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}{live.PREFIX}/"
    if not live.is_loopback(args.host):
        print(f"WARNING: serving on {args.host}, not loopback: anyone who can reach this port can use the "
              f"live page and its models. Browsers allow the microphone only on https:// or localhost "
              f"(see docs/live.md).", file=sys.stderr)
    print(f"REST live: open {url} (up to {max_streams} stream(s) at once; Ctrl+C stops)", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


def build_parser(wings=()) -> argparse.ArgumentParser:
    """The parser of the core's commands plus each wing module's (its `register(sub)` adds them)."""
    ap = argparse.ArgumentParser(prog="python -m rest_model", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="portrait + speech -> talking-head mp4 with the speech track")
    g.add_argument("--image", default=str(DEMO_PORTRAIT), help="portrait image (any size; RGBA/gray ok)")
    g.add_argument("--audio", default=str(DEMO_SPEECH), help="speech audio (any format PyAV reads)")
    g.add_argument("--out", default="out/talking_head.mp4", help=f"video to write: {', '.join(media.OUTPUT_FORMATS)} "
                   "(H.264 + AAC); written to a hidden temporary file and renamed when complete")
    g.add_argument("--vae", help=f"VAE .safetensors (default: bundled demo {DEMO_VAE.name})")
    g.add_argument("--dit", help=f"DiT .safetensors (default: bundled demo {DEMO_DIT.name})")
    g.add_argument("--random-weights", action="store_true", help="untrained model of --preset (smoke test)")
    g.add_argument("--preset", default="tiny", help="preset for --random-weights (tiny/demo/base)")
    g.add_argument("--seed", type=int, default=0, help="noise seed, 0 to 2^64 - 1 (the same seed, the same video)")
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
    s = sub.add_parser("serve", help="live mode: a page where a portrait talks as you speak (WebSocket server)")
    s.add_argument("--vae", help=f"VAE .safetensors (default: bundled demo {DEMO_VAE.name})")
    s.add_argument("--dit", help=f"DiT .safetensors (default: bundled demo {DEMO_DIT.name})")
    s.add_argument("--random-weights", action="store_true", help="untrained model of --preset (smoke test)")
    s.add_argument("--preset", default="tiny", help="preset for --random-weights (tiny/demo/base)")
    s.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others are exposed)")
    s.add_argument("--port", type=int, default=8288, help="port (default 8288)")
    s.add_argument("--max-streams", type=int, help="concurrent live streams (default: 1 on CPU, one per GPU)")
    s.add_argument("--max-audio-ahead", type=float, default=5.0, help="seconds of received audio a stream may "
                   "hold before generating it; beyond, the stream ends with an error (default 5)")
    s.add_argument("--chunk", type=int, help="latent frames per chunk (default: the model's; 1 halves the wait "
                   "for a chunk's audio)")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    s.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=False,
                   help="decode each chunk with the VAE on a second thread while the DiT makes the next one; a "
                   "chunk goes out as soon as it is decoded (no added latency)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--record-dir", default="out/live", help="where streams started with record: true are saved")
    s.set_defaults(fn=cmd_serve)
    for wing in wings:
        wing.register(sub)
    return ap


def main(argv=None, wings=()) -> int:
    """Run a command; errors become one message and the exit code of their kind (module docstring)."""
    args = build_parser(wings).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = errors.raise_on_sigterm()  # SIGTERM cleans up like Ctrl-C instead of killing mid-write
    try:
        for flag in ("device", "decode_device"):
            if getattr(args, flag, None):
                _device("--" + flag.replace("_", "-"), getattr(args, flag))
        if getattr(args, "out", None):
            parent = os.path.dirname(os.path.abspath(args.out))
            try:
                os.makedirs(parent, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise errors.OutputPathError(f"--out {args.out}: a file stands where its folder {parent} "
                                             f"should be") from None
            except OSError as e:
                raise errors.WriteError(f"--out {args.out}: cannot create the folder {parent}: {e.strerror}",
                                        e.errno) from None
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - every error leaves as a message and its kind's exit code
        return _report(e)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the atomic writers have already cleaned up
        print(f"\ninterrupted ({'SIGTERM' if isinstance(e, errors.Terminated) else 'Ctrl-C'}): stopped; an output "
              f"being written was discarded, earlier files are unchanged", file=sys.stderr)
        return errors.exit_code(e)
    finally:
        if previous is not None:  # main() may run inside another program (tests, a notebook)
            signal.signal(signal.SIGTERM, previous)


def _report(e: Exception) -> int:
    code = errors.exit_code(e)
    if code == errors.INTERNAL:
        traceback.print_exc()
        print(f"internal error (a bug, please report it with the traceback above): {type(e).__name__}: {e}",
              file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)
    return code
