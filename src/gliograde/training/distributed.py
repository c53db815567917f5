"""Data-parallel training of one fold (DistributedDataParallel): NCCL on GPUs, gloo on CPUs.

Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or by `--multi-gpu` itself, which spawns one
process per visible GPU (`--nproc N` to choose; on a machine without GPUs, N gloo processes on the CPU).
Rank 0 owns the run folder; the other ranks train and validate their shares and write nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

log = logging.getLogger("gliograde")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """The process group from the environment (torchrun or `launch`), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend(cuda), rank=rank, world_size=world)
    if rank != 0:
        log.setLevel(logging.WARNING)  # one voice: rank 0 reports
    return Dist(rank, world, local)


def backend(cuda: bool) -> str:
    """NCCL for the GPU tensors (gradients, SyncBatchNorm) and gloo for the host-side reductions (the finite-loss
    vote, the loss mean, gathered predictions): NCCL alone refuses CPU tensors and DDP would die at the first step."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(d: Dist, value):
    """Rank 0's value on every rank."""
    if not d.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_predictions(
    d: Dist, loss: float, probs: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """The whole validation set from every rank's share (rank r scored volumes r, r + W, ...), back in order, and
    the mean loss over all of it."""
    if not d.active:
        return loss, probs, labels
    parts = [None] * d.world
    dist.all_gather_object(parts, (loss, probs, labels))
    n = sum(len(p[1]) for p in parts)
    out_p, out_l = np.empty(n, probs.dtype), np.empty(n, labels.dtype)
    for r, (_, p, lab) in enumerate(parts):
        out_p[r :: d.world], out_l[r :: d.world] = p, lab
    return sum(part[0] * len(part[1]) for part in parts) / max(n, 1), out_p, out_l


def gather(d: Dist, value) -> list:
    """Every rank's value (a picklable object), in rank order, on every rank."""
    if not d.active:
        return [value]
    parts = [None] * d.world
    dist.all_gather_object(parts, value)
    return parts


def sync_buffers(d: Dist, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP copies them at the start of each forward pass, so
    after an epoch every rank holds its own; validation must score the weights that rank 0 saves."""
    if d.active:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def max_value(d: Dist, value: float) -> float:
    """The largest of a per-rank float over the ranks (a host tensor: gloo serves it beside NCCL)."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean(d: Dist, value: float) -> float:
    """The mean of a per-rank float over the ranks."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, entry, world: int, port: int, values: dict, run_dir: str, level: int) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    logging.basicConfig(level=level, format=f"[rank {rank}] %(levelname)s: %(message)s")
    from pathlib import Path

    from gliograde.config import TrainConfig

    entry(TrainConfig(**values), run_dir=Path(run_dir))


def launch(entry, cfg, nproc: int, run_dir) -> None:
    """Run `entry(cfg, run_dir=...)` (a module-level function: the trainer's `train_fold`) in nproc spawned processes
    (one per GPU, or gloo on the CPU) into the existing run_dir; returns when all have finished, raises if one
    failed. The trainer hands itself in, so that this module never imports it."""
    values = dataclasses.replace(cfg, multi_gpu=False).to_dict()  # the ranks must not launch again
    log.info("DDP: %d processes (%s)", nproc, "NCCL, one per GPU" if torch.cuda.is_available() else "gloo on the CPU")
    args = (entry, nproc, _free_port(), values, str(run_dir), log.getEffectiveLevel())
    mp.start_processes(_worker, args=args, nprocs=nproc, start_method="spawn")
