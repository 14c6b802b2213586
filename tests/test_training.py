"""Every training stage's loss falls on the tiny preset, and a run resumed from a snapshot equals a run
that never stopped."""
import math

import pytest
import torch

from rest_model import checkpoint
from rest_model.train.asd import ASDConfig, asd_loss, asynchronous_times
from rest_model.cli import random_model
from rest_model.train.student_init import StudentInitConfig, init_student_loss, student_rollout
from rest_model.sampler import flow_schedule
from rest_model.train.teacher import teacher_loss
from rest_model.eval.metrics import MOUTH_ROI
from rest_model.train.vae import (CHANGE_FULL, PatchDiscriminator, change_weights, motion_l1, patch_weights, region_weights,
                                  VAELossConfig, vae_loss)
from rest_model.data.prepare import ClipDataset
from rest_model.train.loop import (LoopConfig, audio_margin, clip_frames, export_model, learning_rate, sample_batch,
                                 train_loop)
from conftest import audio_features, latent, randomize, speech_like

SPF = 640


def toy_clips(n=2, frames=24, size=32):
    """A face-ish disc whose 'mouth' bar opens with the audio envelope: learnable, cheap."""
    clips = []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        audio = speech_like(frames / 25, 16000, seed=i)
        env = audio.abs().reshape(frames, SPF).mean(1)
        env = env / env.max()
        video = torch.zeros(frames, size, size, 3)
        for f in range(frames):
            face = ((yy - 16) ** 2 + (xx - 16 + i) ** 2) < 100
            mouth = (abs(yy - 21) <= 1 + 3 * env[f]) & (abs(xx - 16) < 5)
            video[f][face] = torch.tensor([0.9, 0.7, 0.5 + 0.2 * i])
            video[f][mouth] = torch.tensor([0.3, 0.05, 0.05])
        clips.append(((video * 255).byte(), audio))
    return clips


def _run(stage, modules, loss_fn, tmp_path, steps, lr=3e-3, save_every=1000, ema=0.0, export=None):
    cfg = LoopConfig(steps=steps, lr=lr, warmup=1, log_every=1000, save_every=save_every, ema=ema)
    return train_loop(stage, modules, loss_fn, str(tmp_path), cfg, export=export, progress=False)


def _falls(records, what="loss", k=5):
    first = sum(r[what] for r in records[:k]) / k
    last = sum(r[what] for r in records[-k:]) / k
    assert math.isfinite(last) and last < 0.8 * first, f"{what} did not fall: {first:.4g} -> {last:.4g}"


def _batch(clips, frames, margin, g, batch=2):
    return sample_batch(ClipDataset.from_tensors(clips, frames, 25, 16000, margin), batch, g)


def test_training_crops_align_audio_and_pad_it_with_silence():
    """Each crop's audio starts with its first frame, with `margin` frames of the clip's own audio on each side
    and silence beyond the clip's ends, as a stream hears it; same generator state, same batch."""
    video = torch.arange(10).view(10, 1, 1, 1).expand(10, 2, 2, 3).byte()
    audio = torch.arange(10 * SPF).float() + 1  # sample i of the clip holds i + 1, so silence (0) is told apart
    data = ClipDataset.from_tensors([(video, audio)], 4, 25, 16000, audio_margin=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = sample_batch(data, 1, g)
        first = int(round((b["video"][0, 0, 0, 0, 0].item() + 1) * 127.5))
        wave = b["audio"][0]
        assert b["video"].shape == (1, 3, 4, 2, 2) and wave.numel() == (4 + 4) * SPF
        for k in range(-2, 6):  # frame first + k of the clip, or silence outside it
            seg = wave[(k + 2) * SPF:(k + 3) * SPF]
            want = torch.arange((first + k) * SPF, (first + k + 1) * SPF).float() + 1
            assert torch.equal(seg, want if 0 <= first + k < 10 else torch.zeros(SPF)), (first, k)
    again = [sample_batch(data, 3, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert all(torch.equal(again[0][k], again[1][k]) for k in again[0])
    with pytest.raises(ValueError, match="at least 11 frames"):
        ClipDataset.from_tensors([(video, audio)], 11, 25, 16000)


def test_vae_stage_loss_falls(tmp_path):
    vae, _ = random_model("tiny")
    data = ClipDataset.from_tensors(toy_clips(1, 8), 8, 25, 16000)
    disc = PatchDiscriminator(8)
    weights = region_weights(32, 32, face_weight=1.0, mouth_weight=3.0)

    def step(i, g):
        video = sample_batch(data, 2, g)["video"]
        return vae_loss(vae, video, g, VAELossConfig(adv_weight=0.05), disc=disc if i > 20 else None, weights=weights)

    records = _run("vae", {"vae": vae, "disc": disc}, step, tmp_path, 40)
    _falls(records, "l1")
    assert "d_loss" in records[-1]


def _toy_video(frames: int, batch: int) -> torch.Tensor:
    """A fixed [batch, 3, frames, 32, 32] crop batch of one toy clip of `frames` frames."""
    data = ClipDataset.from_tensors(toy_clips(1, frames), frames, 25, 16000)
    return sample_batch(data, batch, torch.Generator().manual_seed(0))["video"]


def test_adaptive_gan_weight_balances_the_gradients_at_the_decoders_last_layer():
    """--adv-adaptive: the GAN weight is adv_weight x |grad of reconstruction| / |grad of GAN term| at the
    decoder's last layer, so a discriminator whose logits grow tenfold gets a tenth of the weight, and the
    VAE feels the same adversarial pull; the region weights reach the discriminator's patches."""
    vae, _ = random_model("tiny")
    disc = PatchDiscriminator(8)
    video = _toy_video(8, 2)
    weights = region_weights(32, 32, face_weight=1.0, mouth_weight=3.0)
    run = lambda **kw: vae_loss(vae, video, torch.Generator().manual_seed(1), VAELossConfig(adv_weight=0.5, **kw),
                                disc=disc, weights=weights)[1]
    assert run()["w_adv"] == 0.5
    before = run(adaptive=True)
    with torch.no_grad():
        disc.net[-1].weight.mul_(10)
        disc.net[-1].bias.mul_(10)
    after = run(adaptive=True)
    assert after["g_adv"] == pytest.approx(10 * before["g_adv"], rel=1e-4)
    assert after["w_adv"] == pytest.approx(before["w_adv"] / 10, rel=1e-3)
    assert 0 < before["w_adv"] < 1e4
    pw = patch_weights(weights, (8, 8))
    top, bottom, left, right = MOUTH_ROI
    row, col = divmod(int(pw.argmax()), 8)
    assert pw.mean().item() == pytest.approx(1.0) and top * 8 - 1 <= row <= bottom * 8 and left * 8 - 1 <= col <= right * 8
    assert patch_weights(None, (8, 8)) is None


def test_change_weights_weigh_the_pixels_that_move():
    """--change-weight: 1 on a still video and on the first frame; 1 + w where a pixel moved by CHANGE_FULL or
    more, proportionally less for a smaller change; and the stage's L1 counts those pixels that much more."""
    video = torch.zeros(1, 3, 4, 8, 8)
    video[:, :, 2:, 1, 1] = 2 * CHANGE_FULL  # moves at frame 2 and stays: a change at frame 2 only
    video[:, :, 3, 5, 5] = 0.5 * CHANGE_FULL  # a small change at frame 3
    w = change_weights(video, 4.0)
    assert w.shape == (1, 1, 4, 8, 8) and torch.equal(change_weights(torch.ones(1, 3, 4, 8, 8), 4.0), torch.ones(1, 1, 4, 8, 8))
    assert w[0, 0, 2, 1, 1] == pytest.approx(5.0) and w[0, 0, 3, 5, 5] == pytest.approx(3.0)
    assert w[0, 0, 3, 1, 1] == 1.0 and w[0, 0, 0].eq(1).all() and (w == 1).sum() == w.numel() - 2
    vae, _ = random_model("tiny")
    clip = _toy_video(8, 2)
    l1 = lambda v, k: vae_loss(vae, v, torch.Generator().manual_seed(1), VAELossConfig(change_weight=k))[1]["l1"]  # noqa: E731
    assert l1(clip, 4.0) > 1.02 * l1(clip, 0.0)
    still = clip[:, :, :1].expand_as(clip).contiguous()
    assert l1(still, 4.0) == pytest.approx(l1(still, 0.0), rel=1e-6)


def _within_group_motion_error(rec, video, tc):
    """Mean |change of rec - change of video| between frames that share a latent (inside a tc-frame group)."""
    d = (rec.diff(dim=2) - video.diff(dim=2)).abs()
    inside = torch.arange(video.shape[2] - 1) % tc != tc - 1
    return d[:, :, inside].mean().item()


def test_vae_motion_term_keeps_the_motion_inside_a_latent_frame_group(tmp_path):
    """A tc-frame group shares one latent, and plain L1 is nearly met by one average frame per group: the
    motion term (L1 between frame-to-frame changes) is blind to a static error, sees a group-frozen
    reconstruction, and training with it reproduces the motion inside the groups more faithfully."""
    video = _toy_video(16, 1)
    assert motion_l1(video + 0.3, video).item() == pytest.approx(0.0, abs=1e-6)
    frozen = video.unflatten(2, (-1, 4)).mean(3, keepdim=True).expand(-1, -1, -1, 4, -1, -1).flatten(2, 3)
    assert motion_l1(frozen, video).item() > 0.5 * video.diff(dim=2).abs().mean().item()
    data = ClipDataset.from_tensors(toy_clips(2, 16), 8, 25, 16000)
    err = {}
    for motion_weight in (0.0, 4.0):
        vae, _ = random_model("tiny")
        vae.train()
        _run("vae", {"vae": vae}, lambda i, g: vae_loss(vae, sample_batch(data, 2, g)["video"], g,
                                                        VAELossConfig(motion_weight=motion_weight)), tmp_path / str(motion_weight), 80)
        with torch.no_grad():
            rec = vae.decode(vae.encode(video))
        err[motion_weight] = _within_group_motion_error(rec, video, 4)
    assert err[4.0] < 0.7 * err[0.0], err


def test_teacher_stage_loss_falls(tmp_path):
    vae, dit = random_model("tiny")
    clips = toy_clips()
    margin, frames = audio_margin(dit.cfg), clip_frames(dit.cfg, 2)
    batch = _batch(clips, frames, margin, torch.Generator().manual_seed(0))
    records = _run("teacher", {"dit": dit}, lambda i, g: teacher_loss(dit, vae, batch, margin, g), tmp_path, 40)
    _falls(records)


def test_student_init_stage_loss_falls(tmp_path):
    vae, teacher = random_model("tiny")
    student = random_model("tiny")[1]
    student.load_state_dict(teacher.state_dict())
    clips = toy_clips()
    margin, frames = audio_margin(student.cfg), clip_frames(student.cfg, 2)
    batch = _batch(clips, frames, margin, torch.Generator().manual_seed(0))
    records = _run("student", {"dit": student}, lambda i, g: init_student_loss(
        student, teacher, vae, batch, margin, torch.Generator().manual_seed(5), StudentInitConfig(teacher_steps=4)), tmp_path, 30)
    _falls(records, "ode")


def test_asd_stage_loss_falls(tmp_path):
    vae, teacher = random_model("tiny")
    student = random_model("tiny", seed=1)[1]
    clips = toy_clips()
    margin, frames = audio_margin(student.cfg), clip_frames(student.cfg, 2)
    batch = _batch(clips, frames, margin, torch.Generator().manual_seed(0))
    records = _run("asd", {"dit": student}, lambda i, g: asd_loss(
        student, teacher, vae, batch, margin, torch.Generator().manual_seed(5), ASDConfig(solve_steps=1)), tmp_path, 30)
    _falls(records, "asd")


def test_asynchronous_schedule_is_cleaner_before_the_current_chunk():
    t = asynchronous_times(6, 2, 2, 0.1, torch.tensor([0.5, 0.6]))
    assert t.shape == (2, 6)
    assert torch.allclose(t[:, :4], torch.full((2, 4), 0.1))
    assert torch.allclose(t[:, 4:], torch.tensor([[0.5, 0.5], [0.6, 0.6]]))


@torch.no_grad()
def test_student_rollout_is_exactly_the_streamer(tiny):
    """Training and inference share one path: the rollout equals what `stream` generates."""
    from rest_model.streamer import AudioSource, stream
    from rest_model.train.loop import clip_audio_windows
    vae, dit = tiny
    c = dit.cfg
    k, n_chunks = c.stream.chunk_frames, 3
    wave = speech_like(n_chunks * k * c.temporal_compression / 25, 16000)
    portrait = torch.rand(3, c.resolution, c.resolution) * 2 - 1
    chunks = list(stream(vae, dit, portrait, AudioSource.whole(wave, 16000), c.stream, seed=7, decode=False))
    margin = audio_margin(c)
    padded = torch.nn.functional.pad(wave, (margin * SPF, margin * SPF))
    windows = clip_audio_windows(dit, padded[None], margin, n_chunks * k)
    from rest_model.streamer import chunk_noise
    shape = (1, c.latent_channels, k, c.latent_size, c.latent_size)
    noise = torch.cat([chunk_noise(7, j, shape, "cpu", torch.float32) for j in range(n_chunks)], 2)
    ref = vae.encode_image(portrait[None])
    out = student_rollout(dit, ref, windows, noise, flow_schedule(2))
    torch.testing.assert_close(out, torch.cat([c.latent for c in chunks], 2), atol=1e-5, rtol=1e-5)


def _teacher_step(vae, dit, clips):
    margin, frames = audio_margin(dit.cfg), clip_frames(dit.cfg, 2)
    return lambda i, g: teacher_loss(dit, vae, _batch(clips, frames, margin, g), margin, g)


def test_ema_is_what_a_stage_exports_and_the_live_weights_keep_training(tmp_path):
    """With --ema d the exported file holds e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k over the weights after
    each step; the module keeps its live weights after an export."""
    vae, dit = random_model("tiny")
    step, after = _teacher_step(vae, dit, toy_clips()), []

    def recording(i, g):  # weights as step i starts = after step i - 1
        if i:
            after.append({k: v.clone() for k, v in dit.state_dict().items()})
        return step(i, g)

    path, decay = tmp_path / "teacher.safetensors", 0.7
    _run("teacher", {"dit": dit}, recording, tmp_path, 5, ema=decay,
         export=lambda: export_model(dit, str(path)))
    after.append({k: v.clone() for k, v in dit.state_dict().items()})
    expect = dict(after[0])
    for w in after[1:]:
        expect = {k: decay * expect[k] + (1 - decay) * w[k] for k in w}
    exported = checkpoint.load_dit(str(path))
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, expect[k], atol=1e-6, rtol=1e-5, msg=k)
        assert torch.equal(dit.state_dict()[k], after[-1][k]), k  # the live weights are back
    assert any(not torch.allclose(v, after[-1][k]) for k, v in exported.state_dict().items())


def test_ema_rejects_a_decay_outside_0_1(tmp_path):
    vae, dit = random_model("tiny")
    with pytest.raises(ValueError, match="EMA decay"):
        _run("teacher", {"dit": dit}, _teacher_step(vae, dit, toy_clips()), tmp_path, 2, ema=1.0)


@pytest.mark.parametrize("ema", [0.0, 0.8])
def test_resume_from_a_snapshot_equals_an_uninterrupted_run(tmp_path, ema):
    def fresh():
        vae, dit = random_model("tiny")
        return vae, dit

    clips = toy_clips()

    def export(dit, name):
        return lambda: export_model(dit, str(tmp_path / name))

    vae, straight = fresh()
    _run("teacher", {"dit": straight}, _teacher_step(vae, straight, clips), tmp_path / "a", 6, ema=ema,
         export=export(straight, "a.safetensors"))

    vae, first = fresh()
    step = _teacher_step(vae, first, clips)

    def crashing(i, g):
        if i == 4:  # the process dies mid-way through step 5, after the snapshot at step 3
            raise KeyboardInterrupt
        return step(i, g)

    with pytest.raises(KeyboardInterrupt):
        _run("teacher", {"dit": first}, crashing, tmp_path / "b", 6, save_every=3, ema=ema)
    vae, resumed = fresh()  # a new process: weights from scratch, state from the snapshot
    records = _run("teacher", {"dit": resumed}, _teacher_step(vae, resumed, clips), tmp_path / "b", 6, save_every=3, ema=ema,
                   export=export(resumed, "b.safetensors"))
    assert [r["step"] for r in records] == [4, 5, 6]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # the exported weights (the EMA's when on) match too: the snapshot carried the average
    a, b = (checkpoint.load_dit(str(tmp_path / n)).state_dict() for n in ("a.safetensors", "b.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage_commands_write_loadable_checkpoints(tmp_path):
    """The four commands chained on a prepared toy dataset produce checkpoints the loaders accept."""
    from rest_model.__main__ import main
    data = _tiny_dataset(tmp_path / "data", clips=2, frames=24)
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--preset", "tiny", "--steps", "2", "--batch", "1",
              "--chunks", "2", "--device", "cpu"]
    assert main(["train-vae", *common]) == 0
    assert main(["train-teacher", *common, "--vae", str(run / "rest_vae.safetensors")]) == 0
    assert main(["init-student", *common, "--vae", str(run / "rest_vae.safetensors"), "--teacher",
                 str(run / "teacher.safetensors"), "--teacher-steps", "2"]) == 0
    assert main(["distill", *common, "--vae", str(run / "rest_vae.safetensors"), "--teacher",
                 str(run / "teacher.safetensors"), "--student", str(run / "student_init.safetensors")]) == 0
    vae, dit = checkpoint.load_pair(run / "rest_vae.safetensors", run / "student_asd.safetensors")
    assert vae.cfg.scaling_factor != 1.0  # stage 1 measured the latent scale
    assert (run / "asd.log.jsonl").exists()


def test_student_context_cache_length_is_set_at_init_and_kept_by_distill(tmp_path, capsys):
    """init-student --context-frames gives the student a longer rolling cache than the teacher's preset; distill
    accepts that pair (the teacher sees every earlier chunk anyway) and keeps the student's length; a teacher that
    cuts the clip into other chunks is still refused."""
    import dataclasses
    from rest_model.__main__ import main
    from rest_model.dit import CausalDiT
    data = _tiny_dataset(tmp_path / "data", clips=2, frames=24)
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--preset", "tiny", "--steps", "1", "--batch", "1",
              "--chunks", "3", "--device", "cpu"]
    assert main(["train-vae", *common]) == 0
    common += ["--vae", str(run / "rest_vae.safetensors")]
    assert main(["train-teacher", *common]) == 0
    teacher = checkpoint.load_dit(run / "teacher.safetensors")
    student = ["init-student", *common, "--teacher", str(run / "teacher.safetensors"), "--teacher-steps", "2"]
    assert main([*student, "--context-frames", "-1"]) == 2
    assert "--context-frames: context_frames must be >= 0" in capsys.readouterr().err
    assert not (run / "student_init.safetensors").exists()
    assert main([*student, "--context-frames", str(teacher.cfg.stream.context_frames + 2)]) == 0
    init = checkpoint.load_dit(run / "student_init.safetensors")
    assert init.cfg.stream.context_frames == teacher.cfg.stream.context_frames + 2
    assert init.cfg.stream.chunk_frames == teacher.cfg.stream.chunk_frames
    assert main(["distill", *common, "--teacher", str(run / "teacher.safetensors"),
                 "--student", str(run / "student_init.safetensors")]) == 0
    assert checkpoint.load_dit(run / "student_asd.safetensors").cfg.stream == init.cfg.stream
    other = CausalDiT(dataclasses.replace(init.cfg, stream=dataclasses.replace(init.cfg.stream, chunk_frames=1)))
    checkpoint.save(other, tmp_path / "c.safetensors")
    assert main(["distill", *common, "--teacher", str(run / "teacher.safetensors"),
                 "--student", str(tmp_path / "c.safetensors")]) == 2
    assert "differ in stream.chunk_frames: [2] vs [1]" in capsys.readouterr().err


def test_distill_with_dmd_exports_the_student_alone(tmp_path, capsys):
    """distill --dmd-weight: the log carries the DMD and critic terms, the snapshot the critic, the exported
    student file only the student; a negative weight, or a noise level outside 0..1 (or t_min above t_max), is
    refused before anything is written."""
    from safetensors import safe_open
    from rest_model.__main__ import main
    vae, teacher = random_model("tiny")
    checkpoint.save(vae, tmp_path / "v.safetensors"), checkpoint.save(randomize(teacher, 2), tmp_path / "t.safetensors")
    common = ["distill", "--data", str(_tiny_dataset(tmp_path / "data", clips=1, frames=24)), "--preset", "tiny",
              "--steps", "2", "--batch", "1", "--chunks", "2", "--device", "cpu", "--vae", str(tmp_path / "v.safetensors"),
              "--teacher", str(tmp_path / "t.safetensors"), "--student", str(tmp_path / "t.safetensors"),
              "--solve-steps", "1"]
    assert main([*common, "--dmd-weight", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--dmd-weight must be >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for bad in (["--t-ctx", "1"], ["--t-min", "0.8", "--t-max", "0.6"], ["--t-max", "1.5"], ["--t-min", "0"]):
        assert main([*common, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert "0 <= --t-ctx < 1 and 0 < --t-min <= --t-max <= 1" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    assert main([*common, "--dmd-weight", "1", "--audio-guidance", "2", "--out", str(run)]) == 0
    import json
    logs = [json.loads(line) for line in (run / "asd.log.jsonl").read_text().splitlines()]
    assert logs and all({"dmd", "critic"} <= r.keys() for r in logs)
    student = checkpoint.load_dit(run / "student_asd.safetensors")
    with safe_open(str(run / "student_asd.safetensors"), "pt") as f:
        assert set(f.keys()) == set(student.state_dict())
    snapshot = next(run.glob("*state*"))
    with safe_open(str(snapshot), "pt") as f:
        assert any(k.startswith("critic") for k in f.keys())


def replay_chunk_one_renoising(c, out, seed):
    """Chunk 1's asynchronous x_t (t_ctx 0.1, t_j ~ U(0.2, 0.7)) drawn by hand from the generator's sequence,
    as the ASD/DMD code draws it after chunk 0: (x_t, t, t broadcast to the latent)."""
    from rest_model.train.asd import asynchronous_times
    k = c.stream.chunk_frames
    g = torch.Generator().manual_seed(seed)
    for j in range(2):
        t_j = 0.2 + 0.5 * torch.rand(1, generator=g)
        e = torch.randn(1, c.latent_channels, (j + 1) * k, c.latent_size, c.latent_size, generator=g)
    t = asynchronous_times(out.shape[2], k, 1, 0.1, t_j)
    tt = t[:, None, :, None, None]
    return (1 - tt) * out[:, :, :2 * k] + tt * e, t, tt


@torch.no_grad()
def test_asd_target_is_the_teachers_solve_under_the_asynchronous_schedule(tiny):
    """One solve step is the teacher's denoised estimate x_t - t_j v with earlier chunks at t_ctx and
    no later chunk in view; more steps integrate chunk j alone while the context stays put."""
    from rest_model.train.asd import asd_targets
    _, teacher = tiny
    c = teacher.cfg
    k = c.stream.chunk_frames
    n = 3 * k
    out, windows, ref = latent(c, n), audio_features(c, n), latent(c, 1, 1)
    one = asd_targets(teacher, out, ref, windows, torch.Generator().manual_seed(3), ASDConfig(solve_steps=1))
    xt, t, tt = replay_chunk_one_renoising(c, out, seed=3)
    want = (xt - tt * teacher(xt, t, windows[:, :2 * k], ref))[:, :, k:2 * k]
    torch.testing.assert_close(one[:, :, k:2 * k], want, atol=1e-5, rtol=1e-5)
    # a later chunk of the student's rollout changes no earlier target (the teacher sees chunks <= j)
    later = out.clone()
    later[:, :, 2 * k:] += 1
    three = asd_targets(teacher, out, ref, windows, torch.Generator().manual_seed(3), ASDConfig(solve_steps=3))
    three_later = asd_targets(teacher, later, ref, windows, torch.Generator().manual_seed(3),
                              ASDConfig(solve_steps=3))
    torch.testing.assert_close(three[:, :, :2 * k], three_later[:, :, :2 * k])
    assert not torch.allclose(three[:, :, 2 * k:], three_later[:, :, 2 * k:])
    assert not torch.allclose(three, one)  # the multi-step solve is a different (sharper) target


@torch.no_grad()
def test_dmd_direction_is_the_difference_of_the_critics_and_the_teachers_estimates(tiny):
    """d_j = (x0_fake - x0_real) / mean|x_j - x0_real| at the asynchronous x_t; zero while the critic is the
    teacher (at guidance 1), guidance alone makes it non-zero, and chunk j's d ignores later chunks."""
    import copy
    from rest_model.train.asd import dmd_terms
    from rest_model.sampler import audio_guided
    _, teacher = tiny
    c = teacher.cfg
    k = c.stream.chunk_frames
    n = 3 * k
    out, windows, ref = latent(c, n), audio_features(c, n), latent(c, 1, 1)
    critic = copy.deepcopy(teacher)
    d, _ = dmd_terms(teacher, critic, out, ref, windows, torch.Generator().manual_seed(3), ASDConfig())
    assert d.shape == out.shape and torch.count_nonzero(d) == 0
    assert torch.count_nonzero(dmd_terms(teacher, critic, out, ref, windows, torch.Generator().manual_seed(3),
                                         ASDConfig(guidance=3.0))[0]) > 0
    critic = random_model("tiny", seed=7)[1]
    d, _ = dmd_terms(teacher, critic, out, ref, windows, torch.Generator().manual_seed(3), ASDConfig(guidance=2.0))
    xt, t, tt = replay_chunk_one_renoising(c, out, seed=3)
    real = (xt - tt * audio_guided(teacher, xt, t, windows[:, :2 * k], ref, 2.0))[:, :, k:]
    fake = (xt - tt * critic(xt, t, windows[:, :2 * k], ref))[:, :, k:]
    want = (fake - real) / (out[:, :, k:2 * k] - real).abs().mean()
    torch.testing.assert_close(d[:, :, k:2 * k], want, atol=1e-5, rtol=1e-4)
    later = out.clone()
    later[:, :, 2 * k:] += 1
    d_later, _ = dmd_terms(teacher, critic, later, ref, windows, torch.Generator().manual_seed(3), ASDConfig(guidance=2.0))
    torch.testing.assert_close(d_later[:, :, :2 * k], d[:, :, :2 * k])
    assert not torch.allclose(d_later[:, :, 2 * k:], d[:, :, 2 * k:])


def test_asd_with_dmd_trains_the_critic_apart_from_the_student_and_resumes_both(tmp_path):
    """The DMD term's gradient reaches only the student and the critic's only the critic; the critic's loss
    falls; a run resumed from its snapshot equals one that never stopped, critic included."""
    vae, teacher = random_model("tiny")
    teacher = randomize(teacher, 2)  # a fresh DiT ignores the audio (zero-initialised), so guidance would do nothing
    clips = toy_clips()

    def models():  # the critic differs from the teacher from the start, so the DMD term is not zero
        return random_model("tiny", seed=1)[1], randomize(random_model("tiny", seed=5)[1], 4).train().requires_grad_()

    student, critic = models()
    margin, frames = audio_margin(student.cfg), clip_frames(student.cfg, 2)
    batch = _batch(clips, frames, margin, torch.Generator().manual_seed(0))

    def step(s, c):
        return lambda i, g: asd_loss(s, teacher, vae, batch, margin, g, ASDConfig(
            solve_steps=1, real_weight=0.0, dmd_weight=1.0, guidance=2.0), critic=c)

    def grads(w):
        student.zero_grad(), critic.zero_grad()
        loss, logs = asd_loss(student, teacher, vae, batch, margin, torch.Generator().manual_seed(1), ASDConfig(
            solve_steps=1, real_weight=0.0, dmd_weight=w or 0.0, guidance=2.0), critic=critic if w is not None else None)
        loss.backward()
        flat = lambda m: torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())  # noqa: E731
                                    for p in m.parameters()])
        return flat(student), flat(critic), logs

    plain, none, _ = grads(None)
    one, critic_one, logs = grads(1.0)
    five, critic_five, _ = grads(5.0)
    assert {"asd", "fm", "dmd", "critic"} <= logs.keys() and logs["dmd"] > 0 and not none.any()
    torch.testing.assert_close(critic_five, critic_one)  # the DMD term does not train the critic
    assert critic_one.abs().sum() > 0
    # the student's gradient is the plain ASD one plus w times the DMD term's: nothing from the critic's loss
    assert (one - plain).abs().sum() > 1e-3 * plain.abs().sum()
    torch.testing.assert_close(five - plain, 5 * (one - plain), atol=1e-5, rtol=1e-3)
    # with the student held, the critic learns the distribution of its rollouts
    records = _run("asd", {"critic": critic}, step(student, critic), tmp_path / "fall", 30)
    _falls(records, "critic")

    straight_s, straight_c = models()
    _run("asd", {"dit": straight_s, "critic": straight_c}, step(straight_s, straight_c), tmp_path / "a", 4)
    first_s, first_c = models()
    inner = step(first_s, first_c)

    def crashing(i, g):
        if i == 3:
            raise KeyboardInterrupt
        return inner(i, g)

    with pytest.raises(KeyboardInterrupt):
        _run("asd", {"dit": first_s, "critic": first_c}, crashing, tmp_path / "b", 4, save_every=2)
    s, c = models()
    assert [r["step"] for r in _run("asd", {"dit": s, "critic": c}, step(s, c), tmp_path / "b", 4, save_every=2)] \
        == [3, 4]
    for a, b in ((straight_s, s), (straight_c, c)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_an_audio_backbone_stays_frozen_in_every_stage(tmp_path, capsys):
    """train-teacher refuses a backbone without the user's weights; make_trainable (stages 3-4) leaves it frozen."""
    from rest_model.config import preset
    from rest_model.dit import CausalDiT
    from rest_model.train.loop import make_trainable
    cfg = preset("tiny").dit
    cfg.audio.backbone = "hubert_base"
    dit = make_trainable(CausalDiT(cfg).requires_grad_(False))
    enc = dit.audio_encoder
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert all(p.requires_grad for n, p in dit.named_parameters() if not n.startswith("audio_encoder.backbone."))
    from rest_model.__main__ import main
    assert main(["train-teacher", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--vae", str(tmp_path / "v.safetensors"), "--audio-backbone", "wav2vec2_base"]) == 2
    assert "needs --audio-backbone-weights" in capsys.readouterr().err


def test_region_weights_and_the_learning_rate_schedule():
    w = region_weights(100, 100, face_weight=1.0, mouth_weight=4.0)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[63, 50] > w[40, 50] > w[5, 5]  # mouth > rest of the face > background
    assert torch.equal(region_weights(8, 8), torch.ones(8, 8))
    cfg = LoopConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1, rel=0.02) and max(lrs) == pytest.approx(lrs[9], rel=0.01)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1)


def test_decoder_only_fine_tune_keeps_the_latents(tmp_path):
    """train-vae --init F --decoder-only: the decoder trains, the encoder (so every latent a DiT was
    trained on, and the latent scale) stays bit-identical."""
    from rest_model.__main__ import main
    vae, _ = random_model("tiny")
    vae.cfg.scaling_factor = 0.7
    checkpoint.save(vae, tmp_path / "v.safetensors")
    data = _tiny_dataset(tmp_path / "data")
    assert main(["train-vae", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "3",
                 "--batch", "1", "--chunks", "1", "--lr", "1e-2", "--init", str(tmp_path / "v.safetensors"),
                 "--decoder-only", "--device", "cpu"]) == 0
    tuned = checkpoint.load_vae(tmp_path / "run" / "rest_vae.safetensors")
    assert tuned.cfg.scaling_factor == 0.7
    for (k, a), b in zip(vae.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b) == k.startswith("encoder."), k
    # --refine-channels: a pixel refiner added and trained with the decoder; the latents stay the same
    assert main(["train-vae", "--data", str(data), "--out", str(tmp_path / "refined"), "--preset", "tiny",
                 "--steps", "3", "--batch", "1", "--chunks", "1", "--lr", "1e-2", "--init",
                 str(tmp_path / "v.safetensors"), "--decoder-only", "--refine-channels", "4", "--device", "cpu"]) == 0
    refined = checkpoint.load_vae(tmp_path / "refined" / "rest_vae.safetensors")
    assert refined.cfg.refine_channels == 4 and refined.cfg.scaling_factor == 0.7
    state = refined.state_dict()
    assert any(k.startswith("decoder.refine.") for k in state)
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items() if k.startswith("encoder."))
    assert refined.decoder.refine.conv_out.weight.abs().sum() > 0  # it trained, from its zero start


def _tiny_dataset(root, clips: int = 1, frames: int = 16):
    """A prepared tiny-preset dataset of `clips` toy clips of `frames` frames, each its own identity."""
    import json
    from safetensors.torch import save_file
    root.mkdir()
    entries = []
    for i, (video, audio) in enumerate(toy_clips(clips, frames)):
        save_file({"video": video, "audio": audio}, root / f"c{i}.safetensors")
        entries.append({"file": f"c{i}.safetensors", "identity": f"id{i}", "voice": "v", "frames": frames,
                        "split": "train"})
    (root / "index.json").write_text(json.dumps({"preset": "tiny", "fps": 25, "resolution": 32,
                                                 "sample_rate": 16000, "clips": entries}))
    return root


def test_teacher_init_starts_from_a_trained_teacher_and_refuses_another_preset(tmp_path, capsys):
    """train-teacher --init F (a teacher carried over to a fine-tuned VAE) starts from F's weights, not from
    a fresh network; a teacher of another size is refused by name, and so is a VAE of another latent layout."""
    from rest_model.__main__ import main
    from rest_model.config import preset
    from rest_model.dit import CausalDiT
    vae, teacher = random_model("tiny", seed=3)
    checkpoint.save(vae, tmp_path / "v.safetensors")
    checkpoint.save(teacher, tmp_path / "t.safetensors")
    data = _tiny_dataset(tmp_path / "data")
    common = ["--data", str(data), "--preset", "tiny", "--vae", str(tmp_path / "v.safetensors"), "--steps", "1",
              "--batch", "1", "--chunks", "1", "--lr", "1e-9", "--device", "cpu"]
    assert main(["train-teacher", *common, "--out", str(tmp_path / "a"), "--init", str(tmp_path / "t.safetensors")]) == 0
    assert main(["train-teacher", *common, "--out", str(tmp_path / "b")]) == 0
    init, fresh = (checkpoint.load_dit(tmp_path / r / "teacher.safetensors") for r in "ab")
    for k, v in teacher.state_dict().items():
        assert torch.allclose(init.state_dict()[k], v, atol=1e-6), k
    assert any(not torch.allclose(fresh.state_dict()[k], v, atol=1e-3) for k, v in teacher.state_dict().items())
    other = preset("tiny").dit
    other.depth = 1
    checkpoint.save(CausalDiT(other), tmp_path / "o.safetensors")
    assert main(["train-teacher", *common, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "o.safetensors")]) == 2
    assert "o.safetensors is not a tiny teacher" in capsys.readouterr().err
    from rest_model.vae import CausalVAE
    narrow = preset("tiny").vae
    narrow.latent_channels = 4
    checkpoint.save(CausalVAE(narrow), tmp_path / "v4.safetensors")
    other_vae = [a if a != str(tmp_path / "v.safetensors") else str(tmp_path / "v4.safetensors") for a in common]
    assert main(["train-teacher", *other_vae, "--out", str(tmp_path / "d")]) == 2
    assert "the teacher does not fit" in (err := capsys.readouterr().err) and "v4.safetensors" in err


def test_student_stages_refuse_a_teacher_that_does_not_fit_the_vae(tmp_path, capsys):
    """init-student / distill name both files when the teacher was trained on another latent layout."""
    from rest_model.__main__ import main
    from rest_model.config import preset
    from rest_model.vae import CausalVAE
    _, teacher = random_model("tiny")
    other = preset("tiny").vae
    other.latent_channels = 4
    checkpoint.save(CausalVAE(other), tmp_path / "v.safetensors")
    checkpoint.save(teacher, tmp_path / "t.safetensors")
    common = ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "tiny",
              "--vae", str(tmp_path / "v.safetensors"), "--teacher", str(tmp_path / "t.safetensors")]
    assert main(["init-student", *common]) == 2
    assert main(["distill", *common, "--student", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("t.safetensors does not fit") == 2 and "v.safetensors" in err


def test_mouth_weighting_reaches_every_dit_stage_loss(tiny):
    """--mouth-weight: latent cells over the mouth region weigh more (mean 1), and the teacher, student-init
    and ASD losses use the weights (all-ones weights give the unweighted loss, mouth weights another)."""
    from rest_model.eval.metrics import MOUTH_ROI
    from rest_model.train.loop import latent_mouth_weights
    vae, teacher = tiny
    student = random_model("tiny", seed=1)[1]
    c = teacher.cfg
    assert latent_mouth_weights(c, 0.0) is None
    w = latent_mouth_weights(c, 6.0)
    assert w.shape == (c.latent_size, c.latent_size) and abs(w.mean().item() - 1) < 1e-6
    row, col = divmod(int(w.argmax()), c.latent_size)
    assert MOUTH_ROI[0] * c.latent_size - 1 <= row <= MOUTH_ROI[1] * c.latent_size
    assert MOUTH_ROI[2] * c.latent_size - 1 <= col <= MOUTH_ROI[3] * c.latent_size
    assert w[0, 0] < 1 < w[row, col]
    clips = toy_clips()
    margin, frames = audio_margin(c), clip_frames(c, 2)
    batch = _batch(clips, frames, margin, torch.Generator().manual_seed(0))
    losses = {
        "teacher": lambda wt: teacher_loss(teacher, vae, batch, margin, torch.Generator().manual_seed(1),
                                           weights=wt)[0],
        "init": lambda wt: init_student_loss(student, teacher, vae, batch, margin, torch.Generator().manual_seed(1),
                                             StudentInitConfig(teacher_steps=2), weights=wt)[0],
        "asd": lambda wt: asd_loss(student, teacher, vae, batch, margin, torch.Generator().manual_seed(1),
                                   ASDConfig(solve_steps=1), weights=wt)[0],
    }
    with torch.no_grad():
        for name, loss in losses.items():
            plain, ones, mouth = loss(None), loss(torch.ones_like(w)), loss(w)
            torch.testing.assert_close(ones, plain, msg=f"{name}: all-ones weights changed the loss")
            assert abs(mouth.item() - plain.item()) > 1e-4 * plain.item(), f"{name} ignores the mouth weights"


def _toy_dataset(root, size=32, sample_rate=16000):
    import json
    from safetensors.torch import save_file
    root.mkdir()
    video, audio = toy_clips(1, 24, size)[0]
    save_file({"video": video, "audio": audio[: 24 * sample_rate // 25].contiguous()}, root / "c.safetensors")
    (root / "index.json").write_text(json.dumps({"fps": 25, "resolution": size, "sample_rate": sample_rate,
                                                 "clips": [{"file": "c.safetensors", "identity": "a", "frames": 24,
                                                            "split": "train"}]}))
    return root


def test_stages_refuse_data_prepared_for_another_preset(tmp_path, capsys):
    """Another resolution stops every stage; another audio rate stops the stages that hear the audio."""
    from rest_model.__main__ import main
    vae, _ = random_model("tiny")
    checkpoint.save(vae, tmp_path / "v.safetensors")
    common = ["--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1", "--batch", "1", "--chunks", "1",
              "--device", "cpu"]
    small = _toy_dataset(tmp_path / "small", size=16)
    slow = _toy_dataset(tmp_path / "slow", sample_rate=8000)
    for cmd in (["train-vae"], ["train-teacher", "--vae", str(tmp_path / "v.safetensors")]):
        assert main([*cmd, "--data", str(small), *common]) != 0
        assert "16px with 640 audio samples per frame, the model 32px with 640: prepare it" in capsys.readouterr().err
    assert main(["train-teacher", "--vae", str(tmp_path / "v.safetensors"), "--data", str(slow), *common]) != 0
    assert "32px with 320 audio samples per frame, the model 32px with 640" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was trained or written
    assert main(["train-vae", "--data", str(slow), *common]) == 0  # the VAE never hears the audio


def test_audio_guidance_is_classifier_free_guidance_on_the_speech_and_reaches_the_student_stages(tiny):
    """audio_guided = v_null + s (v_audio - v_null) with the silence embedding as the null; scale 1 is the plain
    velocity, silence is unchanged by any scale; init-student's ODE targets and ASD's targets use it."""
    from rest_model.sampler import audio_guided
    vae, teacher = tiny
    student = random_model("tiny", seed=1)[1]
    c = teacher.cfg
    x, t, audio, ref = latent(c, 4), torch.full((1, 4), 0.6), audio_features(c, 4), latent(c, 1, 1)
    null = teacher.audio_encoder.null.expand_as(audio)
    with torch.no_grad():
        v, v_null = teacher(x, t, audio, ref), teacher(x, t, null, ref)
        assert not torch.allclose(v, v_null)  # the speech matters to this teacher
        torch.testing.assert_close(audio_guided(teacher, x, t, audio, ref, 1.0), v)
        torch.testing.assert_close(audio_guided(teacher, x, t, audio, ref, 3.0), v_null + 3 * (v - v_null))
        torch.testing.assert_close(audio_guided(teacher, x, t, null, ref, 3.0), v_null)
        clips = toy_clips()
        margin, frames = audio_margin(c), clip_frames(c, 2)
        batch = _batch(clips, frames, margin, torch.Generator().manual_seed(0))
        for name, loss in {
            "init": lambda s: init_student_loss(student, teacher, vae, batch, margin, torch.Generator().manual_seed(1),
                                                StudentInitConfig(teacher_steps=2, audio_drop=0.0, guidance=s))[0],
            "asd": lambda s: asd_loss(student, teacher, vae, batch, margin, torch.Generator().manual_seed(1),
                                      ASDConfig(solve_steps=1, guidance=s))[0],
        }.items():
            assert abs(loss(4.0).item() - loss(1.0).item()) > 1e-4 * loss(1.0).item(), f"{name} ignores guidance"
