"""What goes wrong gets a message naming the file or flag and the exit code of its kind, never a traceback or a
silent success: NaN/inf at load, in a training step and in the stream; metadata that claims another model than
the file holds; corrupt snapshots and clips; a resume with another architecture; missing devices; seeds."""
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rest_model import checkpoint, cli, errors
from rest_model.__main__ import main
from rest_model.checkpoint import CheckpointError
from rest_model.cli import random_model
from rest_model.config import preset, to_json
from rest_model.data.prepare import ClipDataset
from rest_model.errors import InputError, NonFiniteError
from rest_model.streamer import AudioSource, chunk_noise, noise_seed, stream
from rest_model.train.loop import LoopConfig, train_loop
from conftest import speech_like
from test_output_atomic import _wav
from test_training import _teacher_step, _tiny_dataset, toy_clips

ROOT = Path(__file__).resolve().parent.parent


def _resave_with(path, out, change):
    """A copy of checkpoint `path` with `change(tensors)` applied, bypassing save's own checks."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


# -- NaN / inf ------------------------------------------------------------------------------------
def test_nan_weights_are_refused_at_load_naming_the_tensor_and_never_written(tiny, tmp_path):
    vae, dit = tiny
    checkpoint.save(dit, tmp_path / "d.safetensors")
    name = next(k for k, v in dit.state_dict().items() if v.is_floating_point())

    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
    bad = _resave_with(tmp_path / "d.safetensors", tmp_path / "nan.safetensors", poison)
    with pytest.raises(CheckpointError, match=f"nan.safetensors: tensor {name} holds 1 NaN/infinite"):
        checkpoint.load_dit(bad)
    with torch.no_grad():
        next(dit.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write"):
        checkpoint.save(dit, tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()


@pytest.mark.parametrize("broken", ["dit", "vae"])
def test_a_stream_of_a_broken_model_stops_instead_of_writing_a_black_video(tiny, tmp_path, monkeypatch, capsys, broken):
    vae, dit = tiny
    with torch.no_grad():
        for p in (dit if broken == "dit" else vae.decoder).parameters():
            p.fill_(float("nan"))
    r = dit.cfg.resolution
    with pytest.raises(NonFiniteError, match="chunk 0: the " + ("DiT" if broken == "dit" else "VAE")):
        next(stream(vae, dit, torch.zeros(3, r, r), AudioSource.whole(speech_like(1.0, 16000), 16000), dit.cfg.stream))
    monkeypatch.setattr(cli, "_models", lambda args: (vae, dit))
    out = tmp_path / "v.mp4"
    wav = _wav(tmp_path / "s.wav", 1.0)
    assert main(["generate", "--audio", str(wav), "--out", str(out)]) == errors.NON_FINITE
    err = capsys.readouterr().err
    assert "NaN" in err and "Traceback" not in err and not out.exists()


def test_a_diverging_training_run_stops_with_exit_4_and_keeps_its_last_good_snapshot(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    vae, _ = random_model("tiny")
    checkpoint.save(vae, tmp_path / "v.safetensors")
    rc = main(["train-teacher", "--data", str(data), "--out", str(run), "--preset", "tiny", "--steps", "6",
               "--batch", "1", "--chunks", "2", "--device", "cpu", "--vae", str(tmp_path / "v.safetensors"),
               "--lr", "1e38", "--save-every", "1"])
    err = capsys.readouterr().err
    assert rc == errors.NON_FINITE, err
    assert "diverged" in err and "stopped before updating the weights" in err and "Traceback" not in err
    # what it kept is usable: the snapshot and the exported teacher hold finite weights
    step = json.loads(__import__("safetensors").safe_open(str(run / "teacher.state.safetensors"), "pt")
                      .metadata()["rest_train_state"])["step"]
    assert 1 <= step < 6 and f"(step {step})" in err
    teacher = checkpoint.load_dit(run / "teacher.safetensors")
    assert all(torch.isfinite(v).all() for v in teacher.state_dict().values())


def test_a_nan_step_in_the_loop_saves_nothing_after_it(tmp_path):
    vae, dit = random_model("tiny")
    clips = toy_clips()
    step = _teacher_step(vae, dit, clips)

    def diverging(i, g):
        loss, logs = step(i, g)
        return (loss * float("nan"), logs) if i == 3 else (loss, logs)
    cfg = LoopConfig(steps=6, lr=1e-3, warmup=1, log_every=1000, save_every=2)
    with pytest.raises(NonFiniteError, match=r"step 4 diverged.*last good snapshot .*teacher.state.safetensors \(step 2\)"):
        train_loop("teacher", {"dit": dit}, diverging, str(tmp_path), cfg, progress=False)
    assert all(torch.isfinite(p).all() for p in dit.parameters())  # the NaN gradient never reached the weights


# -- metadata bounds ------------------------------------------------------------------------------
def _claiming_file(path, **claims):
    """A tiny .safetensors whose metadata claims a DiT of `claims` (the issue's 724-byte memory bomb)."""
    cfg = preset("tiny").dit
    for k, v in claims.items():
        setattr(cfg, k, v)
    save_file({"ref_embed": torch.zeros(64), "audio_encoder.null": torch.zeros(32)}, str(path),
              metadata={"format": checkpoint.FORMAT, "format_version": "1", "kind": "dit", "config": to_json(cfg)})
    return path


def test_metadata_claiming_a_huge_model_is_refused_without_building_it(tmp_path):
    """dim 16384 x depth 64 claims 344 billion weights (1.4 TB): refused from the header in a subprocess whose address space is
    capped, fast, naming the mismatch, with its peak memory what importing the package costs."""
    bomb = _claiming_file(tmp_path / "bomb.safetensors", dim=16384, depth=64, heads=64)
    assert bomb.stat().st_size < 2000
    code = f"""
import resource, time, sys
sys.path.insert(0, {str(ROOT)!r})
from rest_model import checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    checkpoint.load_dit({str(bomb)!r})
except checkpoint.CheckpointError as e:
    print("REFUSED", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, e)
"""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))  # a real build dies here, not the machine
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert r.stdout.startswith("REFUSED"), r.stderr[-2000:]
    _, seconds, grew_kb, message = r.stdout.split(" ", 3)
    assert float(seconds) < 30 and int(grew_kb) < 200_000  # under 200 MB over the imports
    assert "bomb.safetensors: weights do not match the config in its metadata" in message
    assert "ref_embed (64,) in the file vs (16384,) by the config" in message


# -- snapshots, clips, architecture ---------------------------------------------------------------
def test_a_truncated_snapshot_is_named(tmp_path, capsys):
    vae, dit = random_model("tiny")
    cfg = LoopConfig(steps=2, lr=1e-3, warmup=1, log_every=1000, save_every=1)
    train_loop("teacher", {"dit": dit}, _teacher_step(vae, dit, toy_clips()), str(tmp_path), cfg, progress=False)
    snap = tmp_path / "teacher.state.safetensors"
    snap.write_bytes(snap.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"teacher.state.safetensors: the training snapshot cannot be read"):
        train_loop("teacher", {"dit": dit}, _teacher_step(vae, dit, toy_clips()), str(tmp_path),
                   LoopConfig(steps=4, save_every=1), progress=False)
    assert errors.exit_code(InputError("x")) == 2


def test_resuming_with_another_architecture_names_what_differs(tmp_path):
    vae, dit = random_model("tiny")
    cfg = LoopConfig(steps=1, lr=1e-3, warmup=1, log_every=1000, save_every=1)
    train_loop("teacher", {"dit": dit}, _teacher_step(vae, dit, toy_clips()), str(tmp_path), cfg, progress=False)
    deeper = preset("tiny").dit
    deeper.depth += 1
    from rest_model.dit import CausalDiT
    other = CausalDiT(deeper)
    with pytest.raises(InputError, match=r"another dit architecture.*blocks\.\d+\..* missing from the snapshot"):
        train_loop("teacher", {"dit": other}, _teacher_step(vae, other, toy_clips()), str(tmp_path),
                   LoopConfig(steps=3, save_every=1), progress=False)


def test_a_corrupt_dataset_clip_is_named(tmp_path):
    data = _tiny_dataset(tmp_path / "data")
    clip = data / "c0.safetensors"
    clip.write_bytes(clip.read_bytes()[:200])
    ds = ClipDataset(data, 8)
    with pytest.raises(InputError, match=r"c0.safetensors: dataset clip unreadable"):
        ds.load(0, 0, 0)
    with pytest.raises(InputError, match=r"c0.safetensors: dataset clip unreadable"):
        ClipDataset(data, 8, cache=True).load(0, 0, 0)


# -- exit codes, devices --------------------------------------------------------------------------
def test_each_kind_of_error_has_its_own_exit_code():
    assert [errors.exit_code(e) for e in (ValueError("x"), FileNotFoundError("x"), CheckpointError("x"),
                                          errors.OutputPathError("x"))] == [2, 2, 2, 2]
    assert [errors.exit_code(e) for e in (errors.WriteError("x"), PermissionError("x"), errors.DeviceError("x"))] == [3] * 3
    assert errors.exit_code(NonFiniteError("x")) == 4
    assert errors.exit_code(KeyboardInterrupt()) == 130 and errors.exit_code(errors.Terminated()) == 143
    assert errors.exit_code(ZeroDivisionError()) == 1


def test_missing_models_and_internal_errors_say_so(tmp_path, monkeypatch, capsys):
    rc = main(["generate", "--vae", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "model file" in err and "nope.safetensors not found" in err
    monkeypatch.setattr(checkpoint, "load_any", lambda path: 1 / 0)
    assert main(["export", "--in", "x", "--out", str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error (a bug" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_message(tmp_path, capsys):
    assert main(["generate", "--random-weights", "--device", "cuda", "--out", str(tmp_path / "o.mp4")]) == 3
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is available" in err and "Traceback" not in err
    data = _tiny_dataset(tmp_path / "data")  # the training stages share the check
    assert main(["train-vae", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--device", "cuda:0"]) == 3


# -- seeds ----------------------------------------------------------------------------------------
def test_seeds_below_2_63_keep_their_noise_and_s_plus_2_63_differs_from_s():
    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, 7, 2 ** 32, 2 ** 62 + 5, 2 ** 63 - 1] + torch.randint(0, 2 ** 62, (50,), generator=g).tolist()
    for s in seeds:
        for i in (0, 1, 2, 1000):
            assert noise_seed(s, i) == (s * 1_000_003 + i) % 2 ** 63  # the formula every earlier video used
            hi = noise_seed(s + 2 ** 63, i)
            # torch's CPU generator keeps the low 32 bits of its seed: those must differ, and do by construction
            assert (hi ^ noise_seed(s, i)) & 0xFFFFFFFF == 0x9E3779B9
    shape = (1, 4, 2, 2, 2)
    for s in (0, 12345, 2 ** 63 - 1):
        assert not torch.equal(chunk_noise(s, 0, shape, "cpu", torch.float32),
                               chunk_noise(s + 2 ** 63, 0, shape, "cpu", torch.float32))
    assert torch.isfinite(chunk_noise(2 ** 64 - 1, 3, shape, "cpu", torch.float32)).all()
    with pytest.raises(ValueError, match="seed must be in"):
        noise_seed(2 ** 64, 0)
