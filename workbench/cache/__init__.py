"""Full activation caches: ``workbench export`` (recompute a run's transcripts, write every token's
activations), the cache file (read and write), and the SAELens folder format. See docs/CACHE.md.

Imports: :mod:`workbench.engine`, :mod:`workbench.store`, :mod:`workbench.errors`.
"""
