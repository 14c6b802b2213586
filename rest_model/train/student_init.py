"""Stage 3: the causal student, initialised from the teacher's weights (CausVid's ODE initialisation).

The student always runs through the same streaming path as inference (`CausalDiT.chunk` over an
ID-Context Cache), so what it is trained on is exactly what it will do. Two terms:
- ODE regression: the teacher solves the whole clip's flow ODE from noise e in many steps (x_0^T); the
  2-step student, with the teacher's earlier chunks as clean context, must land on x_0^T chunk by chunk
  from the same noise:   || student_2step(e_j | x_0^T_<j) - x_0^T_j ||^2
- flow matching with clean real context (teacher forcing): chunk j noised, chunks < j clean in the cache.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .. import checkpoint
from . import distributed
from ..dit import CausalDiT
from ..sampler import flow_schedule, sample_clip, sample_euler
from ..streamer import commit_chunk, new_cache
from .teacher import encode_batch
from .loop import (add_audio_guidance_arg, add_common_args, add_mouth_weight_arg, clip_audio_windows,
                       clip_sampler, drop_audio, export_model, latent_mouth_weights, loop_config, make_trainable,
                       train_loop, weighted_mse)


def student_rollout(dit: CausalDiT, ref, windows, noise, times, context: torch.Tensor | None = None,
                    grad_steps: int = 1) -> torch.Tensor:
    """Generate a clip chunk by chunk as the streamer does; gradients flow through the last `grad_steps`
    Euler steps of each chunk. The cache receives the student's own outputs (detached), or `context`
    (e.g. the teacher's solution) when given. Returns x_0 [B, Cz, n, h, w]."""
    k, b = dit.cfg.stream.chunk_frames, noise.shape[0]
    cache, outs = new_cache(dit, ref, dit.cfg.stream), []
    split = len(times) - 1 - grad_steps
    for j in range(0, noise.shape[2], k):
        a = windows[:, j:j + k]

        def velocity(x, t, a=a):
            return dit.chunk(x, t.expand(b, x.shape[2]), a, cache)[0]

        with torch.no_grad():
            x = sample_euler(velocity, noise[:, :, j:j + k], times[: split + 1])
        x = sample_euler(velocity, x, times[split:])
        outs.append(x)
        with torch.no_grad():
            commit_chunk(dit, cache, (context[:, :, j:j + k] if context is not None else x).detach(), a)
    return torch.cat(outs, 2)


def teacher_forced_fm(dit: CausalDiT, x0, ref, windows, g, weights=None) -> torch.Tensor:
    """Flow matching of each chunk with the real earlier chunks, clean, in the cache."""
    k, b = dit.cfg.stream.chunk_frames, x0.shape[0]
    cache, loss = new_cache(dit, ref, dit.cfg.stream), 0.0
    n_chunks = -(-x0.shape[2] // k)
    for j in range(0, x0.shape[2], k):
        x, a = x0[:, :, j:j + k], windows[:, j:j + k]
        t = torch.sigmoid(torch.randn(b, 1, generator=g)).expand(b, x.shape[2]).to(x)
        e = torch.randn(x.shape, generator=g).to(x)
        tt = t[:, None, :, None, None]
        v = dit.chunk((1 - tt) * x + tt * e, t, a, cache)[0]
        loss = loss + weighted_mse(v, e - x, weights) / n_chunks
        with torch.no_grad():
            commit_chunk(dit, cache, x, a)
    return loss


@dataclasses.dataclass(frozen=True)
class StudentInitConfig:
    """Stage 3's objective (CausVid's ODE initialisation), built once and passed whole."""
    teacher_steps: int = 8  # Euler steps of the teacher's ODE solve that the 2-step student regresses onto
    fm_weight: float = 0.5  # teacher-forced flow matching on real clips
    audio_drop: float = 0.1  # share of clips made silent (the silence mode)
    guidance: float = 1.0  # audio guidance of the teacher's solve

    def __post_init__(self):
        if self.teacher_steps < 1:
            raise ValueError(f"--teacher-steps must be >= 1, got {self.teacher_steps}")
        if not 0 <= self.audio_drop <= 1 or self.fm_weight < 0:
            raise ValueError(f"audio_drop must be in [0, 1] and fm_weight >= 0, got {self.audio_drop}, "
                             f"{self.fm_weight}")

    @classmethod
    def from_args(cls, args) -> "StudentInitConfig":
        return cls(teacher_steps=args.teacher_steps, guidance=args.audio_guidance)


def init_student_loss(student, teacher, vae, batch, margin, g, cfg: StudentInitConfig = StudentInitConfig(),
                      weights=None) -> tuple[torch.Tensor, dict]:
    """ODE regression of the streamed 2-step student onto the teacher's many-step solve of the same noise, plus
    teacher-forced flow matching."""
    device = next(student.parameters()).device
    x0, ref = encode_batch(vae, batch, device)
    n = x0.shape[2]
    ws = drop_audio(student, clip_audio_windows(student, batch["audio"].to(device), margin, n), cfg.audio_drop, g)
    e = torch.randn(x0.shape, generator=g).to(x0)
    with torch.no_grad():
        wt = clip_audio_windows(teacher, batch["audio"].to(device), margin, n)
        dropped = (ws == student.audio_encoder.null).all(-1).all(-1).all(-1)  # the same clips go silent
        wt = torch.where(dropped[:, None, None, None], teacher.audio_encoder.null.expand_as(wt), wt)
        target = sample_clip(teacher, ref, wt, e, flow_schedule(cfg.teacher_steps), guidance=cfg.guidance)
    s = student.cfg.stream
    pred = student_rollout(student, ref, ws, e, flow_schedule(s.steps, s.shift), context=target, grad_steps=s.steps)
    ode = weighted_mse(pred, target, weights)
    fm = teacher_forced_fm(student, x0, ref, ws, g, weights)
    return ode + cfg.fm_weight * fm, {"ode": ode.item(), "fm": fm.item()}


def load_student_stage(args, student_path: str):
    """VAE, frozen teacher and trainable student of stages 3-4, refusing a teacher or student that does not fit the
    VAE, or a pair that streams differently."""
    vae, teacher = checkpoint.load_pair(args.vae, args.teacher, args.device)
    student = make_trainable(checkpoint.load_dit(student_path, args.device))
    try:
        checkpoint.check_compatible(vae.cfg, student.cfg)
    except ValueError as e:
        raise ValueError(f"the student {student_path} does not fit {args.vae}: {e}") from None
    # the teacher may be larger (train-teacher --depth), but it must see the clip as the student streams it: the
    # same frames, cut into the same chunks (its asynchronous schedule is per chunk). How far back the student's
    # rolling cache reaches is the student's own: the bidirectional teacher sees every earlier chunk anyway.
    t, s = teacher.cfg, student.cfg
    pairs = {"resolution": (t.resolution, s.resolution), "fps": (t.fps, s.fps),
             "stream.chunk_frames": (t.stream.chunk_frames, s.stream.chunk_frames)}
    differ = {k: ab for k, ab in pairs.items() if ab[0] != ab[1]}
    if differ:
        raise ValueError(f"the teacher {args.teacher} and the student {student_path} differ in {', '.join(differ)}: "
                         f"{[a for a, _ in differ.values()]} vs {[b for _, b in differ.values()]}")
    return vae, teacher, student


@distributed.launched
def cmd_init_student(args) -> int:
    loss_cfg = StudentInitConfig.from_args(args)
    vae, teacher, student = load_student_stage(args, args.teacher)  # the student starts as the teacher
    if args.context_frames is not None:
        try:
            stream_cfg = dataclasses.replace(student.cfg.stream, context_frames=args.context_frames)
        except ValueError as e:
            raise ValueError(f"--context-frames: {e}") from None
        student.cfg = dataclasses.replace(student.cfg, stream=stream_cfg)
    draw, margin = clip_sampler(args, student.cfg)
    weights = latent_mouth_weights(student.cfg, args.mouth_weight)

    def step(i, g):
        return init_student_loss(student, teacher, vae, draw(g), margin, g, loss_cfg, weights)

    train_loop("student", {"dit": student}, step, args.out, loop_config(args),
               lambda: export_model(student, os.path.join(args.out, "student_init.safetensors"), args.data))
    return 0


def register(sub):
    p = sub.add_parser("init-student", help="stage 3: causal 2-step student from the teacher (ODE regression)")
    add_common_args(p, needs=("vae", "teacher"))
    p.add_argument("--teacher-steps", type=int, default=StudentInitConfig.teacher_steps, help="Euler steps of the teacher's ODE solve")
    p.add_argument("--context-frames", type=int,
                   help="latent frames in the student's rolling Context-Cache (default: the teacher's, i.e. the "
                        "preset's); distill and inference keep the student's. 0: the ID-Sink alone, each chunk made "
                        "from the portrait and its audio only (an ablation: nothing of its own output feeds back). "
                        "Train on clips longer than the cache (--chunks x chunk frames) or it never fills")
    add_mouth_weight_arg(p)
    add_audio_guidance_arg(p)
    p.set_defaults(fn=cmd_init_student)
