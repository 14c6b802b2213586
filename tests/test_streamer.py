import dataclasses

import pytest
import torch

from rest_model.audio import chunk_lookahead_frames
from rest_model.streamer import AudioSource, decode_stream, stream
from conftest import speech_like


def _portrait(dit, seed=0):
    r = dit.cfg.resolution
    return torch.rand(3, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _run(vae, dit, audio, **kw):
    return list(stream(vae, dit, _portrait(dit), audio, dit.cfg.stream, seed=3, **kw))


def test_frame_count_follows_the_audio(tiny):
    vae, dit = tiny
    for seconds, frames in [(1.0, 25), (0.5, 13), (0.04, 1)]:
        chunks = _run(vae, dit, AudioSource.whole(speech_like(seconds, 16000), 16000))
        assert sum(c.num_frames for c in chunks) == frames
        assert all(c.frames.shape[0] == c.num_frames for c in chunks)
        assert chunks[-1].frames.shape[1:] == (3, dit.cfg.resolution, dit.cfg.resolution)
        step = dit.cfg.stream.chunk_frames * dit.cfg.temporal_compression  # video frames per chunk
        assert [c.first_frame for c in chunks] == [step * i for i in range(len(chunks))]


def test_audio_arriving_in_pieces_equals_whole_audio(tiny):
    vae, dit = tiny
    wave = speech_like(1.5, 44100)
    whole = _run(vae, dit, AudioSource.whole(wave, 44100))
    pieces = [wave[i:i + 1234] for i in range(0, wave.numel(), 1234)]
    live = _run(vae, dit, AudioSource(iter(pieces), 44100))
    assert len(whole) == len(live)
    for a, b in zip(whole, live):
        torch.testing.assert_close(a.frames, b.frames, atol=2e-3, rtol=0)


def test_changing_audio_after_a_chunk_leaves_earlier_chunks_bit_identical(tiny):
    vae, dit = tiny
    d = dit.cfg
    spf, per_chunk = d.audio.samples_per_frame, d.stream.chunk_frames * d.temporal_compression
    wave = speech_like(2.0, 16000)
    change_frame = 4 * per_chunk  # audio changes from the start of chunk 4
    other = wave.clone()
    other[change_frame * spf:] = speech_like(2.0, 16000, seed=9)[change_frame * spf:]
    a = _run(vae, dit, AudioSource.whole(wave, 16000))
    b = _run(vae, dit, AudioSource.whole(other, 16000))
    look = chunk_lookahead_frames(d)
    for ca, cb in zip(a, b):
        reads_until = ca.first_frame + per_chunk + look  # last audio frame (exclusive) the chunk needs
        if reads_until <= change_frame:
            assert torch.equal(ca.frames, cb.frames), f"chunk {ca.index} saw audio it should not need"
        elif ca.first_frame >= change_frame:
            assert not torch.allclose(ca.frames, cb.frames), f"chunk {ca.index} ignores its own audio"


def test_a_sink_only_stream_forgets_what_came_before(tiny):
    """context_frames 0 keeps the ID-Sink alone: a change to the first chunk's speech reaches no chunk whose own
    audio windows do not hear it. With a rolling Context-Cache it runs on through every later chunk."""
    vae, dit = tiny
    d = dit.cfg
    spf, per_chunk = d.audio.samples_per_frame, d.stream.chunk_frames * d.temporal_compression
    wave = speech_like(2.0, 16000)
    other = wave.clone()
    other[:per_chunk * spf] = speech_like(2.0, 16000, seed=9)[:per_chunk * spf]
    # the latest chunk index whose audio windows (plus the encoder's reach back) can hear the first chunk's speech
    heard = -(-(per_chunk + (d.audio_context * d.temporal_compression + d.audio.context_frames)) // per_chunk)
    for context, same_later in ((0, True), (d.stream.context_frames, False)):
        cfg = dataclasses.replace(d.stream, context_frames=context)
        a, b = (list(stream(vae, dit, _portrait(dit), AudioSource.whole(w, 16000), cfg, seed=3, decode=False))
                for w in (wave, other))
        assert not torch.equal(a[0].latent, b[0].latent)
        later = [torch.equal(ca.latent, cb.latent) for ca, cb in zip(a[heard + 1:], b[heard + 1:])]
        assert later and all(x == same_later for x in later), (context, later)
    with pytest.raises(ValueError, match="context_frames must be >= 0"):
        dataclasses.replace(d.stream, context_frames=-1)


def test_carried_state_is_bounded_over_a_long_stream(tiny):
    vae, dit = tiny
    wave = speech_like(12.0, 16000)
    pieces = (wave[i:i + 4000] for i in range(0, wave.numel(), 4000))
    sizes = [c.state_bytes for c in stream(vae, dit, _portrait(dit), AudioSource(pieces, 16000), dit.cfg.stream)]
    assert len(sizes) == -(-12 * 25 // (dit.cfg.stream.chunk_frames * dit.cfg.temporal_compression))
    # the cache and decoder are constant once the window is full; the audio buffer only varies with how
    # the 4000-sample pieces fall against chunk boundaries, so late chunks carry no more than early ones
    early, late = sizes[5:15], sizes[25:-1]
    assert max(late) <= max(early), f"carried state grows: {early} -> {late}"
    assert max(sizes) - min(sizes[5:-1]) <= 4000 * 4 * 2  # at most two pieces of float32 audio of slack


def test_stream_far_in_time_matches_stream_at_start(tiny):
    vae, dit = tiny
    audio = speech_like(1.0, 16000)
    a = _run(vae, dit, AudioSource.whole(audio, 16000))
    b = _run(vae, dit, AudioSource.whole(audio, 16000), start_frame=100_000)
    for ca, cb in zip(a, b):
        assert torch.equal(ca.frames, cb.frames)


def test_latents_then_decode_stream_equals_decoding_in_the_loop(tiny):
    vae, dit = tiny
    audio = AudioSource.whole(speech_like(1.0, 16000), 16000)
    with_frames = _run(vae, dit, audio)
    latents_only = _run(vae, dit, AudioSource.whole(speech_like(1.0, 16000), 16000), decode=False)
    assert all(c.frames is None for c in latents_only)
    decoded = list(decode_stream(vae, (c.latent for c in latents_only)))
    for c, frames in zip(with_frames, decoded):
        torch.testing.assert_close(c.frames, frames[: c.num_frames])


def test_more_steps_and_seeds_change_the_result(tiny):
    vae, dit = tiny
    audio = speech_like(0.5, 16000)
    base = _run(vae, dit, AudioSource.whole(audio, 16000))[0].frames
    other_seed = list(stream(vae, dit, _portrait(dit), AudioSource.whole(audio, 16000), dit.cfg.stream, seed=4))
    more_steps = list(stream(vae, dit, _portrait(dit), AudioSource.whole(audio, 16000),
                             dataclasses.replace(dit.cfg.stream, steps=4), seed=3))
    assert not torch.allclose(base, other_seed[0].frames)
    assert not torch.allclose(base, more_steps[0].frames)


def test_wrong_portrait_size_is_named(tiny):
    vae, dit = tiny
    with pytest.raises(ValueError, match="fit_portrait"):
        next(stream(vae, dit, torch.zeros(3, 20, 20), AudioSource.whole(speech_like(0.5, 16000), 16000),
                    dit.cfg.stream))


def test_silent_audio_still_streams(tiny):
    vae, dit = tiny
    chunks = _run(vae, dit, AudioSource.whole(torch.zeros(16000), 16000))
    assert sum(c.num_frames for c in chunks) == 25 and all(torch.isfinite(c.frames).all() for c in chunks)


def test_overlapped_decode_gives_the_same_chunks_and_runs_beside_the_dit(tiny, monkeypatch):
    """overlap_decode: the VAE decodes chunk j on its own thread while the DiT makes chunk j + 1, and the stream
    is bit-identical to the sequential one (frames, latents, bookkeeping, callbacks in order)."""
    import threading
    import time
    import rest_model.streamer as streamer
    vae, dit = tiny
    audio = speech_like(1.5, 16000)
    seen = {False: [], True: []}
    runs = {o: list(stream(vae, dit, _portrait(dit), AudioSource.whole(audio, 16000), dit.cfg.stream, seed=3,
                           overlap_decode=o, callback=seen[o].append)) for o in (False, True)}
    assert len(runs[True]) == len(runs[False]) > 3
    for a, b in zip(runs[False], runs[True]):
        assert (a.index, a.first_frame, a.num_frames, a.state_bytes) == (b.index, b.first_frame, b.num_frames, b.state_bytes)
        assert torch.equal(a.latent, b.latent) and torch.equal(a.frames, b.frames)
    assert [c.index for c in seen[True]] == [c.index for c in seen[False]] == [c.index for c in runs[True]]

    events, decode_chunk, generate = [], vae.decode_chunk, streamer.denoise_chunk

    def slow_decode(latent, state):
        events.append(("decode", threading.current_thread().name, time.perf_counter()))
        time.sleep(0.15)
        out = decode_chunk(latent, state)
        events.append(("decoded", threading.current_thread().name, time.perf_counter()))
        return out

    def logged_generate(*args):
        events.append(("generate", threading.current_thread().name, time.perf_counter()))
        return generate(*args)
    monkeypatch.setattr(vae, "decode_chunk", slow_decode)
    monkeypatch.setattr(streamer, "denoise_chunk", logged_generate)
    list(stream(vae, dit, _portrait(dit), AudioSource.whole(audio, 16000), dit.cfg.stream, overlap_decode=True))
    assert {t for e, t, _ in events if e.startswith("decod")} == {"rest-vae-decode_0"}
    gen = [s for e, _, s in events if e == "generate"]
    dec = list(zip(*([s for e, _, s in events if e == name] for name in ("decode", "decoded"))))
    # chunk j + 1 is being denoised while chunk j is still decoding
    assert sum(d0 < g < d1 for (d0, d1), g in zip(dec, gen[1:])) >= len(dec) - 2


def test_an_overlapped_stream_stopped_early_leaves_no_decoder_thread(tiny):
    import threading
    vae, dit = tiny
    chunks = stream(vae, dit, _portrait(dit), AudioSource.whole(speech_like(2.0, 16000), 16000), dit.cfg.stream,
                    overlap_decode=True)
    first = [next(chunks), next(chunks)]
    assert all(c.frames is not None for c in first)
    chunks.close()  # the consumer stops (ComfyUI's interrupt, a closed client)
    assert not any(t.name.startswith("rest-vae-decode") for t in threading.enumerate())


def test_a_whole_track_handed_over_in_pieces_gives_the_same_frames_without_copying_it(tiny):
    """AudioSource.in_pieces (the CLI and the nodes feed whole tracks this way, so the stream holds a window of
    the speech instead of a second copy): views of the caller's tensor, and at the model's rate the frames are
    bit-identical to handing the track over whole."""
    vae, dit = tiny
    sr = dit.audio_encoder.sample_rate
    wave = torch.stack([speech_like(1.3, sr), speech_like(1.3, sr) * 0.5])  # stereo
    source = AudioSource.in_pieces(wave, sr, seconds=0.3)
    pieces = list(source.pieces)
    assert all(p.untyped_storage().data_ptr() == wave.untyped_storage().data_ptr() for p in pieces)
    assert sum(p.shape[-1] for p in pieces) == wave.shape[-1]
    whole = _run(vae, dit, AudioSource.whole(wave, sr))
    piecewise = _run(vae, dit, AudioSource(iter(pieces), sr))
    assert len(whole) == len(piecewise)
    for a, b in zip(whole, piecewise):
        assert torch.equal(a.frames, b.frames)
    with pytest.raises(ValueError):
        AudioSource.in_pieces(torch.zeros(2, 0), sr)


def test_a_chunk_goes_out_before_its_commit_pass_and_the_last_gets_none(tiny, monkeypatch):
    """The commit (the clean K/V for the Context-Cache) only serves the next chunk: it runs after the chunk was
    handed out, so live it overlaps the wait for the next chunk's audio; the frames are those of
    generate_chunk's order (denoise, commit) chunk by chunk."""
    from rest_model import streamer
    vae, dit = tiny
    audio = speech_like(2.0, 16000)
    events, commit = [], streamer.commit_chunk
    monkeypatch.setattr(streamer, "commit_chunk", lambda *a: (events.append("commit"), commit(*a))[1])
    chunks = []
    for c in stream(vae, dit, _portrait(dit), AudioSource.whole(audio, 16000), dit.cfg.stream, seed=5):
        events.append(("out", c.index))
        chunks.append(c)
    assert events[:4] == [("out", 0), "commit", ("out", 1), "commit"] and events[-1] == ("out", len(chunks) - 1)
    assert events.count("commit") == len(chunks) - 1
    # the same latents as committing each chunk before it goes out (the order before: generate_chunk)
    denoise = streamer.denoise_chunk

    def commit_first(dit, cache, noise, windows, times):
        x0 = denoise(dit, cache, noise, windows, times)
        commit(dit, cache, x0, windows)
        return x0
    monkeypatch.setattr(streamer, "denoise_chunk", commit_first)
    monkeypatch.setattr(streamer, "commit_chunk", lambda *a: None)
    before = list(stream(vae, dit, _portrait(dit), AudioSource.whole(audio, 16000), dit.cfg.stream, seed=5))
    assert len(before) == len(chunks) and all(torch.equal(x.latent, y.latent) and torch.equal(x.frames, y.frames)
                                              for x, y in zip(before, chunks))
