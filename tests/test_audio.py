import pytest
import torch
import torchaudio

from rest_model.audio import StreamingResampler, num_video_frames
from conftest import speech_like


@pytest.fixture
def enc(tiny):
    return tiny[1].audio_encoder


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_any_sample_rate_gives_one_feature_per_video_frame(enc, sr):
    wave = speech_like(1.3, sr)
    feats = enc.encode(wave, sr)
    assert feats.shape == (1, num_video_frames(wave.numel(), sr, enc.fps), enc.cfg.dim)
    assert feats.shape[1] == 33  # ceil(1.3 s * 25 fps)
    assert torch.isfinite(feats).all()


def test_rates_agree_on_the_same_speech(enc):
    wave16 = speech_like(1.0, 16000)
    wave48 = torchaudio.functional.resample(wave16, 16000, 48000)
    a, b = enc.encode(wave16, 16000), enc.encode(wave48, 48000)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > 0.99


def test_stereo_is_mixed_to_mono(enc):
    mono = speech_like(0.8, 16000)
    stereo = torch.stack([mono * 0.5, mono * 1.5])
    torch.testing.assert_close(enc.encode(stereo, 16000), enc.encode(mono, 16000))
    comfy_layout = stereo[None]  # [B=1, C, S] as ComfyUI's AUDIO holds it
    torch.testing.assert_close(enc.encode(comfy_layout, 16000), enc.encode(mono, 16000))


def test_silence_uses_the_null_embedding(enc):
    wave = speech_like(1.0, 16000)
    wave[8000:] = 0  # second half silent
    feats = enc.encode(wave, 16000)[0]
    assert torch.equal(feats[-5], enc.null) and torch.equal(feats[-1], enc.null)
    assert not torch.equal(feats[3], enc.null)
    assert torch.equal(enc.encode(torch.zeros(16000), 16000)[0], enc.null.expand(25, -1))


def test_shorter_than_one_chunk(enc):
    feats = enc.encode(speech_like(0.05, 44100), 44100)  # 2 video frames
    assert feats.shape[1] == 2
    assert enc.encode(torch.randn(3) * 0.1, 8000).shape[1] == 1  # a few samples -> one frame


@pytest.mark.parametrize("bad,msg", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_nan_and_inf_are_refused(enc, bad, msg):
    wave = speech_like(0.5, 16000)
    wave[100] = bad
    with pytest.raises(ValueError, match=msg):
        enc.encode(wave, 16000)


def test_empty_and_malformed_audio_are_refused(enc):
    with pytest.raises(ValueError, match="empty"):
        enc.encode(torch.zeros(0), 16000)
    with pytest.raises(ValueError, match="sample rate"):
        enc.encode(torch.zeros(100), 0)
    with pytest.raises(ValueError, match="one stream"):
        enc.encode(torch.zeros(2, 1, 100), 16000)


def test_features_have_the_documented_lookahead(enc):
    """Feature of frame i changes with audio of frame i + lookahead, never later."""
    c = enc.cfg
    wave = speech_like(1.0, 16000)
    base = enc.encode(wave, 16000)[0]
    i = 10
    for future, should_change in [(i + c.lookahead_frames, True), (i + c.lookahead_frames + 1, False)]:
        w = wave.clone()
        w[future * c.samples_per_frame:] = torch.randn(w.numel() - future * c.samples_per_frame) * 0.3
        changed = not torch.equal(enc.encode(w, 16000)[0, i], base[i])
        assert changed == should_change, (future, changed)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (8000, 16000), (48000, 16000), (22050, 19200)])
def test_streaming_resampler_equals_whole_resample(orig, new):
    x = speech_like(1.1, orig)
    whole = torchaudio.functional.resample(x, orig, new)
    r, out, i = StreamingResampler(orig, new), [], 0
    for size in [1, 500, 3000, 17, 9000, 100000]:
        out.append(r.push(x[i:i + size]))
        i += size
    out.append(r.finish())
    y = torch.cat(out)
    assert y.shape == whole.shape
    torch.testing.assert_close(y, whole, atol=5e-5, rtol=0)


def test_incremental_features_equal_whole(enc):
    wave = speech_like(1.2, 16000)
    whole = enc.encode(wave, 16000)
    tl = enc.timeline()
    tl.push(wave[:9000])
    first = enc.frames(tl, 0, 10)  # frames 0-9 need audio up to frame 12 = 7680 samples: present
    tl.push(wave[9000:])
    tl.finish()
    rest = enc.frames(tl, 10, whole.shape[1])
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def backbone_enc():
    """The tiny preset's audio settings on a wav2vec2 base backbone (the architecture, random weights)."""
    from rest_model.audio import AudioEncoder
    from rest_model.config import AudioConfig
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig(n_mels=32, dim=32, dilations=(1, 2), backbone="wav2vec2_base"), 25)
    with torch.no_grad():
        enc.layer_mix.normal_()
    return enc.eval()


@torch.no_grad()
def test_backbone_keeps_the_documented_lookahead_and_streams_exactly(backbone_enc):
    enc, c = backbone_enc, backbone_enc.cfg
    wave = speech_like(0.8, 16000)
    base = enc.encode(wave, 16000)
    assert base.shape == (1, 20, 32) and torch.isfinite(base).all()
    i = 6
    for future, should_change in [(i + c.lookahead_frames, True), (i + c.lookahead_frames + 1, False)]:
        w = wave.clone()
        w[future * c.samples_per_frame:] = torch.randn(w.numel() - future * c.samples_per_frame) * 0.3
        assert (not torch.equal(enc.encode(w, 16000)[0, i], base[0, i])) == should_change, future
    tl = enc.timeline()
    tl.push(wave[:6000])
    first = enc.frames(tl, 0, 6)
    tl.push(wave[6000:])
    tl.finish()
    torch.testing.assert_close(torch.cat([first, enc.frames(tl, 6, 20)], 1), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_backbone_weights_are_the_users_and_frozen(backbone_enc, tmp_path):
    from safetensors.torch import save_file
    from rest_model.audio import AudioEncoder, build_backbone
    torch.manual_seed(1)
    theirs = build_backbone("wav2vec2_base")  # stands in for weights a user converted from a pretrained model
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "w2v.safetensors")
    enc = AudioEncoder(backbone_enc.cfg, 25)
    enc.load_state_dict(backbone_enc.state_dict())
    wave = speech_like(0.4, 16000)
    before = enc.encode(wave, 16000)
    enc.load_backbone_weights(str(tmp_path / "w2v.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(enc.backbone.state_dict().values(), theirs.state_dict().values()))
    assert not torch.allclose(enc.encode(wave, 16000), before)
    enc.train()
    assert not enc.backbone.training and not any(p.requires_grad for p in enc.backbone.parameters())
    assert enc.layer_mix.requires_grad and enc.proj_in.weight.requires_grad
    save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="do not fit wav2vec2_base"):
        enc.load_backbone_weights(str(tmp_path / "other.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        enc.load_backbone_weights(str(tmp_path / "bad.safetensors"))


def test_backbone_needs_16khz_and_a_known_name():
    from rest_model.audio import AudioEncoder
    from rest_model.config import AudioConfig
    with pytest.raises(ValueError, match="16000 Hz"):
        AudioEncoder(AudioConfig(samples_per_frame=480, backbone="hubert_base"), 25)
    with pytest.raises(ValueError, match="unknown audio backbone"):
        AudioEncoder(AudioConfig(backbone="whisper"), 25)
