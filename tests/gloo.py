"""Two-process gloo runs shared by the distributed test modules.

A worker opens its process group with :func:`process_group` and saves what it computed as
``rank{r}.pt`` in the run's directory; :func:`spawn_ranks` starts the ranks, waits for them and
loads those files.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


@contextmanager
def process_group(rank: int, directory: str) -> Iterator[None]:
    """A gloo process group of :data:`WORLD` ranks, rendezvous through a file in ``directory``.

    On leaving, the ranks meet at a barrier before tearing down, so neither exits while the other
    still drains a collective.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(directory, 'store')}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.barrier()
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[[int, str], None], directory: str) -> list:
    """Run ``worker(rank, directory)`` on :data:`WORLD` processes; the ranks' saved results.

    No retry: a failed spawn raises with the ranks' error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(worker, args=(directory,), nprocs=WORLD, join=True)
    return [
        torch.load(os.path.join(directory, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)
    ]
