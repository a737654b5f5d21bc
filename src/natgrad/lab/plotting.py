"""matplotlib for natgrad's figures: imported on demand, with the file-only Agg backend."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (figures are written to files, no display).

    Raises ImportError, naming the extra to install, when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("natgrad's plots need matplotlib: pip install natgrad[plots]") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["pyplot"]
