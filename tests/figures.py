"""Reading what a saved figure shows (with the ``saved_figures`` fixture of conftest.py)."""

from __future__ import annotations


def line_data(axis) -> dict[str, tuple[list[float], list[float]]]:
    """``label -> (x, y)`` of every labelled line drawn on a matplotlib axis."""
    return {
        line.get_label(): (
            [float(x) for x in line.get_xdata()],
            [float(y) for y in line.get_ydata()],
        )
        for line in axis.get_lines()
        if not line.get_label().startswith("_")
    }
