"""Exact per-sample gradients of any trainable tensor by torch.func: the generic fallback.

Some trainable tensors have no neuron-view structure natgrad knows: a free prompt
``nn.Parameter`` concatenated to the input, the parameters of a custom module, a weight shared
between two layers. Prompt tuning, where the trainable prompt vectors are the only parameters
(Wu et al. 2024, sec. 6-7: iEF on prompt tuning and LoRA), needs exactly these. For them natgrad
re-runs the model one datapoint at a time (``torch.func.vmap`` over the batch of
``functional_call``) and pulls the datapoints' output vectors back with ``torch.func.vjp``,
restricted to the fallback tensors:

    ``g_{kn} = J_n^T v_{kn}``,    ``J_n = d z_n / d θ_fallback``,

rows of shape ``(K, N, P_b)`` (``K`` output vectors per datapoint: the true-label loss
gradient, sampled labels or Hessian square-root columns), which the Woodbury solvers add to the
Gram ``G_b G_b^T`` (:class:`natgrad.precond.blocks.DirectBatch`). The cost is one more forward
pass and ``K`` vector-Jacobian products. The memory is the rows, ``K N P_b``, proportional to
the fallback parameters, plus the activations of the re-run: ``chunk_size`` datapoints are
re-run at a time (``vmap(..., chunk_size=...)``, default 32), so that part is bounded by the
activations of ``chunk_size`` datapoints whatever the batch size (``None``: the whole batch at
once). Chunks of 32 took no longer than the whole batch in ``benchmarks/fallback_memory.py``
and cut the step's peak memory up to 4x on the largest body there; chunks of 8 cut it 16x and
took up to 1.75x as long on the smallest body (docs/performance.md).

A per-sample gradient exists only when each datapoint's output depends on its own input alone.
natgrad checks this on every step: no BatchNorm may normalise with batch statistics (train
mode), the re-run must reproduce the batch's logits, every operation must have a vmap rule
(a custom ``torch.autograd.Function`` needs ``setup_context`` and a vmap rule), and the forward
pass must draw no random numbers (dropout in train mode would draw other masks). Otherwise a
``ValueError`` names the modules and the override (``overrides={name: "plain_gradient"}``)
that leaves them to the plain gradient.

Batched arguments: every tensor argument of the model (positional or keyword) whose first
dimension has the batch size is split into datapoints; other arguments are passed whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from natgrad.capture import model_logits

DEFAULT_CHUNK_SIZE = 32
"""Datapoints the fallback re-runs at a time unless told otherwise."""


class Fallback:
    """Per-sample gradient rows of the fallback tensors of one model.

    Parameters
    ----------
    model
        The model, called as during training.
    groups
        The fallback tensors by owning module name (one Woodbury block per module for
        ``structure="layer"``): ``{module_name: {parameter_name: parameter}}``, with parameter
        names as in ``model.named_parameters()``.
    chunk_size
        Datapoints re-run at a time; ``None`` re-runs the whole batch at once.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, Mapping[str, nn.Parameter]],
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.model = model
        self.chunk_size = chunk_size
        self.groups = {name: dict(params) for name, params in groups.items()}
        modules = dict(model.named_modules())
        self._labels = ", ".join(
            f"'{name or '<root>'}' ({type(modules[name]).__name__}: {', '.join(params)})"
            for name, params in self.groups.items()
        )
        self._override = (
            "{" + ", ".join(f"{name!r}: 'plain_gradient'" for name in self.groups) + "}"
        )

    def rows(
        self, args: tuple, kwargs: dict, vectors: Tensor, expected_output: Tensor
    ) -> dict[str, Tensor]:
        """Per-sample gradients of each group, ``{module_name: (K, N, P_b)}``.

        Parameters
        ----------
        args, kwargs
            The model's arguments in the captured forward pass.
        vectors
            ``(K, N, C)``: the output vectors to pull back, per datapoint.
        expected_output
            The logits ``(N, C)`` of the captured forward pass, which the re-run must
            reproduce.
        """
        batch_statistics = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None)
        ]
        if batch_statistics:
            raise self._error(
                f"the BatchNorm modules {batch_statistics} normalise with batch statistics "
                "(train mode), which couple the datapoints; call model.eval() for them"
            )
        weights = {
            name: param.detach()
            for params in self.groups.values()
            for name, param in params.items()
        }
        num = vectors.shape[1]
        arg_dims = tuple(_batch_dim(a, num) for a in args)
        kwarg_dims = {key: _batch_dim(value, num) for key, value in kwargs.items()}

        def per_datapoint(batched_vectors: bool) -> Callable:
            def one_datapoint(sample_args: tuple, sample_kwargs: dict, sample_vectors: Tensor):
                call_args = tuple(
                    _as_batch(a, d) for a, d in zip(sample_args, arg_dims, strict=True)
                )
                call_kwargs = {k: _as_batch(v, kwarg_dims[k]) for k, v in sample_kwargs.items()}

                def output(params: dict[str, Tensor]) -> Tensor:
                    returned = functional_call(self.model, params, call_args, call_kwargs)
                    return model_logits(returned).squeeze(0)

                value, pullback = vjp(output, weights)
                if batched_vectors:
                    (grads,) = vmap(pullback)(sample_vectors)
                else:  # one vector at a time
                    pulled = [pullback(vector)[0] for vector in sample_vectors]
                    grads = {name: torch.stack([g[name] for g in pulled]) for name in weights}
                return value, grads

            return vmap(
                one_datapoint,
                in_dims=(arg_dims, kwarg_dims, 1),
                randomness="error",
                chunk_size=self.chunk_size,
            )

        try:
            with torch.no_grad():
                try:
                    outputs, grads = per_datapoint(True)(args, kwargs, vectors)
                except RuntimeError as error:
                    # some backward formulas (PReLU's) have no rule for a second vmap level
                    if vectors.shape[0] == 1 or "random operation" in str(error):
                        raise
                    outputs, grads = per_datapoint(False)(args, kwargs, vectors)
        except RuntimeError as error:
            if "random operation" in str(error):
                reason = (
                    "its forward pass draws random numbers (e.g. dropout in train mode), which a "
                    "re-run per datapoint cannot reproduce; set their probability to zero or call "
                    "model.eval() for them"
                )
            else:
                reason = f"re-running the model per datapoint failed: {error}"
            raise self._error(reason) from error
        self._check_outputs(outputs, expected_output)
        result = {}
        for module_name, params in self.groups.items():
            flat = [grads[name].reshape(num, vectors.shape[0], -1) for name in params]
            result[module_name] = torch.cat(flat, dim=2).transpose(0, 1)
        return result

    def _check_outputs(self, outputs: Tensor, expected: Tensor) -> None:
        if outputs.shape != expected.shape:
            raise self._error(
                f"the model gives outputs of shape {tuple(outputs.shape[1:])} on one datapoint "
                f"but {tuple(expected.shape[1:])} per datapoint on the batch"
            )
        tolerance = torch.finfo(expected.dtype).eps ** 0.5 * (1 + float(expected.abs().max()))
        difference = float((outputs - expected).abs().max())
        if not difference <= tolerance:
            raise self._error(
                f"run on one datapoint at a time the model does not reproduce its batch output "
                f"(largest difference {difference:.3g}): its datapoints interact (e.g. through "
                "statistics over the batch) or its forward pass is not deterministic"
            )

    def _error(self, reason: str) -> ValueError:
        return ValueError(
            f"natgrad cannot compute per-sample gradients of {self._labels} with its torch.func "
            f"fallback: {reason.rstrip('.')}. Pass overrides={self._override} to train them "
            "with the plain gradient."
        )


def _batch_dim(value: object, num: int) -> int | None:
    """0 for a tensor argument with the batch size first, else None (passed whole)."""
    return 0 if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == num else None


def _as_batch(value: object, dim: int | None) -> object:
    """One datapoint of a batched argument as a batch of one."""
    return value.unsqueeze(0) if dim == 0 else value


__all__ = ["DEFAULT_CHUNK_SIZE", "Fallback"]
