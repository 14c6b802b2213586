"""prepare: clips in, dataset out, bad clips skipped with a reason; timing survives fps resampling
and the mp4 round trip; ClipDataset returns aligned audio/video crops of the right shapes."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rest_model.eval import metrics

from rest_model.data import synth
from rest_model.__main__ import main
from rest_model.data.prepare import ClipDataset, SkinDetector, assign_split, prepare

SR = 16000  # the tiny preset's encoder rate: 25 fps x 640
SPF = 640


def write_mp4(path, frames, fps, audio=None, sr=SR):
    """Like footage from a camera: any fps, audio stamped from t = 0 (no priming delay)."""
    w = synth.AlignedVideoWriter(str(path), fps, frames.shape[2], frames.shape[1],
                                 None if audio is None else torch.from_numpy(audio), sr)
    w.write(frames)
    w.close()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    synth.synthesize(str(root), 4, 1.6, 64, seed=0, identities=4, speech="babble", jobs=2)
    short = tmp_path_factory.mktemp("short")
    name = synth.synthesize(str(short), 1, 0.6, 64, seed=5, speech="babble", jobs=1)[0]
    shutil.copy(short / f"{name}.mp4", root / "short_clip.mp4")
    shutil.copy(short / f"{name}.json", root / "short_clip.json")
    rng = np.random.default_rng(0)
    speech = synth.babble(rng, 2.0, synth.BabbleVoice(120, 1.0, 4.5, 0.2, 0.9))
    # a real-footage-like clip (no ground truth) of a face, in a person's folder; longer than the rest
    face_dir = tmp_path_factory.mktemp("face")
    face_src = synth.synthesize(str(face_dir), 2, 2.4, 128, seed=0, identities=2, speech="babble", jobs=2)
    (root / "alice").mkdir()
    shutil.copy(face_dir / f"{face_src[1]}.mp4", root / "alice" / "take1.mp4")
    # no face: a drifting blue pattern with speech
    t = np.arange(50)[:, None, None, None]
    blue = np.broadcast_to(np.array([20, 40, 200], np.uint8), (50, 64, 64, 3)).copy()
    blue[..., 1] = (40 + 30 * np.sin(t[..., 0] / 5 + np.arange(64)[None, None, :] / 9)).astype(np.uint8)
    (root / "bob").mkdir()
    write_mp4(root / "bob" / "noface.mp4", blue, 25, speech)
    write_mp4(root / "noaudio.mp4", blue, 25, None)
    write_mp4(root / "silent.mp4", blue, 25, np.zeros(2 * SR, np.float32))
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 256, 5000, dtype=np.uint8)))
    good = (face_dir / f"{face_src[0]}.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def dataset(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    assert main(["prepare", "--videos", str(videos), "--out", str(out), "--preset", "tiny", "--jobs", "2",
                 "--test-fraction", "0.3"]) == 0
    return out


def test_prepare_skips_bad_clips_with_reasons(dataset):
    lines = (dataset / "skipped.log").read_text().strip().splitlines()
    reasons = {line.split("\t")[0].rsplit("/", 1)[1]: line.split("\t")[1] for line in lines}
    assert set(reasons) == {"short_clip.mp4", "noface.mp4", "noaudio.mp4", "silent.mp4", "corrupt.mp4",
                            "truncated.mp4"}
    assert reasons["short_clip.mp4"].startswith("too short")
    assert reasons["noface.mp4"].startswith("no face detected")
    assert reasons["noaudio.mp4"] == "no audio track"
    assert reasons["silent.mp4"] == "audio track is silent"
    assert reasons["corrupt.mp4"].startswith("unreadable")
    assert reasons["truncated.mp4"].startswith("unreadable")


def test_prepare_writes_the_contract(dataset):
    index = json.loads((dataset / "index.json").read_text())
    assert (index["preset"], index["fps"], index["resolution"], index["sample_rate"]) == ("tiny", 25, 32, SR)
    clips = index["clips"]
    assert len(clips) == 5
    by_id = {c["identity"]: c for c in clips}
    assert "alice" in by_id and by_id["alice"]["voice"] == "alice"  # identity from the person's folder
    assert {c["split"] for c in clips} == {"train", "test"}
    test_ids = {c["identity"] for c in clips if c["split"] == "test"}
    assert test_ids.isdisjoint({c["identity"] for c in clips if c["split"] == "train"})
    for c in clips:
        with safe_open(str(dataset / c["file"]), framework="pt") as f:
            meta, keys = f.metadata(), set(f.keys())
            video, audio = f.get_tensor("video"), f.get_tensor("audio")
            assert video.dtype == torch.uint8 and video.shape == (c["frames"], 32, 32, 3)
            assert audio.dtype == torch.float32 and audio.shape == (c["frames"] * SPF,)
            assert meta["identity"] == c["identity"] and meta["voice"] == c["voice"]
            if c["identity"] != "alice":  # synth clips carry their ground truth along
                assert {"mouth_open", "mouth_width", "head_pose"} <= keys
                assert f.get_tensor("head_pose").shape == (c["frames"], 3)
                assert c["frames"] == 40
                # audio sample 0 is frame 0: the stored ground truth matches what the audio implies
                heard, _ = metrics.audio_mouth_shape(audio.numpy(), SR, 25, c["frames"])
                r = metrics.sync_score(heard, f.get_tensor("mouth_open").numpy(), max_offset=5)
                assert r.offset == 0 and r.score > 0.9, r.as_dict()
    log = (dataset / "prepare.log").read_text()
    assert "synth clip: generator framing kept" in log and "skin face crop" in log


def test_prepare_resamples_fps_and_keeps_timing(tmp_path):
    """A 30 fps clip with a flash at 1.0 s and a click at 1.0 s: both land in output frame 25."""
    frames = np.full((60, 48, 64, 3), 60, np.uint8)
    frames[30] = 255  # t = 1.000 s at 30 fps
    audio = np.zeros(2 * 44100, np.float32)
    audio[44100:44100 + 441] = 0.8 * np.sin(np.arange(441) / 3)  # 10 ms at t = 1.0 s, recorded at 44.1 kHz
    (tmp_path / "v").mkdir()
    write_mp4(tmp_path / "v" / "cam.mp4", frames, 30, audio, 44100)
    index = prepare(str(tmp_path / "v"), str(tmp_path / "d"), "tiny", crop="center", jobs=1)
    c = index["clips"][0]
    with safe_open(str(tmp_path / "d" / c["file"]), framework="pt") as f:
        video, wave = f.get_tensor("video").float(), f.get_tensor("audio")
    assert c["frames"] == 50
    flash = int(video.mean((1, 2, 3)).argmax())
    energy = wave[: c["frames"] * SPF].reshape(-1, SPF).pow(2).sum(1)
    assert flash == 25 and int(energy.argmax()) == 25
    # a re-run replaces the clips of the earlier run and nothing else in the folder
    (tmp_path / "d" / "mine.safetensors").write_bytes(b"x")
    (tmp_path / "v" / "cam.mp4").rename(tmp_path / "v" / "cam2.mp4")
    prepare(str(tmp_path / "v"), str(tmp_path / "d"), "tiny", crop="center", jobs=1)
    assert sorted(p.name for p in (tmp_path / "d").glob("*.safetensors")) == ["cam2.safetensors", "mine.safetensors"]


def test_prepare_bad_input(tmp_path, capsys):
    assert main(["prepare", "--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--videos", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no video files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "o"), "huge")


def test_split_holds_out_identities_and_voices():
    clips = [dict(identity=f"p{i % 10}", voice=f"v{i % 10}") for i in range(100)]
    clips += [dict(identity="p0", voice="shared"), dict(identity="p1", voice="shared")]  # links p0 and p1
    split = assign_split(clips, 0.15)
    assert split == assign_split(clips, 0.15)  # deterministic
    test = [c for c, s in zip(clips, split) if s == "test"]
    train = [c for c, s in zip(clips, split) if s == "train"]
    assert 0.08 <= len(test) / len(clips) <= 0.25
    assert {c["identity"] for c in test}.isdisjoint(c["identity"] for c in train)
    assert {c["voice"] for c in test}.isdisjoint(c["voice"] for c in train)


def test_clip_dataset(dataset):
    ds = ClipDataset(dataset, 16, split="all", seed=0, audio_margin=3)
    assert len(ds) == 5
    item = ds[0]
    assert item["video"].shape == (3, 16, 32, 32) and item["ref"].shape == (3, 32, 32)
    assert item["audio"].shape == (16 * SPF,) and item["audio_padded"].shape == (22 * SPF,)
    assert -1 <= item["video"].min() and item["video"].max() <= 1 and isinstance(item["identity"], str)
    # the crop's audio and video are the same span of the clip
    c = ds.clips[0]
    with safe_open(str(dataset / c["file"]), framework="pt") as f:
        video, audio = f.get_tensor("video"), f.get_tensor("audio")
    s = item["start"]
    torch.testing.assert_close(item["video"], video[s:s + 16].permute(3, 0, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(item["audio"], audio[s * SPF:(s + 16) * SPF])
    # margins hold the clip's real audio around the crop, and silence before its start
    first = ds.load(0, 0, 5)
    assert first["audio_padded"][: 3 * SPF].abs().max() == 0
    torch.testing.assert_close(first["audio_padded"][3 * SPF:22 * SPF], audio[: 19 * SPF])
    torch.testing.assert_close(first["ref"], video[5].permute(2, 0, 1).float() / 127.5 - 1)
    synth_item = next(ds[i] for i in range(len(ds)) if ds.clips[i]["identity"] != "alice")
    assert synth_item["mouth_open"].shape == (16,) and synth_item["head_pose"].shape == (16, 3)
    # random crops differ, a seed reproduces them
    starts = {ds[0]["start"] for _ in range(12)}
    assert len(starts) > 1
    draws = [[d[0]["start"] for _ in range(4)] for d in (ClipDataset(dataset, 16, "all", seed=1) for _ in range(2))]
    assert draws[0] == draws[1]
    cached = ClipDataset(dataset, 16, split="all", cache=True)
    torch.testing.assert_close(cached.load(1, 3, 4)["video"], ds.load(1, 3, 4)["video"])
    # batches through a DataLoader
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["video"].shape == (2, 3, 16, 32, 32) and len(batch["identity"]) == 2


def test_clip_dataset_rejects_short_and_missing(dataset, tmp_path):
    with pytest.raises(ValueError, match="no train clip has at least 500 frames"):
        ClipDataset(dataset, 500)
    with pytest.raises(FileNotFoundError, match="index.json"):
        ClipDataset(tmp_path, 8)
    with pytest.raises(ValueError, match="split"):
        ClipDataset(dataset, 8, split="val")
    # clips shorter than clip_frames are left out, the rest still used
    ds = ClipDataset(dataset, 45, split="all")
    assert [c["identity"] for c in ds.clips] == ["alice"] and ds[0]["video"].shape[1] == 45


def test_skin_detector_finds_centred_faces_and_not_walls():
    found = 0
    for i in range(30):
        ident = synth.make_identity(0, i, "babble")
        mot = synth.make_motion(np.random.default_rng(i), 1, 25, ident, np.zeros(1, np.float32))
        boxes = SkinDetector()(synth.render_frame(ident, synth.background(ident, 256), 128, mot, 0, 0.0, 0.5))
        if boxes:
            x, y, w, h = boxes[0]
            found += abs(x + w / 2 - 64) < 15 and 30 < w < 100 and y < 64
    assert found >= 22  # a fallback, not a trained detector: most faces, despite skin-coloured walls and clothes
    wall = np.full((128, 128, 3), (220, 170, 140), np.uint8)  # skin-coloured, fills the frame
    assert SkinDetector()(wall) == []
    assert SkinDetector()(np.zeros((64, 64, 3), np.uint8)) == []


def test_synth_without_espeak_refuses_espeak_and_says_when_auto_falls_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "have_espeak", lambda: False)
    with pytest.raises(ValueError, match="espeak-ng is not installed"):
        synth.synthesize(str(tmp_path / "e"), 1, 0.6, 64, speech="espeak", jobs=1)
    assert not (tmp_path / "e").exists()  # refused before writing anything
    assert main(["synth", "--out", str(tmp_path / "a"), "--n", "1", "--seconds", "0.6", "--size", "64",
                 "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert "espeak-ng is not installed" in err and "babble" in err
    assert json.loads(next((tmp_path / "a").glob("*.json")).read_text())["voice"].startswith("babble")
