"""Shared by the benchmarks: peak memory and CPU time of a process tree, sampled in a thread."""

from __future__ import annotations

import threading
import time

import psutil


def pss_breakdown(pid: int) -> dict[str, int]:
    """Bytes of a process's PSS by kind (``/proc/PID/smaps_rollup``): anonymous (heap, tensors,
    Arrow buffers), file-backed (libraries, mmapped files) and shared memory (Ray's object
    store pages the process mapped); {} where the kernel has no rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("Pss_Anon", "Pss_File", "Pss_Shmem"):
            out[key.lower()] = int(rest.split()[0]) * 1024
    return out


class PeakRSS:
    """Samples this process and its descendants (Ray's GCS, raylet, workers): summed RSS every
    0.2 s, and summed PSS every 1 s (RSS counts the shared object-store pages once per process
    that touched them; PSS splits them, so its sum is the honest total).

    ``role`` (optional) names a substring of a process's command line (e.g. ``RayTrainWorker``,
    as Ray titles its actor processes): ``peak_role`` is the largest RSS any one such process
    reached.
    """

    def __init__(self, role: str | None = None) -> None:
        self.role = role
        self.peak_total = self.peak_driver = self.peak_pss = self.peak_role = 0
        self.peak_role_pss = 0  # the largest PSS any one ``role`` process reached
        self.peak_role_breakdown: dict[str, int] = {}  # that process's smaps_rollup at its peak
        self.cpu_start: dict[int, float] = {}  # pid -> user + system seconds at the first sample
        self.cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:  # a worker may exit between listing and reading
                    t = p.cpu_times()
                    self.cpu_last[p.pid] = t.user + t.system
                    self.cpu_start.setdefault(p.pid, self.cpu_last[p.pid] if tick == 0 else 0.0)
                    own = p.memory_info().rss
                    rss += own
                    own_pss = p.memory_full_info().pss if tick % 5 == 0 else 0
                    pss += own_pss
                    if p.pid == me.pid:
                        self.peak_driver = max(self.peak_driver, own)
                    elif self.role and self.role in " ".join(p.cmdline()):
                        self.peak_role = max(self.peak_role, own)
                        if own_pss > self.peak_role_pss:
                            self.peak_role_pss = own_pss
                            self.peak_role_breakdown = pss_breakdown(p.pid)
                except psutil.Error:
                    continue
            self.peak_total = max(self.peak_total, rss)
            self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            time.sleep(0.2)

    @property
    def cpu_seconds(self) -> float:
        """CPU time all sampled processes spent while sampling (independent of others' load)."""
        return sum(t - self.cpu_start.get(pid, 0.0) for pid, t in self.cpu_last.items())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
