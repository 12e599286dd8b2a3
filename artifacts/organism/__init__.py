"""The shipped organism checkpoint as package data (``workbench.organism_checkpoint`` in a wheel)."""
