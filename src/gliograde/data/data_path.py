"""How a fold's volumes reach the model (`--data-path auto|device|loader`): the training stream and the scoring
sets, on either data path.

device (data/device_path.py): the volumes of each set held beside the model (`DeviceVolumes`), batches gathered by
index, augmented on the device. loader (data/loader_path.py): the seeds' DataLoader over the memory-mapped cache.
Both give the trainer the same two things: a training stream of micro-batches and, per named scoring set
("monitor": what early stopping watches every epoch; "final": the patients scored once at the end), an iterable of
(x, y) batches, each rank's share under DDP or all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch

from gliograde.data.augment import AugmentParams
from gliograde.data.cache import VolumeCache
from gliograde.data.device_path import DeviceStream, DeviceVolumes
from gliograde.data.loader_path import CacheDataset, LoaderStream, make_loaders, make_val_loader

log = logging.getLogger("gliograde")


class FoldData:
    """The training stream (`stream`, `steps_per_epoch`) and the scoring sets (`batches(name, shard)`)."""

    def __init__(self, stream, steps_per_epoch: int, sets: dict[str, Callable[[bool], Iterable]], path: str,
                 classes: tuple[str, str]):  # fmt: skip
        self.stream, self.steps_per_epoch, self._sets, self.path = stream, steps_per_epoch, sets, path
        self.classes = classes  # the names of labels 0 and 1 (the cache's target)

    def batches(self, name: str, shard: bool = True) -> Iterable:
        """(x, y) batches of a scoring set, in order, without augmentation; `shard`: this rank's share only."""
        return self._sets[name](shard)


def use_device_path(data_path: str, device: torch.device, distributed: bool) -> bool:
    """auto: the device path on a GPU, the DataLoader on the CPU; DDP always shards the device path."""
    if distributed and data_path == "loader":
        log.warning("--data-path loader: DDP shards the device-resident data path; using it")
    return data_path == "device" or (data_path == "auto" and device.type == "cuda") or distributed


def make_fold_data(
    cache: VolumeCache,
    train_rows,
    scoring_rows: dict[str, np.ndarray],
    channels: list[int],
    device: torch.device,
    *,
    on_device: bool,
    batch_size: int,
    grad_accum: int,
    sampler: str,
    generator: torch.Generator,
    augment: AugmentParams | None,
    num_workers: int | None,
    rank: int = 0,
    world: int = 1,
    micro_batch: int | None = None,
    per_gpu: bool = False,
) -> FoldData:
    """The data of one fold. `scoring_rows` names the scored sets; sets with the same rows share their data.
    Under DDP the global batch of a step is batch_size x grad_accum (x world with `per_gpu`), each rank's share in
    micro-batches of `micro_batch` (the trainer's batch plan)."""
    if on_device:
        train = DeviceVolumes(cache, train_rows, channels, device)
        held: dict[bytes, DeviceVolumes] = {}
        sets = {}
        size = max(4 * batch_size, 16)  # no gradients kept: larger batches
        for name, rows in scoring_rows.items():
            key = np.asarray(rows).tobytes()
            if key not in held:  # built once: the same rows (outer selection's monitor and final) share them
                held[key] = DeviceVolumes(cache, rows, channels, device)
            volumes = held[key]

            def batches(shard: bool, volumes=volumes):
                return volumes.batches(size, *((rank, world) if shard else (0, 1)))

            sets[name] = batches
        stream = DeviceStream(train, batch_size, sampler, generator, augment, grad_accum, rank, world, micro_batch,
                              per_gpu)  # fmt: skip
        where = f"on {device}" if train.on_device else "in pinned host memory"
        log.info("Data path: %.2f GB of training volumes held %s, batches gathered by index", train.nbytes / 1e9, where)
        return FoldData(stream, stream.steps, sets, "DeviceStream", cache.classes)

    first, *others = scoring_rows.items()
    train_loader, first_loader = make_loaders(
        CacheDataset(cache, train_rows, channels),
        CacheDataset(cache, first[1], channels),
        batch_size,
        sampler,
        generator,
        num_workers,
        device.type == "cuda",
    )
    loaders = {first[0]: first_loader}
    workers = first_loader.num_workers
    for name, rows in others:
        same = next((n for n, r in scoring_rows.items() if n in loaders and np.array_equal(r, rows)), None)
        loaders[name] = (
            loaders[same]
            if same
            else make_val_loader(CacheDataset(cache, rows, channels), batch_size, workers, device.type == "cuda")
        )
    steps = len(train_loader) // grad_accum
    stream = LoaderStream(train_loader, device, generator, augment, steps * grad_accum)
    sets = {name: (lambda shard, loader=loader: loader) for name, loader in loaders.items()}
    return FoldData(stream, steps, sets, "LoaderStream", cache.classes)
