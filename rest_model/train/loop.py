"""What every training stage shares: batches, audio windows for a clip, the resumable loop.

A stage is a `step(batch, g) -> (loss, logs)` closure over its models; `train_loop` owns the rest:
optimiser, an optional exponential moving average (EMA) of the weights, progress, a JSONL loss log,
periodic resumable snapshots. All randomness of step s (batch choice, crops, noise, dropout) comes from a
generator seeded by (seed, s), so a run resumed from a snapshot continues exactly as if it had never stopped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import checkpoint
from . import distributed
from ..audio import SampleTimeline
from ..config import DiTConfig
from ..data.prepare import ClipDataset, describe_dataset
from ..dit import CausalDiT, audio_windows
from ..errors import InputError, NonFiniteError

log = logging.getLogger("rest_model.train")


# -- data ----------------------------------------------------------------------------------------
def audio_margin(cfg: DiTConfig) -> int:
    """Video frames of audio needed on each side of a clip so its windows see real audio, as in a stream."""
    a = cfg.audio
    return cfg.audio_context * cfg.temporal_compression + max(a.context_frames, a.lookahead_frames)


def clip_frames(cfg: DiTConfig, chunks: int) -> int:
    """Video frames of a training clip of `chunks` chunks."""
    return chunks * cfg.stream.chunk_frames * cfg.temporal_compression


def sample_batch(data: ClipDataset, batch: int, g: torch.Generator) -> dict:
    """A batch of random crops of `data` (its clip_frames, with its audio_margin frames of audio each side),
    drawn with the step's generator so a resumed run draws what an unstopped one would: per item a clip, the
    crop's start and a reference frame of the same clip chosen anywhere (identity decoupled from pose)."""
    items = []
    for _ in range(batch):
        i = int(torch.randint(len(data), (1,), generator=g))
        total = data.clips[i]["frames"]
        start = int(torch.randint(total - data.clip_frames + 1, (1,), generator=g))
        items.append(data.load(i, start, int(torch.randint(total, (1,), generator=g))))
    audio = "audio_padded" if data.audio_margin else "audio"
    return {"video": torch.stack([it["video"] for it in items]), "audio": torch.stack([it[audio] for it in items]),
            "ref": torch.stack([it["ref"] for it in items])}


def clip_audio_windows(dit: CausalDiT, audio: torch.Tensor, margin: int, n_latent: int) -> torch.Tensor:
    """Audio [B, S] of a clip with `margin` frames each side -> windows [B, n_latent, W, A] for its latents."""
    c = dit.cfg
    tc, a = c.temporal_compression, c.audio_context
    out = []
    for wave in audio:
        tl = SampleTimeline(c.audio.samples_per_frame, dit.audio_encoder.lead)
        tl.push(wave)
        tl.finish()
        f0 = margin - a * tc
        out.append(dit.audio_encoder.frames(tl, f0, f0 + (n_latent + 2 * a) * tc))
    return audio_windows(torch.cat(out), c)


def drop_audio(dit: CausalDiT, windows: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Silence-mode dropout: whole clips hear the learned null embedding with probability p."""
    drop = torch.rand(windows.shape[0], generator=g) < p
    return torch.where(drop[:, None, None, None].to(windows.device), dit.audio_encoder.null.expand_as(windows), windows)


def chunked_times(b: int, n: int, chunk: int, g: torch.Generator, per_chunk_prob: float = 0.5) -> torch.Tensor:
    """Per-frame flow times [B, n]: per chunk (diffusion forcing) with probability p, else one per clip."""
    per_chunk = torch.rand(b, -(-n // chunk), generator=g).repeat_interleave(chunk, 1)[:, :n]
    per_clip = torch.rand(b, 1, generator=g).expand(b, n)
    pick = (torch.rand(b, 1, generator=g) < per_chunk_prob)
    return torch.where(pick, per_chunk, per_clip)


# -- the loop ------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    steps: int = 1000
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * this at the last step (1 = constant)
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    grad_clip: float = 1.0
    # EMA decay of the weights the stage exports (0 = export the live weights). At batch 4 the live weights
    # jitter with each step's few clips; a diffusion model samples better from their average (0.999 ~ the
    # last 1,000 steps). The live weights keep training; the snapshot holds both.
    ema: float = 0.0


def learning_rate(cfg: LoopConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio: a function of the step alone, so resumes agree."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    frac = min(1.0, step / max(1, cfg.steps - 1))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The randomness of step `step` on process `rank` (each process of a torchrun job draws its own batch)."""
    return torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1 + rank * 15_485_863)


def _state_path(out_dir: str, stage: str) -> str:
    return os.path.join(out_dir, f"{stage}.state.safetensors")


def save_state(path: str, modules: dict, opt: torch.optim.Optimizer, step: int, meta: dict | None = None):
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu().reshape(-1) \
                if torch.as_tensor(v).ndim == 0 else v.detach().contiguous().cpu()
    info = {"step": step, "param_groups": sd["param_groups"], **(meta or {})}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"rest_train_state": json.dumps(info)})
    os.replace(tmp, path)


def load_state(path: str, modules: dict, opt: torch.optim.Optimizer, optional: tuple[str, ...] = ()) -> int:
    """Restore a snapshot; a module named in `optional` that the snapshot lacks keeps its state (an EMA
    turned on when resuming a run that had none starts from the resumed weights). A snapshot that cannot be
    read, or was taken of another architecture, is refused naming the file and what differs."""
    try:
        with safe_open(path, framework="pt") as f:
            info = json.loads((f.metadata() or {})["rest_train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        int(info["step"]), info["param_groups"]
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: the training snapshot cannot be read (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}. Move it away to start the stage afresh") from None
    for name, m in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if sd or name not in optional:
            _check_same_architecture(path, name, m, sd)
            m.load_state_dict(sd)
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v.reshape(()) if key == "step" else v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return int(info["step"])


def _check_same_architecture(path: str, name: str, module: torch.nn.Module, sd: dict) -> None:
    """The snapshot's tensors of `name` must be the module's own: a resume with other model flags (--depth,
    --preset, ...) would otherwise fail deep in load_state_dict with a bare size mismatch."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    diffs = [f"{k} missing from the snapshot" for k in want if k not in have]
    diffs += [f"{k} in the snapshot only" for k in have if k not in want]
    diffs += [f"{k} {have[k]} in the snapshot vs {v} now" for k, v in want.items() if k in have and have[k] != v]
    if diffs:
        raise InputError(f"{path}: this snapshot was taken of another {name} architecture than the one the "
                         f"flags build now ({len(diffs)} difference(s), e.g. {'; '.join(diffs[:3])}); resume with "
                         f"the flags of the run that made it, or use another --out folder")


def check_finite_weights(stage: str, modules: dict[str, torch.nn.Module]) -> None:
    """Refuse to snapshot or export NaN/inf weights, naming the first bad tensor."""
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise NonFiniteError(f"{stage}: {name}.{k} holds NaN/inf weights; nothing was saved")


def ema_models(trainable: dict[str, torch.nn.Module], decay: float) -> dict[str, AveragedModel]:
    """An EMA copy of each trainable module (none when decay is 0); its first update copies the weights."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if not decay:
        return {}
    return {name: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(decay)) for name, m in trainable.items()}


@contextmanager
def averaged_weights(trainable: dict[str, torch.nn.Module], emas: dict[str, AveragedModel]):
    """The EMA's weights in the live modules for the duration (an export writes them), then the live ones back."""
    live = {name: [p.detach().clone() for p in m.parameters()] for name, m in trainable.items() if name in emas}

    def put(name, weights):
        with torch.no_grad():
            for p, w in zip(trainable[name].parameters(), weights):
                p.copy_(w)

    for name in live:
        put(name, emas[name].module.parameters())
    try:
        yield
    finally:
        for name, weights in live.items():
            put(name, weights)


def train_loop(stage: str, trainable: dict[str, torch.nn.Module], step_fn: Callable, out_dir: str,
               cfg: LoopConfig, export: Callable[[], None] | None = None, progress: bool = True) -> list[dict]:
    """Run `step_fn(step, g) -> (loss, logs)` for cfg.steps steps, resuming from out_dir if a snapshot is there.

    `export()` writes the stage's deployable checkpoints; it is called at each snapshot and at the end, with
    the EMA's weights in the modules when cfg.ema is set.
    Under torchrun the step runs data-parallel (distributed.py): each process draws its own batch, DDP
    averages the gradients, and rank 0 alone logs (figures averaged over the processes) and writes files.
    Returns the records of this invocation (this process's own figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    rank, n_proc = distributed.world()
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    emas = ema_models(trainable, cfg.ema)
    saved = trainable | {f"ema_{name}": m for name, m in emas.items()}
    state_path, log_path = _state_path(out_dir, stage), os.path.join(out_dir, f"{stage}.log.jsonl")
    start = load_state(state_path, saved, opt, optional=tuple(saved.keys() - trainable.keys())) \
        if os.path.exists(state_path) else 0
    if start:
        log.info("%s: resumed at step %d from %s", stage, start, state_path)
    if n_proc > 1:
        log.info("%s: data-parallel over %d processes, batch per process as given", stage, n_proc)
    run_step = distributed.data_parallel(trainable, step_fn)
    records, t0 = [], time.perf_counter()
    for m in trainable.values():
        m.train()
    for step in range(start, cfg.steps):
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, logs = run_step(step, step_generator(cfg.seed, step, rank))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        # before the optimiser touches the weights: one NaN step would poison them for good. The flag is
        # shared by all processes of a torchrun job, so they stop together instead of waiting on each other.
        finite = math.isfinite(loss.item()) and math.isfinite(float(grad_norm))
        if distributed.mean_over_ranks({"bad": float(not finite)})["bad"] > 0:
            kept = f"the last good snapshot {state_path} (step {_saved_step(start, step, cfg)}) and" \
                if os.path.exists(state_path) else "no snapshot yet;"
            raise NonFiniteError(f"{stage}: step {step + 1} diverged (loss {loss.item():.4g}, gradient norm "
                                 f"{float(grad_norm):.4g}); stopped before updating the weights; kept {kept} the "
                                 f"checkpoints it exported. Resume with a lower --lr (or other data)")
        opt.step()
        for name, ema in emas.items():
            ema.update_parameters(trainable[name])
        rec = {"step": step + 1, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr, **logs}
        records.append(rec)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            shown = rec | distributed.mean_over_ranks({"loss": rec["loss"], **logs})
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(shown) + "\n")
            if progress and rank == 0:
                rate = (step + 1 - start) / (time.perf_counter() - t0)
                eta = (cfg.steps - step - 1) / max(rate, 1e-9)
                extra = " ".join(f"{k}={shown[k]:.4g}" for k in logs)
                print(f"[{stage}] step {step + 1}/{cfg.steps} loss={shown['loss']:.4g} {extra} "
                      f"({rate:.2f} it/s, eta {eta / 60:.1f} min)", file=sys.stderr, flush=True)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            check_finite_weights(stage, saved)  # every process holds the same weights: all stop together
            if rank == 0:  # every process holds the same weights and optimiser state
                save_state(state_path, saved, opt, step + 1)
                if export is not None:
                    with averaged_weights(trainable, emas):
                        export()
            distributed.barrier()  # nobody runs ahead of (or resumes from) a half-written snapshot
    for m in trainable.values():
        m.eval()
    return records


def _saved_step(start: int, step: int, cfg: LoopConfig) -> int:
    """The step of the newest snapshot written before `step` ran (this run's, else the one it resumed)."""
    last = (step // cfg.save_every) * cfg.save_every
    return last if last > start else start


def make_trainable(dit: CausalDiT) -> CausalDiT:
    """A loaded (frozen) DiT ready to train; an audio backbone stays frozen (its weights are the user's)."""
    dit.requires_grad_(True)
    if dit.audio_encoder.backbone is not None:
        dit.audio_encoder.backbone.requires_grad_(False)
    return dit


def export_model(module, path: str, data: str | None = None):
    """Deployable checkpoint (weights + config, and what it was trained on: the dataset folder `data`
    described), as the loaders and nodes read it."""
    was = module.training
    checkpoint.save(module.eval(), path, trained_on=describe_dataset(data) if data else None)
    module.train(was)


def add_common_args(p, needs: tuple[str, ...] = ()):
    """Arguments every stage command takes; `needs` names the checkpoints a stage starts from."""
    p.add_argument("--data", required=True, help="prepared dataset folder (python -m rest_model prepare)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, resumable state, loss log")
    p.add_argument("--preset", default="demo")
    for name in needs:
        p.add_argument(f"--{name}", required=True, help=f"{name} checkpoint (.safetensors)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunks", type=int, default=3, help="chunks per training clip")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay to lr * this (1 = constant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.0,
                   help="export an exponential moving average of the weights with this decay, e.g. 0.999 "
                        "(default 0 = the live weights)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def region_weights(h: int, w: int, face_weight: float = 0.0, mouth_weight: float = 0.0) -> torch.Tensor:
    """Per-pixel L1 weights [h, w] for face-centred crops: 1 everywhere, + face_weight on the face box,
    + mouth_weight on the mouth region (the boxes the metrics judge), normalised to mean 1. At a high
    compression the loss is otherwise spent on the large background, and the small mouth, the part lip-sync
    lives in, is what blurs away first."""
    from ..data.mouth import FACE_BOX, MOUTH_ROI
    wmap = torch.ones(h, w)
    for (top, bottom, left, right), extra in ((FACE_BOX, face_weight), (MOUTH_ROI, mouth_weight)):
        wmap[round(top * h):round(bottom * h), round(left * w):round(right * w)] += extra
    return wmap / wmap.mean()


def latent_mouth_weights(cfg: DiTConfig, mouth_weight: float) -> torch.Tensor | None:
    """Per-latent-cell loss weights [h, w] for the DiT stages: the VAE's pixel region weights (mouth region
    + mouth_weight) averaged over each cell's pixels, mean 1. The mouth covers a few latent cells, so an
    unweighted loss is nearly all appearance and the audio -> mouth mapping, what lip-sync is, is learnt last."""
    if not mouth_weight:
        return None
    w = region_weights(cfg.resolution, cfg.resolution, 0.0, mouth_weight)
    w = F.avg_pool2d(w[None, None], cfg.spatial_compression)[0, 0]
    return w / w.mean()


def weighted_mean(err: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-pixel (or per-cell) error under region weights broadcast over its last two axes."""
    return err.mean() if weights is None else (err * weights.to(err)).mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    return weighted_mean((pred - target).pow(2), weights)


def add_audio_guidance_arg(p):
    p.add_argument("--audio-guidance", type=float, default=1.0,
                   help="classifier-free guidance scale on the audio for the teacher's targets (1 = off); "
                        "the student learns the guided result and still runs one pass per step")


def add_mouth_weight_arg(p):
    p.add_argument("--mouth-weight", type=float, default=0.0,
                   help="extra loss weight on the latent cells over the mouth region (0 = off)")


def training_data(root: str, cfg: DiTConfig, frames: int, margin: int = 0) -> ClipDataset:
    """The train split of a prepared dataset, read by slices from disk (datasets larger than memory train),
    refusing one prepared for another preset: another resolution, or, when the audio is used (margin > 0),
    another number of audio samples per frame."""
    data = ClipDataset(root, frames, "train", audio_margin=margin)
    if data.resolution != cfg.resolution or (margin and data.spf != cfg.audio.samples_per_frame):
        raise ValueError(f"{root} is {data.resolution}px with {data.spf} audio samples per frame, the model "
                         f"{cfg.resolution}px with {cfg.audio.samples_per_frame}: prepare it with the model's preset")
    return data


def clip_sampler(args, cfg: DiTConfig, min_margin: int = 0) -> tuple[Callable[[torch.Generator], dict], int]:
    """A DiT stage's batches from --data/--batch/--chunks: (draw(g) -> batch, audio margin in frames), the margin
    at least `min_margin` (what a lip-sync expert needs)."""
    margin = max(audio_margin(cfg), min_margin)
    data = training_data(args.data, cfg, clip_frames(cfg, args.chunks), margin)
    return (lambda g: sample_batch(data, args.batch, g)), margin


def loop_config(args) -> LoopConfig:
    return LoopConfig(steps=args.steps, lr=args.lr, seed=args.seed, save_every=args.save_every,
                      min_lr_ratio=args.min_lr_ratio, ema=args.ema)
