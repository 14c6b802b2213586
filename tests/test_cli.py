import subprocess
import sys
import wave as wavmod
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rest_model import checkpoint, media
from rest_model.__main__ import main
from conftest import speech_like

ROOT = Path(__file__).resolve().parent.parent


def _wav(path, seconds, sr=22050, channels=1):
    data = speech_like(seconds, sr).numpy()
    data = np.stack([data] * channels, 1)
    with wavmod.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((data * 32767).astype("<i2").tobytes())
    return path


def _png(path, mode="RGBA", size=(90, 70)):
    arr = (np.random.default_rng(0).random((size[1], size[0], len(mode))) * 255).astype("uint8")
    Image.fromarray(arr.squeeze(), mode).save(path)
    return path


def test_generate_writes_a_playable_mp4_matching_the_audio(tmp_path, tiny):
    vae, dit = tiny
    checkpoint.save(vae, tmp_path / "v.safetensors")
    checkpoint.save(dit, tmp_path / "d.safetensors")
    out = tmp_path / "out" / "video.mp4"
    rc = main(["generate", "--image", str(_png(tmp_path / "p.png")), "--audio", str(_wav(tmp_path / "s.wav", 1.7, channels=2)),
               "--out", str(out), "--vae", str(tmp_path / "v.safetensors"), "--dit", str(tmp_path / "d.safetensors")])
    assert rc == 0
    info = media.probe(out)
    assert info["frames"] == 43  # ceil(1.7 s * 25 fps)
    assert info["fps"] == 25 and (info["width"], info["height"]) == (32, 32)
    assert info["has_audio"] and abs(info["audio_duration"] - 1.7) < 0.06
    frames = [f.to_ndarray(format="rgb24") for f in __import__("av").open(str(out)).decode(video=0)]
    assert len(frames) == 43 and np.std(np.stack(frames)) > 1  # not a blank video
    overlapped = tmp_path / "out" / "overlapped.mp4"  # VAE decode beside the DiT: the same video
    assert main(["generate", "--image", str(tmp_path / "p.png"), "--audio", str(tmp_path / "s.wav"), "--out",
                 str(overlapped), "--vae", str(tmp_path / "v.safetensors"), "--dit", str(tmp_path / "d.safetensors"),
                 "--overlap-decode", "--decode-device", "cpu"]) == 0
    again = [f.to_ndarray(format="rgb24") for f in __import__("av").open(str(overlapped)).decode(video=0)]
    assert len(again) == 43 and all(np.array_equal(a, b) for a, b in zip(frames, again))


def test_generate_as_a_subprocess_with_random_weights(tmp_path):
    out = tmp_path / "v.mp4"
    r = subprocess.run([sys.executable, "-m", "rest_model", "generate", "--random-weights", "--image",
                        str(_png(tmp_path / "g.png", "L")), "--audio", str(_wav(tmp_path / "s.wav", 0.3)),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RANDOM WEIGHTS" in r.stderr
    assert media.probe(out)["frames"] == 8


def test_missing_model_files_say_so(tmp_path, capsys):
    rc = main(["generate", "--image", str(_png(tmp_path / "p.png")), "--audio", str(_wav(tmp_path / "s.wav", 0.3)),
               "--vae", str(tmp_path / "nope.safetensors"), "--dit", str(tmp_path / "nope.safetensors"),
               "--out", str(tmp_path / "o.mp4")])
    assert rc == 2 and "model file" in capsys.readouterr().err  # bad input: the same exit code as every other


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    bad_audio = tmp_path / "bad.wav"
    bad_audio.write_bytes(b"RIFF not really a wav")
    rc = main(["generate", "--random-weights", "--image", str(_png(tmp_path / "p.png")), "--audio", str(bad_audio),
               "--out", str(tmp_path / "o.mp4")])
    assert rc == 2 and "bad.wav is not readable audio" in capsys.readouterr().err
    rc = main(["generate", "--random-weights", "--image", str(tmp_path / "p.png"), "--audio",
               str(_wav(tmp_path / "s.wav", 0.3)), "--out", str(tmp_path / "o.mp4"), "--decode-device", "gpu1"])
    assert rc == 2 and "--decode-device 'gpu1' is not a device" in capsys.readouterr().err
    for flags, says in ((["--context", "-1"], "context_frames must be >= 0"), (["--steps", "0"], "steps >= 1")):
        rc = main(["generate", "--random-weights", "--image", str(tmp_path / "p.png"), "--audio",
                   str(tmp_path / "s.wav"), "--out", str(tmp_path / "o.mp4"), *flags])
        assert rc == 2 and says in capsys.readouterr().err
    tiny_img = _png(tmp_path / "t.png", "RGB", (5, 40))
    rc = main(["generate", "--random-weights", "--image", str(tiny_img), "--audio", str(_wav(tmp_path / "s.wav", 0.3)),
               "--out", str(tmp_path / "o.mp4")])
    assert rc == 2 and "too small" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "RGB", "P", "I;16"])
def test_portraits_of_every_mode_load_as_rgb(tmp_path, mode):
    path = tmp_path / "p.png"
    if mode == "I;16":
        Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(path)
    elif mode == "P":
        Image.new("RGB", (64, 48), (10, 200, 30)).convert("P").save(path)
    else:
        _png(path, mode, (64, 48))
    img = media.load_image(path)
    assert img.shape == (3, 48, 64) and 0 <= img.min() and img.max() <= 1
    fitted = media.fit_portrait(img, 32, "center")
    assert fitted.shape == (3, 32, 32) and -1 <= fitted.min() and fitted.max() <= 1


def test_fit_portrait_modes_and_alpha():
    rgba = torch.zeros(4, 20, 40)
    rgba[3] = 0.0  # fully transparent -> white
    out = media.fit_portrait(rgba, 16, "pad")
    assert torch.allclose(out, torch.ones_like(out))
    wide = torch.rand(3, 20, 40)
    assert media.fit_portrait(wide, 16, "stretch").shape == (3, 16, 16)
    with pytest.raises(ValueError, match="crop mode"):
        media.fit_portrait(wide, 16, "zoom")
    with pytest.raises(ValueError, match="1-4 channels"):
        media.fit_portrait(torch.rand(5, 20, 20), 16)


def test_unreadable_image(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="x.png is not a readable image"):
        media.load_image(p)


def test_the_bundled_demo_model_is_a_loadable_pair_within_budget():
    """What README's main job and the workflows run: both files present, a matching pair, <= 50 MB."""
    from rest_model import checkpoint
    from rest_model.cli import DEMO_DIT, DEMO_VAE
    assert DEMO_VAE.stat().st_size + DEMO_DIT.stat().st_size <= 50e6
    vae, dit = checkpoint.load_pair(DEMO_VAE, DEMO_DIT)
    assert dit.cfg.resolution == 128 and dit.cfg.fps == 25 and dit.cfg.stream.steps == 2
    assert next(dit.parameters()).dtype == torch.float32  # stored float16, run float32


def test_the_bundled_demo_model_has_the_demo_presets_layout():
    """scripts/train_demo.sh trains with --preset demo and the CLI builds fresh demo models from the preset: a
    shipped file of another layout (e.g. a VAE merging its frames at another encoder level) means the two drifted."""
    import dataclasses
    from rest_model.cli import DEMO_DIT, DEMO_VAE
    from rest_model.config import preset
    vae, dit = checkpoint.load_pair(DEMO_VAE, DEMO_DIT)
    p = preset("demo")
    assert dataclasses.replace(vae.cfg, scaling_factor=p.vae.scaling_factor) == p.vae
    assert dit.cfg == p.dit


def _half_body_png(path, size=(301, 251)):
    """The bundled portrait scaled to 96 px, off-centre in the upper part of an odd-sized gray canvas."""
    canvas = np.full((size[1], size[0], 3), 120, np.uint8)
    face = np.asarray(Image.open(ROOT / "assets" / "portrait.png").convert("RGB").resize((96, 96), Image.LANCZOS))
    canvas[20:116, 170:266] = face
    Image.fromarray(canvas).save(path)
    return path, canvas


def test_generate_frames_the_face_and_pastes_back_at_the_portraits_size(tmp_path, capsys):
    png, canvas = _half_body_png(tmp_path / "half_body.png")
    out = tmp_path / "pasted.mp4"
    assert main(["generate", "--random-weights", "--image", str(png), "--audio", str(_wav(tmp_path / "s.wav", 0.5)),
                 "--out", str(out), "--paste-back"]) == 0
    said = capsys.readouterr().out
    assert "portrait: face found" in said
    assert "warning: this portrait is far from what the model was trained on" in said  # a random VAE
    info = media.probe(out)
    assert (info["width"], info["height"]) == (300, 250) and info["frames"] == 13  # odd sides trimmed for H.264
    frame = next(iter(__import__("av").open(str(out)).decode(video=0))).to_ndarray(format="rgb24").astype(float)
    # away from the face the video is the portrait itself (up to H.264), around it the generated noise
    assert np.abs(frame[150:, :150] - canvas[150:250, :150]).mean() < 3
    assert np.abs(frame[40:90, 195:240] - canvas[40:90, 195:240]).mean() > 10


def test_generate_says_when_no_face_is_found_and_the_crop_default_is_face(tmp_path, capsys):
    from rest_model.cli import build_parser
    assert build_parser().parse_args(["generate"]).crop == "face"
    out = tmp_path / "v.mp4"
    assert main(["generate", "--random-weights", "--image", str(_png(tmp_path / "noise.png", "RGB")), "--audio",
                 str(_wav(tmp_path / "s.wav", 0.3)), "--out", str(out)]) == 0
    assert "portrait: no face found: centered crop 70x70 at (10, 0)" in capsys.readouterr().out
    assert media.probe(out)["width"] == 32  # without --paste-back: the model's square
