"""The SGD reference of the step-time benchmarks (``benchmarks/step_time.py``).

With ``--reference own-process`` the SGD copy runs in a child process that steps whenever the
worker sends it a batch. The child must get its own copies of the weights and batches (not the
worker's tensors moved into shared memory), a child that fails must stop the worker with an
error instead of leaving it waiting, and the mode is refused where two processes' OpenMP
threads would compete for the cores.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_time  # the benchmark script, importable from its directory


def unbuildable_model():
    """A model builder that fails in the reference process."""
    raise ValueError("this model cannot be built")


def test_the_reference_process_steps_on_its_own_copies():
    model = step_time.make_model()
    draw = step_time.random_batches(4)
    state = model.state_dict()
    with step_time.sgd_reference(
        step_time.make_model, state, 1e-3, 1, "thread", "own-process"
    ) as sgd_step:
        batch = draw()
        seconds, faults = sgd_step(batch)
        seconds_again, _ = sgd_step(draw())
    assert seconds > 0 and seconds_again > 0 and faults >= 0
    assert not any(param.is_shared() for param in model.parameters())
    assert not any(tensor.is_shared() for tensor in batch)


class StillWaiting(Exception):
    """Raised by the alarm: the worker still waits for a reference process that failed (not an
    ``OSError``, which the harness would take for the pipe closing)."""


def test_a_failing_reference_process_raises_instead_of_hanging():
    def waited_too_long(signum, frame):
        raise StillWaiting

    draw = step_time.random_batches(4)
    previous = signal.signal(signal.SIGALRM, waited_too_long)
    signal.alarm(60)
    try:
        with pytest.raises(RuntimeError, match="SGD reference process ended"):
            with step_time.sgd_reference(
                unbuildable_model, {}, 1e-3, 1, "thread", "own-process"
            ) as sgd_step:
                sgd_step(draw())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_reference_runs_in_its_own_process_only_at_one_thread():
    assert step_time.reference_place(None, 1) == "own-process"
    assert step_time.reference_place(None, 2) == "same-process"
    assert step_time.reference_place("same-process", 1) == "same-process"
    with pytest.raises(ValueError, match="own-process needs --threads 1"):
        step_time.reference_place("own-process", 2)
