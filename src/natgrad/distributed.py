"""Data-parallel natgrad on ``torch.distributed``: what each mode computes and sends.

Objective
---------
Rank ``r`` of ``R`` holds ``n_r`` datapoints and back-propagates its own loss
``L_r = c_r sum_{n in r} l_n`` (``c_r = 1 / n_r`` for a mean, ``1`` for a sum; see
:mod:`natgrad.precond.base`). natgrad's global objective is the mean over ranks,

    ``L = (1 / R) sum_r L_r``,

the objective whose gradient DistributedDataParallel's all-reduce computes: datapoint ``n`` of
rank ``r`` has the weight ``c_r / R``. With a mean loss and equal shards (what
``DistributedSampler`` gives) this is the mean loss of the concatenated batch, so a distributed
step equals the single-process step on all ``sum_r n_r`` datapoints. With a sum loss it is
``1 / R`` times the summed loss: the single-process update with damping ``R λ``. With a mean
loss and unequal shards, datapoints of smaller shards weigh more, exactly as in DDP's gradient.
The curvature always belongs to the same weighted loss, ``C = sum_n (c_n / R) (rows of n)``.

Modes (``distributed=`` of every preconditioner)
------------------------------------------------
``"auto"`` (default)
    ``"global"`` if ``torch.distributed`` is initialised when the preconditioner is built,
    else ``"off"``.
``"off"``
    no communication: every process is on its own.
``"global"``
    every rank computes the update of the global objective, identical on all ranks:

    * Woodbury family (NGD of every Fisher type, EF, iEF, TENGraD): each rank all-gathers the
      neuron-view rows of every block (inputs ``A``, true-label output gradients ``E``, the
      extra datapoint rows of ``mc`` / ``exact``, the materialised per-sample rows of
      normalisation layers and fallback tensors) and the per-datapoint logits gradients
      (which carry the iEF scalars), then solves the one global system. Shards of different
      sizes are padded to the largest for the gather and cut back after it; token dimensions
      of different lengths are zero-padded, which adds nothing to any gradient. An
      embedding's token indices travel in the rows' floating type, exact up to ``2^24``
      (float32) or ``2^53`` (float64): vocabularies beyond 16.7 million words need float64.
    * KFAC, FOOF: the per-step batch statistics (``Σ_A``, ``Σ_G`` of the current batch) are
      averaged, by averaging the factors right after they are folded in (the moving averages
      are linear and were identical; in the background on steps without inversion), so
      factors and inverses are identical on all ranks; ``spread_inversions=True`` deals the
      inversions out over the ranks by cost and broadcasts the inverses;
      each rank applies the inverse to its own low-rank gradient and the preconditioned
      directions are averaged. The inverse is linear and the same on every rank, so this
      equals averaging the gradient first and preconditioning it second, and it keeps the
      ``~N d^2`` low-rank application.
    * FishLeg: the layer gradients (``momentum_on="gradient"``) or the fresh directions
      ``Q g`` (``"update"``, plus the gradients on auxiliary steps, for the probe) are
      averaged before momentum, and the auxiliary gradients before Adam, so ``Q(λ)``, the
      momentum and Adam's state are identical on all ranks.
``"local"`` (Woodbury family only)
    each rank solves the system of its own shard and the ranks average the directions:
    ``(1 / R) sum_r (C_r + λI)^{-1} g_r``. One all-reduce of the parameter size, as DDP's,
    instead of an all-gather of the rows and an ``(sum_r n_r)``-sized solve; not the natural
    gradient of the global batch.

In every active mode natgrad also averages the plain gradients of the parameters it does not
precondition, and all ranks agree before each step on whether it is finite, so a NaN on one
rank skips the step everywhere. Label sampling (``fisher="mc"``) draws, at step ``t`` on rank
``r``, from a generator seeded with :func:`step_seed` ``(seed, r, t)``: independent across
ranks, reproducible from the one ``seed``, and resumable from any rank's ``state_dict``.

DistributedDataParallel
-----------------------
natgrad computes every preconditioned direction from the captured rows, never from ``.grad``,
and averages the plain gradients itself, so its result does not depend on whether DDP has
all-reduced ``.grad``: DDP's own gradient all-reduce is redundant traffic. Pass the DDP
wrapper to the preconditioner (the hooks go on the wrapped module; parameter names, and so
state dicts, are those of the wrapped module) and, to skip that traffic, run the forward and
backward passes inside ``ddp_model.no_sync()``, which the fused path ``pre.backward(loss)``
requires (it does not produce the weight gradients DDP waits for).
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class RowBlock(Protocol):
    """What the all-gather needs of a curvature block (:mod:`natgrad.precond.blocks`)."""

    name: str

    def row_tensors(self) -> list[tuple[Tensor, int, int | None]]:
        """The block's row tensors with their datapoint and (optional) token dimensions."""
        ...

    def with_rows(self, tensors: Sequence[Tensor]) -> RowBlock:
        """The same block around other row tensors (the rows of all ranks)."""
        ...


BlockT = TypeVar("BlockT", bound=RowBlock)

DistributedMode = Literal["auto", "off", "global", "local"]
DISTRIBUTED_MODES: tuple[DistributedMode, ...] = get_args(DistributedMode)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers (in any
    nesting), or ``model`` itself."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded by torch.compile
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank``'s label sampling at step ``step`` (a 64-bit integer).

    Derived by :class:`numpy.random.SeedSequence` from the three numbers, so the streams of
    different ranks and steps are independent and any step can be reproduced from ``seed``.
    """
    entropy = [seed % 2**64, rank, step]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def check_fused_backward(model: nn.Module) -> None:
    """Raise if ``model`` is a DDP wrapper that expects to all-reduce weight gradients.

    ``Preconditioner.backward`` stops autograd at the layer outputs, so DDP's reducer would
    wait forever for the weight gradients of the captured layers.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) and model.require_backward_grad_sync:
        raise RuntimeError(
            "pre.backward(loss) does not produce the weight gradients DistributedDataParallel "
            "all-reduces: run the forward and backward passes inside `with ddp_model.no_sync():` "
            "(natgrad does all the communication it needs), or use loss.backward()"
        )


class Communicator:
    """The collectives of one preconditioner, and the bytes they carry.

    Parameters
    ----------
    mode
        One of :data:`DISTRIBUTED_MODES` (module docstring).
    process_group
        The group to communicate in; ``None`` is the default group.
    supported
        The active modes the preconditioner implements, the first being what ``"auto"``
        chooses.
    method
        The preconditioner's name, for error messages.
    device
        Where the small tensors of the collectives live: the model's device (CUDA tensors for
        the NCCL backend).

    Attributes
    ----------
    mode
        ``"off"``, ``"global"`` or ``"local"`` (``"auto"`` resolved).
    rank, world_size
        This process's rank in the group and the group size (0 and 1 when off).
    traffic
        Bytes this rank has contributed to collectives so far, by purpose (``"consensus"``,
        ``"rows"``, ``"factors"``, ``"inverses"``, ``"gradients"``, ``"directions"``,
        ``"aux"``, ``"checks"``): the size of the tensor it passes to each all-reduce, of its
        (padded) part of each all-gather, or of what it broadcasts as the source.
    """

    def __init__(
        self,
        mode: DistributedMode,
        process_group: ProcessGroup | None,
        supported: Sequence[str],
        method: str,
        device: torch.device | None = None,
    ) -> None:
        if mode not in DISTRIBUTED_MODES:
            raise ValueError(f"unknown distributed={mode!r}: choose one of {DISTRIBUTED_MODES}")
        if mode not in ("auto", "off", *supported):
            raise ValueError(
                f"{method} supports distributed in {('auto', 'off', *supported)}, got {mode!r}"
            )
        initialised = dist.is_available() and dist.is_initialized()
        self.requested = mode
        self.mode = (supported[0] if initialised else "off") if mode == "auto" else mode
        if self.mode != "off" and not initialised:
            raise RuntimeError(
                f"distributed={mode!r} needs torch.distributed: call "
                "torch.distributed.init_process_group(...) before building the preconditioner, "
                "or pass distributed='off'"
            )
        if self.mode == "off" and process_group is not None:
            raise ValueError(
                "a process_group was given but the preconditioner does not communicate "
                f"(distributed={mode!r}, torch.distributed initialised: {initialised})"
            )
        self.group = process_group
        self.device = device
        self.rank = dist.get_rank(process_group) if self.active else 0
        self.world_size = dist.get_world_size(process_group) if self.active else 1
        self.traffic: dict[str, int] = {}

    @property
    def active(self) -> bool:
        """Whether this preconditioner communicates."""
        return self.mode != "off"

    # ------------------------------------------------------------------ checks
    def check_mode(self) -> None:
        """Raise if ``"auto"`` chose ``"off"`` but several processes now form a group.

        Replicas that precondition on their own shards drift apart without an error, so a
        process group initialised after the preconditioner was built is refused.
        """
        if (
            self.requested == "auto"
            and self.mode == "off"
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            raise RuntimeError(
                "torch.distributed was initialised after the preconditioner was built, so "
                "distributed='auto' chose not to communicate and the replicas would drift "
                "apart: build the preconditioner after init_process_group, or pass "
                "distributed='off' to train every process on its own"
            )

    def check_replicas(self, description: str, params: Sequence[Tensor]) -> None:
        """Raise on every rank if the ranks' models or settings differ.

        Compares a hash of ``description`` (method, settings, preconditioned modules) and of the
        parameter shapes and dtypes, then the sum and the sum of squares of the parameter
        values: replicas must start from the same parameters.
        """
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", description)  # addresses of callables
        text += "".join(f"|{tuple(p.shape)}:{p.dtype}" for p in params)
        digest = hashlib.sha256(text.encode()).digest()
        # 48-bit pieces of the hash are exact in float64
        words = [float(int.from_bytes(digest[i : i + 6], "little")) for i in range(0, 24, 6)]
        moments = sum(
            (torch.stack([q.sum(), q.pow(2).sum()]) for q in (p.detach().double() for p in params)),
            torch.zeros(2, dtype=torch.float64, device=self.device),
        )
        rows = self._all_gather(self.small([*words, *moments.tolist()]), "checks")
        differing = [q for q in range(self.world_size) if not torch.equal(rows[q, :4], rows[0, :4])]
        if differing:
            raise ValueError(
                f"ranks {differing} build a different model or preconditioner than rank 0 "
                f"(method, settings, preconditioned modules or parameter shapes; rank {self.rank}: "
                f"{text[:300]}): every rank must build the same model and the same preconditioner"
            )
        scale = 1e-9 * (1 + rows[:, 4:].abs().max())
        if bool(((rows[:, 4:] - rows[0, 4:]).abs() > scale).any()):
            raise ValueError(
                "the ranks' models hold different parameter values: build the preconditioner "
                "after the replicas are synchronised (DistributedDataParallel broadcasts rank "
                "0's parameters when it wraps the model; without it, broadcast them with "
                "torch.distributed.broadcast or seed every rank identically)"
            )

    def check_same_count(self, count: int, what: str) -> None:
        """Raise on every rank unless all ranks pass the same ``count``."""
        counts = self._all_gather(self.small([count]), "checks")
        if not bool((counts == counts[0]).all()):
            raise ValueError(
                f"the ranks disagree on the number of {what}: {counts[:, 0].long().tolist()}"
            )

    # ------------------------------------------------------------------ collectives
    def agree(
        self, finite: bool, blocks: Mapping[str, bool], grads: Sequence[bool]
    ) -> tuple[bool, list[bool]]:
        """One small all-reduce before a step: finiteness, blocks present, plain gradients.

        Parameters
        ----------
        finite
            Whether this rank's logits, loss gradient and captured rows are finite.
        blocks
            ``{block name: whether it took part in this rank's loss}``; a block must take part
            on all ranks or on none.
        grads
            Whether each plain parameter has a ``.grad`` on this rank.

        Returns
        -------
        tuple
            Whether every rank is finite, and per plain parameter whether any rank has a
            gradient for it (those are averaged, a missing one counting as zero).
        """
        if not self.active:
            return finite, list(grads)
        counts = self.all_reduce_sum(self.small([finite, *blocks.values(), *grads]), "consensus")
        partial = [
            name
            for name, count in zip(blocks, counts[1 : 1 + len(blocks)].tolist(), strict=True)
            if 0 < count < self.world_size
        ]
        if partial:
            raise ValueError(
                f"the modules {partial} took part in the loss on some ranks only: every rank "
                "must run the same modules (or override them to 'plain_gradient')"
            )
        return counts[0].item() == self.world_size, [c > 0 for c in counts[1 + len(blocks) :]]

    def average_(self, tensors: Sequence[Tensor], purpose: str, ok: bool = True) -> bool:
        """Average ``tensors`` over the ranks in place (one all-reduce per dtype).

        ``ok`` rides along: the result says whether it was true on every rank. Without
        communication the tensors are left alone and ``ok`` is returned.
        """
        if not self.active:
            return ok
        return self._start_average(tensors, purpose, ok, asynchronous=False).wait()

    def start_average(self, tensors: Sequence[Tensor], purpose: str) -> PendingAverage | None:
        """Start averaging ``tensors`` without waiting (``async_op``); ``None`` when off.

        The tensors keep their own values until :meth:`PendingAverage.wait` copies the averages
        into them, so the caller may go on reading them, and must wait before writing them.
        """
        if not self.active:
            return None
        return self._start_average(tensors, purpose, True, asynchronous=True)

    def _start_average(
        self, tensors: Sequence[Tensor], purpose: str, ok: bool, asynchronous: bool
    ) -> PendingAverage:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        if not by_dtype:
            by_dtype[torch.float64] = []
        reductions = []
        for index, group in enumerate(by_dtype.values()):
            parts = [t.reshape(-1) for t in group]
            if index == 0:  # the flag rides in the first buffer
                parts.append(self.small([ok]).to(group[0].dtype if group else torch.float64))
            buffer = torch.cat(parts)
            self._record(purpose, buffer)
            work = dist.all_reduce(buffer, group=self.group, async_op=asynchronous)
            reductions.append((group, buffer, work))
        return PendingAverage(reductions, self.world_size)

    def broadcast_(self, tensor: Tensor, source: int, purpose: str) -> None:
        """Overwrite ``tensor`` on every rank with rank ``source``'s (in the group's ranks)."""
        if self.rank == source:
            self._record(purpose, tensor)
        global_source = source if self.group is None else dist.get_global_rank(self.group, source)
        dist.broadcast(tensor, src=global_source, group=self.group)

    def gather(
        self, batches: Sequence[BlockT], factor: float, per_sample_output_grad: Tensor
    ) -> tuple[list[BlockT], Tensor, Tensor]:
        """All-gather the rows of every block: the blocks of the global batch (``"global"``).

        Parameters
        ----------
        batches
            This rank's blocks, in model order (the same blocks on every rank).
        factor
            This rank's reduction factor ``c_r``.
        per_sample_output_grad
            ``d l_n / d z_n`` of this rank's datapoints, ``(n_r, C)``.

        Returns
        -------
        tuple
            The blocks with the rows of all ranks concatenated in rank order, the datapoint
            weights ``c_r / R`` ``(sum_r n_r,)`` and the concatenated logits gradients.
        """
        entries = [(per_sample_output_grad, 0, None, "the logits' gradient")]
        for batch in batches:
            entries += [(*row, f"the rows of '{batch.name}'") for row in batch.row_tensors()]
        header = [factor]
        for tensor, *_ in entries:
            header += [tensor.dim(), *tensor.shape, *[0] * (4 - tensor.dim())]
        headers = self._all_gather(self.small(header), "rows")
        shapes = [
            [
                tuple(int(d) for d in row[2 + 5 * i : 2 + 5 * i + int(row[1 + 5 * i])])
                for i in range(len(entries))
            ]
            for row in headers.tolist()
        ]
        dtype = per_sample_output_grad.dtype
        sizes = [sum(math.prod(shape) for shape in rank_shapes) for rank_shapes in shapes]
        buffer = per_sample_output_grad.new_zeros(max(sizes))
        buffer[: sizes[self.rank]] = torch.cat([t.reshape(-1).to(dtype) for t, *_ in entries])
        received = self._all_gather(buffer, "rows")
        parts = [
            [
                part.reshape(shape)
                for part, shape in zip(
                    received[q, : sizes[q]].split([math.prod(s) for s in shapes[q]]),
                    shapes[q],
                    strict=True,
                )
            ]
            for q in range(self.world_size)
        ]
        gathered = [
            _concatenate([rank_parts[i] for rank_parts in parts], *entry[1:]).to(entry[0].dtype)
            for i, entry in enumerate(entries)
        ]
        weights = torch.cat(
            [
                per_sample_output_grad.new_full((shapes[q][0][0],), headers[q, 0].item())
                for q in range(self.world_size)
            ]
        )
        rebuilt, position = [], 1
        for batch in batches:
            count = len(batch.row_tensors())
            rebuilt.append(batch.with_rows(gathered[position : position + count]))
            position += count
        return rebuilt, weights / self.world_size, gathered[0]

    # ------------------------------------------------------------------ internals
    def small(self, values: Sequence[float]) -> Tensor:
        """A float64 tensor of a few numbers (flags, shapes, hashes) on the model's device."""
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)

    def _record(self, purpose: str, tensor: Tensor) -> None:
        self.traffic[purpose] = (
            self.traffic.get(purpose, 0) + tensor.numel() * tensor.element_size()
        )

    def all_reduce_sum(self, tensor: Tensor, purpose: str) -> Tensor:
        """Sum ``tensor`` over the ranks in place."""
        self._record(purpose, tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def _all_gather(self, tensor: Tensor, purpose: str) -> Tensor:
        """``(R, *tensor.shape)``: every rank's tensor (all of the same shape)."""
        self._record(purpose, tensor)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.stack(parts)


class PendingAverage:
    """An average over the ranks under way (:meth:`Communicator.start_average`)."""

    def __init__(self, reductions: list[tuple[list[Tensor], Tensor, object]], world_size: int):
        self._reductions = reductions
        self._world_size = world_size

    def wait(self) -> bool:
        """Wait for the all-reduces, copy the averages into the tensors; whether the flag that
        rode along was true on every rank."""
        all_ok = True
        for index, (group, summed, work) in enumerate(self._reductions):
            if work is not None:
                work.wait()
            if index == 0:
                all_ok = summed[-1].item() == self._world_size
            summed /= self._world_size
            offset = 0
            for tensor in group:
                tensor.copy_(summed[offset : offset + tensor.numel()].view(tensor.shape))
                offset += tensor.numel()
        return all_ok


def _concatenate(parts: list[Tensor], dim: int, token_dim: int | None, label: str) -> Tensor:
    """Concatenate the ranks' parts along the datapoint dimension ``dim``, zero-padding the
    token dimension to the longest (a zero row adds nothing to a gradient)."""
    shapes = [list(part.shape) for part in parts]
    for axis in range(len(shapes[0])):
        if axis in (dim, token_dim):
            continue
        if len({shape[axis] for shape in shapes}) > 1:
            raise ValueError(
                f"the ranks disagree on the shape of {label}: {[tuple(s) for s in shapes]}"
            )
    if token_dim is not None:
        length = max(shape[token_dim] for shape in shapes)
        padded = []
        for part in parts:
            if part.shape[token_dim] < length:
                shape = list(part.shape)
                shape[token_dim] = length - part.shape[token_dim]
                part = torch.cat([part, part.new_zeros(shape)], dim=token_dim)
            padded.append(part)
        parts = padded
    return torch.cat(parts, dim=dim)


__all__ = [
    "DISTRIBUTED_MODES",
    "Communicator",
    "DistributedMode",
    "PendingAverage",
    "check_fused_backward",
    "step_seed",
    "unwrap",
]
