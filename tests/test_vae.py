import pytest
import torch

from rest_model.config import VAEConfig
from rest_model.vae import CausalVAE, with_refiner


def test_streamed_decode_equals_full_decode(tiny):
    vae, _ = tiny
    z = torch.randn(1, vae.cfg.latent_channels, 7, 4, 4)
    full = vae.decode(z)
    state, parts, sizes = None, [], []
    for a, b in [(0, 2), (2, 3), (3, 5), (5, 7)]:  # uneven chunks, one of a single frame
        frames, state = vae.decode_chunk(z[:, :, a:b], state)
        parts.append(frames)
        sizes.append(sum(t.numel() for t in state))
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
    assert len(set(sizes)) == 1, f"decoder state must not grow with the stream: {sizes}"


def test_pixel_refiner_starts_as_the_plain_decoder_and_streams_exactly(tiny):
    """A refiner added to a trained VAE changes no frame until trained, keeps the latents, and once trained
    the decode still streams exactly, with a fixed state, and stays causal."""
    vae, _ = tiny
    z = torch.randn(1, vae.cfg.latent_channels, 5, 4, 4)
    video = torch.rand(1, 3, 2 * vae.cfg.temporal_compression, 32, 32) * 2 - 1
    ref = with_refiner(vae, 8).eval()
    assert ref.cfg.refine_channels == 8 and vae.cfg.refine_channels == 0
    with torch.no_grad():
        torch.testing.assert_close(ref.decode(z), vae.decode(z), atol=0, rtol=0)
        assert torch.equal(ref.encode(video), vae.encode(video))
        torch.nn.init.normal_(ref.decoder.refine.conv_out.weight, std=0.1)
        full = ref.decode(z)
        assert not torch.allclose(full, vae.decode(z), atol=1e-3)
        state, parts, sizes = None, [], []
        for a, b in [(0, 2), (2, 3), (3, 5)]:
            frames, state = ref.decode_chunk(z[:, :, a:b], state)
            parts.append(frames)
            sizes.append(sum(t.numel() for t in state))
        torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
        assert len(set(sizes)) == 1
        z2 = z.clone()
        z2[:, :, 4] += 1.0
        tc = vae.cfg.temporal_compression
        assert torch.equal(ref.decode(z2)[:, :, :4 * tc], full[:, :, :4 * tc])
    assert with_refiner(ref, 0).decoder.refine is None
    for bad in (-1, 1):
        with pytest.raises(ValueError, match=f"refine_channels {bad} must be 0"):
            with_refiner(vae, bad)


def test_decoder_is_causal(tiny):
    vae, _ = tiny
    z = torch.randn(1, vae.cfg.latent_channels, 4, 4, 4)
    z2 = z.clone()
    z2[:, :, 3] += 1.0
    a, b = vae.decode(z), vae.decode(z2)
    tc = vae.cfg.temporal_compression
    assert torch.equal(a[:, :, : 3 * tc], b[:, :, : 3 * tc])
    assert not torch.allclose(a[:, :, 3 * tc:], b[:, :, 3 * tc:])


@pytest.mark.parametrize("s,tc", [(8, 4), (16, 4), (32, 8), (16, 8)])
def test_shapes_for_each_compression(s, tc):
    levels = {8: (8, 16), 16: (8, 16, 16), 32: (8, 16, 16, 16)}[s]
    vae = CausalVAE(VAEConfig(latent_channels=4, spatial_compression=s, temporal_compression=tc,
                              patch_size=4, channels=levels)).eval()
    video = torch.rand(1, 3, 2 * tc, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert z.shape == (1, 4, 2, 64 // s, 64 // s)
        assert vae.decode(z).shape == video.shape
        img = vae.encode_image(video[:, :, 0])
        assert img.shape == (1, 4, 1, 64 // s, 64 // s)


def test_single_image_encode_is_a_still_clip(tiny):
    vae, _ = tiny
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    still = img[:, :, None].expand(-1, -1, vae.cfg.temporal_compression, -1, -1)
    torch.testing.assert_close(vae.encode_image(img), vae.encode(still))


def test_bad_video_shapes_are_named(tiny):
    vae, _ = tiny
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 4, 32, 32))


def test_bad_compression_config():
    with pytest.raises(ValueError, match="levels"):
        VAEConfig(spatial_compression=32, patch_size=4, channels=(8, 16))


def _three_level_vae(split: int) -> CausalVAE:
    """A small VAE with three decoder levels (latent 2x2 for a 32x32 video), so a split can sit at 1 or 2."""
    torch.manual_seed(8)
    cfg = VAEConfig(latent_channels=4, spatial_compression=16, temporal_compression=2, patch_size=4,
                    channels=(8, 16, 16), decoder_split_level=split)
    return CausalVAE(cfg).eval()


@pytest.mark.parametrize("split", [1, 2])
@torch.no_grad()
def test_split_decoder_streams_exactly_with_a_fixed_state_and_stays_causal(split):
    """A decoder that splits each latent frame into its frames at level 1 or 2 runs those levels on video
    frames; the streamed decode still equals the full one, its state does not grow, a latent frame changes
    none of the frames before its own, and a pixel refiner on top of it streams exactly too."""
    vae = _three_level_vae(split)
    tc = vae.cfg.temporal_compression
    assert vae.decoder.conv_out.out_channels == 3 * vae.cfg.patch_size ** 2  # one frame per output step
    z = torch.randn(1, 4, 7, 2, 2, generator=torch.Generator().manual_seed(9))
    for model in (vae, with_refiner(vae, 4)):
        if model.decoder.refine is not None:
            torch.nn.init.normal_(model.decoder.refine.conv_out.weight, std=0.1)
        full = model.decode(z)
        assert full.shape == (1, 3, 7 * tc, 32, 32)
        state, parts, sizes = None, [], []
        for a, b in [(0, 2), (2, 3), (3, 5), (5, 7)]:
            frames, state = model.decode_chunk(z[:, :, a:b], state)
            parts.append(frames)
            sizes.append(sum(t.numel() for t in state))
        torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
        assert len(set(sizes)) == 1, sizes
    z2 = z.clone()
    z2[:, :, 4] += 1.0
    a, b = vae.decode(z), vae.decode(z2)
    assert torch.equal(a[:, :, :4 * tc], b[:, :, :4 * tc])
    assert not torch.allclose(a[:, :, 4 * tc:], b[:, :, 4 * tc:], atol=1e-3)


def test_decoder_split_level_must_be_a_level():
    with pytest.raises(ValueError, match="decoder_split_level 3 must be a level of the decoder, 0..2"):
        VAEConfig(spatial_compression=16, patch_size=4, channels=(8, 16, 16), decoder_split_level=3)
