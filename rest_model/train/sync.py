"""`train-sync`: the lip-sync expert (rest_model.sync_expert) trained on a prepared dataset's clips, encoded by
the VAE the DiT streams through, for `distill --sync-expert`."""
from __future__ import annotations

import os

import torch

from .. import checkpoint
from ..config import preset, sync_expert_config
from ..data.prepare import ClipDataset
from .sync_expert import SyncExpert, check_fits, sync_loss
from .loop import add_common_args, clip_frames, export_model, loop_config, sample_batch, train_loop, training_data


def load_expert(path, vae_cfg, device="cpu") -> SyncExpert:
    """A trained expert, refused (naming the file) if it was trained on another VAE's latent layout."""
    expert = checkpoint.load(path, "sync", device)
    try:
        check_fits(expert.cfg, vae_cfg, "VAE")
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{path}: {e}") from None
    return expert


@torch.no_grad()
def heldout_accuracy(expert: SyncExpert, vae, root: str, frames: int, batches: int = 8, batch: int = 8) -> dict | None:
    """The expert on the test split's clips (unseen identities and voices): the share of windows whose aligned
    audio outscores every shifted one (chance 1 / len(shifts)) and the mean loss; None without a test split."""
    try:
        data = ClipDataset(root, frames, "test", audio_margin=expert.cfg.margin)
    except ValueError:
        return None
    device = next(expert.parameters()).device
    logs = []
    for i in range(batches):
        b = sample_batch(data, batch, torch.Generator().manual_seed(i))
        logs.append(sync_loss(expert, vae.encode(b["video"].to(device)), b["audio"].to(device), expert.cfg.margin)[1])
    return {"accuracy": sum(r["sync_acc"] for r in logs) / batches, "chance": 1 / len(expert.cfg.shifts),
            "loss": sum(r["sync"] for r in logs) / batches}


def cmd_train_sync(args) -> int:
    torch.manual_seed(args.seed)  # a fresh expert's weights are the seed's
    vae = checkpoint.load_vae(args.vae, args.device)
    dit_cfg = preset(args.preset).dit
    cfg = sync_expert_config(vae.cfg, dit_cfg, max_shift=args.max_shift)
    expert = SyncExpert(cfg).to(args.device)
    frames = clip_frames(dit_cfg, args.chunks)
    data = training_data(args.data, dit_cfg, frames, cfg.margin)

    def step(i, g):
        batch = sample_batch(data, args.batch, g)
        with torch.no_grad():
            z = vae.encode(batch["video"].to(args.device))
        return sync_loss(expert, z, batch["audio"].to(args.device), cfg.margin)

    path = os.path.join(args.out, "sync_expert.safetensors")
    train_loop("sync", {"sync": expert}, step, args.out, loop_config(args), lambda: export_model(expert, path, args.data))
    r = heldout_accuracy(expert, vae, args.data, frames)
    if r is not None:
        print(f"lip-sync expert on held-out clips: the aligned audio outscores all {len(cfg.shifts) - 1} shifts in "
              f"{100 * r['accuracy']:.1f}% of windows (chance {100 * r['chance']:.1f}%), loss {r['loss']:.3f}")
    print(f"wrote {path}")
    return 0


def register(sub):
    p = sub.add_parser("train-sync", help="a lip-sync expert over the VAE's latents, for distill --sync-expert")
    add_common_args(p, needs=("vae",))
    p.add_argument("--max-shift", type=int, default=8, help="largest audio shift (video frames) it must tell apart "
                   "from the aligned audio")
    # a small contrastive model learns faster than the DiT stages, and wants many clips per batch for its negatives
    p.set_defaults(fn=cmd_train_sync, steps=600, lr=1e-3, batch=16, chunks=4)
