"""Real-world inputs: surround audio, loud float audio, AAC's padding, phone photos (EXIF rotation), 16-bit
grayscale, decompression bombs."""
import struct
import zlib

import av
import numpy as np
import pytest
import torch
from PIL import Image

from rest_model import media
from rest_model.__main__ import main
from rest_model.errors import InputError
from conftest import speech_like

SR = 16000


def _write_audio(path, wave: np.ndarray, layout: str, codec="pcm_f32le", sr=SR):
    """wave [C, S] float -> a file with that channel layout, stamped from t = 0."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, np.float32), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sr, 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _decoded_audio(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], 1)


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def test_speech_only_in_the_centre_channel_of_5_1_is_kept(tmp_path):
    speech = speech_like(1.0, SR).numpy()
    six = np.zeros((6, speech.size), np.float32)
    six[2] = speech  # FFmpeg's 5.1 order: FL FR FC LFE BL BR
    wave, sr = media.load_audio(_write_audio(tmp_path / "film.wav", six, "5.1"))
    assert sr == SR and wave.shape[0] == 2  # the standard downmix to stereo, not channels 0-1
    assert all(_rms(ch) > 0.5 * _rms(speech) for ch in wave.numpy())
    # a 6-channel waveform handed to the writer (a node's AUDIO) is mixed down the same way
    out = tmp_path / "v.mp4"
    media.write_video(out, [torch.zeros(4, 3, 16, 16)], 25, audio=torch.from_numpy(six), sample_rate=SR)
    assert _rms(_decoded_audio(out)) > 0.5 * _rms(speech)


def test_float_audio_beyond_full_scale_is_scaled_not_clipped(tmp_path):
    t = np.arange(SR) / SR
    loud = 3.0 * np.sin(2 * np.pi * 200 * t).astype(np.float32)  # peaks at 3x full scale
    track, layout = media.audio_track(torch.from_numpy(loud), SR)
    assert layout == "mono" and np.abs(track).max() == pytest.approx(1.0)
    assert np.allclose(track[0], loud / 3, atol=1e-6)  # one gain: the sine's shape is kept (a clamp flattens it)
    wave, _ = media.load_audio(_write_audio(tmp_path / "loud.wav", loud[None], "mono"))
    assert wave.abs().max() == pytest.approx(3.0, rel=1e-4)  # the model hears what the file holds, unclipped


def test_the_muxed_track_of_loud_audio_does_not_clip(tmp_path):
    t = np.arange(SR) / SR
    loud = (3.0 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    out = tmp_path / "v.mp4"
    media.write_video(out, [torch.zeros(25, 3, 16, 16)], 25, audio=torch.from_numpy(loud), sample_rate=SR)
    track = _decoded_audio(out)[0]
    mid = track[SR // 4:3 * SR // 4]
    # a sine's RMS is 0.707 of its peak; clipped at 1 a 3x sine would be nearly a square wave (0.95)
    assert np.abs(mid).max() < 1.05 and _rms(mid) / np.abs(mid).max() == pytest.approx(0.707, abs=0.03)


def test_aac_padding_adds_no_frame_and_no_delay(tmp_path):
    """An mp4 we wrote, used as the speech input: the AAC encoder's priming is skipped and its last frame's
    padding cut, so the audio is as long as the original and the video gets ceil(duration * fps) frames."""
    sr, seconds = 22050, 1.7
    speech = speech_like(seconds, sr).numpy()
    n = speech.size
    first = tmp_path / "first.mp4"
    media.write_video(first, [torch.zeros(43, 3, 16, 16)], 25, audio=torch.from_numpy(speech), sample_rate=sr)
    wave, rate = media.load_audio(first)
    assert rate == sr and wave.shape[1] == n
    lag = int(np.argmax([np.dot(wave[0, k:k + 20000].numpy(), speech[:20000]) for k in range(0, 2200)]))
    assert lag == 0  # the speech starts where it did: no encoder delay in front of it
    again = tmp_path / "again.mp4"
    assert main(["generate", "--random-weights", "--audio", str(first), "--out", str(again)]) == 0
    assert media.probe(again)["frames"] == 43  # ceil(1.7 s * 25 fps)


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)  # stored landscape, a red mark at the stored top-left
    arr[:5, :5] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "phone.png", exif=exif)
    img = media.load_image(tmp_path / "phone.png")
    assert img.shape == (3, 60, 40)  # portrait, as the phone showed it
    assert img[0, :5, -5:].min() > 0.9 and img[0, :5, :5].max() < 0.1  # the mark is now top-right


def test_16_bit_grayscale_is_mapped_by_its_bit_depth_not_stretched(tmp_path):
    dark = (np.linspace(0, 0.25, 48 * 64).reshape(48, 64) * 65535).astype(np.uint16)  # a dark photo
    Image.fromarray(dark).save(tmp_path / "g16.png")
    img = media.load_image(tmp_path / "g16.png")
    assert img.shape == (3, 48, 64)
    assert img.max().item() == pytest.approx(0.25, abs=1e-3)  # stays dark; stretching would make it 1.0
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def _png_header_only(path, width, height):
    """A few bytes that claim a huge image: what a decompression bomb shows PIL before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, capsys):
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(InputError, match="bomb.png is too large an image"):
        media.load_image(bomb)
    # past PIL's warning limit (but under its error limit) is refused too: no portrait needs 100 megapixels
    with pytest.raises(InputError, match="too large an image"):
        media.load_image(_png_header_only(tmp_path / "big.png", 10_000, 10_000))
    assert main(["generate", "--random-weights", "--image", str(bomb), "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert "bomb.png is too large an image" in err and "Traceback" not in err
