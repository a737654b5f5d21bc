"""Data parallelism on 2 gloo processes against single-process runs and dense float64 oracles.

One module-scoped fixture spawns the two ranks once; each rank runs every scenario below on its
shard and saves what it computed. The tests compare those results, in this process, with the
single-process update on the concatenated batch (global mode), with the average of the
single-process updates of the shards (local mode), with dense oracles (sampled labels, unequal
shards) and across the ranks (factors, auxiliary parameters, replicas bit-identical).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from gloo import WORLD, process_group, spawn_ranks
from natgrad.distributed import step_seed
from natgrad.likelihoods import get_likelihood
from oracle import damped_direction, dense_batch, expected_update, relative_error
from problems import MeanOverTokens

DAMPING = 1e-2
SIZES = (4, 4)
UNEQUAL = (5, 3)
TOLERANCE = 1e-10

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
    pytest.mark.usefixtures("float64"),
]


# ---------------------------------------------------------------------- problems
class Scale(nn.Module):
    """A module without adapter: its weight gets per-sample rows from the torch.func fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Gated(nn.Module):
    """Runs its second layer only if ``use_extra``: a module some ranks skip."""

    def __init__(self, use_extra: bool) -> None:
        super().__init__()
        self.body, self.extra, self.use_extra = nn.Linear(5, 3), nn.Linear(5, 3), use_extra

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.extra(x) if self.use_extra else self.body(x)


def make_model(seed: int = 0, width: int = 6) -> nn.Module:
    """Linear layers (neuron view), a LayerNorm (normalisation rows) and a fallback tensor."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, width),
        nn.LayerNorm(width),
        nn.Tanh(),
        Scale(width),
        nn.Linear(width, 4, bias=False),
        nn.Tanh(),
        nn.Linear(4, 3),
    )


def make_sequence_model() -> nn.Module:
    """Linear layers shared over the tokens of each datapoint."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), MeanOverTokens(), nn.Linear(3, 3)
    )


def sequence_shard(rank: int) -> tuple[Tensor, Tensor]:
    """Rank r's 4 sequences have 3 - r tokens: the gather zero-pads the token dimension."""
    generator = torch.Generator().manual_seed(50 + rank)
    inputs = torch.randn(4, 3 - rank, 4, generator=generator)
    return inputs, torch.randint(0, 3, (4,), generator=generator)


def make_embedding_model() -> nn.Module:
    """An embedding (token indices, a padding token) averaged over the tokens."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4, padding_idx=0), MeanOverTokens(), nn.Linear(4, 3))


def embedding_shard(rank: int) -> tuple[Tensor, Tensor]:
    """Rank r's 4 sequences of 3 - r token indices, some of them the padding token 0."""
    generator = torch.Generator().manual_seed(60 + rank)
    tokens = torch.randint(0, 7, (4, 3 - rank), generator=generator)
    return tokens, torch.randint(0, 3, (4,), generator=generator)


SEQUENCE_PROBLEMS = {
    "tokens": (make_sequence_model, sequence_shard),
    "embedding": (make_embedding_model, embedding_shard),
}


def global_batch(step: int, sizes: tuple[int, ...] = SIZES) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    num = sum(sizes)
    return torch.randn(num, 5, generator=generator), torch.randint(
        0, 3, (num,), generator=generator
    )


def shard(batch: tuple[Tensor, Tensor], rank: int, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    start = sum(sizes[:rank])
    return tuple(t[start : start + sizes[rank]] for t in batch)


def batches(steps: int, rank: int | None = None, sizes: tuple[int, ...] = SIZES) -> list:
    """The global batches of ``steps`` steps, or rank ``rank``'s shards of them."""
    data = [global_batch(step, sizes) for step in range(steps)]
    return data if rank is None else [shard(b, rank, sizes) for b in data]


def train(
    model: nn.Module,
    pre: natgrad.Preconditioner,
    data: list,
    *,
    reduction: str = "mean",
    wrapper: nn.Module | None = None,
    fused: bool = False,
) -> Tensor:
    """SGD steps with ``pre``; the written directions, one row per step."""
    forward = wrapper if wrapper is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updates = []
    for inputs, targets in data:
        opt.zero_grad()
        context = wrapper.no_sync() if fused and wrapper is not None else contextlib.nullcontext()
        with context:
            logits = forward(inputs)
            loss = F.cross_entropy(logits, targets, reduction=reduction)
            if fused:
                pre.backward(loss)
            else:
                loss.backward()
        pre.step(logits)
        updates.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    return torch.stack(updates)


WOODBURY: dict[str, dict] = {
    "ngd-empirical": {"fisher": "empirical"},
    "ngd-ief": {"fisher": "ief"},
    "ngd-ief_matrix": {"fisher": "ief_matrix"},
    "ngd-exact": {"fisher": "exact"},
    "tengrad-empirical": {"fisher": "empirical", "structure": "layer"},
    "tengrad-exact": {"fisher": "exact", "structure": "layer"},
}
LOCAL = ["empirical", "exact"]
UNEQUAL_FISHERS = ["empirical", "ief", "exact"]
TOKEN_FISHERS = ["empirical", "exact"]


def kfac(model: nn.Module, **kwargs) -> natgrad.KFAC:
    return natgrad.KFAC(
        model, fisher="exact", damping=DAMPING, ema_decay=0.5, inv_period=2, **kwargs
    )


def foof(model: nn.Module, **kwargs) -> natgrad.FOOF:
    return natgrad.FOOF(model, damping=0.1, ema_decay=0.5, inv_period=2, **kwargs)


def fishleg(momentum_on: str) -> Callable[..., natgrad.FishLeg]:
    def build(model: nn.Module, **kwargs) -> natgrad.FishLeg:
        return natgrad.FishLeg(
            model,
            damping=DAMPING,
            aux_lr=0.01,
            aux_period=2,
            momentum=0.5,
            momentum_on=momentum_on,
            **kwargs,
        )

    return build


KRONECKER_AND_FISHLEG: dict[str, Callable[..., natgrad.Preconditioner]] = {
    "kfac": kfac,
    "foof": foof,
    # inversions dealt out over the ranks and broadcast: every entry type of the inverses
    "kfac-spread": lambda model, **kw: kfac(model, spread_inversions=True, **kw),
    "kfac-correct-spread": lambda model, **kw: kfac(
        model, damping_mode="correct", spread_inversions=True, **kw
    ),
    "foof-kfac-damping-spread": lambda model, **kw: natgrad.FOOF(
        model,
        damping=0.1,
        ema_decay=0.5,
        inv_period=2,
        kfac_damping=True,
        fisher="exact",
        spread_inversions=True,
        **kw,
    ),
    "fishleg-gradient": fishleg("gradient"),
    "fishleg-update": fishleg("update"),
}
RESUMED: dict[str, Callable[..., natgrad.Preconditioner]] = {
    "ngd-mc": lambda model, **kw: natgrad.NGD(model, fisher="mc", mc_samples=2, **kw),
    # saved after a step with inversion
    "kfac-mc": lambda model, **kw: natgrad.KFAC(
        model, fisher="mc", ema_decay=0.5, inv_period=1, **kw
    ),
    # saved after a step without inversion, while its factor average runs in the background
    "kfac-mc-spread-T2": lambda model, **kw: natgrad.KFAC(
        model, fisher="mc", ema_decay=0.5, inv_period=2, spread_inversions=True, **kw
    ),
    "fishleg-update": fishleg("update"),
}


def state(pre: natgrad.Preconditioner) -> Tensor:
    """The curvature a method keeps: Kronecker factors and every entry of their inverses, or
    FishLeg's auxiliary parameters."""
    if isinstance(pre, natgrad.FishLeg):
        tensors = [p.detach() for pair in pre.aux_params.values() for p in pair]
    else:
        tensors = [*pre.input_factors.values(), *pre.grad_factors.values()]
        for inverse in pre.inverses.values():
            tensors += [torch.as_tensor(entry) for entry in inverse.tensors().values()]
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------- the ranks
def scenarios(rank: int) -> dict[str, Callable[[], object]]:
    """Every scenario of one rank, by name; each returns what the tests check."""
    runs: dict[str, Callable[[], object]] = {}

    def woodbury(settings: dict) -> Tensor:
        model = make_model()
        pre = natgrad.NGD(model, damping=DAMPING, distributed="global", **settings)
        return train(model, pre, batches(2, rank))

    for name, settings in WOODBURY.items():
        runs[f"global/{name}"] = lambda s=settings: woodbury(s)

    def mc() -> Tensor:
        model = make_model()
        pre = natgrad.NGD(model, fisher="mc", mc_samples=2, damping=DAMPING, seed=5)
        return train(model, pre, batches(1, rank))

    runs["global/ngd-mc"] = mc

    def local(fisher: str) -> Tensor:
        model = make_model()
        pre = natgrad.NGD(model, fisher=fisher, damping=DAMPING, distributed="local")
        return train(model, pre, batches(1, rank))

    for fisher in LOCAL:
        runs[f"local/{fisher}"] = lambda f=fisher: local(f)

    def unequal(fisher: str, reduction: str) -> Tensor:
        model = make_model()
        pre = natgrad.NGD(model, fisher=fisher, damping=DAMPING, reduction=reduction)
        return train(model, pre, batches(1, rank, UNEQUAL), reduction=reduction)

    for fisher in UNEQUAL_FISHERS:
        runs[f"unequal/{fisher}-mean"] = lambda f=fisher: unequal(f, "mean")
    runs["unequal/exact-sum"] = lambda: unequal("exact", "sum")

    def tokens(fisher: str, problem: str) -> Tensor:
        make, shard_of = SEQUENCE_PROBLEMS[problem]
        model = make()
        pre = natgrad.NGD(model, fisher=fisher, damping=DAMPING)
        return train(model, pre, [shard_of(rank)])

    for problem in SEQUENCE_PROBLEMS:
        for fisher in TOKEN_FISHERS:
            runs[f"{problem}/{fisher}"] = lambda f=fisher, p=problem: tokens(f, p)

    def stateful(build: Callable[..., natgrad.Preconditioner]) -> tuple[Tensor, Tensor]:
        model = make_model()
        pre = build(model)
        updates = train(model, pre, batches(4, rank))
        return updates, state(pre)

    for name, build in KRONECKER_AND_FISHLEG.items():
        runs[f"stateful/{name}"] = lambda b=build: stateful(b)

    def spread() -> tuple[dict[str, int], dict[str, int]]:
        model = make_model()
        pre = kfac(model, spread_inversions=True)
        train(model, pre, batches(1, rank))
        return pre.inversion_owners(list(pre.inverses)), pre.communicator.traffic

    runs["spread/owners"] = spread

    def spread_failure(error: type[Exception]) -> tuple[int, bool] | str:
        """Rank 0's own inversion (of layer '0', the costliest: see
        test_spread_inversions_deal_every_rank_a_share_and_broadcast_it) fails, rank 1's
        succeed: no rank may wait for the other's broadcast."""
        model = make_model()
        pre = kfac(model, spread_inversions=True)

        def failing(*args: object) -> None:
            raise error("injected failure of an inversion")

        if rank == 0:
            pre._invert = failing
        inputs, targets = batches(1, rank)[0]
        if error is FloatingPointError:
            with pytest.warns(natgrad.NonFiniteWarning, match="injected|another rank"):
                _step_last(model, pre, inputs, targets)
            zero = all(not p.grad.any() for p in model.parameters() if p.grad is not None)
            return pre.skipped_steps, zero
        with pytest.raises((error, RuntimeError)) as raised:
            _step_last(model, pre, inputs, targets)
        return str(raised.value)

    runs["spread/numerical-failure"] = lambda: spread_failure(FloatingPointError)
    runs["spread/other-failure"] = lambda: spread_failure(ValueError)

    def resume(build: Callable[..., natgrad.Preconditioner]) -> tuple[Tensor, Tensor]:
        data = batches(4, rank)
        model = make_model()
        pre = build(model, seed=3)
        train(model, pre, data[:2])
        # rank 0's checkpoint (a copy, as if saved to disk), loaded by every rank
        saved = [copy.deepcopy((model.state_dict(), pre.state_dict())) if rank == 0 else None]
        dist.broadcast_object_list(saved, src=0)
        expected = train(model, pre, data[2:])
        resumed_model = make_model(seed=9)
        resumed = build(resumed_model, seed=77)
        resumed_model.load_state_dict(saved[0][0])
        resumed.load_state_dict(saved[0][1])
        return train(resumed_model, resumed, data[2:]), expected

    for name, build in RESUMED.items():
        runs[f"resume/{name}"] = lambda b=build: resume(b)

    def ddp(build: Callable[..., natgrad.Preconditioner], fused: bool) -> Tensor:
        model = make_model()
        wrapper = nn.parallel.DistributedDataParallel(model)
        pre = build(wrapper)
        return train(model, pre, batches(2, rank), wrapper=wrapper, fused=fused)

    def ngd_with_plain(model: nn.Module) -> natgrad.NGD:
        return natgrad.NGD(
            model, fisher="exact", damping=DAMPING, overrides={"3": "plain_gradient"}
        )

    runs["ddp/ngd"] = lambda: ddp(ngd_with_plain, fused=False)
    runs["ddp/ngd-fused"] = lambda: ddp(ngd_with_plain, fused=True)
    runs["ddp/kfac"] = lambda: ddp(kfac, fused=False)

    def ddp_fused_without_no_sync() -> str:
        model = make_model()
        wrapper = nn.parallel.DistributedDataParallel(model)
        pre = natgrad.EF(wrapper)
        inputs, targets = batches(1, rank)[0]
        logits = wrapper(inputs)
        with pytest.raises(RuntimeError, match="no_sync") as error:
            pre.backward(F.cross_entropy(logits, targets))
        return str(error.value)

    runs["errors/ddp-fused"] = ddp_fused_without_no_sync

    def build_error(make: Callable[[], nn.Module]) -> str:
        with pytest.raises(ValueError) as error:
            natgrad.NGD(make())
        return str(error.value)

    runs["errors/structure"] = lambda: build_error(lambda: make_model(width=6 + rank))
    runs["errors/values"] = lambda: build_error(lambda: make_model(seed=rank))

    def partial_layer() -> str:
        torch.manual_seed(0)
        model = Gated(use_extra=rank == 0)
        pre = natgrad.EF(model)
        inputs, targets = batches(1, rank)[0]
        with pytest.raises(ValueError, match="some ranks only") as error:
            _step_last(model, pre, inputs, targets)
        return str(error.value)

    runs["errors/partial-layer"] = partial_layer

    def nan_on_one_rank() -> tuple[int, Tensor, str]:
        model = make_model()
        pre = natgrad.EF(model)
        inputs, targets = batches(1, rank)[0]
        if rank == 1:
            inputs = inputs.clone()
            inputs[0, 0] = float("nan")
        with pytest.warns(natgrad.NonFiniteWarning) as record:
            updates = train(model, pre, [(inputs, targets)])
        return pre.skipped_steps, updates, str(record[0].message)

    runs["errors/nan-on-one-rank"] = nan_on_one_rank
    return runs


def _step_last(model: nn.Module, pre: natgrad.Preconditioner, inputs: Tensor, targets) -> None:
    model.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)


def worker(rank: int, directory: str) -> None:
    """One rank: run every scenario, save ``{name: result or error text}``."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    results: dict[str, object] = {}
    # built before the process group exists: "auto" chooses "off", and step() must refuse
    early_model = make_model()
    early = natgrad.EF(early_model)
    with process_group(rank, directory):
        try:
            inputs, targets = batches(1, rank)[0]
            with pytest.raises(RuntimeError, match="initialised after") as error:
                _step_last(early_model, early, inputs, targets)
            results["errors/auto-before-init"] = str(error.value)
            for name, run in scenarios(rank).items():
                try:
                    results[name] = run()
                except Exception:  # reported by the test of this scenario
                    results[name] = RuntimeError(traceback.format_exc())
        finally:
            torch.save(results, os.path.join(directory, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, object]]:
    """The results of both ranks (one spawn for the whole module).

    No retry: a failed spawn fails every test of the module with the ranks' error. A start-up
    failure was seen once and not reproduced (the module is marked ``flaky_launch``); the
    ranks meet at a barrier before tearing down, so neither exits while the other still
    drains a transfer.
    """
    return spawn_ranks(worker, str(tmp_path_factory.mktemp("distributed")))


def result(ranks: list[dict[str, object]], name: str) -> list:
    """Both ranks' result of a scenario, failing with the rank's traceback if it raised."""
    values = [results[name] for results in ranks]
    for rank, value in enumerate(values):
        if isinstance(value, RuntimeError):
            pytest.fail(f"rank {rank} failed in {name}:\n{value}")
    return values


def single(build: Callable[[nn.Module], natgrad.Preconditioner], data: list, **kwargs) -> Tensor:
    model = make_model()
    return train(model, build(model), data, **kwargs)


# ---------------------------------------------------------------------- global mode
@pytest.mark.parametrize("name", sorted(WOODBURY))
def test_global_woodbury_equals_single_process_on_concatenated_batch(ranks, name):
    updates = result(ranks, f"global/{name}")
    assert torch.equal(updates[0], updates[1])  # every rank writes the same update
    expected = single(lambda m: natgrad.NGD(m, damping=DAMPING, **WOODBURY[name]), batches(2))
    for step in range(2):
        assert relative_error(updates[0][step], expected[step]) <= TOLERANCE


def test_global_mc_equals_dense_oracle_with_each_ranks_labels(ranks):
    """Rank r samples from step_seed(seed, r, step); with those labels the update is the
    sampled-Fisher natural gradient of the concatenated batch."""
    updates = result(ranks, "global/ngd-mc")
    assert torch.equal(updates[0], updates[1])
    model = make_model()
    inputs, targets = batches(1)[0]
    vectors = []
    for rank in range(WORLD):
        with torch.no_grad():
            logits = model(shard((inputs, targets), rank, SIZES)[0])
        generator = torch.Generator().manual_seed(step_seed(5, rank, 0))
        vectors.append(get_likelihood("categorical").sampled_output_grads(logits, 2, generator))
    oracle = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(oracle, "mc", "full", DAMPING, None, torch.cat(vectors, dim=1))
    assert relative_error(updates[0][0], expected) <= TOLERANCE


def weighted_oracle(shards: list, fisher: str, make: Callable[[], nn.Module]) -> Tensor:
    """The damped update of the weighted loss sum_n c_n l_n, c_n = 1 / (R n_r) for the
    datapoints of rank r, from dense per-sample gradients, Jacobians and Hessians."""
    parts = [dense_batch(make(), x, y, "categorical", "sum") for x, y in shards]
    weights = torch.cat([torch.full((len(y),), 1 / (WORLD * len(y))) for _, y in shards])
    rows = torch.cat([part.loss_grads for part in parts])
    if fisher == "exact":
        jacobians = torch.cat([part.output_jacobians for part in parts])
        hessians = torch.cat([part.output_hessians for part in parts])
        curvature = torch.einsum("n,ncp,ncd,ndq->pq", weights, jacobians, hessians, jacobians)
    else:
        curvature = rows.T @ (weights.unsqueeze(1) * rows)
    target = weights
    if fisher == "ief":
        target = weights * torch.cat([part.ief_scaling() for part in parts])
    return damped_direction(curvature, rows.T @ target, DAMPING)


@pytest.mark.parametrize("fisher", UNEQUAL_FISHERS)
def test_unequal_shards_weigh_each_rank_by_its_mean(ranks, fisher):
    """Shards of 5 and 3 with mean losses: datapoint n of rank r weighs 1 / (2 n_r), as in the
    gradient DDP averages."""
    updates = result(ranks, f"unequal/{fisher}-mean")
    assert torch.equal(updates[0], updates[1])
    shards = [shard(batches(1, sizes=UNEQUAL)[0], rank, UNEQUAL) for rank in range(WORLD)]
    expected = weighted_oracle(shards, fisher, make_model)
    assert relative_error(updates[0][0], expected) <= TOLERANCE


@pytest.mark.parametrize("problem", sorted(SEQUENCE_PROBLEMS))
@pytest.mark.parametrize("fisher", TOKEN_FISHERS)
def test_ranks_with_different_token_counts(ranks, fisher, problem):
    """Sequences of 3 tokens on rank 0 and 2 on rank 1 (inputs, or embedding token indices):
    zero-padded tokens add nothing."""
    updates = result(ranks, f"{problem}/{fisher}")
    assert torch.equal(updates[0], updates[1])
    make, shard_of = SEQUENCE_PROBLEMS[problem]
    shards = [shard_of(rank) for rank in range(WORLD)]
    expected = weighted_oracle(shards, fisher, make)
    assert relative_error(updates[0][0], expected) <= TOLERANCE


def test_unequal_shards_with_sum_loss_equal_single_process_with_damping_times_ranks(ranks):
    """Sum losses: the global objective is (1 / R) sum_n l_n, whose damped natural gradient is
    the single-process one of sum_n l_n with damping R λ."""
    updates = result(ranks, "unequal/exact-sum")
    assert torch.equal(updates[0], updates[1])
    expected = single(
        lambda m: natgrad.NGD(m, fisher="exact", damping=WORLD * DAMPING, reduction="sum"),
        batches(1, sizes=UNEQUAL),
        reduction="sum",
    )
    assert relative_error(updates[0][0], expected[0]) <= TOLERANCE


# ---------------------------------------------------------------------- local mode
@pytest.mark.parametrize("fisher", LOCAL)
def test_local_mode_averages_the_shards_single_process_updates(ranks, fisher):
    updates = result(ranks, f"local/{fisher}")
    assert torch.equal(updates[0], updates[1])
    build = lambda m: natgrad.NGD(m, fisher=fisher, damping=DAMPING)  # noqa: E731
    expected = sum(single(build, batches(1, rank))[0] for rank in range(WORLD)) / WORLD
    assert relative_error(updates[0][0], expected) <= TOLERANCE


# ---------------------------------------------------------------------- KFAC, FOOF, FishLeg
@pytest.mark.parametrize("name", sorted(KRONECKER_AND_FISHLEG))
def test_factors_and_auxiliary_parameters_identical_across_ranks(ranks, name):
    (updates_0, state_0), (updates_1, state_1) = result(ranks, f"stateful/{name}")
    assert torch.equal(state_0, state_1)
    assert torch.equal(updates_0, updates_1)


@pytest.mark.parametrize("name", sorted(KRONECKER_AND_FISHLEG))
def test_kronecker_and_fishleg_equal_single_process_on_concatenated_batch(ranks, name):
    """Averaged batch statistics, gradients and auxiliary gradients: with equal shards and
    mean losses, the single-process run on the concatenated batches, step after step."""
    (updates, curvature), _ = result(ranks, f"stateful/{name}")
    model = make_model()
    pre = KRONECKER_AND_FISHLEG[name](model)
    expected = train(model, pre, batches(4))
    assert relative_error(curvature, state(pre)) <= TOLERANCE
    for step in range(4):
        assert relative_error(updates[step], expected[step]) <= TOLERANCE


def test_spread_inversions_deal_every_rank_a_share_and_broadcast_it(ranks):
    (owners_0, traffic_0), (owners_1, traffic_1) = result(ranks, "spread/owners")
    assert owners_0 == owners_1
    assert set(owners_0.values()) == {0, 1}
    # layers (d_in + 1, d_out): (6, 6), (6, 4), (5, 3): costs 432, 280, 152, so rank 1 takes
    # the two smaller layers
    assert owners_0 == {"0": 0, "4": 1, "6": 1}
    floats = 3 * 2 * 8  # two damping values per layer, float64, all-reduced by both ranks
    assert traffic_0["inverses"] == (6 * 6 + 6 * 6) * 8 + floats
    assert traffic_1["inverses"] == (6 * 6 + 4 * 4 + 5 * 5 + 3 * 3) * 8 + floats


def test_spread_inversion_failing_on_one_rank_fails_on_every_rank(ranks):
    """A numerical failure skips the step everywhere; any other error is raised where it
    happened and named on the other ranks."""
    for skipped, zero in result(ranks, "spread/numerical-failure"):
        assert (skipped, zero) == (1, True)
    raised = result(ranks, "spread/other-failure")
    assert raised[0] == "injected failure of an inversion"
    assert "an inversion failed on another rank" in raised[1]


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_state_dict_saved_by_rank_0_resumes_on_both_ranks(ranks, name):
    for actual, expected in result(ranks, f"resume/{name}"):
        assert torch.equal(actual, expected)


# ---------------------------------------------------------------------- DDP
@pytest.mark.parametrize("name", ["ngd", "ngd-fused", "kfac"])
def test_ddp_wrapped_model_gives_the_single_process_update(ranks, name):
    """DDP's all-reduced .grad (or none, under no_sync with the fused path) is never mixed in:
    the update is the global one, and the plain gradient of the overridden module is the
    gradient of the concatenated batch."""
    updates = result(ranks, f"ddp/{name}")
    assert torch.equal(updates[0], updates[1])
    if name == "kfac":
        build = kfac
    else:
        build = lambda m: natgrad.NGD(  # noqa: E731
            m, fisher="exact", damping=DAMPING, overrides={"3": "plain_gradient"}
        )
    expected = single(build, batches(2))
    for step in range(2):
        assert relative_error(updates[0][step], expected[step]) <= TOLERANCE


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("errors/auto-before-init", "initialised after the preconditioner was built"),
        ("errors/ddp-fused", r"inside `with ddp_model.no_sync\(\):`"),
        ("errors/structure", r"ranks \[1\] build a different model or preconditioner"),
        ("errors/values", "different parameter values"),
        ("errors/partial-layer", r"modules \['extra'\] took part in the loss on some ranks only"),
    ],
)
def test_clear_errors_on_every_rank(ranks, name, message):
    for text in result(ranks, name):
        assert re.search(message, text), text


def test_non_finite_rows_on_one_rank_skip_the_step_everywhere(ranks):
    for skipped, updates, message in result(ranks, "errors/nan-on-one-rank"):
        assert skipped == 1
        assert not updates.any()
        assert "on some rank" in message


def test_distributed_modes_need_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        natgrad.NGD(make_model(), distributed="global")
    with pytest.raises(RuntimeError, match="init_process_group"):
        natgrad.FishLeg(make_model(), distributed="global")


def test_default_is_no_communication_without_process_group():
    pre = natgrad.KFAC(make_model())
    assert pre.communicator.mode == "off" and not pre.communicator.active
    assert "distributed" not in pre.describe()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: natgrad.KFAC(make_model(), distributed="local"), "KFAC supports distributed in"),
        (lambda: natgrad.FishLeg(make_model(), distributed="local"), "supports distributed in"),
        (lambda: natgrad.NGD(make_model(), distributed="all"), "unknown distributed='all'"),
        (
            lambda: natgrad.EF(make_model(), distributed="off", process_group=object()),
            "process_group was given",
        ),
    ],
)
def test_bad_distributed_settings_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_step_seeds_are_distinct_and_reproducible():
    seeds = {step_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400
    assert step_seed(7, 1, 3) == step_seed(7, 1, 3) != step_seed(8, 1, 3)
