"""What a resume must reproduce besides the state accelerate saves: the data order (`MicroBatches`, a position
in epoch and micro-batches, `shuffled_batches`) and RNG streams that validation and sampling leave untouched
(`rng_untouched`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def shuffled_batches(n_items: int, batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
    """Default data order: a seeded shuffle per epoch, cut into micro-batches (drop_last)."""
    def batches(epoch: int) -> list[list[int]]:
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        return [perm[i:i + batch_size] for i in range(0, n_items - batch_size + 1, batch_size)]
    return batches


def items_used(n_items: int, batch_size: int, seed: int, micro_batches: int) -> list[int]:
    """The items the first `micro_batches` micro-batches of the default order (`shuffled_batches`, one process)
    touch, sorted: what a run of that many micro-batches needs of a fixed pool (all items after a whole epoch)."""
    order, used, epoch = shuffled_batches(n_items, batch_size, seed), set(), 0
    while micro_batches > 0 and len(used) < n_items:
        batches = order(epoch)[:micro_batches]
        if not batches:
            break
        used.update(i for b in batches for i in b)
        micro_batches -= len(batches)
        epoch += 1
    return sorted(used)


class MicroBatches:
    """This process's micro-batches, epoch after epoch, from a saved position (epoch, micro-batches done).

    Micro-batch k of rank r is the global micro-batch k*world + r, so processes see different data."""

    def __init__(self, dataset: Dataset, batches_fn: Callable[[int], list[list[int]]], rank: int, world: int,
                 epoch: int = 0, done: int = 0, seed: int = 0, **loader_kwargs: Any):
        self.dataset, self.batches_fn, self.rank, self.world = dataset, batches_fn, rank, world
        self.epoch, self.done, self.seed, self.loader_kwargs = epoch, done, seed, loader_kwargs
        self._open()

    def _open(self) -> None:
        batches = [list(b) for b in self.batches_fn(self.epoch)]
        self.n = len(batches) // self.world
        if self.n == 0:
            raise ValueError(f"the dataset ({len(self.dataset)} items) gives {len(batches)} micro-batches in epoch "
                             f"{self.epoch}, fewer than the {self.world} processes: lower batch_size or add data")
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        mine = batches[self.rank:self.n * self.world:self.world][self.done:]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch * 101 + self.rank)  # not the global RNG
        self._it = iter(DataLoader(self.dataset, batch_sampler=mine, generator=gen, **self.loader_kwargs))

    def __next__(self) -> Any:
        while True:
            try:
                batch = next(self._it)
                self.done += 1
                return batch
            except StopIteration:
                self.epoch, self.done = self.epoch + 1, 0
                self._open()

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.done / self.n

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "micro_batches": self.done * self.world}


@contextmanager
def rng_untouched(device: torch.device):
    """Run validation or sampling without moving the training RNG streams (so a resume reproduces)."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])
