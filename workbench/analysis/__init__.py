"""What a run shows: per-round summaries and convergence, ``analyze`` (intervals, correlations, the
organism's truth), the HTML/PNG report, the Bayesian theory, and fine-tuning sample selection.

Imports: :mod:`probes`, :mod:`workbench.engine`, :mod:`workbench.store`, :mod:`workbench.organism`.
"""
