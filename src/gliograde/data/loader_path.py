"""The DataLoader data path (`--data-path loader`, the seeds'): a Dataset over the memory-mapped cache, its
DataLoaders, and `LoaderStream`, the training stream of the device path's interface (data/device_path.py).

Augmentation is not done here but on the batch (gliograde.data.augment), on whatever device it lives on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from gliograde.data.augment import AugmentParams, augment_batch
from gliograde.data.cache import VolumeCache


class CacheDataset(Dataset):
    """(volume (C, S, S, S) float32, label) for the given cache rows and channels."""

    def __init__(self, cache: VolumeCache, rows, channels: list[int]):
        self.volumes, self.rows, self.channels = cache.volumes, np.asarray(rows), list(channels)
        self.labels = cache.labels[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        volume = np.asarray(self.volumes[self.rows[i]][self.channels], dtype=np.float32)
        return torch.from_numpy(volume), int(self.labels[i])


def inverse_frequency_weights(labels) -> torch.Tensor:
    """Per-sample weights 1 / n_class: each class is drawn equally often in expectation."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.as_tensor(1.0 / counts[labels], dtype=torch.double)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def make_loaders(
    train: CacheDataset,
    val: CacheDataset,
    batch_size: int,
    sampler: str,
    generator: torch.Generator,
    num_workers: int | None,
    pin_memory: bool,
) -> tuple[DataLoader, DataLoader]:
    """The seeds' loader settings: workers min(8, cpus), pinned memory, persistent workers, prefetch 4,
    drop_last for training; an inverse-frequency WeightedRandomSampler or plain shuffling."""
    workers = default_workers() if num_workers is None else num_workers
    if sampler == "weighted":
        train_sampler = WeightedRandomSampler(
            inverse_frequency_weights(train.labels), len(train), replacement=True, generator=generator
        )
    else:
        train_sampler = RandomSampler(train, generator=generator)
    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        sampler=train_sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator,
        **extra,
    )
    return train_loader, make_val_loader(val, batch_size, workers, pin_memory)


def make_val_loader(val: CacheDataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """In order, no augmentation, batches of twice the training batch (no gradients are kept)."""
    extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(
        val, batch_size=max(2 * batch_size, 8), shuffle=False, num_workers=workers, pin_memory=pin_memory, **extra
    )


class LoaderStream:
    """The DataLoader path behind the same interface: batches moved to the device, then augmented there."""

    def __init__(self, loader, device: torch.device, generator: torch.Generator, augment: AugmentParams | None, n: int):
        self.loader, self.device, self.generator, self.augment, self.n = loader, device, generator, augment, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.loader):
            if i >= self.n:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.augment:
                x = augment_batch(x, self.augment, self.generator)
            yield x, y
