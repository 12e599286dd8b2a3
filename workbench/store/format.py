"""The run file's format: its names, dtypes and standard arrays, and where a run's files are on disk
(``RUN.h5``, and while it runs ``RUN.h5.parts/``, ``RUN.h5.parts.new/``, ``RUN.h5.lock``). docs/FORMAT.md is the
contract; this module holds its constants so every other piece of the store reads them from one place."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np


FORMAT = "self-correction-workbench-run"
SCHEMA_VERSION = 2
POSITIONS = ("last_prompt", "response_mean")

STR = h5py.string_dtype("utf-8")
VLEN_INT = h5py.vlen_dtype(np.dtype("int32"))
VLEN_FLOAT = h5py.vlen_dtype(np.dtype("float32"))

NUL_STAND_IN = "\u2400"  # HDF5 strings cannot hold NUL; text keeps "␀", token ids keep the exact output


# Ragged per-round arrays live in ``tokens/`` (so ``rounds/`` holds only fixed-shape arrays and strings).
TOKEN_ARRAYS = {"response_token_ids": np.int32, "token_entropy": np.float32}
INT_FILL_MINUS_ONE = ("parsed_answer", "option_answer", "answer")
# Arrays every run has, with their trailing dimensions (R rounds, K options): a running run's view
# has them even before its first batch. Task fields (e.g. the organism's) come with the batches.
STANDARD_ARRAYS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "rounds/instruction": (("R",), STR), "rounds/response": (("R",), STR),
    "rounds/prompt_span": (("R", 2), np.int64), "rounds/response_span": (("R", 2), np.int64),
    "rounds/mean_token_entropy": (("R",), np.float32), "rounds/option_probs": (("R", "K"), np.float32),
    "rounds/option_entropy": (("R",), np.float32), "rounds/parsed_answer": (("R",), np.int16),
    "rounds/option_answer": (("R",), np.int16), "rounds/answer": (("R",), np.int16),
    "rounds/chosen_confidence": (("R",), np.float32), "rounds/correct": (("R",), np.uint8),
    "tokens/response_token_ids": (("R",), VLEN_INT), "tokens/token_entropy": (("R",), VLEN_FLOAT),
    "transcripts/token_ids": ((), VLEN_INT),
}

HEADER, ACTIVATIONS, LAYOUT, ASSEMBLING = "run.h5", "activations.h5", "layout.json", "assembling.h5"
BUILT = "built.json"  # parseable exactly while activations.h5 is a consistent HDF5 file; lists the rows it holds
BUILD_ROWS = 256  # finished rows are written into activations.h5 at least this many at a time (or every COMMIT_INTERVAL_S)
COMMIT_INTERVAL_S = 1.0  # at most one durable commit (two fsyncs) per interval; every batch is finished at once
# A batch part: ``batch-{start}-{stop}.part`` is durable (fsynced, and the activations before it);
# ``batch-{start}-{stop}.{boot}.part`` is provisional: renamed into place without fsync, trusted only
# while the machine has not restarted since (``boot`` is the kernel's boot id when it was written).
BATCH_PART = re.compile(r"^batch-(\d+)-(\d+)(?:\.([0-9a-f]+))?\.part$")


def parts_dir(path: Path) -> Path:
    """The folder a running run lives in: ``RUN.h5.parts``."""
    return path.with_name(path.name + ".parts")


def staging_dir(path: Path) -> Path:
    """Where ``--overwrite`` builds the new run until its first batch is finished."""
    return path.with_name(path.name + ".parts.new")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def run_exists(path: Path) -> bool:
    """Whether ``path`` holds a run: the finished file, or a running one's parts."""
    path = Path(path)
    return path.exists() or (parts_dir(path) / HEADER).exists() or (staging_dir(path) / HEADER).exists() and not parts_dir(path).exists()
