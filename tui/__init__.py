"""The Textual app of the workbench (browsing a run file, stepping through rounds).

Depends on ``probes`` and ``workbench`` core, never the other way round (DESIGN §2).
"""
