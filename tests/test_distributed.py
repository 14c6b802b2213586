"""The stage commands under torchrun (2 CPU processes, gloo): the same command line as on one process, each
process its own batch, DDP's averaged gradients. Invariant: a 2-process run equals one process that averages
the two processes' losses (the reference runs the same command with the step made to do exactly that), and
differs from a plain 1-process run, which saw half the data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rest_model import checkpoint

from rest_model.train import distributed, loop
from rest_model.__main__ import main
from rest_model.cli import random_model
from test_training import _tiny_dataset

ROOT = Path(__file__).resolve().parent.parent


def _two_process_mean(monkeypatch, seed=0):
    """Make train_loop's step the mean of what ranks 0 and 1 of a 2-process run compute, in this process."""
    def averaged(trainable, step_fn):
        def run(step, g):
            outs = [step_fn(step, loop.step_generator(seed, step, r)) for r in range(2)]
            return sum(loss for loss, _ in outs) / 2, {k: sum(o[1][k] for o in outs) / 2 for k in outs[0][1]}
        return run
    monkeypatch.setattr(distributed, "data_parallel", averaged)


def _update(path: Path, start: dict) -> torch.Tensor:
    """The change of every trained weight from `start`, as one vector."""
    sd = checkpoint.load_any(path).state_dict()
    return torch.cat([(sd[k].float() - v.float()).flatten() for k, v in start.items()])


STAGES = {  # stage: (extra arguments, checkpoint it writes, log name, weights it starts from)
    "distill": (["--vae", "{v}", "--teacher", "{t}", "--student", "{t}", "--solve-steps", "1"], "student_asd", "asd", "t"),
    # the discriminator sits unused until --adv-start: DDP must finish its reduction without it
    "train-vae": (["--init", "{v}", "--adv-weight", "0.1", "--adv-start", "1"], "rest_vae", "vae", "v"),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_torchrun_stage_equals_one_process_averaging_both_processes_losses(tmp_path, monkeypatch, stage):
    extra, out_name, log_name, start_from = STAGES[stage]
    vae, dit = random_model("tiny", seed=3)
    files = {"v": tmp_path / "v.safetensors", "t": tmp_path / "t.safetensors"}
    checkpoint.save(vae, files["v"]), checkpoint.save(dit, files["t"])
    args = ["--data", str(_tiny_dataset(tmp_path / "data", clips=4, frames=24)), "--preset", "tiny", "--steps", "2", "--batch", "1",
            "--chunks", "2", "--lr", "0.5", "--device", "cpu", *[a.format(**files) for a in extra]]

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun's scratch too
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "rest_model", stage, *args, "--out", str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([stage, *args, "--out", str(tmp_path / "one")]) == 0  # plain: rank 0's batches only
    _two_process_mean(monkeypatch)
    assert main([stage, *args, "--out", str(tmp_path / "ref")]) == 0

    start = {k: v for k, v in (vae if start_from == "v" else dit).state_dict().items() if v.is_floating_point()}
    ddp, one, ref = (_update(tmp_path / r / f"{out_name}.safetensors", start) for r in ("ddp", "one", "ref"))
    assert ref.norm() > 0
    assert (ddp - ref).norm() / ref.norm() < 1e-3, "the 2-process run is not the mean of both processes' steps"
    assert (one - ref).norm() / ref.norm() > 0.05, "the 2 processes drew the same batches"
    # rank 0 alone wrote the log, with the loss of both processes' batches
    logs = [json.loads(line) for line in (tmp_path / "ddp" / f"{log_name}.log.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "ref" / f"{log_name}.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [r["step"] for r in want] == [2]
    assert logs[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-4)


def test_outside_torchrun_a_stage_runs_alone():
    assert distributed.world() == (0, 1)
    step = lambda i, g: (torch.zeros(()), {})  # noqa: E731
    assert distributed.data_parallel({"m": torch.nn.Linear(1, 1)}, step) is step
    assert loop.step_generator(3, 5).initial_seed() == loop.step_generator(3, 5, rank=0).initial_seed()
    assert loop.step_generator(3, 5, 1).initial_seed() != loop.step_generator(3, 5, 0).initial_seed()
