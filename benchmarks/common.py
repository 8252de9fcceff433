"""Shared pieces of the benchmark suite: statistics, timing, the progress line, /proc readers.

Nothing here starts a process; ``benchmarks.services`` does, and cleans up after itself.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# ``wait_until_quiet``: a timed gateway run starts once the CPUs are under 10% busy over
# 100 ms (five seconds at most).
QUIET_BELOW: Final = 0.10
QUIET_LIMIT: Final = 5.0


# -- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """A series of measurements (one per repeat): median and min-max."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def fmt(self, unit: str = "/s", digits: int = 0) -> str:
        """``median unit [min-max]``, thousands separated."""
        return (f"{self.median:>10,.{digits}f}{unit} "
                f"[{self.low:,.{digits}f}-{self.high:,.{digits}f}]")


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Ratios of paired measurements (repeat i against repeat i, measured back to back)."""
    return Spread.of([n / d for n, d in zip(numerators, denominators, strict=True) if d > 0])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- timing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """Calls per second of wall time, and per second of this thread's CPU time (the cost,
    which other processes taking the CPU away do not change)."""

    wall: float
    cpu: float


def interleaved_rates(fns: Sequence[Callable[[], object]], seconds: float, *,
                      slice_seconds: float = 0.02, warmup: int = 5) -> list[Rate]:
    """Calls per second of each of ``fns`` over about ``seconds`` of its own, measured in
    alternating slices of about ``slice_seconds`` (after ``warmup`` untimed calls each, which
    size the slices): load from elsewhere on a shared machine, which comes and goes within a
    second, then falls on every candidate alike instead of on whichever ran at the time."""
    sizes = []
    for fn in fns:
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        per_call = (time.perf_counter() - start) / warmup
        sizes.append(max(1, int(slice_seconds / per_call)) if per_call > 0 else 1000)
    counts = [0] * len(fns)
    walls = [0.0] * len(fns)
    cpus = [0.0] * len(fns)
    while min(walls) < seconds:
        for index, fn in enumerate(fns):
            if walls[index] >= seconds:
                continue
            start, cpu_start = time.perf_counter(), time.thread_time()
            for _ in range(sizes[index]):
                fn()
            walls[index] += time.perf_counter() - start
            cpus[index] += time.thread_time() - cpu_start
            counts[index] += sizes[index]
    return [Rate(count / wall, count / cpu if cpu > 0 else math.inf)
            for count, wall, cpu in zip(counts, walls, cpus, strict=True)]


# -- the progress line (stderr) ----------------------------------------------------------------


class Progress:
    """One status line on stderr: step n/N, elapsed time, what runs now.

    On a terminal the line is redrawn in place; otherwise each step is one line. ``emit``
    prints a result line on stdout without tearing the status line.
    """

    def __init__(self, total: int, *, stream: TextIO = sys.stderr, out: TextIO = sys.stdout,
                 enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream
        self._out = out
        self._enabled = enabled
        self._tty = stream.isatty()
        self._start = time.monotonic()
        self._label = ""
        self._shown = False

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self._start)
        return f"{seconds // 60}m{seconds % 60:02d}s"

    def _draw(self, detail: str) -> None:
        if not self._enabled:
            return
        text = f"[{self.done}/{self.total} {self._elapsed()}] {self._label} {detail}".rstrip()
        if self._tty:
            self._stream.write("\r\x1b[2K" + text[:150])
            self._shown = True
        elif not detail:
            self._stream.write(text + "\n")
        self._stream.flush()

    def step(self, label: str) -> None:
        """A new step begins (counts toward n/N when it ends)."""
        self._label = label
        self._draw("")

    def tick(self, detail: str) -> None:
        self._draw(detail)

    def finish_step(self) -> None:
        self.done += 1

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
            self._shown = False

    def emit(self, line: str = "") -> None:
        self.clear()
        print(line, file=self._out, flush=True)

    def close(self) -> None:
        self.clear()
        if self._enabled:
            self._stream.write(f"done in {self._elapsed()}\n")
            self._stream.flush()


# -- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat``. Steal time (another
    guest on the same host) is neither: nothing here can wait it out."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def wait_until_quiet(*, below: float = QUIET_BELOW, window: float = 0.1,
                     limit: float = QUIET_LIMIT) -> tuple[float, float]:
    """Wait until the machine's CPUs are less than ``below`` busy over one ``window`` (at
    most ``limit`` seconds). Returns (how busy the first window was, seconds waited).

    A timed run should not start while the previous server still works off its tail:
    PostgreSQL's WAL writer and autovacuum, requests still in flight when the load generator
    stopped, a seed server's last KMS calls. Whatever ran last would otherwise slow the next
    server in the rotation."""
    start = time.monotonic()
    first = -1.0
    while True:
        busy0, total0 = _cpu_ticks()
        time.sleep(window)
        busy1, total1 = _cpu_ticks()
        share = (busy1 - busy0) / max(total1 - total0, 1)
        if first < 0:
            first = share
        waited = time.monotonic() - start
        if share < below or waited >= limit:
            return first, waited


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of ``pid`` in KiB, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of ``pid``."""
    found: list[tuple[int, str]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid != pid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except (OSError, ValueError):
            continue
        found.append((int(entry.name), cmdline))
    return found


def machine() -> dict[str, str]:
    """What the figures came from: CPUs, CPU model, Python, kernel."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "load average at start": load,
    }
