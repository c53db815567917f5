"""Data-parallel training of one fold (DistributedDataParallel): NCCL on GPUs, gloo on CPUs.

Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or by `--multi-gpu` itself, which spawns one
process per visible GPU (`--nproc N` to choose; on a machine without GPUs, or with --device cpu, N gloo processes on
the CPU). Rank 0 owns the run folder; the other ranks train and validate their shares and write nothing.

The batch. `--batch-size B --gradient-accumulation-steps A` is the global batch of one optimizer step, B x A
volumes, whatever the number of processes W (the seeds' --multi-gpu is DataParallel, which splits the batch): each
rank takes B x A / W of them, in micro-batches of at most B (`plan_batch`). `--batch-per-gpu` asks for the other
convention instead (B per rank, global B x A x W).

Every collective runs on the process's own device: NCCL on a GPU (the group is bound to it with `device_id`), gloo on
the CPU. No host-side gloo half, so multi-node runs need no GLOO_SOCKET_IFNAME.
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

from gliograde.errors import GliogradeError

log = logging.getLogger("gliograde")


class DistributedError(GliogradeError):
    """A DDP set-up that cannot work, said in one line."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's collectives run: "cuda:<local_rank>" under NCCL, "cpu" under gloo

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


# ------------------------------------------------------------------------------------------------ the batch plan
@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's `global_batch` volumes are computed: each of `world` ranks runs `accumulation`
    micro-batches of `micro_batch` volumes. `sync_bn`: BatchNorm statistics shared across the ranks."""

    global_batch: int
    micro_batch: int
    accumulation: int
    world: int
    per_gpu: bool = False
    sync_bn: bool = False
    note: str | None = None

    def to_dict(self) -> dict:
        return {
            "global": self.global_batch,
            "micro_batch_per_process": self.micro_batch,
            "accumulation_per_process": self.accumulation,
            "processes": self.world,
            "convention": "per-gpu" if self.per_gpu else "global",
            "sync_bn": self.sync_bn,
            "note": self.note,
        }


def plan_batch(
    batch_size: int,
    grad_accum: int,
    world: int,
    *,
    per_gpu: bool = False,
    sync_bn: bool = False,
    cuda: bool = False,
    batchnorm_per_volume: bool = True,
) -> BatchPlan:
    """The batch plan (see the module's docstring). Global convention: B x A split over W ranks, each rank taking
    the largest micro-batch <= B that divides its share (fewest accumulation steps), e.g. B 4, A 2, W 2: each rank
    one micro-batch of 4. A share that W does not divide is refused. A micro-batch of 1 volume would leave the 3D
    network's BatchNorm with one volume's statistics (`batchnorm_per_volume`; the MIL model normalises over its k
    slices and is fine): SyncBatchNorm is then switched on on GPUs, and the plan refused on the CPU (gloo has no
    SyncBatchNorm)."""
    if per_gpu:
        plan = BatchPlan(batch_size * grad_accum * world, batch_size, grad_accum, world, True, sync_bn)
    else:
        total = batch_size * grad_accum
        if total % world:
            raise DistributedError(
                f"the global batch {total} (--batch-size {batch_size} x --gradient-accumulation-steps {grad_accum}) "
                f"cannot be split evenly over {world} processes; choose a global batch divisible by {world}, "
                "or --batch-per-gpu"
            )
        share = total // world
        micro = max(m for m in range(1, min(batch_size, share) + 1) if share % m == 0)
        plan = BatchPlan(total, micro, share // micro, world, False, sync_bn)
    if world > 1 and plan.micro_batch < 2 and batchnorm_per_volume and not plan.sync_bn:
        if not cuda:
            raise DistributedError(
                f"the global batch {plan.global_batch} over {world} processes leaves each a micro-batch of 1 volume: "
                "BatchNorm would see one volume's statistics, and SyncBatchNorm needs GPUs; use a global batch of "
                f"at least {2 * world} or fewer processes"
            )
        plan = dataclasses.replace(
            plan, sync_bn=True,
            note=f"micro-batch of 1 volume per process: SyncBatchNorm switched on (statistics over {world} volumes)",
        )  # fmt: skip
    return plan


def uses_cuda(device_request: str = "auto") -> bool:
    """Whether the ranks run on GPUs: CUDA works and the run did not ask for the CPU (tests on a GPU machine do)."""
    return device_request != "cpu" and torch.cuda.is_available()


def setup(device_request: str = "auto") -> Dist:
    """The process group from the environment (torchrun or `launch`), or a single process. On GPUs: NCCL, bound to
    this rank's GPU (so that every collective, the host-side scalars included, runs there); else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = uses_cuda(device_request)
    if cuda and local >= torch.cuda.device_count():
        raise DistributedError(
            f"rank {rank} has local rank {local}, but this node sees {torch.cuda.device_count()} GPU(s); start at "
            "most one process per GPU (torchrun --nproc-per-node, --multi-gpu --nproc)"
        )
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
            dist.init_process_group(backend(True), rank=rank, world_size=world, device_id=device)
        else:
            dist.init_process_group(backend(False), rank=rank, world_size=world)
    if rank != 0:
        log.setLevel(logging.WARNING)  # one voice: rank 0 reports
    return Dist(rank, world, local, str(device))


def backend(cuda: bool) -> str:
    """NCCL on GPUs (every collective on the rank's GPU), gloo on the CPU."""
    return "nccl" if cuda else "gloo"


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


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
    return merge_shards(parts, d.world)


def merge_shards(parts: list, world: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Interleave the ranks' (loss, probs, labels) shares back into the set's order; the mean loss weighted by
    volumes. A rank whose share was empty (fewer volumes than ranks) reports a NaN loss over none: left out."""
    n = sum(len(p[1]) for p in parts)
    out_p = np.empty(n, np.asarray(parts[0][1]).dtype)
    out_l = np.empty(n, np.asarray(parts[0][2]).dtype)
    for r, (_, p, lab) in enumerate(parts):
        out_p[r::world], out_l[r::world] = p, lab
    return sum(part[0] * len(part[1]) for part in parts if len(part[1])) / max(n, 1), out_p, out_l


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
    """The largest of a per-rank float over the ranks (on the rank's device: NCCL or gloo)."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def mean(d: Dist, value: float) -> float:
    """The mean of a per-rank float over the ranks."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(nproc: int | None, device_request: str) -> int:
    """How many DDP processes `--multi-gpu [--nproc N]` starts: N, or one per visible GPU; more processes than GPUs
    is refused (each process owns one GPU). On the CPU (no CUDA, or --device cpu) N gloo processes (default 1)."""
    if not uses_cuda(device_request):
        return nproc or 1
    visible = torch.cuda.device_count()
    if nproc is not None and nproc > visible:
        raise DistributedError(
            f"--nproc {nproc}: only {visible} GPU(s) are visible here (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --nproc {visible} or fewer"
        )
    return nproc or visible


def _worker(rank: int, entry, world: int, port: int, values: dict, run_dir: str, level: int) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    if not uses_cuda("cuda" if values.get("gpu") else values.get("device", "auto")):
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
    cuda = uses_cuda("cuda" if cfg.gpu else cfg.device)
    log.info("DDP: %d processes (%s)", nproc, "NCCL, one per GPU" if cuda else "gloo on the CPU")
    args = (entry, nproc, _free_port(), values, str(run_dir), log.getEffectiveLevel())
    mp.start_processes(_worker, args=args, nprocs=nproc, start_method="spawn")
