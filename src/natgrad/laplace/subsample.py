"""A uniform random subset of a data set's datapoints, chosen in one pass (reservoir sampling).

Algorithm R (Vitter 1985): the first ``S`` datapoints fill the slots; datapoint ``i`` (0-based)
after them replaces the datapoint in slot ``j`` if ``j``, uniform in ``0..i``, is below ``S``.
After any number of datapoints every subset of size ``S`` is equally likely, without knowing
the data set's size in advance.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Reservoir:
    """Slots for ``capacity`` datapoints, filled as batches of datapoints stream by."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.generator = generator
        self.seen = 0
        self._slots: list[int] = []  # the global index of the datapoint in each slot

    @property
    def kept(self) -> int:
        return len(self._slots)

    def assign(self, num: int) -> list[tuple[int, int]]:
        """``(n, slot)`` for the datapoints ``n`` of the next batch of ``num`` that are kept
        (a later pair may overwrite the slot of an earlier one of the same batch)."""
        assignments = []
        for n in range(num):
            if self.seen < self.capacity:
                slot = self.seen
                self._slots.append(self.seen)
            else:
                slot = int(torch.randint(self.seen + 1, (), generator=self.generator))
                if slot >= self.capacity:
                    slot = -1
                else:
                    self._slots[slot] = self.seen
            if slot >= 0:
                assignments.append((n, slot))
            self.seen += 1
        return assignments

    def indices(self) -> Tensor:
        """The kept datapoints' positions in the data set (loader order), by slot."""
        return torch.tensor(self._slots, dtype=torch.long)


__all__ = ["Reservoir"]
