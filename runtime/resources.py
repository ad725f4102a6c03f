"""What a process has used of the machine, as stages record it in their metrics."""

from __future__ import annotations

import resource


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB).  Under Ray a stage runs in a
    worker process, which a benchmark's own child-process accounting does not see."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
