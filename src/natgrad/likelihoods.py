"""Likelihoods: the link between a model's outputs ("logits") and its loss.

A likelihood fixes the per-datapoint loss ``l_n(z_n, y_n)`` as a function of the model output
``z_n`` and supplies what the Fisher types of natgrad need from the output side:

* the reduction factor ``c`` of the batch loss ``L = c * sum_n l_n`` (``c = 1`` for a sum,
  ``1 / N`` or ``1 / (N D)`` for torch's mean, exactly as the matching ``torch.nn.functional``
  loss computes it);
* output gradients ``d l / d z`` at labels sampled from the model ``p(y | z)`` (the Monte-Carlo
  Fisher ``F(M)``, Wu et al. 2024, eq. 22);
* a square root ``S_n`` of the output Hessian, ``S_n S_n^T = d^2 l_n / d z_n^2`` (the exact
  Fisher as a generalised Gauss-Newton matrix, Kunstner et al. 2019, App. A.2 eq. 26-35), returned
  column by column as output gradients;
* the squared logits-gradient norms ``s_n = ||d l_n / d z_n||^2`` of the iEF scaling vector
  (Wu et al. 2024, eq. 6).

Outputs are ``(N, C)``, one row per datapoint, or, for the categorical likelihood, token-level
``(N, T, C)``: a datapoint is a sequence, its loss the sum of its tokens' cross-entropies,
``l_n = sum_{t counted} l_{nt}``, and a mean-reduced loss divides by the number ``K`` of tokens
that count, ``c = 1 / K`` (``F.cross_entropy`` on the flattened tokens with
``ignore_index``, as HuggingFace's causal-LM loss computes it). Which positions count is read
from the gradient of the loss with respect to the logits (:meth:`Likelihood.counted`): a
cross-entropy gradient ``c (softmax(z) - e_y)`` is zero only at positions outside the loss
(label ``-100``, the last position of HuggingFace's causal shift). The same holds for
classification logits ``(N, C)`` with ignored labels.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
LikelihoodName = Literal["categorical", "gaussian", "bernoulli"]


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if natgrad knows it, else raise a ValueError naming the choices."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"unknown loss reduction {reduction!r}: natgrad supports 'mean' (torch's default) "
            "and 'sum'; pass the reduction your loss function uses"
        )
    return reduction


def check_logits(logits: Tensor) -> None:
    """Raise unless ``logits`` is a floating-point tensor of shape ``(N, C)`` or ``(N, T, C)``."""
    if not isinstance(logits, Tensor):
        hint = " (pass its .logits)" if isinstance(getattr(logits, "logits", None), Tensor) else ""
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}{hint}")
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must have shape (N, C) with one row per datapoint, or (N, T, C) with T "
            f"tokens per datapoint, got shape {tuple(logits.shape)}; reshape the model output"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")


DATAPOINTS = ("sequence", "token")


class Likelihood(ABC):
    """A per-datapoint negative log-likelihood ``l_n(z_n, y_n)`` of a model output ``z_n``."""

    name: str
    datapoint: str = "sequence"
    """For token-level outputs ``(N, T, C)``: whether a datapoint is a sequence (its loss the sum
    of its tokens') or a token."""

    @abstractmethod
    def reduction_factor(
        self, logits: Tensor, reduction: str, counted: Tensor | None = None
    ) -> float:
        """Return ``c`` such that the batch loss is ``c * sum_n l_n``; ``counted`` (from
        :meth:`counted`) marks the positions in the loss, all of them if ``None``."""

    def counted(self, logits: Tensor, output_grad: Tensor) -> Tensor | None:
        """Boolean ``logits.shape[:-1]``: the positions (datapoints, or tokens) that take part
        in the loss, judged from its gradient; ``None``: all of them (the default)."""
        return None

    @abstractmethod
    def sampled_output_grads(
        self, logits: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Output gradients ``d l(z_n, y) / d z_n`` at ``y ~ p(y | z_n)``, shape ``(M, N, C)``."""

    @abstractmethod
    def hessian_sqrt(self, logits: Tensor) -> Tensor:
        """Columns of ``S_n`` with ``S_n S_n^T = d^2 l_n / d z_n^2``, shape ``(K, N, C)``.

        Slice ``k`` holds column ``k`` of every ``S_n``; back-propagating the slices gives the
        exact Fisher's ``N K`` datapoints.
        """

    def hessian_vector_product(self, logits: Tensor, vectors: Tensor) -> Tensor:
        """``H_n v_n`` for every row, ``H_n = d^2 l_n / d z_n^2``, as ``S_n (S_n^T v_n)``."""
        columns = self.hessian_sqrt(logits)
        return torch.einsum("knc,kn->nc", columns, torch.einsum("knc,nc->kn", columns, vectors))

    def check_output_grad(
        self,
        logits: Tensor,
        output_grad: Tensor,
        reduction: str,
        counted: Tensor | None = None,
        factor: float | None = None,
    ) -> None:
        """Raise if ``output_grad`` cannot be ``c * d l / d z`` of this likelihood.

        The default accepts anything; likelihoods whose gradients have a recognisable form
        (categorical) override it to catch a wrong reduction or a different loss. ``counted``
        and ``factor``: :meth:`counted` of these logits and gradient and the
        :meth:`reduction_factor` of ``reduction`` that goes with it, if the caller has them.
        """
        return None

    @staticmethod
    def logits_grad_norms_sq(per_sample_output_grad: Tensor) -> Tensor:
        """``s_n = ||d l_n / d z_n||^2`` for each datapoint (Wu et al. 2024, eq. 6), shape ``(N,)``;
        for token-level logits the norm runs over all the datapoint's tokens."""
        return per_sample_output_grad.pow(2).flatten(start_dim=1).sum(dim=1)


class Categorical(Likelihood):
    """Softmax cross-entropy: ``l_n = -log softmax(z_n)[y_n]`` (``F.cross_entropy``).

    Output Hessian ``H = diag(pi) - pi pi^T`` with ``pi = softmax(z)``, of rank ``C - 1``
    (``H sqrt(pi) = 0``). Its square root used here has ``C - 1`` columns, so the exact Fisher
    has ``C - 1`` datapoints per datapoint instead of ``C`` (a tenth fewer rows to
    back-propagate and a fifth less Gram for ``C = 10``): with ``q = sqrt(pi)``,
    ``H = diag(q) (I - q q^T) diag(q)``, and ``I - q q^T = U U^T`` for the columns ``U`` of the
    Householder reflection ``P = I - v v^T / (1 + q_j)``, ``v = q + e_j``, other than column
    ``j`` (``P q = -e_j``; ``j`` is the largest ``q_j``, so ``1 + q_j >= 1`` and nothing
    cancels), so ``S = diag(q) U`` (``C x (C - 1)``). With one class the Hessian is zero and
    ``S`` its one zero column.

    Token-level logits ``(N, T, C)`` (module docstring): each token has its own labels and
    output Hessian, and the sequence's Hessian is block-diagonal over its tokens. Sampled
    labels are drawn per token (one output vector ``(T, C)`` per sequence and sample); the
    Hessian's square root has ``T C`` columns per sequence, column ``(t, c)`` being token
    ``t``'s column ``c`` and zero at the other tokens (an exact-Fisher solve over ``N T C``
    rows: use ``fisher="mc"`` for real vocabularies).

    Parameters
    ----------
    datapoint
        ``"sequence"`` (default): a datapoint of token-level logits is a sequence, its gradient
        the sum of its tokens'. ``"token"``: every token in the loss is a datapoint of its own
        (the Woodbury methods only; its rows cost one extra backward pass per token position,
        batched). The exact Fisher is the same either way.
    """

    name = "categorical"

    def __init__(self, datapoint: str = "sequence") -> None:
        if datapoint not in DATAPOINTS:
            raise ValueError(f"unknown datapoint={datapoint!r}: choose one of {DATAPOINTS}")
        self.datapoint = datapoint

    def reduction_factor(
        self, logits: Tensor, reduction: str, counted: Tensor | None = None
    ) -> float:
        check_reduction(reduction)
        if reduction == "sum":
            return 1.0
        count = logits.shape[:-1].numel() if counted is None else int(counted.sum())
        return 1.0 / max(count, 1)

    def counted(self, logits: Tensor, output_grad: Tensor) -> Tensor:
        """Positions whose logits receive a gradient, or whose softmax is exactly one-hot
        (a saturated position, whose gradient and Hessian vanish whether it counts or not)."""
        # in float32 at least: a bfloat16 softmax rounds any p > ~0.998 to one, which would
        # count confident positions outside the loss (label -100)
        receives = (output_grad != 0).any(dim=-1)
        if bool(receives.all()):  # the usual case: no softmax needed
            return receives
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits.detach().to(dtype), dim=-1)
        return receives | (probs.amax(dim=-1) == 1)

    def sampled_output_grads(
        self, logits: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        probs = torch.softmax(logits.detach(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        labels = torch.multinomial(
            flat.to(_device_of(generator, flat)), num_samples, replacement=True,
            generator=generator,
        ).to(flat.device)  # fmt: skip
        onehot = torch.nn.functional.one_hot(labels.T, flat.shape[1]).to(probs.dtype)
        return probs.unsqueeze(0) - onehot.reshape(num_samples, *probs.shape)

    def hessian_sqrt(self, logits: Tensor) -> Tensor:
        probs = torch.softmax(logits.detach(), dim=-1)
        # (..., C, K): S of every position, then column k laid out as (k, n, [t,] :)
        roots = _softmax_hessian_root(probs)
        if probs.dim() == 2:
            return roots.permute(2, 0, 1)
        num, tokens, classes = probs.shape
        columns = roots.permute(3, 0, 1, 2)  # (k, n, t, :)
        # column (t, k) lives at token t only
        at_token = torch.eye(tokens, dtype=probs.dtype, device=probs.device)
        return torch.einsum("kntd,ts->tknsd", columns, at_token).reshape(
            tokens * columns.shape[0], num, tokens, classes
        )

    def hessian_vector_product(self, logits: Tensor, vectors: Tensor) -> Tensor:
        """``(diag(pi) - pi pi^T) v`` at every position."""
        probs = torch.softmax(logits.detach(), dim=-1)
        return probs * vectors - probs * (probs * vectors).sum(dim=-1, keepdim=True)

    def check_output_grad(
        self,
        logits: Tensor,
        output_grad: Tensor,
        reduction: str,
        counted: Tensor | None = None,
        factor: float | None = None,
    ) -> None:
        """Check that ``output_grad = c (softmax(z) - e_y)`` with the declared reduction.

        A cross-entropy gradient row sums to zero (up to ``c`` times round-off: confident rows
        in float32 lose ``pi_y - 1`` to rounding while their small entries stay exact), and
        its positive entries are ``c * pi_k``; their ratio, pooled over the batch (entries
        far from the subnormal range only), recovers ``c``, which must match the declared
        reduction.
        """
        # float32 at least: a bfloat16 gradient (autocast) is checked at its own precision
        dtype = torch.promote_types(output_grad.dtype, torch.float32)
        grad = output_grad.detach().to(dtype)
        if counted is None:
            counted, factor = self.counted(logits, grad), None
        expected = self.reduction_factor(logits, reduction, counted) if factor is None else factor
        # round-off of the gradient's dtype: 2^-7 relative in bfloat16, 2^-10 in float16
        finfo = torch.finfo(output_grad.dtype)
        precision = max(1e-3, 4 * finfo.eps)
        probs = torch.softmax(logits.detach().to(dtype), dim=-1)
        # entries near the subnormal range carry few significant bits (a very confident row's
        # c * pi_k of 1e-40 in float32): they would bias the ratio, so only clearly normal ones
        # vote; a batch with none (every row certain) cannot reveal c and passes
        positive = (grad > 0) & (probs > finfo.tiny / finfo.eps)
        # masked sums, not boolean indexing: no copy of the selected entries (LLM-sized logits);
        # three numbers read one by one (stacking them costs more than the reads on the CPU)
        row_sum = float(torch.linalg.vector_norm(grad.sum(dim=-1), math.inf))
        grads_sum = float(grad.where(positive, 0).sum())
        probs_sum = float(probs.where(positive, 0).sum())
        if row_sum > precision * expected:
            raise ValueError(
                "the gradient w.r.t. the logits is not that of a softmax cross-entropy loss "
                "(its rows do not sum to zero): use likelihood='categorical' only with "
                "F.cross_entropy on these logits, without label smoothing or extra terms"
            )
        if probs_sum == 0:  # no voting entry (each counted one exceeds tiny / eps > 0)
            return
        inferred = grads_sum / probs_sum
        if math.isclose(inferred, expected, rel_tol=10 * precision):
            return
        other = "sum" if reduction == "mean" else "mean"
        if math.isclose(
            inferred, self.reduction_factor(logits, other, counted), rel_tol=10 * precision
        ):
            raise ValueError(
                f"the loss looks {other}-reduced but the preconditioner was built with "
                f"reduction={reduction!r}: pass reduction={other!r}"
            )
        count, positions = int(counted.sum()), counted.numel()
        raise ValueError(
            "the gradient w.r.t. the logits does not match F.cross_entropy with "
            f"reduction={reduction!r} over the {count} of {positions} positions whose logits "
            f"receive a gradient (inferred scale {inferred:.3g}, expected {expected:.3g}): the "
            "loss must be exactly the cross-entropy of these logits, averaged over the labels "
            "that count (ignored ones marked by ignore_index, e.g. -100), not divided by a "
            "count from elsewhere (such as HuggingFace's num_items_in_batch over accumulated "
            "batches: use reduction='sum' with the sum of the token losses instead)"
        )


class Gaussian(Likelihood):
    """Gaussian with fixed variance: ``l_n = ||z_n - y_n||^2 / (2 variance)``.

    The default ``variance = 0.5`` gives ``||z_n - y_n||^2``, i.e. ``F.mse_loss`` (whose mean
    divides by ``N * D``). ``variance = 1`` gives the least-squares loss ``½ (z - y)^2`` of
    Wu et al. 2024, sec. 2. Output Hessian ``I / variance``.
    """

    name = "gaussian"

    def __init__(self, variance: float = 0.5) -> None:
        if not variance > 0:
            raise ValueError(f"variance must be positive, got {variance}")
        self.variance = float(variance)

    def reduction_factor(
        self, logits: Tensor, reduction: str, counted: Tensor | None = None
    ) -> float:
        check_reduction(reduction)
        return 1.0 / logits.numel() if reduction == "mean" else 1.0

    def sampled_output_grads(
        self, logits: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        # y = z + sqrt(variance) eps, so d l / d z = (z - y) / variance = -eps / sqrt(variance)
        noise = torch.randn(
            (num_samples, *logits.shape),
            generator=generator,
            dtype=logits.dtype,
            device=_device_of(generator, logits),
        ).to(logits.device)
        return -noise / math.sqrt(self.variance)

    def hessian_sqrt(self, logits: Tensor) -> Tensor:
        _two_dimensional(logits, self.name)
        num, dim = logits.shape
        eye = torch.eye(dim, dtype=logits.dtype, device=logits.device) / math.sqrt(self.variance)
        return eye.unsqueeze(1).expand(dim, num, dim).clone()

    def hessian_vector_product(self, logits: Tensor, vectors: Tensor) -> Tensor:
        """``v / variance`` at every row (the output Hessian is a multiple of ``I``), without
        the ``D x N x D`` square root."""
        _two_dimensional(logits, self.name)
        return vectors / self.variance


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs: ``F.binary_cross_entropy_with_logits``.

    Output Hessian ``diag(sigma(z)(1 - sigma(z)))``; mean reduction divides by ``N * D``.
    """

    name = "bernoulli"

    def reduction_factor(
        self, logits: Tensor, reduction: str, counted: Tensor | None = None
    ) -> float:
        check_reduction(reduction)
        return 1.0 / logits.numel() if reduction == "mean" else 1.0

    def sampled_output_grads(
        self, logits: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        probs = torch.sigmoid(logits.detach())
        expanded = probs.unsqueeze(0).expand(num_samples, *probs.shape)
        labels = torch.bernoulli(
            expanded.to(_device_of(generator, probs)), generator=generator
        ).to(probs.device)
        return probs.unsqueeze(0) - labels

    def check_output_grad(
        self,
        logits: Tensor,
        output_grad: Tensor,
        reduction: str,
        counted: Tensor | None = None,
        factor: float | None = None,
    ) -> None:
        """Check that the implied targets ``y = sigma(z) - g / c`` lie in ``[0, 1]``.

        A gradient ``g = c (sigma(z) - y)`` of ``F.binary_cross_entropy_with_logits`` implies
        its targets; outside ``[0, 1]`` (beyond round-off) the loss is another one (a
        ``pos_weight``, extra terms) or its reduction is not the declared one. A necessary
        condition only: a mean-reduced loss declared as ``"sum"`` implies targets close to
        ``sigmoid(z)`` and passes.
        """
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.sigmoid(logits.detach().to(dtype))
        grad = output_grad.detach().to(dtype)
        tolerance = 1e-4 + 8 * torch.finfo(logits.dtype).eps

        targets = probs - grad / self.reduction_factor(logits, reduction)
        if bool(((targets >= -tolerance) & (targets <= 1 + tolerance)).all()):
            return
        hint = "reduction='sum' for a summed loss" if reduction == "mean" else "reduction='mean'"
        raise ValueError(
            "the gradient w.r.t. the logits is not that of F.binary_cross_entropy_with_logits "
            f"with reduction={reduction!r}: the targets it implies, sigmoid(z) - grad / c, lie "
            f"outside [0, 1]. Pass the reduction your loss uses ({hint}) and use "
            "likelihood='bernoulli' only with that loss on these logits, without pos_weight, "
            "per-element weights or extra terms"
        )

    def hessian_sqrt(self, logits: Tensor) -> Tensor:
        _two_dimensional(logits, self.name)
        probs = torch.sigmoid(logits.detach())
        dim = probs.shape[1]
        std = (probs * (1 - probs)).sqrt()
        eye = torch.eye(dim, dtype=probs.dtype, device=probs.device)
        return eye.unsqueeze(1) * std.unsqueeze(0)

    def hessian_vector_product(self, logits: Tensor, vectors: Tensor) -> Tensor:
        """``diag(p (1 - p)) v`` at every row, without the ``D x N x D`` square root (for an
        autoencoder's 784 outputs and a batch of 100 that root holds 61 million numbers)."""
        _two_dimensional(logits, self.name)
        probs = torch.sigmoid(logits.detach())
        return probs * (1 - probs) * vectors


def _softmax_hessian_root(probs: Tensor) -> Tensor:
    """``S`` with ``S S^T = diag(p) - p p^T`` for every row ``p`` of ``probs`` ``(..., C)``:
    ``(..., C, C - 1)``, ``diag(q)`` times the columns of the Householder reflection of
    ``q = sqrt(p)`` onto ``-e_j`` other than ``j`` (:class:`Categorical`); ``(..., 1, 1)``
    zeros for one class."""
    classes = probs.shape[-1]
    roots = probs.sqrt()
    if classes == 1:
        return (roots - 1).unsqueeze(-1)  # sqrt(1) - 1: the zero Hessian of one class
    top = roots.argmax(dim=-1, keepdim=True)
    reflected = roots.scatter_add(-1, top, torch.ones_like(top, dtype=roots.dtype))  # v
    beta = 1 / (1 + roots.gather(-1, top))
    others = torch.arange(classes - 1, device=probs.device)
    kept = others + (others >= top).to(others.dtype)  # the columns i != j, (..., C - 1)
    identity = (
        torch.arange(classes, device=probs.device).unsqueeze(-1) == kept.unsqueeze(-2)
    ).to(roots.dtype)
    columns = identity - (beta * reflected).unsqueeze(-1) * reflected.gather(-1, kept).unsqueeze(-2)
    return roots.unsqueeze(-1) * columns


def _device_of(generator: torch.Generator | None, tensor: Tensor) -> torch.device:
    """Where to sample: on the generator's device (natgrad's is a CPU generator, so a run
    samples the same labels on any device), on the tensor's without a generator."""
    return tensor.device if generator is None else generator.device


def _two_dimensional(logits: Tensor, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"the exact Fisher of likelihood={name!r} needs outputs of shape (N, D), got "
            f"{tuple(logits.shape)}: token-level outputs (N, T, C) are supported for "
            "likelihood='categorical'; use fisher='mc' or reshape the outputs"
        )


LIKELIHOODS: dict[LikelihoodName, type[Likelihood]] = {
    "categorical": Categorical,
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
}


def get_likelihood(likelihood: LikelihoodName | Likelihood) -> Likelihood:
    """Return a :class:`Likelihood` from its name or pass an instance through."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"unknown likelihood {likelihood!r}: choose one of {sorted(LIKELIHOODS)} "
            "or pass a natgrad.likelihoods.Likelihood instance"
        )
    return LIKELIHOODS[likelihood]()


__all__ = [
    "DATAPOINTS",
    "LIKELIHOODS",
    "REDUCTIONS",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "LikelihoodName",
    "Reduction",
    "check_logits",
    "check_reduction",
    "get_likelihood",
]
