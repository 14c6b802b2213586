"""Streaming benchmarks (printed figures, not tests). Every figure goes through `rest_model.stream`,
timed from outside the loop through its callback.

    python bench/stream_bench.py speed   [--preset demo] [--seconds 20]   fps, real-time factor, first frame;
                                                                          VAE decode in line vs overlapped;
                                         [--vae-b F]                      another VAE's decode, side by side
    python bench/stream_bench.py long    [--preset demo] [--chunks 1000]  per-chunk cost drift, resident memory
    python bench/stream_bench.py cache   [--preset demo] [--chunks 12]    ID-Context Cache vs recomputing context
    python bench/stream_bench.py flops                                    FLOPs per frame per preset, H100 ceiling
    python bench/stream_bench.py all
Models are untrained (random weights, the zero-initialised gates opened) unless --vae/--dit are given:
cost does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rest_model import checkpoint  # noqa: E402
from rest_model.cli import random_model  # noqa: E402
from rest_model.config import PRESETS, preset  # noqa: E402
from rest_model.dit import CausalDiT, audio_windows  # noqa: E402
from rest_model.id_context_cache import IDContextCache  # noqa: E402
from rest_model.sampler import flow_schedule, sample_euler  # noqa: E402
from rest_model.streamer import AudioSource, generate_chunk, new_cache, prepare_reference, stream  # noqa: E402
from rest_model.vae import CausalVAE  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense, no sparsity)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def models(args):
    if args.vae and args.dit:
        return checkpoint.load_pair(args.vae, args.dit)
    vae, dit = random_model(args.preset)
    with torch.no_grad():  # open the adaLN-zero gates so every branch really computes
        for p in list(vae.parameters()) + list(dit.parameters()):
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return vae, dit


def speech(seconds: float, sr: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return 0.3 * torch.sin(2 * torch.pi * 150 * t) * (torch.sin(2 * torch.pi * 4 * t) > 0)


def timed_stream(vae, dit, seconds, live=False, overlap=False):
    """Run the streamer, dropping each chunk's frames as a player would once shown; return the start time,
    per-chunk wall-clock marks, the frame count and per-chunk (carried state bytes, resident MiB)."""
    r = dit.cfg.resolution
    wave = speech(seconds)
    audio = AudioSource([wave[i:i + 1600] for i in range(0, wave.numel(), 1600)], 16000) if live \
        else AudioSource.whole(wave, 16000)
    marks, stats, frames = [], [], 0
    t0 = time.perf_counter()
    for c in stream(vae, dit, torch.zeros(3, r, r), audio, dit.cfg.stream, overlap_decode=overlap,
                    callback=lambda c: marks.append(time.perf_counter())):
        frames += c.num_frames
        stats.append((c.state_bytes, rss_mib() if live else 0.0))
    return t0, marks, frames, stats


def bench_speed(args):
    """End-to-end speed with the VAE decode in line, then overlapped with the DiT (TalkingMachines), side by
    side: in line, in turn, twice each, so machine noise shows as the spread within a mode."""
    vae, dit = models(args)
    timed_stream(vae, dit, 1.0)  # warm up allocator and kernels
    fps = dit.cfg.fps
    print(f"[speed] preset={args.preset} {dit.cfg.resolution}x{dit.cfg.resolution}@{fps}fps threads={torch.get_num_threads()} "
          f"steps={dit.cfg.stream.steps} chunk={dit.cfg.stream.chunk_frames} latent frames "
          f"({dit.cfg.stream.chunk_frames * dit.cfg.temporal_compression} video frames)")
    rates = {False: [], True: []}
    for overlap in (False, True, False, True):
        t0, marks, frames, _ = timed_stream(vae, dit, args.seconds, overlap=overlap)
        total = marks[-1] - t0
        rates[overlap].append(frames / total)
        mode = "overlapped" if overlap else "in line   "
        print(f"[speed] decode {mode}: {frames} frames ({frames / fps:.1f} s of video) in {total:.2f} s: "
              f"{frames / total:.1f} fps, real-time factor {frames / fps / total:.2f}x (>1 is faster than real "
              f"time), first frame after {marks[0] - t0:.3f} s")
    best = {o: max(r) for o, r in rates.items()}
    print(f"[speed] overlapped / in line (best of 2 each): {best[True] / best[False]:.2f}x")
    if args.vae_b:
        compare_vaes(vae, checkpoint.load_vae(args.vae_b), dit, args)


def compare_vaes(vae_a, vae_b, dit, args):
    """Two VAEs for the same latents (e.g. a decoder split against the decoder it was carried from), streamed
    in line in turn, twice each: what the other decoder costs end to end."""
    checkpoint.check_compatible(vae_b.cfg, dit.cfg)
    rates = {"a": [], "b": []}
    for name, vae in (("a", vae_a), ("b", vae_b), ("a", vae_a), ("b", vae_b)):
        t0, marks, frames, _ = timed_stream(vae, dit, args.seconds)
        rates[name].append(frames / (marks[-1] - t0))
        print(f"[speed] --vae{'' if name == 'a' else '-b'} in line: {rates[name][-1]:.1f} fps, first frame after "
              f"{marks[0] - t0:.3f} s")
    print(f"[speed] --vae-b / --vae (best of 2 each): {max(rates['b']) / max(rates['a']):.2f}x")


def bench_long(args):
    vae, dit = models(args)
    per_chunk = dit.cfg.stream.chunk_frames * dit.cfg.temporal_compression
    seconds = args.chunks * per_chunk / dit.cfg.fps
    t0, marks, frames, chunks = timed_stream(vae, dit, seconds, live=True)
    dts = torch.diff(torch.tensor([t0] + marks, dtype=torch.float64))
    first, last = dts[10:110].mean().item(), dts[-100:].mean().item()
    print(f"[long] {len(chunks)} chunks ({frames} frames, {frames / dit.cfg.fps / 60:.1f} min of video), live audio in 0.1 s pieces")
    print(f"[long] mean chunk cost: chunks 10-110 {first * 1e3:.1f} ms, last 100 {last * 1e3:.1f} ms, "
          f"ratio last/early {last / first:.3f} (target <= 1.10)")
    blocks = [f"{dts[i:i + 100].mean().item() * 1e3:.0f}" for i in range(0, len(dts) - 99, 100)]
    print(f"[long] mean ms per block of 100 chunks: {' '.join(blocks)} (a trend here is growth; scatter is machine noise)")
    print(f"[long] carried state: chunk 10 {chunks[10][0] / 1024:.1f} KiB, last {chunks[-2][0] / 1024:.1f} KiB; "
          f"resident memory at chunk 10 {chunks[10][1]:.0f} MiB, at chunk {len(chunks)} {chunks[-1][1]:.0f} MiB, "
          f"peak over chunks 10+ {max(m for _, m in chunks[10:]):.0f} MiB")


@torch.no_grad()
def bench_cache(args):
    """Same chunks, same noise: (a) the ID-Context Cache, (b) no cache: every denoising step reruns the
    block-causal pass over all history that can still reach the chunk (depth * (context + chunk) frames)."""
    vae, dit = models(args)
    c, s = dit.cfg, dit.cfg.stream
    k, n_chunks = s.chunk_frames, args.chunks
    times = flow_schedule(s.steps, s.shift)
    ref = prepare_reference(vae, dit, torch.zeros(3, c.resolution, c.resolution))
    feats = torch.randn(1, (n_chunks * k + 2 * c.audio_context) * c.temporal_compression, c.audio.dim)
    audio = audio_windows(feats, c)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, c.latent_channels, k, c.latent_size, c.latent_size, generator=g) for _ in range(n_chunks)]

    cache, cached, t_cached = new_cache(dit, ref, s), [], []
    for j in range(n_chunks):
        t0 = time.perf_counter()
        cached.append(generate_chunk(dit, cache, noises[j], audio[:, j * k:(j + 1) * k], times))
        t_cached.append(time.perf_counter() - t0)

    reach = c.depth * (s.context_frames + k)  # frames of history that can influence a chunk
    recomputed, t_recompute = [], []
    for j in range(n_chunks):
        t0 = time.perf_counter()
        lo = max(0, j * k - reach) // k * k
        history = torch.cat(recomputed, 2)[:, :, lo:] if recomputed else None

        def velocity(x, t, history=history, lo=lo, j=j):
            seq = x if history is None else torch.cat([history, x], 2)
            tt = torch.cat([torch.zeros(1, seq.shape[2] - k), t.expand(1, k)], 1)
            out = dit(seq, tt, audio[:, lo:(j + 1) * k], ref, causal=True, chunk=k, context=s.context_frames)
            return out[:, :, -k:]

        recomputed.append(sample_euler(velocity, noises[j], times))
        t_recompute.append(time.perf_counter() - t0)
    err = max((a - b).abs().max().item() for a, b in zip(cached, recomputed))
    steady = slice(-(-reach // k), None)  # chunks whose whole reach of history exists
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    a, b = mean(t_cached[steady]), mean(t_recompute[steady])
    print(f"[cache] preset={args.preset} {n_chunks} chunks, steady state = chunks {-(-reach // k)}+ (history reach "
          f"{reach} latent frames): ID-Context Cache {a * 1e3:.1f} ms/chunk, recomputing context {b * 1e3:.1f} ms/chunk "
          f"-> speed-up {b / a:.2f}x (target >= 2x); whole run {sum(t_recompute) / sum(t_cached):.2f}x; "
          f"max |difference| of the outputs {err:.2e}")


def flops_per_frame(name: str) -> tuple[float, dict]:
    from torch.utils.flop_counter import FlopCounterMode
    p = preset(name)
    c, s = p.dit, p.dit.stream
    dit, vae = CausalDiT(c).to("meta"), CausalVAE(p.vae).to("meta")
    with torch.device("meta"):
        lat = (1, c.latent_channels, s.chunk_frames, c.latent_size, c.latent_size)
        ref, x = torch.randn(lat[:2] + (1,) + lat[3:]), torch.randn(lat)
        t, aud = torch.rand(1, s.chunk_frames), torch.randn(1, s.chunk_frames, c.audio_window, c.audio.dim)
        cache = IDContextCache(dit.id_sink(ref), s.context_frames, c.tokens_per_frame)
        while cache.window_frames < s.context_frames:  # a full window: the steady-state cost
            cache.append(dit.chunk(x, t, aud, cache)[1], s.chunk_frames)

        def count(fn):
            fc = FlopCounterMode(display=False)
            with fc:
                fn()
            return fc.get_total_flops()

        dit_pass = count(lambda: dit.chunk(x, t, aud, cache))
        decode = count(lambda: vae.decode_chunk(x, None))
    enc = CausalDiT(c).audio_encoder  # the audio front end cannot run on meta (mel filterbank)
    tl = enc.timeline()
    tl.push(torch.zeros(10 * c.audio.samples_per_frame * s.chunk_frames * c.temporal_compression))
    tl.finish()
    n = s.chunk_frames * c.temporal_compression
    audio = count(lambda: enc.frames(tl, 0, n + 2 * c.audio_context * c.temporal_compression))
    parts = {"dit": dit_pass * (s.steps + 1), "vae_decode": decode, "audio": audio}
    return sum(parts.values()) / n, {k: v / n for k, v in parts.items()}


def bench_flops(args):
    for name in PRESETS:
        per_frame, parts = flops_per_frame(name)
        c = preset(name).dit
        ceiling = H100_BF16_DENSE / per_frame
        detail = ", ".join(f"{k} {v / 1e9:.4f}" for k, v in parts.items())
        print(f"[flops] {name:5s} {c.resolution}x{c.resolution}: {per_frame / 1e9:9.4f} GFLOP/frame ({detail}; "
              f"DiT x{c.stream.steps + 1} passes incl. commit) -> H100 bf16 dense ceiling {ceiling:,.0f} fps "
              f"at 100% MFU, {ceiling * 0.4:,.0f} fps at 40%")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["speed", "long", "cache", "flops", "all"])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--vae"), ap.add_argument("--dit")
    ap.add_argument("--vae-b", help="speed: a second VAE for --dit's latents, streamed in line in turn with --vae")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"speed": bench_speed, "long": bench_long, "cache": bench_cache, "flops": bench_flops}
    defaults = {"long": 1000, "cache": 24}
    for name in (runs if args.what == "all" else [args.what]):
        a = argparse.Namespace(**vars(args))
        a.chunks = args.chunks or defaults.get(name)
        runs[name](a)


if __name__ == "__main__":
    main()
