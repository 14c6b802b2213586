"""The lip-sync expert: which audio it judges each window against, that it learns the timing of a mouth, its
checkpoint and its errors, and its term in distillation reaching the student alone."""
import json

import pytest
import torch

from rest_model import checkpoint
from rest_model.train.asd import ASDConfig, asd_loss
from rest_model.__main__ import main
from rest_model.cli import random_model
from rest_model.config import preset, sync_expert_config
from rest_model.train.sync_expert import SyncExpert, audio_frames, mouth_cells, sync_logits, sync_loss
from rest_model.train.loop import LoopConfig, audio_margin, clip_frames, sample_batch, train_loop
from rest_model.data.prepare import ClipDataset
from test_training import _tiny_dataset, toy_clips

SPF = 640


def tiny_cfg(**kw):
    p = preset("tiny")
    return sync_expert_config(p.vae, p.dit, **kw)


def test_each_window_hears_its_own_frames_and_pad_at_each_shift():
    """Window p of span latent frames is judged against video frames [p*tc - pad, (p + span)*tc + pad) of audio,
    moved by each shift; the aligned candidate is the middle one, and the margin must cover the largest shift."""
    c = tiny_cfg(max_shift=4, shift_step=2)
    n_latent, margin = 5, c.margin + 1
    n_frames = n_latent * c.temporal_compression + 2 * margin
    wave = torch.arange(n_frames).repeat_interleave(SPF).float() - margin  # each sample holds its clip frame index
    w = audio_frames(c, wave[None], margin, n_latent)
    assert w.shape == (1, n_latent - c.span + 1, len(c.shifts), c.window_frames * SPF)
    assert c.shifts[len(c.shifts) // 2] == 0
    for p in range(w.shape[1]):
        for s, shift in enumerate(c.shifts):
            first = p * c.temporal_compression - c.pad + shift
            want = torch.arange(first, first + c.window_frames).repeat_interleave(SPF).float()
            assert torch.equal(w[0, p, s], want), (p, shift)
    with pytest.raises(ValueError, match="needs 6 frames of audio beyond"):
        audio_frames(c, wave[None, :-(2 * SPF)], c.margin - 1, n_latent)
    with pytest.raises(ValueError, match="does not cover"):
        audio_frames(c, wave[None, :-1], margin, n_latent)


def test_mouth_cells_cover_the_mouth_region_with_a_cell_around_it():
    from rest_model.eval.metrics import MOUTH_ROI
    for name in ("tiny", "demo", "base"):
        p = preset(name)
        c = sync_expert_config(p.vae, p.dit)
        rows, cols = mouth_cells(c)
        n = c.latent_size
        top, bottom, left, right = MOUTH_ROI
        assert rows.start <= top * n - 1 or rows.start == 0
        assert rows.stop >= bottom * n + 1 or rows.stop == n
        assert cols.start <= left * n - 1 or cols.start == 0
        assert cols.stop >= right * n + 1 or cols.stop == n
        assert (rows.stop - rows.start) < n or n <= 4  # it judges the mouth, not the whole frame


def test_other_clips_aligned_audio_are_negatives_but_never_the_clips_own():
    torch.manual_seed(0)
    c = tiny_cfg()
    expert = SyncExpert(c)
    n = 4
    z = torch.randn(3, c.latent_channels, n, c.latent_size, c.latent_size)
    wave = torch.randn(3, (n * c.temporal_compression + 2 * c.margin) * SPF)
    shifted, others = sync_logits(expert, z, wave, c.margin)
    assert shifted.shape == (3, n - c.span + 1, len(c.shifts)) and others.shape == (3, n - c.span + 1, 3)
    own = torch.eye(3, dtype=torch.bool)[:, None, :].expand_as(others)
    assert torch.isneginf(others[own]).all() and torch.isfinite(others[~own]).all()
    # clip 0's score against clip 1's audio is what clip 0 scores aligned when it is given clip 1's audio
    swapped = torch.stack([wave[1], wave[0], wave[2]])
    assert torch.allclose(sync_logits(expert, z, swapped, c.margin)[0][0, :, len(c.shifts) // 2], others[0, :, 1])


def test_the_expert_learns_when_the_mouth_moves_with_the_speech(tmp_path):
    """On clips whose mouth opens with the speech envelope, the aligned audio comes to outscore the shifted audio
    of the same clip, through a (random, fixed) VAE's latents; with the audio of another clip it does not."""
    torch.manual_seed(0)
    vae, dit = random_model("tiny")
    c = sync_expert_config(vae.cfg, dit.cfg, max_shift=6)
    expert = SyncExpert(c)
    frames = clip_frames(dit.cfg, 3)
    data = ClipDataset.from_tensors(toy_clips(4, 96), frames, 25, 16000, c.margin)
    batches = [sample_batch(data, 4, torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        encoded = [(vae.encode(b["video"]), b["audio"]) for b in batches]
    cfg = LoopConfig(steps=80, lr=2e-3, warmup=1, log_every=1000, save_every=1000)
    records = train_loop("sync", {"sync": expert}, lambda i, g: sync_loss(expert, *encoded[i % 4], c.margin),
                         str(tmp_path), cfg, progress=False)
    first, last = (sum(r["sync"] for r in rs) / 8 for rs in (records[:8], records[-8:]))
    assert last < 0.6 * first, (first, last)
    with torch.no_grad():
        acc = sum(sync_loss(expert, z, a, c.margin)[1]["sync_acc"] for z, a in encoded) / 4
        rolled = sum(sync_loss(expert, z, a.roll(1, 0), c.margin)[1]["sync_acc"] for z, a in encoded) / 4
    assert acc > 0.8 and rolled < 0.5, (acc, rolled)


def test_the_sync_term_in_distillation_reaches_the_student_alone(tiny):
    """distill's lip-sync term: zero weight (or no expert) leaves the loss as it was; with a weight it adds the
    expert's loss on the student's own rollout, whose gradient reaches the student and never the frozen expert."""
    vae, teacher = tiny
    student = random_model("tiny", seed=1)[1].requires_grad_(True)
    expert = SyncExpert(sync_expert_config(vae.cfg, student.cfg)).requires_grad_(False)
    margin = max(audio_margin(student.cfg), expert.cfg.margin)
    data = ClipDataset.from_tensors(toy_clips(2, 48), clip_frames(student.cfg, 2), 25, 16000, margin)
    batch = sample_batch(data, 2, torch.Generator().manual_seed(0))

    def run(expert=None, sync_weight=0.0):
        student.zero_grad()
        loss, logs = asd_loss(student, teacher, vae, batch, margin, torch.Generator().manual_seed(5),
                              ASDConfig(solve_steps=1, sync_weight=sync_weight), expert=expert)
        loss.backward()
        return loss.detach(), logs, [p.grad.clone() for p in student.parameters() if p.grad is not None]

    plain, logs, g_plain = run()
    off, _, _ = run(expert=expert, sync_weight=0.0)
    on, logs_on, g_on = run(expert=expert, sync_weight=1.0)
    assert torch.equal(plain, off) and "sync" not in logs
    assert torch.allclose(on, plain + logs_on["sync"], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in expert.parameters())
    assert any(not torch.allclose(a, b) for a, b in zip(g_plain, g_on))


def test_train_sync_and_distill_with_its_expert_from_the_command_line(tmp_path, capsys):
    """train-sync writes an expert the loader reads as one (and the DiT loader refuses); distill --sync-expert
    logs the term; a weight without an expert, or an expert of another latent layout, is refused by name."""
    data = _tiny_dataset(tmp_path / "data", clips=2, frames=24)
    vae, teacher = random_model("tiny")
    checkpoint.save(vae, tmp_path / "v.safetensors"), checkpoint.save(teacher, tmp_path / "t.safetensors")
    common = ["--data", str(data), "--preset", "tiny", "--steps", "2", "--batch", "2", "--chunks", "2",
              "--device", "cpu", "--vae", str(tmp_path / "v.safetensors")]
    assert main(["train-sync", *common, "--out", str(tmp_path / "sync")]) == 0
    path = tmp_path / "sync" / "sync_expert.safetensors"
    expert = checkpoint.load(path, "sync")
    assert isinstance(expert, SyncExpert) and expert.cfg.latent_channels == vae.cfg.latent_channels
    with pytest.raises(checkpoint.CheckpointError, match="lip-sync expert checkpoint, but a causal DiT"):
        checkpoint.load_dit(path)
    distill = ["distill", *common, "--teacher", str(tmp_path / "t.safetensors"), "--student",
               str(tmp_path / "t.safetensors"), "--solve-steps", "1"]
    assert main([*distill, "--sync-weight", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--sync-weight and --sync-expert go together" in capsys.readouterr().err
    other = SyncExpert(sync_expert_config(preset("demo").vae, preset("tiny").dit))
    checkpoint.save(other, tmp_path / "other.safetensors")
    assert main([*distill, "--sync-weight", "0.5", "--sync-expert", str(tmp_path / "other.safetensors"),
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "other.safetensors" in err and "does not fit the VAE" in err and "latent_channels" in err
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    assert main([*distill, "--sync-weight", "0.5", "--sync-expert", str(path), "--out", str(run)]) == 0
    logs = [json.loads(line) for line in (run / "asd.log.jsonl").read_text().splitlines()]
    assert logs and all({"sync", "sync_acc"} <= r.keys() for r in logs)
    checkpoint.load_pair(tmp_path / "v.safetensors", run / "student_asd.safetensors")


def test_an_expert_refuses_a_model_of_another_layout_frame_rate_or_audio_rate():
    from rest_model.train.sync_expert import check_fits
    p = preset("tiny")
    c = sync_expert_config(p.vae, p.dit)
    check_fits(c, p.vae, "VAE"), check_fits(c, p.dit, "student")
    other = preset("tiny").dit
    other.fps, other.audio.samples_per_frame = 30, 400
    with pytest.raises(ValueError, match=r"does not fit the student \(fps: expert 25 vs student 30; "
                                         r"samples_per_frame: expert 640 vs student 400\)"):
        check_fits(c, other, "student")
    with pytest.raises(ValueError, match="latent_channels: expert 8 vs VAE 64"):
        check_fits(c, preset("demo").vae, "VAE")


def test_heldout_accuracy_judges_the_test_split_alone(tmp_path):
    """train-sync's held-out report: the mean accuracy and loss of the expert over batches of the test split's
    clips (not the training clips), chance one in the number of shifts, and nothing without a test split."""
    import json
    from rest_model.train.sync import heldout_accuracy
    torch.manual_seed(0)
    vae, dit = random_model("tiny")
    c = sync_expert_config(vae.cfg, dit.cfg)
    expert = SyncExpert(c)
    frames = clip_frames(dit.cfg, 2)
    data = _tiny_dataset(tmp_path / "data", clips=4, frames=frames + 2 * c.margin)
    assert heldout_accuracy(expert, vae, str(data), frames) is None
    index = json.loads((data / "index.json").read_text())
    for e in index["clips"][2:]:
        e["split"] = "test"
    (data / "index.json").write_text(json.dumps(index))
    r = heldout_accuracy(expert, vae, str(data), frames, batches=2, batch=2)

    def by_hand(split):
        clips = ClipDataset(str(data), frames, split, audio_margin=c.margin)
        logs = [sync_loss(expert, vae.encode(b["video"]), b["audio"], c.margin)[1]
                for b in (sample_batch(clips, 2, torch.Generator().manual_seed(i)) for i in range(2))]
        return sum(x["sync_acc"] for x in logs) / 2, sum(x["sync"] for x in logs) / 2

    with torch.no_grad():
        (acc, loss), (_, train_loss) = by_hand("test"), by_hand("train")
    assert r["chance"] == 1 / len(c.shifts)
    assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == pytest.approx(acc)
    assert r["loss"] == pytest.approx(loss) and r["loss"] != pytest.approx(train_loss)
