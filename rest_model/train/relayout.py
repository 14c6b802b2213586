"""Carry trained weights over to another temporal compression (video frames per latent frame).

Training a VAE and a teacher from scratch costs hours on a CPU; a model with another tc mostly needs
what the trained one already knows (faces, mouths, the latent space, the audio-to-mouth map). Only a
few tensors depend on tc, and these functions re-lay them so that the carried model starts where the
source stands:

- VAE: the encoder's input conv and the decoder's output conv see tc frames stacked as channels. The
  encoder's per-frame weights are summed (or split) across the frames that merge (or divide), and the
  decoder's are averaged (or repeated). On a still video the carried VAE then gives exactly the source's
  latent, and decodes each group of frames to the mean of the source's frames for it
  (tests/test_relayout.py), so a DiT trained on the source's latents still fits it.
- DiT: the audio cross-attention's window embedding is indexed by video frame within the window;
  each new window position takes the source's embedding for the same frame offset from the latent
  frame's start (clamped at the ends). Nothing else in the DiT depends on tc.
Everything else is copied as is; fine-tuning then teaches the model the motion inside the new groups.

`later_encoder_merge` carries a VAE over to an encoder that merges the frames of a latent frame at a later
level (VAEConfig.encoder_merge_level) the same way: the layer that merged them now sees one frame, with its
per-frame weights summed, and the layer that merges them now takes the mean of its frames, so again a still
video gives exactly the source's latent and the decoder and any DiT trained on its latents still fit.

`split_decoder` is the decoder's mirror: a decoder that wrote the tc frames of a latent frame together at its
output conv is carried over to one that splits the latent frame at an earlier level (VAEConfig.
decoder_split_level). The splitting upsample gives every frame the features the source had, and the output
conv, now shared by the frames, takes the mean of the source's per-frame rows: a still latent then decodes to
the mean of the source's frames of each latent frame. The encoder is untouched, so with `train-vae
--decoder-only` the latents, and any DiT trained on them, stay exactly valid.

`deeper_dit` carries a DiT over to more blocks: the new blocks are interleaved among the trained ones and
start as the identity (adaLN-zero gates and the audio cross-attention's output projection are zero at
init), so the deeper DiT gives exactly the source's velocities and its ID-Sink and Context-Cache K/V at the
source's blocks; fine-tuning then spends the extra depth where the loss needs it.
"""
from __future__ import annotations

import dataclasses

import torch
from einops import reduce, repeat

from ..config import DiTConfig, VAEConfig, to_json
from ..dit import CausalDiT
from ..vae import CausalVAE


def _frame_ratio(src_tc: int, dst_tc: int) -> tuple[int, bool]:
    """(r, merge): dst groups merge r source frame slots (dst_tc < src_tc) or split each into r."""
    big, small = max(src_tc, dst_tc), min(src_tc, dst_tc)
    if big % small:
        raise ValueError(f"cannot carry temporal compression {src_tc} over to {dst_tc}: one must divide the other")
    return big // small, dst_tc < src_tc


def _same_apart_from(a, b, **ignored) -> bool:
    """Whether two configs agree in every field but those named (set to the given neutral values)."""
    return to_json(dataclasses.replace(a, **ignored)) == to_json(dataclasses.replace(b, **ignored))


def _rows(w: torch.Tensor, rows_in: str, rows_out: str, fn, **sizes) -> torch.Tensor:
    """Re-lay the output-channel axis of a conv weight or bias (whatever its other axes) with einops' `fn`."""
    rest = " ".join(f"s{i}" for i in range(w.dim() - 1))
    return fn(w, f"({rows_in}) {rest} -> ({rows_out}) {rest}", **sizes)


def relayout_vae(src: CausalVAE, cfg: VAEConfig) -> CausalVAE:
    """A VAE of config `cfg` carrying `src`'s weights; `cfg` may differ from src's only in tc."""
    if src.cfg.encoder_merge_level:
        raise ValueError("a VAE whose encoder merges frames late cannot be carried to another temporal "
                         "compression; carry one that merges them at the input and move its merge after")
    if src.cfg.decoder_split_level:
        raise ValueError("a VAE whose decoder splits frames early cannot be carried to another temporal "
                         "compression; carry one that writes them at its output and split it after")
    if not _same_apart_from(src.cfg, cfg, temporal_compression=0, scaling_factor=1.0, encoder_merge_level=0,
                            decoder_split_level=0):
        raise ValueError("only the temporal compression can be carried over; the VAEs differ in more "
                         f"({to_json(src.cfg)} vs {to_json(cfg)})")
    if src.cfg.refine_channels:
        raise ValueError("a VAE with a pixel refiner cannot be carried to another temporal compression: "
                         "carry it over without one (train-vae --refine-channels 0) and add it after")
    # the latent space is carried too; the merge level stays the source's (later_encoder_merge moves it)
    cfg = dataclasses.replace(cfg, scaling_factor=src.cfg.scaling_factor, encoder_merge_level=0,
                              decoder_split_level=0)
    r, merge = _frame_ratio(src.cfg.temporal_compression, cfg.temporal_compression)
    p = cfg.patch_size
    state = dict(src.state_dict())

    def slots(w, pattern_in, pattern_out, fn, **kw):
        return fn(w, f"{pattern_in} -> {pattern_out}", **kw, c=3, ph=p, pw=p)

    w = state["encoder.conv_in.conv.weight"]  # (out, c*pt*ph*pw, kt, ks, ks): a sum over frames stays a sum
    if merge:
        w = slots(w, "o (c pt r ph pw) k y x", "o (c pt ph pw) k y x", reduce, reduction="sum", r=r)
    else:
        w = slots(w, "o (c pt ph pw) k y x", "o (c pt r ph pw) k y x", repeat, r=r) / r
    state["encoder.conv_in.conv.weight"] = w
    for name in ("decoder.conv_out.weight", "decoder.conv_out.bias"):  # each output frame: the mean of its sources
        if merge:
            state[name] = _rows(state[name], "c pt r ph pw", "c pt ph pw", reduce, reduction="mean", r=r, c=3, ph=p, pw=p)
        else:
            state[name] = _rows(state[name], "c pt ph pw", "c pt r ph pw", repeat, r=r, c=3, ph=p, pw=p)
    vae = CausalVAE(cfg)
    vae.load_state_dict(state)
    return vae.to(next(src.parameters()).device)


def later_encoder_merge(src: CausalVAE, level: int) -> CausalVAE:
    """`src` with its encoder merging the tc frames of a latent frame at encoder level `level` (later than
    src's): levels before it then run on every frame apart, so fine-tuning can teach the encoder to keep
    each frame's mouth; on a still video the latent is exactly src's."""
    old, tc = src.cfg.encoder_merge_level, src.cfg.temporal_compression
    cfg = dataclasses.replace(src.cfg, encoder_merge_level=level)  # checks the level exists
    if level <= old:
        raise ValueError(f"the encoder's frames can only be merged later than now (level {old}), not at {level}")
    state = dict(src.state_dict())
    if old == 0:  # the input conv now sees one frame: a sum over the frames it stacked stays a sum
        name = "encoder.conv_in.conv.weight"
        state[name] = reduce(state[name], "o (c pt ph pw) k y x -> o (c ph pw) k y x", "sum",
                             pt=tc, c=3, ph=cfg.patch_size, pw=cfg.patch_size)
    else:
        name = f"encoder.levels.{old - 1}.down.proj.weight"
        state[name] = reduce(state[name], "o (c pt p q) k y x -> o (c p q) k y x", "sum", pt=tc, p=2, q=2)
    name = f"encoder.levels.{level - 1}.down.proj.weight"  # the merging downsample: the mean of its frames
    state[name] = repeat(state[name], "o (c p q) k y x -> o (c pt p q) k y x", pt=tc, p=2, q=2) / tc
    vae = CausalVAE(cfg)
    vae.load_state_dict(state)
    return vae.to(next(src.parameters()).device)


def split_decoder(src: CausalVAE, level: int) -> CausalVAE:
    """`src` with its decoder splitting each latent frame into its tc frames at the upsample into decoder level
    `level`; src's decoder must write them together at its output. Levels from `level` on then run on every
    frame apart, so fine-tuning can teach them to draw each frame's mouth; a still latent decodes to the mean
    of src's frames of each latent frame, and the encoder (the latents) is src's exactly."""
    if src.cfg.decoder_split_level:
        raise ValueError(f"the decoder already splits its frames (at level {src.cfg.decoder_split_level}); only "
                         "a decoder that writes them together at its output can be carried to a split")
    if level == 0:
        raise ValueError("decoder_split_level 0 is the source's own layout (frames written together at the output)")
    if src.cfg.refine_channels:
        raise ValueError("a VAE with a pixel refiner cannot be carried to a decoder split: carry it over without "
                         "one (train-vae --refine-channels 0) and add it after")
    tc = src.cfg.temporal_compression
    cfg = dataclasses.replace(src.cfg, decoder_split_level=level)  # checks the level exists
    state = dict(src.state_dict())
    p = cfg.patch_size
    for name in ("decoder.conv_out.weight", "decoder.conv_out.bias"):  # shared by the frames: their mean row
        state[name] = _rows(state[name], "c pt ph pw", "c ph pw", reduce, reduction="mean", pt=tc, c=3, ph=p, pw=p)
    for name in (f"decoder.levels.{level - 1}.up.proj.weight", f"decoder.levels.{level - 1}.up.proj.bias"):
        # the splitting upsample: every frame starts from the source's features
        state[name] = _rows(state[name], "c p q", "c pt p q", repeat, pt=tc, p=2, q=2)
    vae = CausalVAE(cfg)
    vae.load_state_dict(state)
    return vae.to(next(src.parameters()).device)


def window_offsets(cfg: DiTConfig) -> torch.Tensor:
    """Video-frame offset of each audio-window position from its latent frame's first frame."""
    return torch.arange(cfg.audio_window) - cfg.audio_context * cfg.temporal_compression


def relayout_dit(src: CausalDiT, cfg: DiTConfig) -> CausalDiT:
    """A DiT of config `cfg` carrying `src`'s weights; `cfg` may differ only in the temporal layout
    (temporal_compression, audio_context) and in how it streams."""
    if not _same_apart_from(src.cfg, cfg, temporal_compression=0, audio_context=0, stream=None):
        raise ValueError("only the temporal layout (temporal_compression, audio_context, stream) can be carried "
                         f"over; the DiTs differ in more ({to_json(src.cfg)} vs {to_json(cfg)})")
    src_off, dst_off = window_offsets(src.cfg), window_offsets(cfg)
    index = (dst_off - src_off[0]).clamp(0, len(src_off) - 1)
    state = {k: (v[index] if k.endswith("audio_attn.pos") else v) for k, v in src.state_dict().items()}
    dit = CausalDiT(cfg)
    dit.load_state_dict(state)
    return dit.to(next(src.parameters()).device)


def deeper_dit(src: CausalDiT, depth: int) -> CausalDiT:
    """`src` with `depth` blocks: src's blocks keep their order, fresh identity blocks fill evenly between them."""
    n = src.cfg.depth
    if depth < n:
        raise ValueError(f"a DiT can only be carried to more blocks: it has {n}, asked for {depth}")
    dit = CausalDiT(dataclasses.replace(src.cfg, depth=depth)).to(next(src.parameters()).device)
    # fresh blocks start exactly as the identity, whatever their other weights
    # new position -> source block: the first and last stay first and last (the ID-Sink's first block and the
    # block the output head reads keep their neighbours)
    keep = {round(i * (depth - 1) / max(n - 1, 1)): i for i in range(n)}
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.")}
    for new, old in keep.items():
        state.update({f"blocks.{new}.{k}": v for k, v in src.blocks[old].state_dict().items()})
    state.update({f"blocks.{i}.{k}": v for i in range(depth) if i not in keep
                  for k, v in dit.blocks[i].state_dict().items()})
    dit.load_state_dict(state)
    return dit
