"""Stage 4: Asynchronous Streaming Distillation (REST).

The student generates a clip chunk by chunk exactly as at inference (2 Euler steps per chunk, its own
outputs committed to the ID-Context Cache, gradients through the last step only). For each chunk j the
bidirectional teacher sees the sequence under an *asynchronous* noise schedule:

    chunks i < j : the student's own outputs, lightly re-noised to t_ctx   (earlier = cleaner)
    chunk  j     : the student's output re-noised to t_j ~ U(t_min, t_max)
    chunks i > j : absent

and the teacher's solve of chunk j from t_j to 0 (`solve_steps` Euler steps over chunk j alone, the
context held at t_ctx; one step is its denoised estimate x_t - t_j v_T) is the target:

    L_ASD = sum_j || x^S_j - stopgrad(x_0^T_j) ||^2

A few solve steps give a sharper target than the one-step estimate, which at t_j ~ 0.5 is the blurry
conditional mean.

Because the context is the student's own, the teacher is meant to show it how to correct the drift it creates;
that is REST's argument against error accumulation over long streams. It holds only for a teacher that learned on
clips as long as the rollouts it judges (`--chunks`): asked about chunks after more context than it ever saw, its
targets carry drift of their own into the student (docs/experiments/drift_study.md measures both cases). A
teacher-forced flow-matching term on real clips (weight `real_weight`) keeps the student anchored to data.

Optional distribution term (`dmd_weight`, DMD / DMD2): regression onto a solve pulls the student towards the
teacher's conditional *mean* from its own noised chunk; distribution matching instead moves each of the
student's chunks along the difference between two scores at the same asynchronous x_t:

    x0_real = x_t - t_j v_T(x_t)          the teacher (with audio guidance): where data lies
    x0_fake = x_t - t_j v_C(x_t)          a critic C that tracks the student's own outputs
    d_j     = (x0_fake - x0_real) / mean|x^S_j - x0_real|          (DMD's per-sample normalisation)
    L_DMD   = || x^S - stopgrad(x^S - d) ||^2 / 2     (mouth-weighted mean over cells, as the ASD term; its
                                                     gradient is d per cell, scaled by the same weights)

The critic starts as a copy of the teacher (so d = 0 until the student's distribution moves away from the
teacher's, at guidance 1) and learns by flow matching on the student's detached chunks under the same
asynchronous schedule, L_C = || v_C(x_t) - (e - x^S_j) ||^2, one critic update per student update (DMD2 uses
several; the two losses share one optimiser step because neither reaches the other's weights).

Optional lip-sync term (`sync_weight`, with a frozen expert from `train-sync`): the expert scores the student's
rollout against the clip's audio, L = sync_weight * L_sync (rest_model.sync_expert), its gradient reaching the
student's chunks through the same last Euler step as the ASD term. Regression onto the teacher can teach no more
lip-sync than the teacher has; the expert judges the timing of the student's own mouths against the audio.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from . import distributed
from .student_init import load_student_stage, student_rollout, teacher_forced_fm
from ..sampler import audio_guided, flow_schedule
from .sync_expert import check_fits, sync_loss
from .sync import load_expert
from .teacher import encode_batch
from .loop import (add_audio_guidance_arg, add_common_args, add_mouth_weight_arg, clip_audio_windows,
                       clip_sampler, export_model, latent_mouth_weights, loop_config, make_trainable, train_loop,
                       weighted_mse)


@dataclass(frozen=True)
class ASDConfig:
    """Stage 4's objective: the asynchronous schedule and the weight of each term. Built once (from the
    command line by `from_args`) and passed whole, so no two floats can trade places on the way down."""
    t_ctx: float = 0.1  # re-noise level of the student's own context (0 = clean, 1 = pure noise)
    t_min: float = 0.2  # chunk j is re-noised to t_j ~ U(t_min, t_max)
    t_max: float = 0.7
    solve_steps: int = 3  # teacher Euler steps from t_j to 0 for the target (1 = its one-step estimate)
    real_weight: float = 0.25  # teacher-forced flow matching on real clips
    guidance: float = 1.0  # audio guidance of the teacher's targets, distilled into the student
    dmd_weight: float = 0.0  # distribution-matching term with a critic (0 = off)
    sync_weight: float = 0.0  # lip-sync expert's loss on the rollout (0 = off)

    def __post_init__(self):
        # a context of pure noise would tell the teacher nothing
        if not (0 <= self.t_ctx < 1 and 0 < self.t_min <= self.t_max <= 1):
            raise ValueError(f"distill needs 0 <= --t-ctx < 1 and 0 < --t-min <= --t-max <= 1, got --t-ctx "
                             f"{self.t_ctx} --t-min {self.t_min} --t-max {self.t_max}")
        for name in ("dmd_weight", "sync_weight", "real_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.solve_steps < 1:
            raise ValueError(f"--solve-steps must be >= 1, got {self.solve_steps}")

    @classmethod
    def from_args(cls, args) -> "ASDConfig":
        return cls(t_ctx=args.t_ctx, t_min=args.t_min, t_max=args.t_max, solve_steps=args.solve_steps,
                   real_weight=args.real_weight, guidance=args.audio_guidance, dmd_weight=args.dmd_weight,
                   sync_weight=args.sync_weight)


def asynchronous_times(n_frames: int, chunk: int, j: int, t_ctx: float, t_j: torch.Tensor) -> torch.Tensor:
    """Per-frame teacher times [B, (j + 1) * chunk]: t_ctx for chunks before j, t_j for chunk j."""
    b = t_j.shape[0]
    ctx = torch.full((b, j * chunk), t_ctx)
    return torch.cat([ctx, t_j[:, None].expand(b, min(chunk, n_frames - j * chunk))], 1)


def renoise_asynchronously(x, chunk: int, j: int, cfg: ASDConfig, g):
    """Chunks <= j of x under the asynchronous schedule, t_j ~ U(t_min, t_max): (x_t, per-frame t, noise)."""
    b, n = x.shape[0], x.shape[2]
    t_j = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, generator=g)
    t = asynchronous_times(n, chunk, j, cfg.t_ctx, t_j).to(x)
    x = x[:, :, :t.shape[1]]
    e = torch.randn(x.shape, generator=g).to(x)
    tt = t[:, None, :, None, None]
    return (1 - tt) * x + tt * e, t, e


def asd_targets(teacher, student_out, ref, windows, g, cfg: ASDConfig) -> torch.Tensor:
    """The teacher's clean estimate of every chunk under its asynchronous schedule (no gradient): a
    `cfg.solve_steps` solve from t_j to 0 with audio guidance `cfg.guidance` (distilled into the student,
    which then needs one pass per step at inference)."""
    k = teacher.cfg.stream.chunk_frames
    n = student_out.shape[2]
    targets = []
    with torch.no_grad():
        for j in range(0, -(-n // k)):
            start, end = j * k, min(n, (j + 1) * k)
            xt, t, _ = renoise_asynchronously(student_out, k, j, cfg, g)
            steps = t[:, start:start + 1] * torch.linspace(1, 0, cfg.solve_steps + 1).to(t)  # (B, S+1) t_j -> 0
            xj = xt[:, :, start:end]
            for s in range(cfg.solve_steps):
                t[:, start:end] = steps[:, s:s + 1]
                v = audio_guided(teacher, torch.cat([xt[:, :, :start], xj], 2), t, windows[:, :end], ref,
                                 cfg.guidance)[:, :, start:end]
                xj = xj + (steps[:, s + 1] - steps[:, s])[:, None, None, None, None] * v
            targets.append(xj)
    return torch.cat(targets, 2)


def dmd_terms(teacher, critic, student_out, ref, windows, g, cfg: ASDConfig,
              weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, L_C): the DMD direction of every chunk of the (detached) rollout, without gradient, and the critic's
    flow-matching loss on the same noised chunks (gradient to the critic only)."""
    k = teacher.cfg.stream.chunk_frames
    n = student_out.shape[2]
    n_chunks = -(-n // k)
    directions, critic_loss = [], 0.0
    for j in range(n_chunks):
        start, end = j * k, min(n, (j + 1) * k)
        xt, t, e = renoise_asynchronously(student_out, k, j, cfg, g)
        v_fake = critic(xt, t, windows[:, :end], ref)[:, :, start:end]
        x = student_out[:, :, start:end]
        critic_loss = critic_loss + weighted_mse(v_fake, e[:, :, start:end] - x, weights) / n_chunks
        with torch.no_grad():
            v_real = audio_guided(teacher, xt, t, windows[:, :end], ref, cfg.guidance)[:, :, start:end]
            tj = t[:, start:end][:, None, :, None, None]
            x0_real = xt[:, :, start:end] - tj * v_real
            x0_fake = xt[:, :, start:end] - tj * v_fake.detach()
            scale = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
            directions.append((x0_fake - x0_real) / scale)
    return torch.cat(directions, 2), critic_loss


def asd_loss(student, teacher, vae, batch, margin, g, cfg: ASDConfig = ASDConfig(), *, weights=None, critic=None,
             expert=None) -> tuple[torch.Tensor, dict]:
    """L_ASD + real_weight * L_FM (+ dmd_weight * L_DMD + L_C with a critic) (+ sync_weight * L_sync with an
    expert) on one batch of clips, the student rolled out exactly as it streams."""
    device = next(student.parameters()).device
    x0, ref = encode_batch(vae, batch, device)
    n = x0.shape[2]
    ws = clip_audio_windows(student, batch["audio"].to(device), margin, n)
    with torch.no_grad():
        wt = clip_audio_windows(teacher, batch["audio"].to(device), margin, n)
    s = student.cfg.stream
    e = torch.randn(x0.shape, generator=g).to(x0)
    out = student_rollout(student, ref, ws, e, flow_schedule(s.steps, s.shift), grad_steps=1)
    target = asd_targets(teacher, out.detach(), ref, wt, g, cfg)
    asd = weighted_mse(out, target, weights)
    real = teacher_forced_fm(student, x0, ref, ws, g, weights)
    loss, logs = asd + cfg.real_weight * real, {"asd": asd.item(), "fm": real.item()}
    if critic is not None and cfg.dmd_weight > 0:
        # the critic hears the teacher's windows: a copy of the teacher whose audio front end these losses never
        # reach, so its own windows would be the same
        d, critic_loss = dmd_terms(teacher, critic, out.detach(), ref, wt, g, cfg, weights=weights)
        dmd = 0.5 * weighted_mse(out, (out - d).detach(), weights)
        loss = loss + cfg.dmd_weight * dmd + critic_loss
        logs |= {"dmd": dmd.item(), "critic": critic_loss.item()}
    if expert is not None and cfg.sync_weight > 0:
        sync, sync_logs = sync_loss(expert, out, batch["audio"].to(device), margin)
        loss = loss + cfg.sync_weight * sync
        logs |= sync_logs
    return loss, logs


@distributed.launched
def cmd_distill(args) -> int:
    cfg = ASDConfig.from_args(args)  # checks the schedule and the weights before anything is loaded
    if (cfg.sync_weight > 0) != bool(args.sync_expert):
        raise ValueError("--sync-weight and --sync-expert go together: the lip-sync term needs an expert "
                         "(python -m rest_model train-sync) and a weight > 0")
    vae, teacher, student = load_student_stage(args, args.student)
    expert = None
    if args.sync_expert:
        expert = load_expert(args.sync_expert, vae.cfg, args.device)
        check_fits(expert.cfg, student.cfg, "student")
    draw, margin = clip_sampler(args, student.cfg, expert.cfg.margin if expert is not None else 0)
    weights = latent_mouth_weights(student.cfg, args.mouth_weight)
    models = {"dit": student}
    if cfg.dmd_weight > 0:
        # the critic starts as the teacher; it is trained, and saved in the run's snapshot, but never exported
        models["critic"] = make_trainable(copy.deepcopy(teacher))
    critic = models.get("critic")

    def step(i, g):
        return asd_loss(student, teacher, vae, draw(g), margin, g, cfg, weights=weights, critic=critic, expert=expert)

    train_loop("asd", models, step, args.out, loop_config(args),
               lambda: export_model(student, os.path.join(args.out, "student_asd.safetensors"), args.data))
    return 0


def register(sub):
    p = sub.add_parser("distill", help="stage 4: Asynchronous Streaming Distillation of the 2-step student")
    add_common_args(p, needs=("vae", "teacher", "student"))
    d = ASDConfig()
    p.add_argument("--t-ctx", type=float, default=d.t_ctx, help="re-noise level of the student's own context")
    p.add_argument("--t-min", type=float, default=d.t_min, help="the current chunk is re-noised to t_j ~ U(t-min, "
                   "t-max)")
    p.add_argument("--t-max", type=float, default=d.t_max, help="(0 = clean, 1 = pure noise)")
    p.add_argument("--solve-steps", type=int, default=d.solve_steps, help="teacher Euler steps from t_j to 0 for the "
                   "target")
    p.add_argument("--real-weight", type=float, default=d.real_weight, help="teacher-forced flow matching on real "
                   "clips")
    p.add_argument("--dmd-weight", type=float, default=d.dmd_weight, help="weight of the distribution-matching (DMD) term, "
                   "with a critic initialised from the teacher and trained alongside (default 0 = off)")
    p.add_argument("--sync-expert", help="lip-sync expert (.safetensors from train-sync) for the --sync-weight term")
    p.add_argument("--sync-weight", type=float, default=d.sync_weight, help="weight of the lip-sync expert's loss on the "
                   "student's rollout (default 0 = off)")
    add_mouth_weight_arg(p)
    add_audio_guidance_arg(p)
    p.set_defaults(fn=cmd_distill)
