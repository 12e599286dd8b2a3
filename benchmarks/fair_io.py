"""Fair file-write timings on a virtual machine whose freed memory goes back to the host.

This project's machines are Firecracker VMs with virtio-balloon *free page reporting*: a few
seconds after the guest frees memory (a deleted file's page cache included), the host takes those
pages back, and the guest's next touch of each one faults in the host, at about 0.4 GB/s against
several GB/s for a page it still holds. Which pages a new file's page cache gets is chance, so
two writes of the same bytes timed a minute apart differed up to 20× (``numpy.save`` of 2.4 GiB:
0.7–1.75 s within one script), and touching memory once at the start of a benchmark only helps
the writes of the next few seconds.

:func:`settle` is called, untimed, right before each timed write: it flushes the dirty pages the
write before left (``os.sync``) and touches, then frees, more memory than the write will take, so
every timed write starts with the same supply of pages the guest holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def settle(nbytes: int) -> float:
    """``os.sync``, then touch and free ``1.5 × nbytes`` of memory; returns the seconds it took."""
    t0 = time.perf_counter()
    os.sync()
    np.ones(int(1.5 * nbytes), dtype=np.uint8)
    return time.perf_counter() - t0


def free_page_reporting() -> bool | None:
    """Whether a virtio balloon with free page reporting (feature bit 5) is bound; None if unknown."""
    try:
        for dev in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*"):
            bits = (dev / "features").read_text().strip()
            return len(bits) > 5 and bits[5] == "1"
    except OSError:
        return None
    return False
