"""Laplace posteriors over a network's weights from natgrad's curvature rows.

Conventions. The model is trained to a MAP ``θ*`` of the summed negative log-likelihood of
the data set ``D`` plus a Gaussian prior ``N(0, diag(τ)^{-1})``; the Laplace posterior is
``N(θ*, Λ^{-1})`` with

    ``Λ = diag(τ) + Σ_{n ∈ D} J_n^T H_n J_n``                          (``fisher="exact"``)

(``J_n = d z_n / d θ``, ``H_n = d^2 l_n / d z_n^2``: the generalised Gauss-Newton matrix of
the *sum* over the whole data set, not a mean), ``Σ_n ∇l_n ∇l_n^T`` for ``"empirical"``, or
the sampled Fisher ``1/M Σ_{n,m} J_n^T ∇_z l(z_n, y_m) (·)^T`` for ``"mc"``. ``τ`` is one
prior precision for all parameters or one per module (:attr:`Laplace.group_names`).

The log marginal likelihood (MacKay's evidence; the form laplace-torch uses) is

    ``log p(D) ≈ log p(D | θ*) + log p(θ*) + P/2 log 2π - ½ log det Λ
               = log p(D | θ*) - ½ θ*^T diag(τ) θ* - ½ (log det Λ - log det diag(τ))``,

with ``log p(D | θ*)`` the normalised log-likelihood (the Gaussian's ``- N C/2 log 2πσ^2``
included). The structures (:mod:`natgrad.laplace.posteriors`): ``"full"`` (exact; Woodbury
sampler of Benzing 2022 App. C), ``"layer"`` (block-diagonal over modules, each exact),
``"kron"`` (KFAC's factors; ``kron_damping`` ``"correct"``, ``"heuristic"`` or ``"a_only"``,
App. G) and ``"diag"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from natgrad.distributed import unwrap
from natgrad.fallback import DEFAULT_CHUNK_SIZE
from natgrad.laplace.posteriors import (
    DiagonalPart,
    KronDamping,
    KroneckerPart,
    LowRankPart,
    Part,
)
from natgrad.laplace.predictive import (
    Link,
    linearised_predictive,
    output_jacobians,
    sampled_predictive,
)
from natgrad.laplace.rows import (
    LAPLACE_FISHERS,
    LaplaceFisher,
    RowCollector,
    check_laplace_likelihood,
    log_likelihood,
    loss_sum,
)
from natgrad.laplace.subsample import Reservoir
from natgrad.likelihoods import Likelihood, get_likelihood
from natgrad.precond.blocks import Block, LayerBatch
from natgrad.selection import select_layers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Structure = Literal["full", "layer", "kron", "diag"]
STRUCTURES = ("full", "layer", "kron", "diag")
DEFAULT_MAX_ENTRIES = 2**27
"""Numbers a low-rank part may keep (``min(R, P) P``; float64: 1 GiB)."""


class Laplace:
    """A Laplace posterior around the model's current weights (module docstring).

    Parameters
    ----------
    model
        The trained model (its weights are the MAP); its forward pass returns ``(N, C)``.
    likelihood
        ``"categorical"``, ``"gaussian"`` (``natgrad.likelihoods.Gaussian(variance)`` for a
        noise variance other than ½), ``"bernoulli"``.
    fisher
        ``"exact"`` (GGN: ``C`` rows per datapoint), ``"mc"`` (``mc_samples`` rows) or
        ``"empirical"`` (one row).
    structure
        ``"full"``, ``"layer"``, ``"kron"`` or ``"diag"``.
    prior_precision
        ``τ``: a float, or one value per module of :attr:`group_names`.
    kron_damping
        How ``structure="kron"`` adds the prior: ``"correct"`` (``B ⊗ A + τ I``),
        ``"heuristic"`` (KFAC's split) or ``"a_only"`` (FOOF-like).
    subsample
        ``structure="full"`` or ``"layer"`` only: keep the rows of ``S`` datapoints drawn
        uniformly without replacement from the data set (reservoir sampling in one pass over
        the loader, with the generator of ``seed``; :attr:`subset` lists them), scaled by
        ``sqrt(D / S)``, so that ``Λ = diag(τ) + D F_S`` with ``F_S`` the subset's mean
        curvature (Benzing 2022 App. C). ``None`` (default): every datapoint.
    max_entries
        The most numbers a full or per-layer part keeps (``min(rows, params) x params``);
        beyond, :meth:`fit` raises a ``MemoryError`` naming the alternatives.
    seed
        Seed of the generator for sampled labels (``"mc"``) and posterior samples.
    unsupported, overrides, distributed, process_group, fallback_chunk_size
        As for :class:`natgrad.NGD`: every trainable parameter needs curvature rows, so a
        parameter left to the plain gradient is refused. Under ``torch.distributed`` every
        rank passes its shard of the data set (the same number of batches on each rank) and
        all ranks end with the posterior of the whole data set.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        fisher: LaplaceFisher = "exact",
        structure: Structure = "full",
        prior_precision: float | Sequence[float] | Tensor = 1.0,
        *,
        kron_damping: KronDamping = "correct",
        subsample: int | None = None,
        mc_samples: int = 1,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        seed: int = 0,
        unsupported: str = "fallback",
        overrides: Mapping[str, str] | None = None,
        distributed: str = "auto",
        process_group: ProcessGroup | None = None,
        fallback_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure={structure!r}: choose one of {STRUCTURES}")
        self.wrapper = model
        self.model = unwrap(model)
        self.likelihood = check_laplace_likelihood(get_likelihood(likelihood))
        self.fisher, self.structure, self.kron_damping = fisher, structure, kron_damping
        self.max_entries = max_entries
        if subsample is not None:
            if structure not in ("full", "layer"):
                raise ValueError(
                    f"subsample applies to structure='full' or 'layer' (which keep rows), not "
                    f"{structure!r}, whose statistics cost the same for every datapoint"
                )
            if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
                raise ValueError(f"subsample must be an integer >= 1, got {subsample!r}")
        self.subsample = subsample
        self.subset: Tensor | None = None
        self._collector_options = dict(
            mc_samples=mc_samples,
            unsupported=unsupported,
            overrides=overrides,
            seed=seed,
            distributed=distributed,
            process_group=process_group,
            fallback_chunk_size=fallback_chunk_size,
        )
        if fisher not in LAPLACE_FISHERS:
            raise ValueError(f"unknown fisher={fisher!r}: choose one of {LAPLACE_FISHERS}")
        self.generator = torch.Generator().manual_seed(int(seed))
        selection = select_layers(self.model, unsupported, overrides)
        if selection.plain:
            raise ValueError(
                "Laplace needs curvature rows for every trainable parameter, but "
                f"{', '.join(selection.plain)} would keep the plain gradient: remove the "
                "'plain_gradient' override (or unsupported='plain_gradient'), or freeze those "
                "parameters with requires_grad_(False)"
            )
        named = {id(p): name for name, p in self.model.named_parameters() if p.requires_grad}
        self.param_names = list(named.values())
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        offsets, position = {}, 0
        for param in self._params:
            offsets[id(param)] = position
            position += param.numel()
        self._offsets = offsets
        self.num_params = position
        self.group_names = list(selection.order)
        self._group_of = torch.empty(position, dtype=torch.long)
        group_params = {
            **{n: _layer_params(m) for n, m in selection.layers.items()},
            **{n: _trainable(m) for n, m in selection.direct.items()},
            **{n: list(ps.values()) for n, ps in selection.fallback.items()},
        }
        for group, name in enumerate(self.group_names):
            self._group_of[self._columns(group_params[name])] = group
        self.prior_precision = prior_precision
        self.parts: list[Part] | None = None
        self.mean: Tensor | None = None
        self.log_likelihood: Tensor | None = None
        self.num_datapoints = 0

    # ------------------------------------------------------------------ prior
    @property
    def prior_precision(self) -> Tensor:
        """``τ`` per module of :attr:`group_names`, ``(G,)``."""
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | Sequence[float] | Tensor) -> None:
        self._prior = self._checked_prior(value, torch.float64).detach().clone()

    def _checked_prior(self, value: float | Sequence[float] | Tensor, dtype: torch.dtype) -> Tensor:
        """``τ`` per module of :attr:`group_names` from one value or one per module, positive
        and finite (a tensor keeps its autograd graph)."""
        prior = torch.as_tensor(value, dtype=dtype)
        if prior.dim() == 0:
            prior = prior.expand(len(self.group_names))
        if prior.shape != (len(self.group_names),):
            raise ValueError(
                f"prior_precision must be a float or one value per module of group_names "
                f"({len(self.group_names)}: {self.group_names}), got shape {tuple(prior.shape)}"
            )
        values = prior.detach()
        if not bool(torch.isfinite(values).all() and (values > 0).all()):
            raise ValueError(f"prior precisions must be positive and finite, got {values.tolist()}")
        return prior

    def _prior_vector(self, prior: Tensor | None = None) -> Tensor:
        groups = self._prior if prior is None else prior
        dtype = self.mean.dtype if self.mean is not None else torch.float64
        return groups.to(dtype)[self._group_of]

    # ------------------------------------------------------------------ fit
    def fit(self, loader: Iterable) -> Laplace:
        """Accumulate the curvature over ``loader``'s ``(inputs, targets)`` batches; the MAP is
        the current weights. The model runs in eval mode (its mode is restored), and the
        parameters' ``.grad`` are left as they were."""
        self.parts, self.mean, self.log_likelihood, self.subset = None, None, None, None
        collector = RowCollector(
            self.wrapper,
            self.likelihood,
            self.fisher,
            self._add_batch,
            **self._collector_options,
        )
        self._pending: dict[str, Part] = {}
        self._block_columns: dict[str, Tensor] = {}
        self._reservoir = (
            None
            if self.subsample is None
            else Reservoir(
                self.subsample, torch.Generator().manual_seed(self.generator.initial_seed())
            )
        )
        self._collector = collector
        saved_grads = [p.grad for p in self._params]  # backward would add into them
        for param in self._params:
            param.grad = None
        training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64)
        self.num_datapoints = 0
        try:
            for batch in loader:
                inputs, targets = batch[0], batch[1]
                logits = collector.wrapper(inputs)
                loss = loss_sum(self.likelihood, logits, targets)
                loss.backward()
                collector.step(logits)
                with torch.no_grad():
                    total += log_likelihood(self.likelihood, logits, targets).double()
                self.num_datapoints += logits.shape[0]
                for param in self._params:
                    param.grad = None
        finally:
            collector.remove()
            self.model.train(training)
            for param, grad in zip(self._params, saved_grads, strict=True):
                param.grad = grad
        if self.num_datapoints == 0:
            raise ValueError("the loader gave no batches: Laplace.fit needs the training data")
        if collector.communicator.active:
            counts = torch.tensor([float(self.num_datapoints)], dtype=torch.float64)
            total = collector.communicator.all_reduce_sum(total.reshape(1), "laplace")[0]
            counts = collector.communicator.all_reduce_sum(counts, "laplace")
            self.num_datapoints = int(counts.item())
        self.mean = torch.cat([p.detach().reshape(-1) for p in self._params]).clone()
        self.log_likelihood = total.to(self.mean.dtype)
        parts = list(self._pending.values())
        if self._reservoir is None:
            for part in parts:
                part.finish(self.mean.dtype)
        else:
            kept = self._reservoir.kept
            scale = (self._reservoir.seen / kept) ** 0.5
            for part in parts:
                part.finish(self.mean.dtype, kept, scale)
            self.subset = self._reservoir.indices()
        covered = torch.zeros(self.num_params, dtype=torch.bool)
        for part in parts:
            covered[part.index] = True
        if not bool(covered.all()):
            missing = sorted({self.group_names[g] for g in self._group_of[~covered].tolist()})
            raise RuntimeError(f"the modules {missing} never took part in a loss during fit")
        self.parts = parts
        del self._pending, self._collector
        return self

    def _columns(self, params: Sequence[nn.Parameter]) -> Tensor:
        return torch.cat(
            [torch.arange(self._offsets[id(p)], self._offsets[id(p)] + p.numel()) for p in params]
        )

    def _add_batch(self, blocks: list[Block], row_weight: float) -> None:
        """The collector's sink: fold one batch's blocks into the parts."""
        scale = row_weight**0.5
        assignments = None
        num_datapoints = blocks[0].loss_grads.shape[1]
        if self._reservoir is not None:
            assignments = self._reservoir.assign(num_datapoints)
            if not assignments:
                return
        if self.structure == "full":
            rows = None
            for block in blocks:
                block_rows = self._block_rows(block, scale)
                if rows is None:
                    rows = block_rows.new_zeros(block_rows.shape[0], self.num_params)
                rows[:, self._block_index(block)] = block_rows
            part = self._pending.get("")
            if part is None:
                part = self._pending[""] = LowRankPart(
                    torch.arange(self.num_params), self.max_entries, self.subsample
                )
            self._add_rows(part, rows, assignments, num_datapoints)
            return
        for block in blocks:
            part = self._pending.get(block.name)
            index = self._block_index(block)
            if self.structure == "kron" and isinstance(block, LayerBatch):
                if part is None:
                    part = self._pending[block.name] = KroneckerPart(
                        index, block.module, block.adapter, block.has_bias, self.kron_damping
                    )
                part.add(block, self._collector.curvature_rows(block), row_weight)
                continue
            if part is None:
                part = self._pending[block.name] = (
                    LowRankPart(index, self.max_entries, self.subsample)
                    if self.structure == "layer"
                    else DiagonalPart(index)
                )
            rows = self._block_rows(block, scale)
            self._add_rows(part, rows, assignments, num_datapoints)

    @staticmethod
    def _add_rows(
        part: Part, rows: Tensor, assignments: list[tuple[int, int]] | None, num: int
    ) -> None:
        """All rows of the batch, or (subsample) those of the kept datapoints."""
        if assignments is None:
            part.add(rows)
        else:
            part.keep(rows, num, assignments)

    def _block_index(self, block: Block) -> Tensor:
        if block.name not in self._block_columns:
            self._block_columns[block.name] = self._columns(block.parameters())
        return self._block_columns[block.name]

    def _block_rows(self, block: Block, scale: float) -> Tensor:
        """The block's weighted curvature rows, materialised ``(K N, p_b)``."""
        return scale * block.per_datapoint_grads(self._collector.curvature_rows(block))

    # ------------------------------------------------------------------ posterior
    def _fitted(self, what: str) -> list[Part]:
        if self.parts is None:
            raise RuntimeError(f"{what} needs a fitted posterior: call la.fit(train_loader) first")
        return self.parts

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` parameter vectors ``(S, P)`` from the posterior, flattened in the
        order of the model's trainable ``parameters()``."""
        parts = self._fitted("sample()")
        prior = self._prior_vector()
        generator = self.generator if generator is None else generator
        samples = self.mean.expand(num_samples, -1).clone()
        for part in parts:
            samples[:, part.index] += part.sample(num_samples, prior[part.index], generator)
        return samples

    def covariance_times(self, matrix: Tensor) -> Tensor:
        """``M Σ`` for rows ``M`` ``(k, P)``, ``Σ = Λ^{-1}`` applied by the structure."""
        parts = self._fitted("covariance_times()")
        prior = self._prior_vector()
        result = torch.empty_like(matrix)
        for part in parts:
            result[:, part.index] = part.covariance_times(matrix[:, part.index], prior[part.index])
        return result

    def posterior_precision(self) -> Tensor:
        """The dense ``P x P`` precision of the structure (small models and tests only)."""
        parts = self._fitted("posterior_precision()")
        prior = self._prior_vector()
        dense = torch.zeros(self.num_params, self.num_params, dtype=prior.dtype)
        for part in parts:
            dense[part.index.unsqueeze(1), part.index] = part.precision_matrix(prior[part.index])
        return dense

    def log_marginal_likelihood(self, prior_precision: Tensor | float | None = None) -> Tensor:
        """The Laplace log evidence (module docstring), differentiable in a given ``τ``
        (one value or one per module); the fitted ``τ`` by default."""
        parts = self._fitted("log_marginal_likelihood()")
        if prior_precision is None:
            groups = self._prior
            one_value = bool((groups == groups[0]).all())
        else:
            groups = self._checked_prior(prior_precision, self.mean.dtype)
            one_value = torch.as_tensor(prior_precision).numel() == 1
        prior = self._prior_vector(groups)
        scatter = (prior * self.mean.pow(2)).sum()
        log_det = sum(self._log_det_ratio(part, prior[part.index], one_value) for part in parts)
        return self.log_likelihood - 0.5 * (scatter + log_det)

    def _log_det_ratio(self, part: Part, prior: Tensor, one_value: bool) -> Tensor:
        """``log det Λ_b - Σ log τ`` of one part. A low-rank part under one ``τ`` (one value
        given, or the part is one module's) takes its eigenvalue form, else its factorisation
        for the ``τ`` of each parameter (needed for per-module gradients in ``τ``)."""
        if isinstance(part, LowRankPart):
            groups = self._group_of[part.index]
            if one_value or bool((groups == groups[0]).all()):
                return part.log_det_ratio_uniform(prior[0])
        return part.log_det_ratio(prior)

    def optimize_prior_precision(
        self, per_module: bool = False, max_iter: int = 100, tolerance: float = 1e-10
    ) -> Tensor:
        """Set ``τ`` to the maximiser of :meth:`log_marginal_likelihood` (one value, or one per
        module with ``per_module=True``) by L-BFGS on ``log τ``; returns the new ``τ``."""
        self._fitted("optimize_prior_precision()")
        start = self._prior.log() if per_module else self._prior.log().mean().reshape(1)
        log_prior = start.to(self.mean.dtype).clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [log_prior],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=tolerance,
            tolerance_change=tolerance * 1e-2,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            prior = log_prior.exp() if per_module else log_prior[0].exp()
            loss = -self.log_marginal_likelihood(prior)
            loss.backward()
            return loss

        optimizer.step(closure)
        self.prior_precision = log_prior.detach().exp().expand(len(self.group_names))
        return self.prior_precision

    # ------------------------------------------------------------------ predictive
    def predictive(
        self,
        inputs: Tensor,
        n_samples: int = 100,
        method: Literal["mc", "linearised"] = "mc",
        link: Link = "probit",
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive at ``inputs``: class probabilities ``(N, C)``, or
        ``(mean (N, C), covariance (N, C, C))`` for the Gaussian likelihood.

        ``method="mc"`` averages over ``n_samples`` networks with sampled weights;
        ``"linearised"`` is the GLM predictive (:mod:`natgrad.laplace.predictive`), with
        ``link="probit"`` or ``"mc"`` (``n_samples`` output samples) for classification.
        """
        self._fitted("predictive()")
        generator = self.generator if generator is None else generator
        was_training = self.model.training
        self.model.eval()
        try:
            if method == "linearised":
                mean, covariance = self._output_moments(inputs)
                return linearised_predictive(
                    self.likelihood, mean, covariance, link, n_samples, generator
                )
            if method != "mc":
                raise ValueError(f"unknown method={method!r}: choose 'mc' or 'linearised'")
            thetas = self.sample(n_samples, generator)
            with torch.no_grad():
                outputs = torch.stack([self._forward(theta, inputs) for theta in thetas])
            return sampled_predictive(self.likelihood, outputs)
        finally:
            self.model.train(was_training)

    def _output_moments(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The linearised model's output means ``(N, C)`` and covariances ``J Σ J^T``
        ``(N, C, C)``, summed over the parts of the block-diagonal ``Σ``, over chunks of inputs
        whose Jacobians hold at most a quarter of ``max_entries`` numbers (the Jacobians of all
        inputs would need ``N C P``)."""
        parts = self._fitted("predictive()")
        prior = self._prior_vector()
        params = self._params_at(self.mean)
        with torch.no_grad():
            outputs = self._forward(self.mean, inputs[:1]).shape[1]
        chunk = max(1, self.max_entries // (4 * outputs * self.num_params))
        means, covariances = [], []
        for part in inputs.split(chunk):
            mean, jacobians = output_jacobians(self.model, self.param_names, params, part)
            means.append(mean)
            jacobians = jacobians.to(self.mean.dtype)
            covariances.append(
                sum(
                    part.output_covariance(jacobians[..., part.index], prior[part.index])
                    for part in parts
                )
            )
        return torch.cat(means), torch.cat(covariances)

    def _params_at(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[self._offsets[id(p)] : self._offsets[id(p)] + p.numel()].reshape(p.shape)
            for p in self._params
        ]

    def _forward(self, flat: Tensor, inputs: Tensor) -> Tensor:
        values = dict(zip(self.param_names, self._params_at(flat), strict=True))
        return functional_call(self.model, values, (inputs,))


def _layer_params(module: nn.Module) -> list[nn.Parameter]:
    bias = getattr(module, "bias", None)
    params = [module.weight]
    return [*params, bias] if bias is not None and bias.requires_grad else params


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


__all__ = ["STRUCTURES", "Laplace", "Structure"]
