"""The shipped visual organism checkpoint as package data (``workbench.organism_visual_checkpoint`` in a wheel)."""
