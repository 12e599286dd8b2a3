"""Data-parallel runs: which shard of the dataset this process runs, and where it writes it.

A shard is a contiguous, batch-aligned range of samples (by their position in the filtered dataset,
which is also their stable global ``samples/index`` order). Batches are fixed by sample position and
seeded by the first sample's global index, so a shard runs exactly the batches a single-process
run would run over those samples: same padding, same seeds, the same numbers.

Each shard is an ordinary, complete run file written by :class:`workbench.store.writer.RunWriter` (its own
parts folder, lock and ``--resume``) at ``RUN.h5.shards/shard-KKK-of-NNN.h5``; :mod:`workbench.store.merge`
joins them into ``RUN.h5``. The process that finishes the last shard merges (no collective
communication): see :func:`workbench.store.merge.merge_when_complete`.

No torch import here: the plan is checked before any model loads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from workbench.errors import WorkbenchError

SHARD_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
SHARD_FILE = re.compile(r"^shard-(\d+)-of-(\d+)\.h5$")


@dataclass(frozen=True)
class ShardSpec:
    """Which shard this process runs: ``index`` of ``count`` (0-based), and for a rank started by
    torchrun/accelerate its ``local_rank`` (the device it should use; None for ``--shard`` by hand)."""

    index: int
    count: int
    local_rank: int | None = None

    @property
    def launcher(self) -> bool:
        """Started by torchrun or accelerate launch (taken from ``RANK``/``WORLD_SIZE``)."""
        return self.local_rank is not None


@dataclass(frozen=True)
class ShardPlan:
    """The shard plan, written into every shard (root attribute ``shard``) and checked by the merge.

    ``rows`` holds every shard's ``[start, stop)`` positions in the full dataset of ``n_samples``
    samples (whose fingerprint is ``fingerprint``); ``batch_size`` divides every ``start``."""

    index: int
    count: int
    batch_size: int
    n_samples: int
    fingerprint: str
    rows: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.rows[self.index][0]

    @property
    def stop(self) -> int:
        return self.rows[self.index][1]

    def to_json(self) -> dict:
        """The plan as the JSON object stored in the ``shard`` attribute."""
        return {"index": self.index, "count": self.count, "batch_size": self.batch_size, "n_samples": self.n_samples,
                "fingerprint": self.fingerprint, "rows": [list(r) for r in self.rows]}

    @classmethod
    def from_json(cls, value: Mapping) -> "ShardPlan":
        return cls(int(value["index"]), int(value["count"]), int(value["batch_size"]), int(value["n_samples"]),
                   str(value["fingerprint"]), tuple((int(a), int(b)) for a, b in value["rows"]))


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (K counted from 0) → ``(K, N)``; raises a one-line WorkbenchError otherwise."""
    m = SHARD_SPEC.match(text)
    if not m:
        raise WorkbenchError(f"--shard takes K/N, shard K of N counted from 0 (0/4 … 3/4), not {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise WorkbenchError(f"--shard {text}: the number of shards must be ≥ 1")
    if k >= n:
        raise WorkbenchError(f"--shard {text}: K counts from 0, so the shards of {n} are 0/{n} … {n - 1}/{n}")
    return k, n


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise WorkbenchError(f"the environment variable {name}={value!r} (set by torchrun/accelerate launch) is not an integer") from None
    if number < 0:
        raise WorkbenchError(f"the environment variable {name}={value} (set by torchrun/accelerate launch) is negative")
    return number


def resolve_shard(shard: str | None, environ: Mapping[str, str]) -> ShardSpec | None:
    """This process's shard: ``--shard K/N`` if given, else ``RANK``/``WORLD_SIZE`` (torchrun,
    accelerate launch) when ``WORLD_SIZE`` > 1, else None (the whole dataset, one run file)."""
    world, rank = _env_int(environ, "WORLD_SIZE"), _env_int(environ, "RANK")
    launched = world is not None and world > 1
    if shard is not None:
        if launched:
            raise WorkbenchError(f"--shard {shard} under a launcher with WORLD_SIZE={world}: the launcher already gives each "
                                 "rank its shard (leave out --shard, or start one process per shard without the launcher)")
        k, n = parse_shard(shard)
        return ShardSpec(k, n)
    if not launched:
        return None
    if rank is None:
        raise WorkbenchError(f"WORLD_SIZE={world} is set but RANK is not (start the ranks with torchrun or accelerate launch)")
    if rank >= world:
        raise WorkbenchError(f"RANK={rank} is not below WORLD_SIZE={world}")
    local = _env_int(environ, "LOCAL_RANK")
    return ShardSpec(rank, world, rank if local is None else local)


def plan_rows(n_samples: int, batch_size: int, count: int) -> tuple[tuple[int, int], ...]:
    """``count`` contiguous, batch-aligned ``[start, stop)`` ranges covering ``n_samples`` samples:
    the ``ceil(n / batch_size)`` batches dealt out as evenly as possible (shard sizes differ by at
    most one batch). Raises when there are fewer batches than shards."""
    batches = math.ceil(n_samples / batch_size)
    if count > batches:
        raise WorkbenchError(f"{count} shards but the run has only {batches} batch{'es' if batches != 1 else ''} "
                             f"({n_samples} samples, --batch-size {batch_size}); every shard needs at least one: "
                             "use fewer shards or a smaller --batch-size")
    edges = [k * batches // count for k in range(count + 1)]
    return tuple((edges[k] * batch_size, min(edges[k + 1] * batch_size, n_samples)) for k in range(count))


def make_plan(spec: ShardSpec, n_samples: int, batch_size: int, fingerprint: str) -> ShardPlan:
    """The plan of ``spec``'s shard over a dataset of ``n_samples`` samples."""
    return ShardPlan(spec.index, spec.count, batch_size, n_samples, fingerprint, plan_rows(n_samples, batch_size, spec.count))


def shards_dir(run: Path) -> Path:
    """The folder a sharded run's shards live in: ``RUN.h5.shards``."""
    run = Path(run)
    return run.with_name(run.name + ".shards")


def shard_path(run: Path, index: int, count: int) -> Path:
    """Shard ``index`` of ``count``: ``RUN.h5.shards/shard-003-of-008.h5`` (0-based, at least 3 digits)."""
    return shards_dir(run) / f"shard-{index:03d}-of-{count:03d}.h5"
