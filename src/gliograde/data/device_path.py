"""The device data path (`--data-path device`): training volumes held where the model is, micro-batches drawn by
index.

`DeviceVolumes` holds the cache rows of a fold as one float16 tensor: on the GPU when it fits (the whole BraTS 2018
set at 128^3 is 4.8 GB), else in pinned host memory, copied a batch ahead on a side stream; on the CPU, in RAM.
`DeviceStream` draws an epoch of micro-batches with the same distributions as the DataLoader path
(inverse-frequency sampling with replacement = WeightedRandomSampler, or a permutation = RandomSampler; the last
incomplete batch dropped), augments each batch in one grid_sample call, and under DDP hands every rank its share.
All random numbers come from one CPU generator that every rank advances identically, so W ranks see together exactly
the volumes of each optimizer step that one process with the same global batch sees.
The DataLoader path behind the same interface is `loader_path.LoaderStream`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gliograde.data.augment import AugmentParams, apply_params, draw_params, to_device
from gliograde.data.cache import VolumeCache
from gliograde.data.loader_path import inverse_frequency_weights

DEVICE_MEMORY_FRACTION = 0.5  # at most this share of the free GPU memory is used for volumes


class DeviceVolumes:
    """Rows of a cache, selected channels, as one (N, C, S, S, S) float16 tensor; `gather` returns float32 batches
    on `device`. `labels` stay on the CPU (for sampling weights); `device_labels` is their copy on `device`.
    Indices passed to `start`/`gather` live where the volumes do (`index_device`): on `device` when `on_device`,
    else on the CPU; indices elsewhere are moved there (asynchronously from the CPU to a GPU)."""

    def __init__(self, cache: VolumeCache, rows, channels: list[int], device: torch.device, chunk: int = 16):
        rows = np.asarray(rows)
        self.device, self.labels = device, torch.as_tensor(cache.labels[rows])
        shape = (len(rows), len(channels), *cache.volumes.shape[2:])
        self.nbytes = int(np.prod(shape)) * 2
        self.on_device = device.type != "cuda" or self.nbytes < DEVICE_MEMORY_FRACTION * torch.cuda.mem_get_info()[0]
        place = device if self.on_device else torch.device("cpu")
        pin = device.type == "cuda" and not self.on_device
        self.volumes = torch.empty(shape, dtype=torch.float16, device=place, pin_memory=pin)
        for start in range(0, len(rows), chunk):  # chunked: never the whole fold twice in host memory
            part = np.asarray(cache.volumes[rows[start : start + chunk]][:, channels], dtype=np.float16)
            self.volumes[start : start + len(part)].copy_(torch.from_numpy(part))
        self._stream = torch.cuda.Stream(device) if pin else None
        # once, here: indexing CPU labels per batch would mean a host-to-device copy (and a wait) per batch
        self.device_labels = self.labels.to(device)
        self.index_device = self.volumes.device  # with its index (cuda:0), comparable to a tensor's device

    def __len__(self) -> int:
        return len(self.labels)

    def start(self, idx: torch.Tensor):
        """Begin bringing a batch to the device: (x float16, y, the copy's CUDA event or None). From pinned host
        memory the copy runs on a side stream, so it overlaps whatever the default stream is computing."""
        if idx.device != self.index_device:
            idx = to_device(idx, self.index_device) if self.on_device else idx.to(self.index_device)
        if self.on_device:
            return self.volumes.index_select(0, idx), self.device_labels.index_select(0, idx), None
        batch = self.volumes.index_select(0, idx).pin_memory()
        labels = self.labels.index_select(0, idx).pin_memory()  # pinned, so their copy does not block the host
        with torch.cuda.stream(self._stream):
            x = batch.to(self.device, non_blocking=True)
            y = labels.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return x, y, done

    def finish(self, x: torch.Tensor, y: torch.Tensor, done) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as float32, once its copy (if any) has landed; call where it is about to be used."""
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)  # allocated on the side stream, used on this one
            y.record_stream(stream)
        return x.float(), y

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(volumes float32, labels) of the given indices, on the device."""
        return self.finish(*self.start(idx))

    def batches(self, size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In order, no augmentation (validation); under DDP each rank takes every world-th volume."""
        mine = torch.arange(len(self), device=self.index_device)[rank::world]  # empty where rank >= len(self)
        for start in range(0, len(mine), size):
            yield self.gather(mine[start : start + size])


def epoch_indices(labels: torch.Tensor, n: int, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """n training indices for one epoch, drawn exactly as WeightedRandomSampler / RandomSampler draw them."""
    if sampler == "weighted":
        return torch.multinomial(inverse_frequency_weights(labels.numpy()), n, replacement=True, generator=generator)
    return torch.randperm(len(labels), generator=generator)[:n]


class DeviceStream:
    """One epoch of this rank's augmented micro-batches: `for x, y in stream: ...` (x float32 on the device).

    One optimizer step takes `global_batch` = batch_size x grad_accum volumes (x world with `per_gpu`), drawn, with
    their augmentation parameters, in draws of batch_size exactly as one process draws them; rank r takes the r-th
    world-th of the step, in micro-batches of `micro_batch` (default batch_size). So W ranks see together exactly
    the volumes, augmented exactly alike, that one process sees in the same optimizer step."""

    def __init__(
        self,
        volumes: DeviceVolumes,
        batch_size: int,
        sampler: str,
        generator: torch.Generator,
        augment: AugmentParams | None,
        grad_accum: int = 1,
        rank: int = 0,
        world: int = 1,
        micro_batch: int | None = None,
        per_gpu: bool = False,
    ):
        self.volumes, self.batch_size, self.sampler, self.generator = volumes, batch_size, sampler, generator
        self.augment, self.rank, self.world = augment, rank, world
        self.global_batch = batch_size * grad_accum * (world if per_gpu else 1)
        self.share = self.global_batch // world  # this rank's volumes per optimizer step
        self.micro_batch = micro_batch or min(batch_size, self.share)
        if self.global_batch % world or self.share % self.micro_batch:
            raise ValueError(
                f"a global batch of {self.global_batch} does not split into {world} shares of micro-batches of "
                f"{self.micro_batch}"
            )
        self.grad_accum = self.share // self.micro_batch  # this rank's micro-batches per optimizer step
        self.steps = len(volumes) // self.global_batch  # optimizer steps per epoch

    def __len__(self) -> int:
        return self.steps * self.grad_accum  # this rank's micro-batches

    def _step_params(self, channels: int) -> dict | None:
        """The augmentation parameters of one optimizer step's global batch: its draws of batch_size, drawn on every
        rank (so that the generators stay identical), concatenated."""
        if not self.augment:
            return None
        draws = [draw_params(self.batch_size, channels, self.augment, self.generator)
                 for _ in range(self.global_batch // self.batch_size)]  # fmt: skip
        return draws[0] if len(draws) == 1 else {k: torch.cat([d[k] for d in draws]) for k in draws[0]}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, g, m = self.batch_size, self.global_batch, self.micro_batch
        idx = epoch_indices(self.volumes.labels, len(self.volumes) // b * b, self.sampler, self.generator)
        # drawn on the CPU (the shared random stream), moved where the volumes are once per epoch, sliced there
        idx = to_device(idx, self.volumes.index_device) if self.volumes.on_device else idx
        channels = self.volumes.volumes.shape[1]
        pending = None  # one batch ahead: its copy overlaps the step on the batch before it
        for step in range(self.steps):
            params = self._step_params(channels)
            for j in range(self.grad_accum):
                lo = self.rank * self.share + j * m  # within the step's global batch
                mine = {k: v[lo : lo + m] for k, v in params.items()} if params else None
                started = (self.volumes.start(idx[step * g + lo : step * g + lo + m]), mine)
                if pending is not None:
                    yield self._ready(*pending)
                pending = started
        if pending is not None:
            yield self._ready(*pending)

    def _ready(self, started, params) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.volumes.finish(*started)
        return (apply_params(x, params) if params else x), y
