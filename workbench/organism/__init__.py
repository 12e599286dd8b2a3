"""The organism: a small model the project trains and ships, whose latent concept is known exactly.

* :mod:`.world` – the synthetic world (items, hidden concept, dialogues) and its frozen parameters;
* :mod:`.posterior` – the exact posterior p(z = fair | prefix) and the exact predictive distributions;
* :mod:`.tokenizer` – the word-level tokenizer and chat template;
* :mod:`.train` – training and saving a checkpoint; :mod:`.check` – measuring one against the exact answers;
* :mod:`.task` – ``ORGANISM``, the engine's task; :mod:`.cli` – ``workbench organism sample|train|check``.

This module stays import-light (no torch), so resolving the model name costs nothing.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def organism_path() -> Path:
    """The folder of the shipped checkpoint: the ``workbench.organism_checkpoint`` package data of an
    installed wheel if there is one, else ``<repo>/artifacts/organism``."""
    try:
        folder = resources.files("workbench.organism_checkpoint")
        candidate = Path(str(folder))
        if (candidate / "config.json").is_file():
            return candidate
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "artifacts" / "organism"
