"""Unmodified HuggingFace transformers (GPT-2, BERT, Llama; random weights from tiny configs):
every natgrad update against the dense per-sequence oracle of :mod:`hf_oracle`, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from hf_oracle import (
    KINDS,
    TASKS,
    counted_mask,
    dense_sequence_batch,
    dense_token_batch,
    hf_loss,
    make_batch,
    make_model,
)
from natgrad.likelihoods import get_likelihood
from oracle import dense_batch, expected_update, flat_grad

pytest.importorskip("transformers")

DAMPING, SAMPLES, SEED = 1e-2, 2, 3
TOLERANCE = 1e-8
# Llama's RMSNorm computes in float32 (also in a float64 model) and rounds the gradient it
# passes back to float32: the model's own batch gradient differs from the sum of its
# per-sequence gradients by about 4e-8, which the damped solves amplify up to 5e-6 here.
TOLERANCES = {"gpt2": TOLERANCE, "bert": TOLERANCE, "llama": 1e-5}
FISHERS = ("empirical", "ief", "mc", "exact")


def module_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """One block per module, its own trainable parameters (``structure="layer"``)."""
    return [
        own
        for module in model.modules()
        if (own := [p for p in module.parameters(recurse=False) if p.requires_grad])
    ]


@functools.cache
def oracle_case(kind: str, task: str):
    torch.manual_seed(0)
    model = make_model(kind, task)
    inputs, labels = make_batch(task)
    return model, inputs, labels, dense_sequence_batch(model, task, inputs, labels)


def natgrad_step(model, task, inputs, labels, fused=False, **settings):
    pre = natgrad.NGD(model, **settings)
    model.zero_grad()
    out = model(**inputs)
    loss = hf_loss(task, out.logits, labels)
    if fused:
        pre.backward(loss)
    else:
        loss.backward()
    pre.step(out.logits)
    pre.remove()
    return pre, flat_grad([p for p in model.parameters() if p.requires_grad]), out.logits.detach()


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def masked_mc_vectors(task, logits, labels):
    """The labels natgrad samples (same seed), zero at positions outside the loss."""
    generator = torch.Generator().manual_seed(SEED)
    vectors = get_likelihood("categorical").sampled_output_grads(logits, SAMPLES, generator)
    vectors = vectors * counted_mask(task, labels).unsqueeze(-1)
    return vectors.reshape(SAMPLES, logits.shape[0], -1)


@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", KINDS)
def test_update_matches_dense_per_sequence_oracle(kind, task, fisher, structure):
    """Sequence = datapoint, -100 labels ignored, HF's causal shift; every weight is
    preconditioned in the neuron view or by normalisation rows (no fallback, no plain)."""
    model, inputs, labels, batch = oracle_case(kind, task)
    pre, actual, logits = natgrad_step(
        model,
        task,
        inputs,
        labels,
        fisher=fisher,
        structure=structure,
        damping=DAMPING,
        mc_samples=SAMPLES,
        seed=SEED,
    )
    assert not pre.selection.plain
    # untied, BERT's LM head keeps an output bias of its own that its forward never uses
    unused = {"cls.predictions"} if (kind, task) == ("bert", "causal") else set()
    assert set(pre.selection.fallback) == unused
    vectors = masked_mc_vectors(task, logits, labels) if fisher == "mc" else None
    expected = expected_update(batch, fisher, structure, DAMPING, module_blocks(model), vectors)
    assert relative_error(actual, expected) <= TOLERANCES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_fused_backward_equals_standard_path(kind):
    model, inputs, labels, _ = oracle_case(kind, "causal")
    _, standard, _ = natgrad_step(model, "causal", inputs, labels, fisher="ief")
    _, fused, _ = natgrad_step(model, "causal", inputs, labels, fisher="ief", fused=True)
    assert relative_error(fused, standard) <= 1e-12


def test_tuple_and_dict_outputs_give_the_model_output_update():
    """return_dict=False with labels returns (loss, logits, ...); natgrad watches the logits."""
    model, inputs, labels, batch = oracle_case("gpt2", "classification")
    pre = natgrad.IEF(model, damping=DAMPING)
    model.zero_grad()
    loss, logits = model(**inputs, labels=labels, return_dict=False)[:2]
    loss.backward()
    pre.step(logits)
    pre.remove()
    expected = expected_update(batch, "ief", "full", DAMPING, [], None)
    assert relative_error(flat_grad(list(model.parameters())), expected) <= TOLERANCE

    class AsDict(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, **kwargs):
            return {"hidden": None, "logits": self.body(**kwargs).logits}

    wrapped = AsDict(model)
    pre = natgrad.IEF(wrapped, damping=DAMPING)
    model.zero_grad()
    out = wrapped(**inputs)
    hf_loss("classification", out["logits"], labels).backward()
    pre.step(out["logits"])
    pre.remove()
    assert relative_error(flat_grad(list(model.parameters())), expected) <= TOLERANCE


def test_another_output_tensor_is_refused_naming_what_natgrad_watches():
    model, inputs, labels, _ = oracle_case("gpt2", "causal")
    pre = natgrad.EF(model)
    out = model(**inputs, output_hidden_states=True)
    hf_loss("causal", out.logits, labels).backward()
    with pytest.raises(ValueError, match="returned a CausalLMOutputWithCrossAttentions"):
        pre.step(out.hidden_states[-1])
    pre.remove()


def test_models_own_causal_loss_in_float32_is_followed():
    """HF's causal-LM loss upcasts to float32 (a float64 model's logits are rounded to
    float32 in the loss): the update matches the oracle to that precision."""
    model, inputs, labels, batch = oracle_case("llama", "causal")
    pre = natgrad.EF(model, damping=DAMPING)
    model.zero_grad()
    out = model(**inputs, labels=labels)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    pre.step(out.logits)
    pre.remove()
    expected = expected_update(batch, "empirical", "full", DAMPING, [], None)
    assert relative_error(flat_grad(list(model.parameters())), expected) <= 1e-5


def test_loss_normalised_by_another_count_is_refused():
    """Dividing by all positions instead of the counted labels is not HF's mean."""
    model, inputs, labels, _ = oracle_case("gpt2", "causal")
    pre = natgrad.EF(model)
    out = model(**inputs)
    from hf_oracle import sequence_losses

    (sequence_losses("causal", out.logits, labels).sum() / labels.numel()).backward()
    with pytest.raises(ValueError, match="averaged over the labels that count"):
        pre.step(out.logits)
    pre.remove()


class TransposedLinear(nn.Module):
    """A user's own linear layer storing its weight as (d_in, d_out)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_registered_adapter_and_rms_norm_match_dense_oracle(fisher):
    torch.manual_seed(1)
    natgrad.register_adapter(TransposedLinear, natgrad.adapters.TransposedLinearAdapter())
    try:
        model = nn.Sequential(
            TransposedLinear(4, 5), nn.Tanh(), nn.RMSNorm(5), TransposedLinear(5, 3)
        ).double()
        inputs, targets = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        pre = natgrad.NGD(model, fisher=fisher, damping=DAMPING, unsupported="error")
        assert set(pre.selection.layers) == {"0", "3"} and set(pre.selection.direct) == {"2"}
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        pre.remove()
    finally:
        natgrad.adapters.ADAPTERS.pop(TransposedLinear)
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, fisher, "full", DAMPING, [], None)
    assert relative_error(flat_grad(list(model.parameters())), expected) <= TOLERANCE


def test_register_adapter_refuses_what_is_not_an_adapter():
    with pytest.raises(TypeError, match=r"LayerAdapter .* or a natgrad\.direct\.NormAdapter"):
        natgrad.register_adapter(TransposedLinear, "linear")
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        natgrad.register_adapter(int, natgrad.adapters.LinearAdapter())


def explicit_conv1d_factors(model, task, inputs, labels, batch, name, fisher):
    """``Σ_A = Ā^T Ā / (N T)`` and ``Σ_G`` of one Conv1D, summed explicitly: EF from the
    layer-output gradients of the loss, the exact Fisher as ``c Σ_{n,t} Jy^T H_n Jy`` with
    ``Jy = d z_n / d y_{nt}`` by autograd and ``H_n`` the oracle's output Hessian."""
    module = model.get_submodule(name)
    seen = {}

    def record(module, args, output):
        seen["input"], seen["output"] = args[0].detach(), output

    handle = module.register_forward_hook(record)
    logits = model(**inputs).logits
    handle.remove()
    layer_input, output = seen["input"], seen["output"]
    rows = layer_input.reshape(-1, layer_input.shape[-1])
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
    input_cov = rows.T @ rows / rows.shape[0]
    if fisher == "empirical":
        (grad,) = torch.autograd.grad(hf_loss(task, logits, labels), output)
        e = grad.reshape(-1, grad.shape[-1]) / batch.factor
        return input_cov, batch.factor * e.T @ e
    num, width = logits.shape[0], logits[0].numel()
    grad_cov = torch.zeros(output.shape[-1], output.shape[-1], dtype=torch.float64)
    for n in range(num):
        flat = logits[n].reshape(-1)
        jac = torch.stack(
            [torch.autograd.grad(flat[i], output, retain_graph=True)[0][n] for i in range(width)]
        )  # (T V, T, d_out): logits of sequence n w.r.t. its layer outputs
        for t in range(jac.shape[1]):
            grad_cov += batch.factor * jac[:, t].T @ batch.output_hessians[n] @ jac[:, t]
    return input_cov, grad_cov


@pytest.mark.usefixtures("float64")  # kron_solve's identity matrices
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_kfac_factors_and_update_of_gpt2_conv1d_layers_match_explicit_sums(fisher):
    """Token positions as in weight sharing's "expand" setting; the weight is (d_in, d_out)."""
    from test_kronecker import kron_solve

    model, inputs, labels, batch = oracle_case("gpt2", "causal")
    pre = natgrad.KFAC(model, fisher=fisher, damping=DAMPING, ema_decay=0.0)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and set(conv1d) <= set(pre.selection.layers)
    model.zero_grad()
    out = model(**inputs)
    hf_loss("causal", out.logits, labels).backward()
    plain = {
        name: torch.cat([m.weight.grad.T, m.bias.grad.unsqueeze(1)], dim=1)
        for name in conv1d
        if (m := model.get_submodule(name))
    }
    pre.step(out.logits)
    pre.remove()
    for name in conv1d:
        input_cov, grad_cov = explicit_conv1d_factors(
            model, "causal", inputs, labels, batch, name, fisher
        )
        natgrad_a, natgrad_g = pre.normalised_factors(name)
        assert relative_error(natgrad_a, input_cov) <= TOLERANCE
        assert relative_error(natgrad_g, grad_cov) <= TOLERANCE
        module = model.get_submodule(name)
        actual = torch.cat([module.weight.grad.T, module.bias.grad.unsqueeze(1)], dim=1)
        expected = kron_solve(grad_cov, input_cov, plain[name], "heuristic", DAMPING)
        assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize(("kind", "task"), [("gpt2", "causal"), ("bert", "classification")])
def test_fisher_vector_product_of_keyword_inputs_counts_only_the_loss_positions(kind, task):
    """FishLeg's Fisher-vector product: keyword inputs, a ModelOutput, ignored labels."""
    from natgrad.fisher_vector import fisher_vector_product

    model, inputs, labels, batch = oracle_case(kind, task)
    params = dict(model.named_parameters())
    vector = [torch.randn_like(p) for p in params.values()]
    counted = counted_mask(task, labels)
    product = fisher_vector_product(
        model, (), params, vector, get_likelihood("categorical"), "mean", inputs, counted
    )
    expected = batch.exact_fisher() @ torch.cat([v.reshape(-1) for v in vector])
    assert relative_error(torch.cat([p.reshape(-1) for p in product]), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_fishleg_trains_every_adapted_layer_of_a_causal_lm(kind):
    """FishLeg's auxiliary steps run on the model's own keyword inputs: the auxiliary
    parameters of every neuron-view layer learn, and the directions are finite."""
    model, inputs, labels, _ = oracle_case(kind, "causal")
    pre = natgrad.FishLeg(model, aux_period=1)
    initial = {name: [p.detach().clone() for p in pair] for name, pair in pre.aux_params.items()}
    assert set(initial) == set(pre.selection.layers)
    for _ in range(2):
        model.zero_grad()
        out = model(**inputs)
        hf_loss("causal", out.logits, labels).backward()
        pre.step(out.logits)
    pre.remove()
    for name, module in pre.selection.layers.items():
        assert torch.isfinite(module.weight.grad).all()
        pairs = zip(pre.aux_params[name], initial[name], strict=True)
        assert all(not torch.equal(p, q) for p, q in pairs), name


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_tied_input_and_output_embeddings_match_dense_oracle(kind, fisher, fused):
    """HF's default configs tie the LM head to the token embedding (and BERT's decoder bias
    to its head's bias): one block whose rows add both layers' per-sample gradients."""
    model, inputs, labels, batch = tied_case(kind)
    pre, actual, logits = natgrad_step(
        model,
        "causal",
        inputs,
        labels,
        fused=fused,
        fisher=fisher,
        damping=DAMPING,
        mc_samples=SAMPLES,
        seed=SEED,
        unsupported="error",
    )
    assert len(pre.selection.tied) == 1 and not pre.selection.plain
    vectors = masked_mc_vectors("causal", logits, labels) if fisher == "mc" else None
    expected = expected_update(batch, fisher, "full", DAMPING, [], vectors)
    assert relative_error(actual, expected) <= TOLERANCE


@functools.cache
def tied_case(kind: str):
    torch.manual_seed(0)
    model = make_model(kind, "causal", tie=True)
    inputs, labels = make_batch("causal")
    return model, inputs, labels, dense_sequence_batch(model, "causal", inputs, labels)


def test_kronecker_methods_give_tied_weights_the_plain_gradient():
    model, inputs, labels, _ = tied_case("gpt2")
    pre = natgrad.KFAC(model)
    assert "lm_head" not in pre.selection.layers and "transformer.wte" not in pre.selection.layers
    assert "transformer.wte.weight" in pre.selection.plain
    model.zero_grad()
    out = model(**inputs)
    hf_loss("causal", out.logits, labels).backward()
    plain = model.transformer.wte.weight.grad.clone()
    pre.step(out.logits)
    pre.remove()
    assert torch.equal(model.transformer.wte.weight.grad, plain)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("fisher", ["ief", "exact"])
def test_lora_adapters_from_peft_match_dense_oracle(fisher):
    """peft's LoRA on GPT-2's Conv1D attention: only the rank-2 factors train, each an
    nn.Linear in the neuron view."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = make_model("gpt2", "causal")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True
    )
    model = peft.get_peft_model(base, config)
    for name, param in model.named_parameters():  # B starts at zero: give it values
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    inputs, labels = make_batch("causal")
    batch = dense_sequence_batch(model, "causal", inputs, labels)
    pre, actual, _ = natgrad_step(
        model, "causal", inputs, labels, fisher=fisher, damping=DAMPING, unsupported="error"
    )
    assert len(pre.selection.layers) == 4 and not pre.selection.plain
    expected = expected_update(batch, fisher, "full", DAMPING, [], None)
    assert relative_error(actual, expected) <= TOLERANCE


def test_token_level_outputs_of_other_likelihoods_are_refused_for_the_exact_fisher():
    model = nn.Sequential(nn.Linear(4, 3))
    pre = natgrad.NGD(model, likelihood="gaussian", fisher="exact")
    outputs = model(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"token-level outputs .* likelihood='categorical'"):
        F.mse_loss(outputs, torch.zeros_like(outputs)).backward()
    pre.remove()


def test_logits_with_more_than_a_token_dimension_are_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    pre = natgrad.EF(model)
    logits = model(torch.randn(2, 5, 6, 4))
    F.cross_entropy(logits.flatten(0, 2), torch.zeros(60, dtype=torch.long)).backward()
    with pytest.raises(ValueError, match=r"\(N, T, C\) with T tokens per datapoint"):
        pre.step(logits)
    pre.remove()


@functools.cache
def token_case(kind: str):
    model, inputs, labels, _ = oracle_case(kind, "causal")
    return dense_token_batch(model, inputs, labels)


@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", ("empirical", "ief", "ief_matrix", "mc", "exact"))
@pytest.mark.parametrize("kind", KINDS)
def test_per_token_datapoints_match_dense_per_token_oracle(kind, fisher, structure):
    """``Categorical(datapoint="token")``: every token in the loss is a datapoint."""
    model, inputs, labels, _ = oracle_case(kind, "causal")
    batch = token_case(kind)
    likelihood = natgrad.likelihoods.Categorical(datapoint="token")
    _, actual, logits = natgrad_step(
        model, "causal", inputs, labels, likelihood=likelihood, fisher=fisher,
        structure=structure, damping=DAMPING, mc_samples=SAMPLES, seed=SEED,
    )  # fmt: skip
    vectors = None
    if fisher == "mc":  # natgrad's samples (same seed), the rows of the tokens in the loss
        generator = torch.Generator().manual_seed(SEED)
        sampled = get_likelihood("categorical").sampled_output_grads(logits, SAMPLES, generator)
        vectors = sampled[:, counted_mask("causal", labels)]
    expected = expected_update(batch, fisher, structure, DAMPING, module_blocks(model), vectors)
    assert relative_error(actual, expected) <= TOLERANCES[kind]


def test_per_token_datapoints_are_refused_by_kronecker_methods():
    model, _, _, _ = oracle_case("gpt2", "causal")
    likelihood = natgrad.likelihoods.Categorical(datapoint="token")
    with pytest.raises(ValueError, match=r"per-token datapoints .* Woodbury methods"):
        natgrad.KFAC(model, likelihood=likelihood)


@pytest.mark.parametrize("fisher", ["ief", "mc"])
def test_per_token_fused_backward_equals_standard_path(fisher):
    model, inputs, labels, _ = oracle_case("llama", "causal")
    settings = dict(
        likelihood=natgrad.likelihoods.Categorical(datapoint="token"), fisher=fisher, seed=SEED
    )
    _, standard, _ = natgrad_step(model, "causal", inputs, labels, **settings)
    _, fused, _ = natgrad_step(model, "causal", inputs, labels, fused=True, **settings)
    assert relative_error(fused, standard) <= 1e-12
