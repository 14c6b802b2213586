"""Model files say what they were trained on: the training stages write it, the loaders show it."""
import json
import shutil

import pytest

from rest_model import checkpoint
from rest_model.__main__ import main
from rest_model.cli import DEMO_DIT, DEMO_VAE
from rest_model.data import synth
from rest_model.data.prepare import describe_dataset, prepare
from rest_model.train.loop import export_model


def test_trained_on_is_saved_and_described_from_the_header(tmp_path, tiny):
    vae, dit = tiny
    checkpoint.save(dit, tmp_path / "d.safetensors", trained_on="my studio clips")
    checkpoint.save(vae, tmp_path / "v.safetensors")
    said = checkpoint.describe(tmp_path / "d.safetensors")
    assert said.startswith("d.safetensors: causal DiT, ") and "32x32 at 25 fps" in said
    assert said.endswith("trained on: my studio clips")
    n = sum(p.numel() for p in dit.state_dict().values()) / 1e6
    assert f"{n:.1f} M parameters" in said
    assert checkpoint.describe(tmp_path / "v.safetensors").endswith("trained on: not stated")
    # the shipped demo files predate the field: their weights are left as they are, the loader says so
    for path in (DEMO_VAE, DEMO_DIT):
        assert checkpoint.describe(path).endswith("trained on: not stated")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        (tmp_path / "junk.safetensors").write_bytes(b"\x10" * 64)
        checkpoint.describe(tmp_path / "junk.safetensors")


def test_export_re_saves_keep_what_a_model_was_trained_on(tmp_path, tiny, capsys):
    vae, _ = tiny
    checkpoint.save(vae, tmp_path / "v.safetensors", trained_on="drawn faces")
    assert main(["export", "--in", str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "v16.safetensors")]) == 0
    assert checkpoint.read_metadata(tmp_path / "v16.safetensors")["trained_on"] == "drawn faces"


def test_a_stage_export_describes_its_dataset(tmp_path, tiny):
    data = tmp_path / "data"
    data.mkdir()
    clips = [dict(file=f"c{i}.safetensors", identity=f"id{i % 3}", voice=f"id{i % 3}", frames=50, source="synth",
                  split="test" if i == 5 else "train") for i in range(6)]
    (data / "index.json").write_text(json.dumps(dict(preset="tiny", fps=25, resolution=32, sample_rate=16000,
                                                     clips=clips)))
    said = describe_dataset(data)
    assert said == ("procedural drawn faces (rest_model synth), 32x32 at 25 fps: 5 clips, 3 identities, 0.2 min "
                    "(dataset data)")
    export_model(tiny[0], str(tmp_path / "v.safetensors"), str(data))
    assert checkpoint.describe(tmp_path / "v.safetensors").endswith("trained on: " + said)
    clips[0]["source"] = "video"
    (data / "index.json").write_text(json.dumps(dict(fps=25, resolution=32, sample_rate=16000, clips=clips)))
    assert describe_dataset(data).startswith("talking-head videos and procedural drawn faces (4 of the clips)")


def test_prepare_records_where_each_clip_came_from(tmp_path):
    videos = tmp_path / "videos"
    names = synth.synthesize(str(videos), 2, 1.2, 64, seed=0, identities=2, speech="babble", jobs=1)
    (videos / "person").mkdir()
    shutil.move(videos / f"{names[1]}.mp4", videos / "person" / "take.mp4")  # no ground truth: "real" footage
    (videos / f"{names[1]}.json").unlink()
    index = prepare(str(videos), str(tmp_path / "data"), "tiny", jobs=1, test_fraction=0)
    assert sorted(c["source"] for c in index["clips"]) == ["synth", "video"]
    train = [c for c in index["clips"] if c["split"] == "train"]  # one identity is always held out
    said = describe_dataset(tmp_path / "data")
    assert len(train) == 1 and ": 1 clip, 1 identity, " in said
    assert said.startswith({"synth": "procedural drawn faces", "video": "face-cropped talking-head videos"}[
        train[0]["source"]])
