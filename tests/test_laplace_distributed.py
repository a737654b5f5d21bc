"""Laplace.fit on 2 gloo processes, each with its shard of the data set, against one process
fitting the whole data set: every rank ends with the posterior of all the data."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import natgrad
from gloo import WORLD, process_group, spawn_ranks

STRUCTURES = ("full", "kron", "diag")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"
)


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    inputs, targets = torch.randn(12, 4), torch.randint(0, 3, (12,))
    return model, inputs, targets


def shards(inputs, targets, rank: int | None):
    """Batches of 2 datapoints per rank (rank ``r`` takes every other batch of 2), or all
    batches for ``rank=None``."""
    batches = list(zip(inputs.split(2), targets.split(2), strict=True))
    return batches if rank is None else batches[rank::WORLD]


def fit(structure: str, rank: int | None) -> dict[str, torch.Tensor]:
    model, inputs, targets = make_problem()
    la = natgrad.Laplace(model, structure=structure, prior_precision=0.6)
    la.fit(shards(inputs, targets, rank))
    return {
        "precision": la.posterior_precision(),
        "evidence": la.log_marginal_likelihood().detach(),
        "datapoints": torch.tensor(la.num_datapoints),
    }


def worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    with process_group(rank, directory):
        results = {structure: fit(structure, rank) for structure in STRUCTURES}
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(worker, str(tmp_path_factory.mktemp("laplace_distributed")))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_every_rank_has_the_posterior_of_the_whole_data_set(float64, ranks, structure):
    expected = fit(structure, None)
    for results in ranks:
        got = results[structure]
        assert int(got["datapoints"]) == 12
        torch.testing.assert_close(got["precision"], expected["precision"], rtol=1e-10, atol=1e-12)
        assert abs(got["evidence"].item() - expected["evidence"].item()) < 1e-9
