"""Which windows each optimizer step trains on: seeded, resumable, sharded by rank.

The sampler walks an endless sequence of epochs; epoch e visits all training windows in the
order of ``default_rng([seed, e]).permutation`` (or in order without shuffling). Its whole
state is one integer, the number of windows consumed, so a checkpoint resumes the exact
stream. A global batch takes the next ``batch_size`` positions; rank r of w trains on the
r-th contiguous w-th of them, so w processes see exactly the windows one process would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BatchSampler"]


class BatchSampler:
    def __init__(self, n_windows: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # windows consumed, over all ranks
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_windows) if self.shuffle
                     else np.arange(self.n_windows))
            self._order = (epoch, order)
        return self._order[1]

    def _windows_at(self, first: int, count: int) -> np.ndarray:
        epochs, idx = np.divmod(np.arange(first, first + count, dtype=np.int64), self.n_windows)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():  # a batch spans at most a few epochs
            here = epochs == epoch
            out[here] = self._epoch_order(epoch)[idx[here]]
        return out

    def next_batch(self) -> np.ndarray:
        """This rank's window indices of the next global batch; advances the position."""
        local = self.batch_size // self.world_size
        first = self.position + self.rank * local
        idx = self._windows_at(first, local)
        self.position += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "n_windows": self.n_windows, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("n_windows", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the saved data position was for {key}={state.get(key)!r}, "
                                 f"this run has {getattr(self, key)!r}")
        self.position = int(state["position"])
