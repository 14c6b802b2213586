import pytest
import torch

from rest_model.dit import audio_windows, block_causal_mask
from rest_model.id_context_cache import IDContextCache


def _inputs(dit, frames, seed=0):
    c = dit.cfg
    g = torch.Generator().manual_seed(seed)
    s = c.latent_size
    x = torch.randn(1, c.latent_channels, frames, s, s, generator=g)
    t = torch.rand(1, frames, generator=g)  # every frame at its own noise level
    ref = torch.randn(1, c.latent_channels, 1, s, s, generator=g)
    feats = torch.randn(1, (frames + 2 * c.audio_context) * c.temporal_compression, c.audio.dim, generator=g)
    return x, t, ref, audio_windows(feats, c)


def _stream(dit, x, t, ref, audio, chunk, context, start_frame=0):
    cache = IDContextCache(dit.id_sink(ref), context, dit.cfg.tokens_per_frame, start_frame)
    outs, sizes = [], []
    for j in range(0, x.shape[2], chunk):
        v, kvs = dit.chunk(x[:, :, j:j + chunk], t[:, j:j + chunk], audio[:, j:j + chunk], cache)
        cache.append(kvs, chunk)
        outs.append(v)
        sizes.append(cache.nbytes())
    return torch.cat(outs, 2), sizes, cache


@pytest.mark.parametrize("chunk,context", [(2, 2), (1, 3), (2, 4), (3, 0)])
@torch.no_grad()
def test_chunked_with_cache_equals_full_block_causal_pass(tiny, chunk, context):
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 6)
    full = dit(x, t, audio, ref, causal=True, chunk=chunk, context=context)
    streamed, _, _ = _stream(dit, x, t, ref, audio, chunk, context)
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_block_causal_pass_ignores_the_future_and_teacher_does_not(tiny):
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 6)
    x2 = x.clone()
    x2[:, :, 4:] += 1.0  # change the last chunk
    a = dit(x, t, audio, ref, causal=True, chunk=2, context=2)
    b = dit(x2, t, audio, ref, causal=True, chunk=2, context=2)
    assert torch.equal(a[:, :, :4], b[:, :, :4])
    teacher_a, teacher_b = dit(x, t, audio, ref), dit(x2, t, audio, ref)
    assert not torch.allclose(teacher_a[:, :, :4], teacher_b[:, :, :4]), "teacher must see the whole clip"


@torch.no_grad()
def test_context_cache_window_evicts_old_frames(tiny):
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 8)
    # with context 2, chunk 4 (frames 6-7) must not depend on chunk 0-1 (frames 0-3) at all
    x2 = x.clone()
    x2[:, :, :2] += 1.0
    a, _, _ = _stream(dit, x, t, ref, audio, 2, 2)
    b, _, _ = _stream(dit, x2, t, ref, audio, 2, 2)
    assert not torch.allclose(a[:, :, 2:4], b[:, :, 2:4])  # next chunk does see it
    torch.testing.assert_close(a[:, :, 6:], b[:, :, 6:], atol=0, rtol=0)


@torch.no_grad()
def test_cache_memory_constant_after_window_fills(tiny):
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 16)
    _, sizes, cache = _stream(dit, x, t, ref, audio, chunk=2, context=4)
    assert sizes[0] < sizes[1] == sizes[-1]  # grows while filling, then flat
    assert len(set(sizes[1:])) == 1 and cache.window_frames == 4


@torch.no_grad()
def test_positions_are_relative_so_frame_100000_works(tiny):
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 6)
    at_start, _, _ = _stream(dit, x, t, ref, audio, 2, 2, start_frame=0)
    far, _, cache = _stream(dit, x, t, ref, audio, 2, 2, start_frame=100_000)
    assert cache.frame == 100_006
    assert torch.isfinite(far).all()
    torch.testing.assert_close(far, at_start, atol=0, rtol=0)


@torch.no_grad()
def test_id_sink_carries_identity(tiny):
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 2)
    a = dit(x, t, audio, ref)
    b = dit(x, t, audio, ref + 1.0)
    assert not torch.allclose(a, b)


def test_block_causal_mask_shape_and_rule():
    m = block_causal_mask(n_frames=4, chunk=2, context=1, sink_tokens=3, tokens_per_frame=1)
    assert m.shape == (4, 7)
    assert m[:, :3].all()  # everyone sees the ID-Sink
    frames = m[:, 3:].int().tolist()
    assert frames == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1]]


def test_wrong_latent_shape_is_named(tiny):
    _, dit = tiny
    with pytest.raises(ValueError, match="latent"):
        dit.id_sink(torch.zeros(1, 3, 1, 4, 4))
