"""Stage 1: the causal VAE. L1 reconstruction + a small KL, optionally a hinge adversarial term from a
patch discriminator trained from scratch (no pretrained perceptual network exists here).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call

from .. import checkpoint
from . import distributed
from ..config import preset
from .relayout import later_encoder_merge, relayout_vae, split_decoder
from .loop import (add_common_args, clip_frames, export_model, loop_config, region_weights, sample_batch,
                       train_loop, training_data, weighted_mean)
from ..vae import CausalPad, CausalVAE, with_refiner


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Stage 1's objective, built once from the command line and passed whole."""
    kl_weight: float = 1e-4
    adv_weight: float = 0.0  # hinge GAN weight (0 = off)
    adv_start: int = 0  # step at which the adversarial term starts
    adaptive: bool = False  # scale the GAN weight by the gradient-norm ratio at the decoder's last layer
    motion_weight: float = 0.0  # L1 between frame-to-frame changes of the reconstruction and the video
    change_weight: float = 0.0  # extra L1 on the pixels that change from the previous frame
    decoder_only: bool = False  # the encoder (and so the latents a DiT was trained on) stays frozen

    def __post_init__(self):
        for name in ("kl_weight", "adv_weight", "motion_weight", "change_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args) -> "VAELossConfig":
        return cls(kl_weight=args.kl_weight, adv_weight=args.adv_weight, adv_start=args.adv_start,
                   adaptive=args.adv_adaptive, motion_weight=args.motion_weight, change_weight=args.change_weight,
                   decoder_only=args.decoder_only)


class PatchDiscriminator(nn.Module):
    """Per-frame PatchGAN: real/fake logits on overlapping patches."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(8, 2 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 4 * ch, 4, 2, 1), nn.GroupNorm(8, 4 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * ch, 1, 3, 1, 1))

    def forward(self, video):  # (B, 3, T, H, W) -> patch logits
        return self.net(rearrange(video, "b c t h w -> (b t) c h w"))


CHANGE_FULL = 0.1  # a change from the previous frame of this much ([-1, 1] units, ~13 grey levels) gets the whole --change-weight


def change_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel L1 multipliers [B, 1, T, H, W]: 1 + weight where a pixel changed from the previous frame by
    CHANGE_FULL or more, in proportion below (the first frame has no previous one: 1). Unlike the motion
    term it asks for each frame itself, so where the latent cannot settle the change it is not drawn to none."""
    change = F.pad(video.diff(dim=2).abs().mean(1, keepdim=True), (0, 0, 0, 0, 1, 0))
    return 1 + weight * (change / CHANGE_FULL).clamp(max=1)


def motion_l1(rec: torch.Tensor, video: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |change of rec - change of video| between consecutive frames ([B, C, T, H, W]), region-weighted."""
    return weighted_mean((rec.diff(dim=2) - video.diff(dim=2)).abs(), weights)


def patch_weights(weights: torch.Tensor | None, grid) -> torch.Tensor | None:
    """The pixel region weights averaged over each discriminator patch, mean 1: the adversarial pull then
    goes where the L1's does (a blurred mouth, not the background, is what costs lip-sync)."""
    if weights is None:
        return None
    w = F.adaptive_avg_pool2d(weights[None, None], tuple(grid))[0, 0]
    return w / w.mean()


def gradient_ratio(rec_loss: torch.Tensor, g_loss: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """|d rec_loss / d layer| / |d g_loss / d layer|, detached and clamped to [0, 1e4]."""
    if not torch.is_grad_enabled():
        return torch.tensor(1.0)
    g_rec, = torch.autograd.grad(rec_loss, layer, retain_graph=True)
    g_gan, = torch.autograd.grad(g_loss, layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()


def vae_loss(vae: CausalVAE, video: torch.Tensor, g: torch.Generator, cfg: VAELossConfig = VAELossConfig(),
             disc: PatchDiscriminator | None = None, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L1 (+ region weights, + change weights) + KL (+ hinge GAN) (+ motion: L1 between the frame-to-frame
    changes).

    With `cfg.adaptive` the GAN term's weight is `adv_weight` times the ratio of the reconstruction's to the
    GAN term's gradient norm at the decoder's last layer (Esser et al., taming-transformers): a fixed weight
    is either lost under the L1 or swamps it as the discriminator's logits grow.

    The motion term is there because a tc-frame group shares one latent: plain L1 is nearly met by one
    average frame per group, and the frames of a group then come out identical, a mouth that moves only
    every tc frames. It is no cure on its own (docs/demo_model.md has the measurements): where the latent does
    not settle a change, the L1 between changes is least at their median, no change. `change_weight` asks for
    each frame itself where it moves instead."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.decoder_only):
        mean, logvar = vae.encode_dist(video)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(mean)
    rec = vae.decoder(z, CausalPad())
    err = (rec - video).abs()
    if cfg.change_weight > 0:
        err = err * change_weights(video, cfg.change_weight)
    l1 = weighted_mean(err, weights)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss, logs = l1 + cfg.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}
    if cfg.motion_weight > 0:
        motion = motion_l1(rec, video, weights)
        loss, logs["motion"] = loss + cfg.motion_weight * motion, motion.item()
    if disc is not None and cfg.adv_weight > 0:
        frozen = {k: v.detach() for k, v in disc.named_parameters()}  # the VAE's term must not train D
        logits = functional_call(disc, frozen, (rec,))
        g_adv = -weighted_mean(logits, patch_weights(weights, logits.shape[-2:]))
        d_loss = F.relu(1 - disc(video)).mean() + F.relu(1 + disc(rec.detach())).mean()
        w_adv = cfg.adv_weight * (gradient_ratio(loss, g_adv, vae.decoder.conv_out.weight) if cfg.adaptive else 1.0)
        loss = loss + w_adv * g_adv + d_loss
        logs.update(g_adv=g_adv.item(), d_loss=d_loss.item(), w_adv=float(w_adv))
    return loss, logs


@torch.no_grad()
def latent_scale(vae: CausalVAE, data, n: int = 8) -> float:
    """1 / std of posterior-mean latents over a fixed sample: the DiT then sees unit-variance latents."""
    g = torch.Generator().manual_seed(1234)
    video = sample_batch(data, n, g)["video"].to(next(vae.parameters()).device)
    std = vae.encode_dist(video)[0].std().item()
    return 1.0 / max(std, 1e-6)


@distributed.launched
def cmd_train_vae(args) -> int:
    loss_cfg = VAELossConfig.from_args(args)
    torch.manual_seed(args.seed)  # fresh weights (VAE, discriminator) are the seed's, the same in every process
    p = preset(args.preset)
    data = training_data(args.data, p.dit, clip_frames(p.dit, args.chunks))
    merge, split = args.encoder_merge_level, args.decoder_split_level
    if args.init:
        vae = checkpoint.load_vae(args.init, args.device)
        if vae.cfg.temporal_compression != p.vae.temporal_compression:
            try:  # another tc: carry the weights over (relayout.py) instead of training from scratch
                vae = relayout_vae(vae, p.vae)
            except ValueError as e:
                raise ValueError(f"--init {args.init} is not a {args.preset} VAE: {e}") from None
        elif vae.cfg.latent_channels != p.vae.latent_channels or vae.cfg.spatial_compression != p.vae.spatial_compression:
            raise ValueError(f"--init {args.init} is not a {args.preset} VAE")
        if args.refine_channels is not None and args.refine_channels != vae.cfg.refine_channels:
            vae = with_refiner(vae, args.refine_channels)
        if merge is None:  # the init's own merge, or the preset's if that is later
            merge = max(vae.cfg.encoder_merge_level, p.vae.encoder_merge_level)
        if merge != vae.cfg.encoder_merge_level:
            if args.decoder_only:
                raise ValueError("--decoder-only freezes the encoder, so it cannot learn a later frame merge "
                                 f"(--encoder-merge-level {merge}); fine-tune the encoder too")
            vae = later_encoder_merge(vae, merge)
        if split is None:  # the init's own split, or the preset's if the init has none
            split = vae.cfg.decoder_split_level or p.vae.decoder_split_level
        if split != vae.cfg.decoder_split_level:
            vae = split_decoder(vae, split)
        vae.requires_grad_(True)
    else:
        cfg = p.vae if merge is None else dataclasses.replace(p.vae, encoder_merge_level=merge)
        if split is not None:
            cfg = dataclasses.replace(cfg, decoder_split_level=split)
        if args.refine_channels is not None:
            cfg = dataclasses.replace(cfg, refine_channels=args.refine_channels)
        vae = CausalVAE(cfg).to(args.device)
    if args.decoder_only:
        if not args.init:
            raise ValueError("--decoder-only fine-tunes the decoder of a trained VAE: give it with --init")
        vae.encoder.requires_grad_(False)  # latents stay exactly as the DiT saw them
    disc = PatchDiscriminator().to(args.device) if args.adv_weight > 0 else None
    r = p.dit.resolution
    weights = region_weights(r, r, args.face_weight, args.mouth_weight).to(args.device) \
        if args.face_weight or args.mouth_weight else None

    def step(i, g):
        video = sample_batch(data, args.batch, g)["video"].to(args.device)
        return vae_loss(vae, video, g, loss_cfg, disc if i >= loss_cfg.adv_start else None, weights)

    def export():
        if not args.decoder_only:  # a frozen encoder keeps its latent scale
            vae.cfg.scaling_factor = latent_scale(vae, data)
        export_model(vae, os.path.join(args.out, "rest_vae.safetensors"), args.data)

    trainable = {"vae": vae} | ({"disc": disc} if disc is not None else {})
    train_loop("vae", trainable, step, args.out, loop_config(args), export)
    return 0


def register(sub):
    p = sub.add_parser("train-vae", help="stage 1: train the causal VAE on a prepared dataset")
    add_common_args(p)
    d = VAELossConfig()
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--init", help="start from this VAE checkpoint instead of from scratch (one of another temporal compression is "
                   "carried over: see relayout.py)")
    p.add_argument("--decoder-only", action="store_true", help="fine-tune only the decoder of --init: the "
                   "encoder and so the latents (and any DiT trained on them) stay valid")
    p.add_argument("--refine-channels", type=int, default=None, help="width of the decoder's full-resolution "
                   "pixel refiner (default: --init's, or the preset's; 0 = none); added to an --init VAE it starts "
                   "at zero, so --decoder-only can sharpen the frames of a VAE a DiT was trained on")
    p.add_argument("--encoder-merge-level", type=int, default=None, help="encoder level at which the frames of "
                   "a latent frame merge (0 = stacked at the input; default: --init's, or the preset's): a later "
                   "merge lets the encoder see each frame's mouth apart; an --init VAE is carried over (relayout.py)")
    p.add_argument("--decoder-split-level", type=int, default=None, help="decoder level at which a latent frame "
                   "splits into its frames (0 = written together by the output conv; default: --init's, or the "
                   "preset's): the levels from it on draw each frame apart; an --init VAE is carried over "
                   "(relayout.py), and with --decoder-only its latents stay valid for a DiT trained on them")
    p.add_argument("--adv-weight", type=float, default=d.adv_weight, help="hinge GAN weight (0 = off)")
    p.add_argument("--face-weight", type=float, default=0.0, help="extra L1 weight on the face box (0 = off)")
    p.add_argument("--mouth-weight", type=float, default=0.0, help="extra L1 weight on the mouth region (0 = off)")
    p.add_argument("--motion-weight", type=float, default=d.motion_weight, help="weight of the L1 between frame-to-frame "
                   "changes of the reconstruction and the video (0 = off): keeps motion inside a latent's frame group")
    p.add_argument("--adv-adaptive", action="store_true", help="scale the GAN weight by the ratio of the "
                   "reconstruction's to the GAN term's gradient norm at the decoder's last layer (taming-transformers)")
    p.add_argument("--change-weight", type=float, default=d.change_weight, help="extra L1 weight on the pixels that change "
                   "from the previous frame (full at a change of 13 grey levels; 0 = off): weights getting both "
                   "frames of a latent right where they differ, without the motion term's pull to no change")
    p.add_argument("--adv-start", type=int, default=d.adv_start, help="step at which the adversarial term starts")
    p.set_defaults(fn=cmd_train_vae)
