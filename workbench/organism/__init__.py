"""The organism: a small model the project trains and ships, whose latent concept is known exactly.

* :mod:`.world` – the synthetic world (items, hidden concept, dialogues) and its frozen parameters;
* :mod:`.posterior` – the exact posterior p(z = fair | prefix) and the exact predictive distributions;
* :mod:`.tokenizer` – the word-level tokenizer and chat template;
* :mod:`.train` – training and saving a checkpoint; :mod:`.check` – measuring one against the exact answers;
* :mod:`.task` – ``ORGANISM``, the engine's task; :mod:`.cli` – ``workbench organism sample|train|check``;
* :mod:`.picture` – the visual world's pictures; :mod:`.visual` – the visual organism's LLaVA and processor.

This module stays import-light (no torch), so resolving the model name costs nothing.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _checkpoint(package: str, folder: str) -> Path:
    try:
        candidate = Path(str(resources.files(package)))
        if (candidate / "config.json").is_file():
            return candidate
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "artifacts" / folder


def organism_path() -> Path:
    """The folder of the shipped checkpoint: the ``workbench.organism_checkpoint`` package data of an
    installed wheel if there is one, else ``<repo>/artifacts/organism``."""
    return _checkpoint("workbench.organism_checkpoint", "organism")


def organism_visual_path() -> Path:
    """The folder of the shipped visual organism (a LLaVA, ``--model organism-visual``): the
    ``workbench.organism_visual_checkpoint`` package data of an installed wheel if there is one, else
    ``<repo>/artifacts/organism-visual``."""
    return _checkpoint("workbench.organism_visual_checkpoint", "organism-visual")
