"""Carrying a VAE / DiT over to another temporal compression keeps what the source knows."""
import dataclasses

import pytest
import torch

from rest_model import checkpoint
from rest_model.__main__ import main
from rest_model.cli import random_model
from rest_model.config import preset
from rest_model.train.relayout import deeper_dit, later_encoder_merge, relayout_dit, relayout_vae, window_offsets
from rest_model.dit import CausalDiT
from rest_model.vae import CausalVAE, with_refiner
from conftest import audio_features, latent
from test_training import _tiny_dataset


def _still(vae, frames=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1
    return image.expand(-1, -1, frames, -1, -1)


@pytest.mark.parametrize("dst_tc", [2, 8])
@torch.no_grad()
def test_carried_vae_gives_the_source_latent_of_a_still_video(dst_tc):
    """Merging (4 -> 2) or splitting (4 -> 8) frame groups: on a still video the latent is the source's
    exactly, and each decoded frame is the mean of the source's frames it stands for (merge) or one of them
    repeated (split), so a DiT trained on the source's latents still fits."""
    src, _ = random_model("tiny", seed=1)
    src.cfg.scaling_factor = 0.8
    dst = relayout_vae(src, dataclasses.replace(src.cfg, temporal_compression=dst_tc, scaling_factor=1.0))
    assert dst.cfg.temporal_compression == dst_tc and dst.cfg.scaling_factor == 0.8
    video = _still(src, 16)
    z_src, z_dst = src.encode(video), dst.encode(video)
    assert z_dst.shape[2] == 16 // dst_tc
    assert torch.allclose(z_dst, z_src[:, :, :1].expand_as(z_dst), atol=1e-5)
    out_src, out_dst = src.decode(z_src)[:, :, :4], dst.decode(z_dst)[:, :, :8]
    if dst_tc == 2:
        expected = torch.stack([out_src[:, :, 0:2].mean(2), out_src[:, :, 2:4].mean(2)], 2).repeat(1, 1, 4, 1, 1)
    else:
        expected = out_src.repeat_interleave(2, dim=2)
    assert torch.allclose(out_dst, expected, atol=1e-5)
    # moving video is where the layouts differ: the carried VAE is a start, not a copy
    moving = torch.rand(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert not torch.allclose(dst.decode(dst.encode(moving)), src.decode(src.encode(moving)), atol=1e-3)


def test_vae_relayout_refuses_anything_but_a_divisible_temporal_compression():
    src, _ = random_model("tiny")
    with pytest.raises(ValueError, match="only the temporal compression"):
        relayout_vae(src, dataclasses.replace(src.cfg, temporal_compression=2, latent_channels=4))
    with pytest.raises(ValueError, match="cannot carry temporal compression 4 over to 6"):
        relayout_vae(src, dataclasses.replace(src.cfg, temporal_compression=6))
    refined = with_refiner(src, 4)
    with pytest.raises(ValueError, match="pixel refiner cannot be carried"):
        relayout_vae(refined, dataclasses.replace(refined.cfg, temporal_compression=2))


def test_carried_dit_reads_each_audio_frame_offset_with_the_source_embedding():
    """tc 4 / audio_context 1 -> tc 2 / audio_context 2: the windows cover frames -4..7 and -4..5 of a latent
    frame's start; each position keeps the embedding of its frame offset, and every other weight is kept."""
    _, src = random_model("tiny", seed=2)
    for block in src.blocks:  # distinct rows, so a wrong index would show
        block.audio_attn.pos.data = torch.randn(block.audio_attn.pos.shape)
    cfg = dataclasses.replace(src.cfg, temporal_compression=2, audio_context=2)
    dst = relayout_dit(src, cfg)
    assert window_offsets(src.cfg).tolist() == list(range(-4, 8)) and window_offsets(cfg).tolist() == list(range(-4, 6))
    for a, b in zip(src.blocks, dst.blocks):
        assert torch.equal(b.audio_attn.pos, a.audio_attn.pos[:10])
    wide = relayout_dit(src, dataclasses.replace(src.cfg, temporal_compression=4, audio_context=2))  # -8..11
    assert torch.equal(wide.blocks[0].audio_attn.pos[:4], src.blocks[0].audio_attn.pos[:1].expand(4, -1))
    assert torch.equal(wide.blocks[0].audio_attn.pos[4:16], src.blocks[0].audio_attn.pos)
    for k, v in src.state_dict().items():
        if not k.endswith("audio_attn.pos"):
            assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(ValueError, match="only the temporal layout"):
        relayout_dit(src, dataclasses.replace(src.cfg, depth=1))


def test_train_stages_carry_a_model_of_another_temporal_compression(tmp_path, capsys):
    """train-vae / train-teacher --init F where F has 8 frames per latent and the preset 4: both start from
    F's weights (re-laid), and the results are tiny-preset models that fit together."""
    vae, dit = random_model("tiny", seed=4)
    vae8 = relayout_vae(vae, dataclasses.replace(vae.cfg, temporal_compression=8))
    dit8 = relayout_dit(dit, dataclasses.replace(dit.cfg, temporal_compression=8))
    checkpoint.save(vae8, tmp_path / "v8.safetensors")
    checkpoint.save(dit8, tmp_path / "t8.safetensors")
    data = _tiny_dataset(tmp_path / "data")
    common = ["--data", str(data), "--preset", "tiny", "--steps", "1", "--batch", "1", "--chunks", "1",
              "--lr", "1e-9", "--device", "cpu"]
    assert main(["train-vae", *common, "--out", str(tmp_path / "v"), "--init", str(tmp_path / "v8.safetensors")]) == 0
    tuned_vae = checkpoint.load_vae(tmp_path / "v" / "rest_vae.safetensors")
    assert tuned_vae.cfg.temporal_compression == 4
    for k, v in relayout_vae(vae8, preset("tiny").vae).state_dict().items():
        assert torch.allclose(tuned_vae.state_dict()[k], v, atol=1e-6), k
    assert main(["train-teacher", *common, "--vae", str(tmp_path / "v" / "rest_vae.safetensors"),
                 "--out", str(tmp_path / "t"), "--init", str(tmp_path / "t8.safetensors")]) == 0
    teacher = checkpoint.load_dit(tmp_path / "t" / "teacher.safetensors")
    checkpoint.check_compatible(tuned_vae.cfg, teacher.cfg)
    for k, v in dit.state_dict().items():  # 8 -> 4 gives back the windows of the original
        assert torch.allclose(teacher.state_dict()[k], v, atol=1e-6), k
    wide = dataclasses.replace(vae.cfg, temporal_compression=8, channels=(8, 16))
    checkpoint.save(CausalVAE(wide), tmp_path / "w8.safetensors")
    assert main(["train-vae", *common, "--out", str(tmp_path / "w"), "--init", str(tmp_path / "w8.safetensors")]) == 2
    assert "w8.safetensors is not a tiny VAE: only the temporal compression" in capsys.readouterr().err


@pytest.mark.parametrize("path", [(1,), (2,), (1, 2)])
@torch.no_grad()
def test_later_encoder_merge_keeps_the_latent_of_a_still_video(path):
    """Merging a latent frame's frames at encoder level 1 or 2 instead of at the input (or 1 then 2): on a
    still video the latent is the source's exactly, so its decoder and DiT still fit; on moving video the
    encoder now sees each frame apart, so the latents differ."""
    torch.manual_seed(3)
    src = CausalVAE(dataclasses.replace(preset("demo").vae, encoder_merge_level=0)).eval()
    dst = src
    for level in path:
        dst = later_encoder_merge(dst, level)
    assert dst.cfg.encoder_merge_level == path[-1] and dst.cfg.scaling_factor == src.cfg.scaling_factor
    assert dst.encoder.conv_in.conv.in_channels == 3 * src.cfg.patch_size ** 2  # one frame at the input
    g = torch.Generator().manual_seed(4)
    still = (torch.rand(1, 3, 1, 128, 128, generator=g) * 2 - 1).expand(-1, -1, 6, -1, -1)
    assert torch.allclose(dst.encode(still), src.encode(still), atol=1e-4)
    moving = torch.rand(1, 3, 6, 128, 128, generator=g) * 2 - 1
    assert not torch.allclose(dst.encode(moving), src.encode(moving), atol=1e-3)


@torch.no_grad()
def test_late_merge_encoder_is_causal_per_latent_frame():
    """A latent frame depends on its own frames and earlier ones only, as with the merge at the input."""
    vae = later_encoder_merge(random_model("tiny", seed=5)[0], 1)
    g = torch.Generator().manual_seed(6)
    video = torch.rand(1, 3, 12, 32, 32, generator=g) * 2 - 1
    changed = video.clone()
    changed[:, :, 8:] = torch.rand(1, 3, 4, 32, 32, generator=g) * 2 - 1  # latent frames 2 on (tc 4)
    a, b = vae.encode(video), vae.encode(changed)
    assert torch.allclose(a[:, :, :2], b[:, :, :2], atol=1e-6)
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:], atol=1e-3)


def test_encoder_merge_can_only_move_later_to_a_real_level():
    src, _ = random_model("tiny")
    late = later_encoder_merge(src, 1)
    with pytest.raises(ValueError, match="only be merged later than now"):
        later_encoder_merge(late, 1)
    with pytest.raises(ValueError, match="encoder_merge_level 3 must be a level of the encoder"):
        later_encoder_merge(src, 3)
    with pytest.raises(ValueError, match="merges frames late cannot be carried"):
        relayout_vae(late, dataclasses.replace(late.cfg, temporal_compression=2))


def test_train_vae_moves_the_encoder_merge_and_saves_it(tmp_path, capsys):
    """`train-vae --init F --encoder-merge-level 1` carries F over and trains; the file keeps the late
    merge, a later --init of it keeps it, and --decoder-only refuses to move it."""
    data = _tiny_dataset(tmp_path / "data")
    src, _ = random_model("tiny", seed=7)
    checkpoint.save(src, tmp_path / "src.safetensors")
    common = ["--data", str(data), "--preset", "tiny", "--batch", "1", "--chunks", "1", "--save-every", "100"]
    assert main(["train-vae", *common, "--out", str(tmp_path / "a"), "--steps", "2", "--init",
                 str(tmp_path / "src.safetensors"), "--encoder-merge-level", "1"]) == 0
    late = checkpoint.load_vae(tmp_path / "a" / "rest_vae.safetensors", "cpu")
    assert late.cfg.encoder_merge_level == 1
    assert main(["train-vae", *common, "--out", str(tmp_path / "b"), "--steps", "1", "--init",
                 str(tmp_path / "a" / "rest_vae.safetensors")]) == 0
    assert checkpoint.load_vae(tmp_path / "b" / "rest_vae.safetensors", "cpu").cfg.encoder_merge_level == 1
    assert main(["train-vae", *common, "--out", str(tmp_path / "c"), "--steps", "1", "--init",
                 str(tmp_path / "src.safetensors"), "--encoder-merge-level", "1", "--decoder-only"]) == 2
    assert "cannot learn a later frame merge (--encoder-merge-level 1)" in capsys.readouterr().err


@pytest.mark.parametrize("level", [1, 2])
@torch.no_grad()
def test_split_decoder_keeps_the_latents_and_decodes_a_still_latent_to_the_mean_of_its_frames(level):
    """Carrying a decoder that writes a latent frame's frames together at its output over to one that splits
    them at level 1 or 2: the encoder is the source's bit for bit (the latents a DiT was trained on stay
    valid), a still latent decodes to the mean of the source's frames of each latent frame, and on a moving
    latent the split levels now see each frame apart, so the decodes differ."""
    from rest_model.config import VAEConfig
    from rest_model.train.relayout import split_decoder
    torch.manual_seed(10)
    src = CausalVAE(VAEConfig(latent_channels=4, spatial_compression=16, temporal_compression=2, patch_size=4,
                              channels=(8, 16, 16), encoder_merge_level=1, scaling_factor=0.9)).eval()
    dst = split_decoder(src, level).eval()
    assert dst.cfg.decoder_split_level == level and dst.cfg.scaling_factor == 0.9
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(dst.encoder.state_dict()[k], v), k
    g = torch.Generator().manual_seed(11)
    still = torch.randn(1, 4, 1, 2, 2, generator=g).expand(-1, -1, 4, -1, -1)
    a = src.decode(still)
    pair_mean = a.unflatten(2, (4, 2)).mean(3, keepdim=True).expand(-1, -1, -1, 2, -1, -1).flatten(2, 3)
    assert not torch.allclose(a, pair_mean, atol=1e-3)  # the source's two frames differ: the mean is a real test
    torch.testing.assert_close(dst.decode(still), pair_mean, atol=1e-5, rtol=1e-5)
    moving = torch.randn(1, 4, 4, 2, 2, generator=g)
    src_mean = src.decode(moving).unflatten(2, (4, 2)).mean(3)
    assert not torch.allclose(dst.decode(moving).unflatten(2, (4, 2)).mean(3), src_mean, atol=1e-3)


def test_split_decoder_refuses_what_it_cannot_carry():
    from rest_model.train.relayout import split_decoder
    src, _ = random_model("tiny")
    split = split_decoder(src, 1)
    with pytest.raises(ValueError, match="already splits its frames"):
        split_decoder(split, 1)
    with pytest.raises(ValueError, match="decoder_split_level 0 is the source's own layout"):
        split_decoder(src, 0)
    with pytest.raises(ValueError, match="decoder_split_level 2 must be a level of the decoder"):
        split_decoder(src, 2)
    with pytest.raises(ValueError, match="pixel refiner cannot be carried to a decoder split"):
        split_decoder(with_refiner(src, 4), 1)
    with pytest.raises(ValueError, match="decoder splits frames early cannot be carried"):
        relayout_vae(split, dataclasses.replace(split.cfg, temporal_compression=2))


def test_train_vae_decoder_only_splits_the_decoder_and_keeps_the_latents(tmp_path):
    """`train-vae --init F --decoder-split-level 1 --decoder-only` carries F's decoder over to the split and
    trains it alone: the saved file keeps the split, F's encoder and latent scale bit for bit (a DiT trained
    on F's latents still fits), and a later --init of it keeps the split."""
    data = _tiny_dataset(tmp_path / "data")
    src, _ = random_model("tiny", seed=12)
    src.cfg.scaling_factor = 0.7
    checkpoint.save(src, tmp_path / "src.safetensors")
    src = checkpoint.load_vae(tmp_path / "src.safetensors", "cpu")
    common = ["--data", str(data), "--preset", "tiny", "--batch", "1", "--chunks", "1", "--save-every", "100"]
    assert main(["train-vae", *common, "--out", str(tmp_path / "a"), "--steps", "2", "--lr", "1e-2", "--init",
                 str(tmp_path / "src.safetensors"), "--decoder-split-level", "1", "--decoder-only"]) == 0
    split = checkpoint.load_vae(tmp_path / "a" / "rest_vae.safetensors", "cpu")
    assert split.cfg.decoder_split_level == 1 and split.cfg.scaling_factor == 0.7
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(split.encoder.state_dict()[k], v), k
    from rest_model.train.relayout import split_decoder
    carried = split_decoder(src, 1).decoder.state_dict()
    assert any(not torch.equal(split.decoder.state_dict()[k], v) for k, v in carried.items())  # it trained
    assert main(["train-vae", *common, "--out", str(tmp_path / "b"), "--steps", "1", "--init",
                 str(tmp_path / "a" / "rest_vae.safetensors")]) == 0
    assert checkpoint.load_vae(tmp_path / "b" / "rest_vae.safetensors", "cpu").cfg.decoder_split_level == 1


def test_deeper_dit_starts_as_the_source_and_can_learn():
    """6 -> 10 blocks in the demo's layout, 2 -> 3 in the tiny one: the deeper DiT's velocities (bidirectional
    and under the block-causal mask) and its ID-Sink at the source's blocks are the source's exactly, and the
    new blocks get gradient, so fine-tuning can use them."""
    from conftest import randomize
    for name, depth, kept in (("tiny", 3, [0, 2]), ("demo", 10, [0, 2, 4, 5, 7, 9])):
        _, src = random_model(name, seed=5)
        randomize(src, 6)
        dst = deeper_dit(src, depth)
        assert dst.cfg.depth == depth and len(dst.blocks) == depth
        c, s = src.cfg, src.cfg.stream
        x, ref = latent(c, 4, seed=1), latent(c, 1, seed=2)
        t, audio = torch.rand(1, 4, generator=torch.Generator().manual_seed(3)), audio_features(c, 4, seed=4)
        with torch.no_grad():
            for causal in (False, True):
                kw = dict(causal=causal, chunk=s.chunk_frames, context=s.context_frames)
                assert torch.equal(dst(x, t, audio, ref, **kw), src(x, t, audio, ref, **kw))
            sink_src, sink_dst = src.id_sink(ref), dst.id_sink(ref)
        for i, j in enumerate(kept):
            assert torch.equal(sink_dst[j].k, sink_src[i].k) and torch.equal(sink_dst[j].v, sink_src[i].v)
        new = next(i for i in range(depth) if i not in kept)
        dst(x, t, audio, ref).pow(2).mean().backward()
        assert dst.blocks[new].ada.weight.grad.abs().sum() > 0
        assert dst.blocks[new].audio_attn.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="only be carried to more blocks: it has 2, asked for 1"):
        deeper_dit(random_model("tiny")[1], 1)


def test_a_deeper_teacher_trains_and_distils_into_the_shallower_student(tmp_path, capsys):
    """train-teacher --depth 3 --init (2 blocks) keeps the source's blocks; distill then runs with that 3-block
    teacher and the 2-block student, and refuses a student that streams in other chunks or fits another VAE."""
    from conftest import randomize
    vae, dit = random_model("tiny", seed=7)
    randomize(dit, 8)
    checkpoint.save(vae, tmp_path / "v.safetensors")
    checkpoint.save(dit, tmp_path / "s.safetensors")
    data = _tiny_dataset(tmp_path / "data")
    common = ["--data", str(data), "--preset", "tiny", "--steps", "1", "--batch", "1", "--chunks", "1",
              "--lr", "1e-9", "--device", "cpu", "--vae", str(tmp_path / "v.safetensors")]
    assert main(["train-teacher", *common, "--out", str(tmp_path / "t"), "--init", str(tmp_path / "s.safetensors"),
                 "--depth", "3"]) == 0
    teacher = checkpoint.load_dit(tmp_path / "t" / "teacher.safetensors")
    assert teacher.cfg.depth == 3
    kept = {0: 0, 1: 2}  # source block -> teacher block: the new one goes between
    for k, v in dit.state_dict().items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            k = f"blocks.{kept[int(i)]}.{rest}"
        assert torch.allclose(teacher.state_dict()[k], v, atol=1e-6), k
    for k in ("ada.weight", "ada.bias", "audio_attn.proj.weight", "audio_attn.proj.bias"):  # the new block: identity
        assert teacher.state_dict()[f"blocks.1.{k}"].abs().max() < 1e-6, k
    distill = ["distill", *common, "--teacher", str(tmp_path / "t" / "teacher.safetensors"), "--solve-steps", "1"]
    assert main([*distill, "--out", str(tmp_path / "a"), "--student", str(tmp_path / "s.safetensors")]) == 0
    assert checkpoint.load_dit(tmp_path / "a" / "student_asd.safetensors").cfg.depth == 2
    other_chunks = CausalDiT(dataclasses.replace(dit.cfg, stream=dataclasses.replace(dit.cfg.stream, chunk_frames=1)))
    checkpoint.save(other_chunks, tmp_path / "c.safetensors")
    assert main([*distill, "--out", str(tmp_path / "b"), "--student", str(tmp_path / "c.safetensors")]) == 2
    assert "c.safetensors differ in stream" in capsys.readouterr().err
    other_latents = CausalDiT(dataclasses.replace(dit.cfg, latent_channels=4))
    checkpoint.save(other_latents, tmp_path / "l.safetensors")
    assert main([*distill, "--out", str(tmp_path / "d"), "--student", str(tmp_path / "l.safetensors")]) == 2
    assert "the student" in (err := capsys.readouterr().err) and "l.safetensors does not fit" in err
