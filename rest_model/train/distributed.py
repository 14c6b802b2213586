"""Training on several processes: the stage commands under `torchrun`, with the same command line as on one.

    torchrun --standalone --nproc_per_node 8 -m rest_model train-teacher --data D --out R --preset base ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `launched` turns them into a process group (NCCL on CUDA,
gloo on the CPU) and gives each process its own GPU. `train_loop` then wraps the stage's whole loss
computation in DistributedDataParallel, so every process draws its own batch (`--batch` is per process: the
global batch is batch x processes), gradients are averaged by DDP, and only rank 0 writes logs, snapshots
and checkpoints. Run without torchrun, none of this happens and a stage is exactly the single-process one.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes) of this training run: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched(cmd):
    """Decorator for a stage command: under torchrun, join the process group for the command's run and point
    `args.device` at this process's GPU (cuda:LOCAL_RANK); outside torchrun, call the command as it is."""
    @functools.wraps(cmd)
    def run(args):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
            return cmd(args)
        cuda = str(args.device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            return cmd(args)
        finally:
            dist.destroy_process_group()
    return run


class StageStep(torch.nn.Module):
    """A stage's `step_fn(step, g) -> (loss, logs)` as the forward of one module that owns every trainable
    model: DDP must see the whole loss computation as one forward, because the stages call their models in
    other ways than `forward` (`CausalDiT.chunk` in the student rollout, the VAE's encoder and decoder)."""

    def __init__(self, trainable: dict[str, torch.nn.Module], step_fn):
        super().__init__()
        self.trainable = torch.nn.ModuleDict(trainable)
        self.step_fn = step_fn

    def forward(self, step: int, g: torch.Generator):
        return self.step_fn(step, g)


def data_parallel(trainable: dict[str, torch.nn.Module], step_fn):
    """step_fn as DDP runs it across the process group (a plain call when there is one process). Rank 0's
    weights are broadcast at the start, so every process starts from the same model whatever it loaded.
    Some parameters sit out whole steps (the VAE's discriminator before --adv-start): find_unused_parameters
    lets DDP finish the reduction without them."""
    if world()[1] == 1:
        return step_fn
    device = next(p for m in trainable.values() for p in m.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        StageStep(trainable, step_fn), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)


def mean_over_ranks(figures: dict[str, float]) -> dict[str, float]:
    """Logged figures averaged over the processes (what the global batch scored), in one all-reduce."""
    n = world()[1]
    if n == 1:
        return figures
    t = torch.tensor(list(figures.values()), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(figures, (t / n).tolist()))


def barrier():
    if world()[1] > 1:
        dist.barrier()
