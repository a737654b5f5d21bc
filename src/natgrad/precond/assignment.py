"""Data-parallel inversion: which rank inverts which layer, and sharing the results.

With ``spread_inversions=True`` (:mod:`natgrad.precond.kronecker`) the layers due for
inversion are dealt out over the ranks by cost (``d_in^3 + d_out^3``, largest first, each to
the least loaded rank; a diagonal factor costs its size); each rank inverts its share and
broadcasts it, so every rank ends with the same inverses for about ``1/R`` of the inversion
work. Each rank broadcasts the tensors of the inverses it computed as one buffer; one
all-reduce in float64 carries every inverse's floats (damping values, scales). If an inversion
fails on its rank, every rank raises: a ``FloatingPointError`` (non-finite factors) on every
rank, so the step is skipped everywhere; any other error where it happened, and a
``RuntimeError`` naming it on the others. kfac-pytorch (Pauloski et al. 2021) assigns its
inversions the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from natgrad.distributed import Communicator
from natgrad.precond.inverses import LayerInverse


class InversionAssignment:
    """Deals inversions out over the ranks of ``communicator`` and shares their results."""

    def __init__(self, communicator: Communicator) -> None:
        self.communicator = communicator

    def owners(self, costs: Mapping[str, int]) -> dict[str, int]:
        """The rank that inverts each layer: layers by decreasing cost (ties in the given
        order), each to the least loaded rank (ties to the lowest). The same on every rank, as
        the costs are."""
        loads = [0] * self.communicator.world_size
        owners = {}
        for name in sorted(costs, key=lambda n: -costs[n]):
            rank = loads.index(min(loads))
            owners[name] = rank
            loads[rank] += costs[name]
        return owners

    def invert(
        self,
        costs: Mapping[str, int],
        invert: Callable[[str], LayerInverse],
        empty_like: Callable[[str], LayerInverse],
    ) -> dict[str, LayerInverse]:
        """The inverses of the layers in ``costs``, in its order, the same on every rank.

        ``invert(name)`` computes a layer's inverse (called for this rank's share only);
        ``empty_like(name)`` gives an inverse of its layout to receive it into. A collective
        call: every rank must make it with the same layers.
        """
        names = list(costs)
        owners = self.owners(costs)
        inverses: dict[str, LayerInverse] = {}
        failure = None
        try:
            for name in names:
                if owners[name] == self.communicator.rank:
                    inverses[name] = invert(name)
        except Exception as error:  # agreed on below, so no rank waits for a broadcast
            failure = error
        self._agree_on_failure(failure)
        held = {name: inverses[name] if name in inverses else empty_like(name) for name in names}
        entries = {name: inverse.tensors() for name, inverse in held.items()}
        self._share(names, owners, entries)
        return {name: type(held[name]).from_tensors(entries[name]) for name in names}

    def _agree_on_failure(self, failure: Exception | None) -> None:
        """Raise on every rank if an inversion failed on any (module docstring)."""
        numerical = isinstance(failure, FloatingPointError)
        flags = self.communicator.small([numerical, failure is not None and not numerical])
        numerical_ranks, other_ranks = self.communicator.all_reduce_sum(flags, "checks").tolist()
        if failure is not None and not numerical:
            raise failure
        if other_ranks:
            raise RuntimeError(
                "an inversion failed on another rank (spread_inversions): see its error"
            )
        if numerical_ranks:
            raise failure or FloatingPointError(
                "an inversion on another rank met non-finite factors (spread_inversions)"
            )

    def _share(
        self,
        names: list[str],
        owners: dict[str, int],
        entries: dict[str, dict[str, Tensor | float]],
    ) -> None:
        """Fill every layer's ``entries`` with its owner's: tensors by one broadcast per
        owning rank, floats by one all-reduce."""
        communicator = self.communicator
        for source in range(communicator.world_size):
            owned = [
                (name, key, value)
                for name in names
                if owners[name] == source
                for key, value in entries[name].items()
                if isinstance(value, Tensor)
            ]
            if not owned:
                continue
            sizes = [math.prod(value.shape) for *_, value in owned]
            dtype = owned[0][2].dtype  # one buffer, one dtype
            if source == communicator.rank:
                buffer = torch.cat([value.reshape(-1).to(dtype) for *_, value in owned])
            else:
                buffer = owned[0][2].new_empty(sum(sizes))
            communicator.broadcast_(buffer, source, "inverses")
            if source != communicator.rank:
                for (name, key, value), part in zip(owned, buffer.split(sizes), strict=True):
                    entries[name][key] = part.view(value.shape).to(value.dtype)
        floats = {
            name: [key for key, value in entries[name].items() if not isinstance(value, Tensor)]
            for name in names
        }
        float_values = torch.zeros(
            len(names), max(map(len, floats.values()), default=0), dtype=torch.float64,
            device=communicator.device,
        )  # fmt: skip
        if not float_values.numel():
            return
        for row, name in enumerate(names):
            if owners[name] == communicator.rank:
                for column, key in enumerate(floats[name]):
                    float_values[row, column] = entries[name][key]
        communicator.all_reduce_sum(float_values, "inverses")
        for row, name in enumerate(names):
            for column, key in enumerate(floats[name]):
                entries[name][key] = float_values[row, column].item()


__all__ = ["InversionAssignment"]
