"""The run file: its format, the writer (part files, durable commits, the build), the reader, the lock,
and data-parallel shards and their merge.

Imports only :mod:`workbench.errors` and :mod:`workbench.version` (no torch, no TransformerLens), so the TUI
opens a run in a fraction of a second. See docs/FORMAT.md and docs/ARCHITECTURE.md.
"""
