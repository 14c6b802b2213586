"""Stage 2: the bidirectional teacher. Flow matching on whole clips conditioned on the ID-Sink (a reference
frame of the same clip) and windowed audio:

    loss = || v_theta(x_t, t, ref, a) - (e - x_0) ||^2,   x_t = (1 - t) x_0 + t e

with t drawn per chunk half of the time (diffusion forcing), so the teacher is accurate on the
asynchronous schedules it must serve in ASD, and audio dropped to the silence embedding 10% of the time.
"""
from __future__ import annotations

import os

import torch

from .. import checkpoint
from . import distributed
from ..config import check_compatible, preset, to_json
from ..dit import CausalDiT
from .relayout import deeper_dit, relayout_dit
from .loop import (add_common_args, add_mouth_weight_arg, chunked_times, clip_audio_windows, clip_sampler,
                       drop_audio, export_model, latent_mouth_weights, loop_config, train_loop, weighted_mse)
from ..vae import CausalVAE


@torch.no_grad()
def encode_batch(vae: CausalVAE, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and reference images -> scaled latents (x_0 [B, Cz, n, h, w], ref [B, Cz, 1, h, w])."""
    return vae.encode(batch["video"].to(device)), vae.encode_image(batch["ref"].to(device))


def flow_matching_loss(dit: CausalDiT, x0, ref, windows, t, g, causal=False,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    e = torch.randn(x0.shape, generator=g).to(x0)
    tt = t.to(x0)[:, None, :, None, None]
    xt = (1 - tt) * x0 + tt * e
    s = dit.cfg.stream
    v = dit(xt, t.to(x0), windows, ref, causal=causal, chunk=s.chunk_frames, context=s.context_frames)
    return weighted_mse(v, e - x0, weights)


def teacher_loss(dit: CausalDiT, vae: CausalVAE, batch: dict, margin: int, g: torch.Generator,
                 audio_drop: float = 0.1, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    device = next(dit.parameters()).device
    x0, ref = encode_batch(vae, batch, device)
    b, n = x0.shape[0], x0.shape[2]
    windows = drop_audio(dit, clip_audio_windows(dit, batch["audio"].to(device), margin, n), audio_drop, g)
    t = chunked_times(b, n, dit.cfg.stream.chunk_frames, g)
    loss = flow_matching_loss(dit, x0, ref, windows, t, g, weights=weights)
    return loss, {"fm": loss.item()}


@distributed.launched
def cmd_train_teacher(args) -> int:
    if args.audio_backbone != "mel" and not args.audio_backbone_weights:
        raise ValueError(f"--audio-backbone {args.audio_backbone} needs --audio-backbone-weights (a .safetensors "
                         f"of the torchaudio model's state dict): a random backbone hears nothing")
    torch.manual_seed(args.seed)  # a fresh teacher's weights are the seed's, the same in every process
    vae = checkpoint.load_vae(args.vae, args.device)
    cfg = preset(args.preset).dit
    cfg.audio.backbone = args.audio_backbone
    if args.depth:
        cfg.depth = args.depth
    if args.init:  # e.g. carry a trained teacher over to a fine-tuned VAE's latents
        dit = checkpoint.load_dit(args.init, args.device)
        if args.depth and dit.cfg.depth < args.depth:  # asked for a deeper teacher: start as the trained one
            dit = deeper_dit(dit, cfg.depth)
        if to_json(dit.cfg) != to_json(cfg):
            try:  # another temporal layout: carry the weights over (relayout.py)
                dit = relayout_dit(dit, cfg)
            except ValueError as e:
                raise ValueError(f"--init {args.init} is not a {args.preset} teacher with the "
                                 f"{args.audio_backbone} audio front end: {e}") from None
        dit.requires_grad_(True)
    else:
        dit = CausalDiT(cfg)
        if args.audio_backbone_weights:
            dit.audio_encoder.load_backbone_weights(args.audio_backbone_weights)
    dit.to(args.device)
    try:
        check_compatible(vae.cfg, dit.cfg)
    except ValueError as e:
        raise ValueError(f"the teacher does not fit {args.vae}: {e}") from None
    draw, margin = clip_sampler(args, dit.cfg)
    weights = latent_mouth_weights(dit.cfg, args.mouth_weight)

    def step(i, g):
        return teacher_loss(dit, vae, draw(g), margin, g, weights=weights)

    train_loop("teacher", {"dit": dit}, step, args.out, loop_config(args),
               lambda: export_model(dit, os.path.join(args.out, "teacher.safetensors"), args.data))
    return 0


def register(sub):
    p = sub.add_parser("train-teacher", help="stage 2: bidirectional teacher DiT (flow matching)")
    add_common_args(p, needs=("vae",))
    p.add_argument("--audio-backbone", default="mel", choices=("mel", "wav2vec2_base", "hubert_base"),
                   help="audio front end: log-mel (default) or a frozen torchaudio wav2vec2/HuBERT base")
    p.add_argument("--audio-backbone-weights", help="the backbone's weights: .safetensors of the torchaudio "
                   "model's state dict (yours; nothing is downloaded)")
    p.add_argument("--depth", type=int, help="DiT blocks, instead of the preset's: a teacher may be deeper than the "
                   "student it distils into (the streaming stages only need the same latents); with --init from a "
                   "shallower DiT the new blocks start as the identity")
    p.add_argument("--init", help="start from this teacher checkpoint instead of from scratch (a fresh optimizer "
                   "and schedule; the run folder's own snapshot, if any, still wins; one of another temporal layout is "
                   "carried over: see relayout.py)")
    add_mouth_weight_arg(p)
    p.set_defaults(fn=cmd_train_teacher)
