"""A video output appears under its name only when complete: an interrupted or failed run (Ctrl-C, SIGTERM, an
exception, a full disk) leaves an earlier file byte-identical and no temporary file; every check on the output
path happens before the first chunk is computed."""
import os
import resource
import signal
import subprocess
import sys
import wave as wavmod
from pathlib import Path

import numpy as np
import pytest
import torch

from rest_model import cli, media
from rest_model.__main__ import main
from rest_model.errors import OutputPathError, WriteError
from conftest import speech_like

ROOT = Path(__file__).resolve().parent.parent
OLD = b"an earlier video the user wants to keep\n" * 50


def _wav(path, seconds, sr=16000):
    data = speech_like(seconds, sr).numpy()
    with wavmod.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((data * 32767).astype("<i2").tobytes())
    return path


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def _frames(n=4, size=16):
    return torch.rand(n, 3, size, size) * 2 - 1


def test_atomic_video_renames_only_on_a_clean_exit(tmp_path):
    target = tmp_path / "v.mp4"
    target.write_bytes(OLD)
    with pytest.raises(RuntimeError, match="boom"):
        with media.atomic_video(target, 25, torch.zeros(16000), 16000) as writer:
            writer.write(_frames())
            assert _debris(tmp_path) and target.read_bytes() == OLD  # frames go to the hidden file
            raise RuntimeError("boom")
    assert target.read_bytes() == OLD and _debris(tmp_path) == []
    with media.atomic_video(target, 25, torch.zeros(16000), 16000) as writer:
        writer.write(_frames(3))
        writer.write((np.random.default_rng(0).random((2, 16, 16, 3)) * 255).astype(np.uint8))  # uint8 too
    assert writer.frames == 5 and media.probe(target)["frames"] == 5 and _debris(tmp_path) == []
    assert media.write_video(tmp_path / "w.mkv", [_frames(2)], 25) == 2 and media.probe(tmp_path / "w.mkv")["frames"] == 2


@pytest.mark.parametrize("name, kind, says", [
    ("x.gif", OutputPathError, "not a supported video format; use one of .mp4"),
    ("noext", OutputPathError, "no extension"),
    ("afile/x.mp4", OutputPathError, "is a file, not a folder"),
    ("afolder.mp4", OutputPathError, "it is a folder"),
])
def test_output_paths_that_cannot_be_a_video_are_refused_up_front(tmp_path, name, kind, says):
    (tmp_path / "afile").write_bytes(b"x")
    (tmp_path / "afolder.mp4").mkdir()
    with pytest.raises(kind, match=says):
        media.check_output(tmp_path / name, writable=True)


def test_a_folder_the_system_will_not_write_is_refused_before_any_frame(tmp_path):
    with pytest.raises(WriteError, match="cannot write /proc/x.mp4: cannot create a file in /proc"):
        media.atomic_video("/proc/x.mp4", 25).__enter__()
    made = tmp_path / "new" / "dir" / "v.mp4"  # a folder that does not exist yet is made
    assert media.check_output(made, writable=True) == "mp4" and made.parent.is_dir() and _debris(made.parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_with_the_earlier_file_kept(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "v.mp4").write_bytes(OLD)
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="Permission denied.*earlier file is unchanged"):
            media.check_output(folder / "v.mp4", writable=True)
    finally:
        folder.chmod(0o755)
    assert (folder / "v.mp4").read_bytes() == OLD


def test_cli_output_errors_come_before_the_first_chunk_with_their_exit_codes(tmp_path, monkeypatch, capsys):
    def no_chunk(*a, **k):
        raise AssertionError("a chunk was computed before the output was checked")
    monkeypatch.setattr(cli, "stream", no_chunk)
    audio = str(_wav(tmp_path / "s.wav", 0.3))
    (tmp_path / "afile").write_bytes(b"x")
    for out, code, says in ((tmp_path / "x.gif", 2, "use one of .mp4, .m4v, .mov, .mkv"),
                            (tmp_path / "afile" / "x.mp4", 2, "afile"),
                            ("/proc/x.mp4", 3, "cannot create a file in /proc")):
        assert main(["generate", "--random-weights", "--audio", audio, "--out", str(out)]) == code
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def _generate(tmp_path, target, seconds=30, **popen):
    audio = _wav(tmp_path / "long.wav", seconds)
    return subprocess.Popen([sys.executable, "-m", "rest_model", "generate", "--random-weights", "--audio", str(audio),
                             "--out", str(target)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _wait_for_chunks(folder: Path, proc, chunks=2) -> list[Path]:
    """Until the progress bar shows `chunks` chunks written to the hidden file (mid-run); returns that file."""
    seen = ""
    while f"chunk {chunks}/" not in seen:
        c = proc.stderr.read(1)
        assert c, f"the run ended early (exit {proc.wait()}): {seen}"
        seen += c
    return [p for p in folder.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_mid_run_keeps_the_earlier_file_and_leaves_no_debris(tmp_path, sig, code, says):
    target = tmp_path / "talking_head.mp4"
    target.write_bytes(OLD)
    proc = _generate(tmp_path, target)
    try:
        assert len(_wait_for_chunks(tmp_path, proc)) == 1
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert f"interrupted ({says})" in err and "Traceback" not in err
    assert target.read_bytes() == OLD and _debris(tmp_path) == []


def test_sigkill_leaves_only_the_hidden_file_never_a_broken_one_under_the_name(tmp_path):
    target = tmp_path / "talking_head.mp4"
    target.write_bytes(OLD)
    proc = _generate(tmp_path, target)
    try:
        parts = _wait_for_chunks(tmp_path, proc)
        proc.kill()  # SIGKILL: no handler runs
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert target.read_bytes() == OLD and [p.name for p in parts] == _debris(tmp_path)


def test_a_full_disk_mid_stream_keeps_the_earlier_file_and_leaves_no_debris(tmp_path):
    """The file-size limit (RLIMIT_FSIZE) makes the kernel refuse writes past 100 kB, as a full disk does (EFBIG
    instead of ENOSPC, through the same write path): the encoder fails a few frames into the stream."""
    target = tmp_path / "v.mp4"
    target.write_bytes(OLD)
    rng = np.random.default_rng(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(WriteError, match=f"cannot write {target}: File too large \\(the earlier file is unchanged"):
            with media.atomic_video(target, 25) as writer:
                for _ in range(200):
                    writer.write((rng.random((1, 128, 128, 3)) * 255).astype(np.uint8))  # noise: ~25 kB a frame
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert 0 < writer.frames < 200  # it failed mid-stream, not at the end
    assert target.read_bytes() == OLD and _debris(tmp_path) == []


def test_the_cli_says_which_file_a_full_disk_stopped(tmp_path):
    target = tmp_path / "talking_head.mp4"
    target.write_bytes(OLD)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))
    proc = _generate(tmp_path, target, seconds=4, preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert f"cannot write {target}: File too large (the earlier file is unchanged)" in err and "Traceback" not in err
    assert target.read_bytes() == OLD and _debris(tmp_path) == []
