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


@torch.no_grad()
def test_the_commit_pass_gives_the_same_kv_as_a_full_chunk_pass(tiny):
    """`kv_only` skips the last block's output and the head; the K/V it commits must be the full pass's."""
    _, dit = tiny
    x, t, ref, audio = _inputs(dit, 4)
    cache = IDContextCache(dit.id_sink(ref), 2, dit.cfg.tokens_per_frame)
    cache.append(dit.chunk(x[:, :, :2], t[:, :2], audio[:, :2], cache)[1], 2)
    v, full = dit.chunk(x[:, :, 2:], t[:, 2:], audio[:, 2:], cache)
    none, only = dit.chunk(x[:, :, 2:], t[:, 2:], audio[:, 2:], cache, kv_only=True)
    assert v is not None and none is None and len(only) == len(full) == len(dit.blocks)
    assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(full, only))


def test_rotary_tables_turn_each_pair_by_its_angle():
    """The cached complex tables against the textbook rotation: pair (2i, 2i+1) of the temporal dims turns by
    pos * theta^(-2i/dt), of the row dims by row * theta^(-2i/dh), of the column dims by col * ...; nothing else."""
    from rest_model import rope
    g = torch.Generator().manual_seed(0)
    d, h, w, theta = 16, 2, 3, 100.0
    dt, dh, dw = rope.split(d)
    x = torch.randn(1, 2, 2 * h * w, d, generator=g)
    pos = torch.tensor([-3, 1])

    def turn(x, lo, n, angle):  # angle (tokens,) per token; dims [lo, lo + n) in pairs
        out = x.clone()
        for i in range(n // 2):
            a, b = x[..., lo + 2 * i], x[..., lo + 2 * i + 1]
            f = theta ** (-2 * i / n)
            c, s = torch.cos(angle * f), torch.sin(angle * f)
            out[..., lo + 2 * i], out[..., lo + 2 * i + 1] = a * c - b * s, a * s + b * c
        return out

    rows = torch.arange(h).repeat_interleave(w).float().repeat(2)
    cols = torch.arange(w).repeat(h).float().repeat(2)
    frames = pos.float().repeat_interleave(h * w)
    space = turn(turn(x, dt, dh, rows), dt + dh, dw, cols)
    torch.testing.assert_close(rope.rotate_space(x, h, w, theta), space)
    torch.testing.assert_close(rope.rotate_time(x, pos, h * w, theta), turn(x, 0, dt, frames))
    torch.testing.assert_close(rope.rotate_space_time(x, h, w, pos, theta), turn(space, 0, dt, frames))
    qkv = torch.randn(1, h * w, 3 * 2 * d, generator=g)  # keys as the DiT reads them: a strided view of qkv
    k = qkv.unflatten(-1, (3, 2, d))[:, :, 1].transpose(1, 2)
    assert not k.is_contiguous()
    torch.testing.assert_close(rope.rotate_space(k, h, w, theta),
                               turn(turn(k, dt, dh, rows[:h * w]), dt + dh, dw, cols[:h * w]))
