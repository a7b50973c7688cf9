"""How many threads torch may use. Every command sets it explicitly: torch's own default counts the
machine's cores, not the ones this process may run on (a CPU set, a container quota, other ranks of a
torchrun job), and oversubscribed threads were measured 20-30x slower than one thread per core."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

from mpis.errors import MpisError

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota, shared among the
    local ranks of a torchrun job (LOCAL_WORLD_SIZE); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // max(1, int(ranks) if ranks.isdigit() else 1))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Intra-op threads for a block, restored afterwards (the CLI, the demo and the check share a process
    with the tests)."""
    import torch

    if threads < 1:
        raise MpisError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
