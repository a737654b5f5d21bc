"""Every (fisher, structure) update of the Woodbury family against dense float64 oracles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.likelihoods import get_likelihood
from oracle import dense_batch, expected_update, flat_grad, relative_error
from problems import MODELS, make_mlp, make_targets, run_natgrad

FISHERS = ["empirical", "ief", "ief_matrix", "mc", "exact"]
STRUCTURES = ["full", "layer"]
LIKELIHOODS = ["categorical", "gaussian", "bernoulli"]
REDUCTIONS = ["mean", "sum"]
TOLERANCE = 1e-8


pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("fisher", FISHERS)
def test_update_matches_dense_oracle(fisher, structure, model_name, likelihood, reduction):
    torch.manual_seed(0)
    outputs = 3
    model, inputs = MODELS[model_name](outputs)
    targets = make_targets(likelihood, inputs.shape[0], outputs)
    damping, samples, seed = 1e-2, 3, 7
    actual, logits = run_natgrad(
        model,
        inputs,
        targets,
        likelihood,
        reduction,
        fisher=fisher,
        structure=structure,
        damping=damping,
        mc_samples=samples,
        seed=seed,
    )
    vectors = None
    if fisher == "mc":
        generator = torch.Generator().manual_seed(seed)
        vectors = get_likelihood(likelihood).sampled_output_grads(logits, samples, generator)
    batch = dense_batch(model, inputs, targets, likelihood, reduction)
    blocks = [list(m.parameters()) for m in model if len(list(m.parameters())) > 0]
    expected = expected_update(batch, fisher, structure, damping, blocks, vectors)
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_fused_backward_equals_standard_path(fisher, model_name):
    torch.manual_seed(1)
    model, inputs = MODELS[model_name](3)
    targets = make_targets("categorical", inputs.shape[0], 3)
    results = []
    for fused in (False, True):
        grads, _ = run_natgrad(
            model, inputs, targets, "categorical", "mean", fused=fused, fisher=fisher, seed=3
        )
        results.append(grads)
    assert relative_error(results[1], results[0]) <= 1e-12


@pytest.mark.parametrize("damping", [1e-6, 1e-1, 10.0])
def test_least_squares_ief_matrix_equals_exact_ngd(damping):
    """Wu et al. 2024, sec. 2.2: for ½(z - y)^2 the iEF matrix is the Fisher, at any damping."""
    torch.manual_seed(2)
    model = nn.Linear(1, 1)
    inputs = torch.distributions.LogNormal(0.0, 0.75).sample((40, 1))
    targets = 2 + 2 * inputs + torch.randn(40, 1)
    likelihood = natgrad.likelihoods.Gaussian(variance=1.0)
    updates = {}
    for fisher in ("ief_matrix", "exact"):
        pre = natgrad.NGD(
            model, likelihood=likelihood, fisher=fisher, damping=damping, reduction="sum"
        )
        model.zero_grad()
        logits = model(inputs)
        (0.5 * (logits - targets).pow(2).sum()).backward()
        pre.step(logits)
        pre.remove()
        updates[fisher] = flat_grad(list(model.parameters()))
    assert relative_error(updates["ief_matrix"], updates["exact"]) <= TOLERANCE


def test_least_squares_ief_update_approaches_ngd_when_n_below_p():
    """Wu et al. 2024, sec. 2.2 / eq. 19: with N <= P the iEF update tends to NGD as
    damping -> 0."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    inputs, targets = torch.randn(5, 3), torch.randn(5, 1)
    likelihood = natgrad.likelihoods.Gaussian(variance=1.0)
    updates = {}
    for fisher in ("ief", "exact"):
        pre = natgrad.NGD(
            model, likelihood=likelihood, fisher=fisher, damping=1e-9, reduction="sum"
        )
        model.zero_grad()
        logits = model(inputs)
        (0.5 * (logits - targets).pow(2).sum()).backward()
        pre.step(logits)
        pre.remove()
        updates[fisher] = flat_grad(list(model.parameters()))
    assert relative_error(updates["ief"], updates["exact"]) <= 1e-5


def test_aliases_match_ngd_configurations():
    torch.manual_seed(4)
    model, inputs = make_mlp(3)
    targets = make_targets("categorical", inputs.shape[0], 3)
    configurations = {
        natgrad.EF: {"fisher": "empirical", "structure": "full"},
        natgrad.IEF: {"fisher": "ief", "structure": "full"},
        natgrad.TENGraD: {"fisher": "empirical", "structure": "layer"},
    }
    for alias, settings in configurations.items():
        grads = []
        for make in (lambda a=alias: a(model), lambda s=settings: natgrad.NGD(model, **s)):
            pre = make()
            model.zero_grad()
            logits = model(inputs)
            F.cross_entropy(logits, targets).backward()
            pre.step(logits)
            pre.remove()
            grads.append(flat_grad(list(model.parameters())))
        assert torch.equal(grads[0], grads[1]), alias.__name__


def test_state_dict_resumes_sampling_identically():
    torch.manual_seed(5)
    model, inputs = make_mlp(3)
    targets = make_targets("categorical", inputs.shape[0], 3)

    def one_step(pre):
        model.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        return flat_grad(list(model.parameters()))

    pre = natgrad.NGD(model, fisher="mc", seed=11)
    one_step(pre)
    saved = pre.state_dict()
    expected = one_step(pre)
    pre.remove()
    resumed = natgrad.NGD(model, fisher="mc", seed=999)
    resumed.load_state_dict(saved)
    assert resumed.steps == 1
    assert torch.equal(one_step(resumed), expected)


def test_callable_damping_is_evaluated_per_step():
    torch.manual_seed(6)
    model, inputs = make_mlp(3)
    targets = make_targets("categorical", inputs.shape[0], 3)
    schedule = [1e-1, 1e-3]
    twins = [copy.deepcopy(model) for _ in schedule]  # one live preconditioner per model
    pre = natgrad.EF(model, damping=lambda step: schedule[step])
    fixed = [natgrad.EF(twin, damping=value) for twin, value in zip(twins, schedule, strict=True)]
    for step, value in enumerate(schedule):
        assert pre.current_damping() == value
        results = []
        for net, preconditioner in ((model, pre), (twins[step], fixed[step])):
            net.zero_grad()
            logits = net(inputs)
            F.cross_entropy(logits, targets).backward()
            preconditioner.step(logits)
            results.append(flat_grad(list(net.parameters())))
        assert torch.allclose(results[0], results[1], rtol=1e-12, atol=0), value


@pytest.mark.parametrize("fisher", ["ief", "exact"])
def test_two_backward_passes_add_up_like_grad(fisher):
    torch.manual_seed(7)
    model, inputs = make_mlp(3)
    targets = make_targets("categorical", inputs.shape[0], 3)
    results = []
    for split in (False, True):
        pre = natgrad.NGD(model, fisher=fisher, seed=2)
        model.zero_grad()
        logits = model(inputs)
        if split:
            (0.25 * F.cross_entropy(logits, targets)).backward(retain_graph=True)
            (0.75 * F.cross_entropy(logits, targets)).backward()
        else:
            F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        pre.remove()
        results.append(flat_grad(list(model.parameters())))
    assert relative_error(results[1], results[0]) <= 1e-12


@pytest.mark.parametrize("fisher", ["empirical", "ief", "exact"])
def test_layer_systems_solved_one_by_one_or_batched_agree(monkeypatch, fisher):
    """structure="layer" solves its layers' systems in batches up to a size budget: a budget
    of one entry (every system alone) gives the update of one batch for all."""
    updates = []
    for budget in (natgrad.precond.woodbury.BATCHED_SOLVE_ENTRIES, 1):
        monkeypatch.setattr(natgrad.precond.woodbury, "BATCHED_SOLVE_ENTRIES", budget)
        torch.manual_seed(0)
        model, inputs = make_mlp(3)
        update, _ = run_natgrad(
            model, inputs, make_targets("categorical", 7, 3), "categorical", "mean",
            fisher=fisher, structure="layer", damping=1e-2,
        )  # fmt: skip
        updates.append(update)
    assert relative_error(updates[1], updates[0]) <= 1e-13


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_upper_block_grams_and_combined_rows_match_dense_oracle(
    monkeypatch, fisher, structure, model_name
):
    """With Gram blocks of 2 rows (the shipped 128 exceed these tiny K N) each layer's Gram is
    right only on and above its diagonal blocks and the summed system is mirrored once (the
    batched layer solves read the lower triangle); with no row set added one by one, the
    combined rows ``E_u`` come from the contraction instead: the same updates as the dense
    oracle, on both paths."""
    monkeypatch.setattr(natgrad.linalg, "SYMMETRIC_BLOCK", 2)
    updates = []
    for combined_sets in (natgrad.linalg.COMBINED_SETS, 0):
        monkeypatch.setattr(natgrad.linalg, "COMBINED_SETS", combined_sets)
        torch.manual_seed(0)
        model, inputs = MODELS[model_name](3)
        targets = make_targets("categorical", inputs.shape[0], 3)
        actual, logits = run_natgrad(
            model, inputs, targets, "categorical", "mean", fused=True, fisher=fisher,
            structure=structure, damping=1e-2, mc_samples=3, seed=7,
        )  # fmt: skip
        vectors = None
        if fisher == "mc":
            generator = torch.Generator().manual_seed(7)
            vectors = get_likelihood("categorical").sampled_output_grads(logits, 3, generator)
        batch = dense_batch(model, inputs, targets, "categorical", "mean")
        blocks = [list(m.parameters()) for m in model if len(list(m.parameters())) > 0]
        expected = expected_update(batch, fisher, structure, 1e-2, blocks, vectors)
        assert relative_error(actual, expected) <= TOLERANCE
        updates.append(actual)
    assert relative_error(updates[1], updates[0]) <= 1e-12
