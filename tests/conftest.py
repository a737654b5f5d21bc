"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype, restoring the previous default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite's problems are tiny: one intra-op thread is as fast on an idle machine and
    avoids thread-pool contention on a busy one (two threads made tests 20x slower on two
    shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures natgrad saves, kept open so a test can read the data they show.

    natgrad's plotting functions save a figure and then ``plt.close(figure)``; here that close
    records the figure instead (all are closed after the test).
    """
    plt = pytest.importorskip("natgrad.lab.plotting").pyplot()
    close, kept = plt.close, []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


def pytest_collection_modifyitems(items):
    """The tests reading test_distributed.py's ``ranks`` fixture wait for its two spawned gloo
    processes: slow, and ``flaky_launch`` (a start-up failure of the spawn was seen once)."""
    for item in items:
        if "ranks" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.flaky_launch)
