"""The natgrad lab: experiments built on the library, never imported by it.

Layers, each importing only from the ones above it in this list and from the core ``natgrad``:

* :mod:`~natgrad.lab.plotting`, :mod:`~natgrad.lab.datasets` (offline data sets and the
  synthetic generators), :mod:`~natgrad.lab.models`, :mod:`~natgrad.lab.transformer`;
* :mod:`~natgrad.lab.registry` (optimisers by name), :mod:`~natgrad.lab.runner` (training runs,
  grids, reports), :mod:`~natgrad.lab.sweep` (Optuna studies);
* :mod:`~natgrad.lab.fields`, :mod:`~natgrad.lab.study`, :mod:`~natgrad.lab.reports`
  (measurement studies and their figures);
* :mod:`~natgrad.lab.reproduce` (the papers' claims with verdicts);
* :mod:`~natgrad.lab.cli` (the ``natgrad`` command).

Importing this package loads none of them: import the module you need.
"""
