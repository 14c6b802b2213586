"""Metrics: the lip-sync score is real (high on ground truth, finds a known audio shift, low on
mismatched audio), identity PSNR/SSIM and flicker behave as their definitions say."""
import numpy as np
import pytest

from rest_model.eval import metrics

from rest_model.data import synth

FPS, SR = 25, synth.SAMPLE_RATE


def render_clip(identity: int, clip: int, seconds: float = 4.0, size: int = 128):
    """A synth clip in memory (no mp4): frames [T, H, W, 3], audio, ground-truth openness."""
    ident = synth.make_identity(7, identity, "babble")
    rng = np.random.default_rng([7, 2, clip])
    n = int(seconds * FPS)
    audio, _, _ = synth.clip_speech(rng, ident, seconds)
    audio = audio[: n * (SR // FPS)]
    mo, mw = metrics.audio_mouth_shape(audio, SR, FPS, n)
    mot = synth.make_motion(rng, n, FPS, ident, mo)
    bg = synth.background(ident, size * synth.SS)
    frames = np.stack([synth.render_frame(ident, bg, size, mot, i, float(mo[i]), float(mw[i])) for i in range(n)])
    return frames, audio, mo


@pytest.fixture(scope="module")
def clips():
    return [render_clip(i, i) for i in range(3)]


def test_mouth_estimate_follows_ground_truth(clips):
    for frames, _, mo in clips:
        est = metrics.mouth_openness(frames)
        assert est.shape == (len(frames),)
        assert np.corrcoef(est, mo)[0, 1] > 0.8


def test_sync_high_on_ground_truth(clips):
    for frames, audio, _ in clips:
        r = metrics.lip_sync(frames, audio, SR, FPS)
        assert r.score > 0.7 and r.offset == 0 and r.confidence > 0.5, r.as_dict()


@pytest.mark.parametrize("shift_s", [-0.5, -0.2, 0.2, 0.44])
def test_sync_finds_known_audio_shift(clips, shift_s):
    for frames, audio, _ in clips:
        shifted = metrics.shift_audio(audio, int(round(shift_s * SR)))
        r = metrics.lip_sync(frames, shifted, SR, FPS, max_offset=15)
        assert abs(r.offset - shift_s * FPS) <= 1.0, (shift_s, r.as_dict())
        assert r.at_zero < r.score - 0.3  # unshifted, the shifted audio fits badly


def test_sync_low_on_mismatched_audio(clips):
    for i, (frames, _, _) in enumerate(clips):
        other = clips[(i + 1) % len(clips)][1]
        true = metrics.lip_sync(frames, clips[i][1], SR, FPS)
        wrong = metrics.lip_sync(frames, other, SR, FPS)
        assert wrong.score < 0.5 and wrong.score < true.score - 0.35, (true.as_dict(), wrong.as_dict())


def test_audio_mouth_shape_gain_invariant_and_closed_in_silence():
    rng = np.random.default_rng(0)
    audio = synth.babble(rng, 3.0, synth.BabbleVoice(120, 1.0, 4.5, 0.2, 0.9))
    audio[: SR // 2] = 0  # half a second of silence
    o1, w1 = metrics.audio_mouth_shape(audio, SR, FPS)
    o2, _ = metrics.audio_mouth_shape(audio * 0.1, SR, FPS)
    assert o1.shape == w1.shape == (75,)
    np.testing.assert_allclose(o1, o2, atol=1e-3)
    assert o1[:10].max() < 0.02 and o1.max() > 0.5
    assert np.abs(w1[:10] - 0.5).max() < 0.02  # a closed mouth is neutral in width
    # another sample rate gives the same per-frame shape
    import torchaudio, torch
    o3, _ = metrics.audio_mouth_shape(torchaudio.functional.resample(torch.from_numpy(audio), SR, 22050).numpy(), 22050, FPS, 75)
    assert np.corrcoef(o1, o3)[0, 1] > 0.99


def test_sync_rejects_too_short_and_bad_shapes():
    with pytest.raises(ValueError, match="at least 8 frames"):
        metrics.sync_score(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="channels last"):
        metrics.mouth_openness(np.zeros((4, 3, 32, 32)))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.audio_mouth_shape(np.zeros(0), SR)


def test_psnr_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    a = np.repeat(np.repeat(a[::8, ::8], 8, 0), 8, 1)  # blocky image: structure for SSIM
    noisy = np.clip(a + rng.normal(0, 10, a.shape), 0, 255)
    noisier = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    assert metrics.psnr(a, a) == float("inf") and metrics.ssim(a, a) == pytest.approx(1.0)
    assert 25 < metrics.psnr(a, noisy) < 30  # 20 log10(255 / 10) = 28.1 dB
    assert metrics.psnr(a, noisy) > metrics.psnr(a, noisier)
    assert 1 > metrics.ssim(a, noisy) > metrics.ssim(a, noisier) > 0
    # the face box ignores what happens outside it
    b = a.copy()
    b[:5] = 0
    assert metrics.psnr(a, b, metrics.FACE_BOX) == float("inf")
    sim = metrics.face_similarity(np.stack([noisy, noisier]), a)
    assert sim["ssim"] < 1 and np.isfinite(sim["psnr"])
    with pytest.raises(ValueError, match="differ"):
        metrics.psnr(a, a[:32])


def test_flicker_and_static_mask():
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, (1, 32, 32, 3)), 10, 0).astype(np.uint8)
    moving = still.copy()
    moving[:, 10:20, 10:20] = rng.integers(0, 256, (10, 10, 10, 3))  # a "talking" part
    mask = metrics.static_mask(moving, erode=1)
    assert not mask[10:20, 10:20].any() and mask[:5].all()
    assert metrics.flicker(still) == 0.0 and metrics.flicker(moving, mask) == 0.0
    shimmer = moving.astype(np.float32) + rng.normal(0, 3, moving.shape)
    f = metrics.flicker(shimmer, mask)
    assert 2 < f < 6  # E|N(0,3) - N(0,3)| = 3.4
    meter = metrics.FlickerMeter(mask)
    for k in range(0, 10, 3):
        meter.update(shimmer[k:k + 3])
    assert meter.value == pytest.approx(f, rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        metrics.flicker(moving, np.zeros((32, 32), bool))


def test_mouth_motion_inside_and_across_latent_frame_groups(clips):
    """A clip whose frames are frozen per 4-frame group (a VAE that decodes a latent as one still frame)
    has no mouth motion inside the groups but keeps it across them; the true clip moves inside them too."""
    frames = clips[0][0]
    n = len(frames) // 4 * 4
    frozen = np.repeat(frames[:n:4], 4, axis=0)
    inside, across = metrics.mouth_motion(frames[:n], 4)
    f_inside, f_across = metrics.mouth_motion(frozen, 4)
    assert inside > 0.5 and across > 0.5
    assert f_inside == 0.0 and f_across > 0.5
    assert metrics.mouth_motion(frozen, 8)[0] > 0.1  # 8-frame groups hold the 4-frame steps inside them
    with pytest.raises(ValueError, match="group"):
        metrics.mouth_motion(frames[:4], 4)


# ---------------------------------------------------------------------------------------------
# the eval command, end to end with tiny untrained models
# ---------------------------------------------------------------------------------------------
def test_latent_probe_tells_one_mouth_per_latent_from_two():
    """A latent that holds only the mean openness of its two frames reads well per frame and not at all for
    the change inside it (the frozen pair); one that holds both reads both; one that holds neither, nothing."""
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, (2, 600, 2))  # train / test: openness of each latent frame's 2 video frames
    mix = rng.normal(size=(3, 24))

    def latents(signal):  # signal [N, k] spread over 24 noisy feature dims
        return signal @ mix[: signal.shape[1]] + 0.01 * rng.normal(size=(len(signal), 24))

    for code, frames, change in [(lambda yy: yy.mean(1, keepdims=True), (0.6, 0.8), (-0.15, 0.15)),  # one mouth
                                 (lambda yy: yy, (0.99, 1.0), (0.99, 1.0)),  # both frames' mouths
                                 (lambda yy: rng.uniform(0, 1, (len(yy), 1)), (-0.15, 0.15), (-0.15, 0.15))]:
        r = metrics.latent_probe(latents(code(y[0])), y[0], latents(code(y[1])), y[1])
        assert len(r["frames"]) == 2 and all(frames[0] <= f <= frames[1] for f in r["frames"]), r
        assert change[0] <= r["in_group"] <= change[1], r
    assert np.isnan(metrics.latent_probe(y[0, :, :1], y[0, :, :1], y[1, :, :1], y[1, :, :1])["in_group"])
    with pytest.raises(ValueError, match="matching N and D"):
        metrics.latent_probe(y[0], y[0][:-1], y[1], y[1])


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from rest_model.data.prepare import prepare
    raw = tmp_path_factory.mktemp("raw")
    synth.synthesize(str(raw), 4, 2.0, 64, seed=0, identities=4, speech="babble", jobs=1)
    out = tmp_path_factory.mktemp("ds")
    index = prepare(str(raw), str(out), "tiny", jobs=1, test_fraction=0.5)
    assert any(c["split"] == "test" for c in index["clips"])
    return out


def test_eval_command_side_by_side(tiny, tiny_dataset, tmp_path, capsys):
    import json
    from rest_model import checkpoint
    from rest_model.__main__ import main
    vae, dit = tiny
    checkpoint.save(vae, tmp_path / "vae.safetensors")
    checkpoint.save(dit, tmp_path / "teacher.safetensors")
    checkpoint.save(dit, tmp_path / "student.safetensors")
    rc = main(["eval", "--vae", str(tmp_path / "vae.safetensors"), "--dit", str(tmp_path / "teacher.safetensors"),
               "--dit", str(tmp_path / "student.safetensors"), "--teacher", "teacher.safetensors",
               "--data", str(tiny_dataset), "--minutes", "0.08", "--clips", "2", "--teacher-steps", "2",
               "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "metric check" in out and "teacher (non-streaming)" in out and "streaming" in out
    report = json.loads((tmp_path / "report.json").read_text())
    gt, ceiling, teacher, student = report["models"]
    assert gt["kind"] == "ground truth" and teacher["name"] == "teacher" and student["name"] == "student"
    assert ceiling["kind"] == "VAE ceiling" and "VAE reconstruction" in out
    for row in (ceiling, teacher, student):
        assert -1 <= row["sync"] <= 1 and -1 <= row["sync_chance"] <= 1 and row["flicker"] >= 0
    # the chance column scores each row's frames against another clip's speech: for the ground truth that
    # is the metric check's mismatched-audio reading
    assert gt["sync_chance"] == pytest.approx(report["metric_check"]["mismatched_sync"])
    assert gt["sync_chance"] != pytest.approx(gt["sync"]) and "chance" in out
    # in-group mouth motion is relative to the ground truth's own; an untrained VAE does not copy it
    assert gt["mouth_motion_in_group"] == 1.0 and "in-grp" in out
    assert all(np.isfinite(r["mouth_motion_in_group"]) and r["mouth_motion_in_group"] != 1.0
               for r in (ceiling, teacher, student))
    probe = ceiling["latent_probe"]  # fit on the dataset's training clips
    assert len(probe["frames"]) == vae.cfg.temporal_compression and probe["train_clips"] >= 1
    assert all(-1 <= v <= 1 for v in probe["frames"] + [probe["in_group"]]) and "read linearly" in out
    assert "id_psnr_end" not in teacher  # the teacher cannot stream
    assert student["long_frames"] == student["expected_frames"] == 120  # 0.08 min at 25 fps
    assert np.isfinite([student["id_psnr_start"], student["id_ssim_end"], student["long_flicker"],
                        student["sync_start"], student["sync_end"], student["id_drift_se"]]).all()
    # 120 frames: the first and the last 60 (the same speech) are compared, and the drift is their difference
    assert student["drift_window_s"] == pytest.approx(60 / 25)
    assert student["id_drift"] == pytest.approx(student["id_psnr_end"] - student["id_psnr_start"])
    assert f"{student['id_drift']:+.2f}+-" in out and "sync@0" in out
    # under a minute there is no window between the first and the last
    assert [t for t, _ in student["id_psnr_curve"]] == [0, pytest.approx(60 / 25 / 60)]
    assert [v for _, v in student["id_psnr_curve"]] == pytest.approx([student["id_psnr_start"],
                                                                      student["id_psnr_end"]])
    assert np.isnan([student["id_slope_10min"], student["id_slope_10min_se"]]).all() and "slope" in out


def test_eval_long_stream_from_several_portraits(tiny, tiny_dataset, tmp_path, capsys):
    import json
    from rest_model import checkpoint
    from rest_model.__main__ import main
    vae, dit = tiny
    checkpoint.save(vae, tmp_path / "vae.safetensors")
    checkpoint.save(dit, tmp_path / "student.safetensors")
    args = ["eval", "--vae", str(tmp_path / "vae.safetensors"), "--dit", str(tmp_path / "student.safetensors"),
            "--data", str(tiny_dataset), "--minutes", "0.08", "--clips", "2", "--json", str(tmp_path / "r.json")]
    assert main(args + ["--long-portraits", "2"]) == 0
    out = capsys.readouterr().out
    student = json.loads((tmp_path / "r.json").read_text())["models"][-1]
    a, b = student["long_streams"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [a["portrait"], b["portrait"]] == report["clips"]  # each stream from another clip's portrait
    assert a["id_psnr_start"] != b["id_psnr_start"]
    assert student["id_drift"] == pytest.approx((a["id_drift"] + b["id_drift"]) / 2)
    assert "pooled over 2 streams" in out and f"/ {b['portrait']}" in out
    assert main(args + ["--long-portraits", "3"]) == 2  # more portraits than clips: refused before any work
    assert "--long-portraits must be 1..--clips (2), got 3" in capsys.readouterr().err
    # more portraits than the dataset has test clips (2 here): refused, naming the count, before any stream
    assert main(args + ["--clips", "8", "--long-portraits", "3"]) == 2
    assert "--long-portraits 3 needs as many test clips" in capsys.readouterr().err


def test_eval_names_rows_by_file_and_by_folder_where_files_share_a_name():
    from rest_model.eval.evaluate import model_names
    paths = ["runs/a/student_asd.safetensors", "runs/b/student_asd.safetensors", "runs/a/student_init.safetensors"]
    assert model_names(paths) == {paths[0]: "a/student_asd", paths[1]: "b/student_asd", paths[2]: "student_init"}


def test_long_stream_replays_its_first_window_every_minute_and_at_the_end():
    from rest_model.eval.evaluate import long_stream_audio
    rng = np.random.default_rng(0)
    sr, fps = 16000, 25
    waves = [rng.normal(size=n).astype(np.float32) for n in (3 * sr + 123, 2 * sr, 5 * sr - 7)]
    wave, window, marks = long_stream_audio(waves, sr, fps, minutes=0.5, window_s=4, every_s=10)
    spf = sr // fps
    assert wave.size == 30 * sr and window == 4 * fps and marks == [0, 10 * fps, 20 * fps, 26 * fps]
    first = wave[: window * spf]
    loop = np.concatenate(waves * 4)
    np.testing.assert_array_equal(first, loop[: window * spf])
    for m in marks[1:]:  # sample for sample the first window's speech
        np.testing.assert_array_equal(wave[m * spf:(m + window) * spf], first)
    # between the windows the clips run on where they would have been without the replays
    for m, nxt in zip(marks, marks[1:]):
        np.testing.assert_array_equal(wave[(m + window) * spf: nxt * spf], loop[(m + window) * spf: nxt * spf])
    assert not np.array_equal(wave[-window * spf:], loop[26 * fps * spf: 30 * sr])
    # a stream shorter than two windows is split in half; one of under 2 frames is refused
    wave, window, marks = long_stream_audio(waves, sr, fps, minutes=0.05, window_s=10)
    assert (window, marks) == (37, [0, 38]) and wave.size == 75 * spf
    with pytest.raises(ValueError, match="under 2 frames"):
        long_stream_audio(waves, sr, fps, minutes=0.0005)


def test_curve_slope_sees_accumulating_loss_not_settling_in():
    from rest_model.eval.evaluate import curve_slope
    minutes = np.arange(11.0)
    settles = [(t, 22.0 if t == 0 else 21.8) for t in minutes]  # the first window only is higher
    assert curve_slope(settles) == pytest.approx((0, 0), abs=1e-9)
    falls = [(t, 22.0 - 0.05 * t) for t in minutes]
    assert curve_slope(falls) == pytest.approx((-0.5, 0), abs=1e-9)  # dB per 10 minutes, exact: no error
    # with noise the error is the textbook one of a fitted slope, and it covers the true slope
    noisy = [(t, v + e) for (t, v), e in zip(falls, np.random.default_rng(0).normal(0, 0.05, 11))]
    slope, se = curve_slope(noisy)
    coef, cov = np.polyfit(minutes[1:], [v for _, v in noisy[1:]], 1, cov=True)
    assert (slope, se) == pytest.approx((coef[0] * 10, np.sqrt(cov[0, 0]) * 10))
    assert 0 < se < 0.2 and abs(slope + 0.5) < 3 * se
    assert np.isnan(curve_slope(falls[:3])).all()  # two windows after the first minute are no line


def test_long_streams_of_several_portraits_pool_into_one_row():
    from rest_model.eval.evaluate import POOLED_MEANS, pool_long_streams
    rng = np.random.default_rng(0)

    def stream(name):
        d = {k: float(rng.normal(20, 1)) for k in POOLED_MEANS}
        d |= dict(id_drift_se=float(rng.uniform(0.02, 0.1)), id_slope_10min_se=float(rng.uniform(0.02, 0.1)),
                  id_psnr_curve=[(t, float(rng.normal(21, 0.1))) for t in (0.0, 1.0, 2.0)], portrait=name,
                  long_minutes=2.0, drift_window_s=10.0, long_frames=3000, expected_frames=3000)
        return d

    one = stream("a")
    assert pool_long_streams([one]) == one  # one stream is its own row
    streams = [one, stream("b"), stream("c")]
    row = pool_long_streams(streams)
    for k in POOLED_MEANS:
        assert row[k] == pytest.approx(np.mean([q[k] for q in streams]))
    # independent streams: the error of their mean drift is sqrt(sum se^2) / n, below each one's
    assert row["id_drift_se"] == pytest.approx(np.sqrt(sum(q["id_drift_se"] ** 2 for q in streams)) / 3)
    assert row["id_drift_se"] < max(q["id_drift_se"] for q in streams)
    assert [t for t, _ in row["id_psnr_curve"]] == [0.0, 1.0, 2.0]
    assert row["id_psnr_curve"][1][1] == pytest.approx(np.mean([q["id_psnr_curve"][1][1] for q in streams]))
    assert [q["portrait"] for q in row["long_streams"]] == ["a", "b", "c"]


def test_paired_drift_is_the_mean_difference_with_its_error_over_seconds():
    from rest_model.eval.evaluate import paired_drift
    rng = np.random.default_rng(0)
    start = rng.normal(22, 1, 250)
    d, se = paired_drift(start, start - 0.5, 25)
    assert d == pytest.approx(-0.5) and se == pytest.approx(0, abs=1e-12)  # a constant loss has no error
    # noise around the loss: the error is that of 10 one-second means, and it covers the true -0.5
    end = start - 0.5 + rng.normal(0, 1, 250)
    d, se = paired_drift(start, end, 25)
    blocks = (end - start).reshape(10, 25).mean(1)
    assert se == pytest.approx(blocks.std(ddof=1) / np.sqrt(10)) and 0 < se < 0.2
    assert abs(d + 0.5) < 3 * se
    assert np.isnan(paired_drift(start[:30], end[:30], 25)[1])  # one second gives no error estimate


def test_teacher_generation_matches_clip_length(tiny):
    from rest_model.eval import evaluate
    vae, dit = tiny
    wave = np.random.default_rng(0).normal(0, 0.1, 37 * 640).astype(np.float32)
    frames = evaluate.generate_teacher(vae, dit, torch_zeros_portrait(dit), wave, 16000, steps=2)
    assert frames.shape == (37, 32, 32, 3) and frames.dtype == np.uint8
    guided = evaluate.generate_teacher(vae, dit, torch_zeros_portrait(dit), wave, 16000, steps=2, guidance=3.0)
    assert guided.shape == frames.shape and (guided != frames).any()  # --teacher-guidance reaches the sampler
    streamed = evaluate.generate_streaming(vae, dit, torch_zeros_portrait(dit), wave, 16000)
    assert streamed.shape == frames.shape


def torch_zeros_portrait(dit):
    import torch
    return torch.zeros(3, dit.cfg.resolution, dit.cfg.resolution)


def test_eval_bad_input(tiny, tiny_dataset, tmp_path, capsys):
    from rest_model import checkpoint
    from rest_model.__main__ import main
    vae, dit = tiny
    checkpoint.save(vae, tmp_path / "vae.safetensors")
    rc = main(["eval", "--vae", str(tmp_path / "vae.safetensors"), "--dit", str(tmp_path / "vae.safetensors"),
               "--data", str(tiny_dataset), "--minutes", "0"])
    assert rc == 2 and "causal DiT was expected" in capsys.readouterr().err
    checkpoint.save(dit, tmp_path / "dit.safetensors")
    rc = main(["eval", "--vae", str(tmp_path / "vae.safetensors"), "--dit", str(tmp_path / "dit.safetensors"),
               "--data", str(tmp_path), "--minutes", "0"])
    assert rc == 2 and "index.json" in capsys.readouterr().err
