"""The engine: loading models, chat templates, protocols and tasks, and the :class:`~workbench.engine.session.Session`
that runs samples through rounds (KV cache carried, activations captured, per-round uncertainty).

Imports: :mod:`workbench.store`, :mod:`workbench.organism` (its world and task), :mod:`workbench.errors`.
Nothing here imports probes, the cache, analysis or the TUI. See docs/ARCHITECTURE.md.
"""
