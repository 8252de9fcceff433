"""Process figures from /proc and the reports of ``make fuzz``: ``fuzz.json`` (the fuzz run),
``soak.json`` (the soak) and ``latest.md``, the human summary of both, under ``fuzz/reports/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_rss_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of ``pid``, in KiB."""
    figures: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0])
    return figures


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """What ``pid``'s descriptors point at: file names, ``socket``, ``pipe``, ``anon_inode:*``."""
    kinds: dict[str, int] = {}
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:  # closed meanwhile
            continue
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else (
            target.split("]", 1)[0] + "]" if target.startswith("anon_inode:") else
            os.path.basename(target))
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def write_reports(directory: Path, *, fuzz: dict[str, Any] | None = None,
                  soak: dict[str, Any] | None = None) -> None:
    """Save the given report(s) as JSON, then rewrite ``latest.md`` from every JSON there."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, report in (("fuzz", fuzz), ("soak", soak)):
        if report is not None:
            (directory / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# cardseal: latest `make fuzz` figures", "",
             "Written by `fuzz/run.py` and `fuzz/soak.py`; the JSON beside this file has every "
             "figure. See `fuzz/README.md` for what each run checks.", ""]
    fuzz_path, soak_path = directory / "fuzz.json", directory / "soak.json"
    if fuzz_path.is_file():
        lines += _fuzz_lines(json.loads(fuzz_path.read_text()))
    if soak_path.is_file():
        lines += _soak_lines(json.loads(soak_path.read_text()))
    (directory / "latest.md").write_text("\n".join(lines) + "\n")


def _fuzz_lines(r: dict[str, Any]) -> list[str]:
    rss = r["rss_mb"]
    lines = [
        f"## Fuzz run: {r['verdict']}", "",
        f"`{r['command']}` (seed {r['seed']}), started {r['started']}, "
        f"{r['wall_seconds']} s wall.", "",
        f"- inputs: **{r['inputs']:,}** at **{r['inputs_per_second']:,}/s** overall",
        f"- unexpected exceptions: **{r['unexpected_exceptions']}**",
        f"- RSS (MB): start {rss['start']}, after warm-up {rss['after_warmup']}, end "
        f"{rss['end']}, peak {rss['peak']}; growth after warm-up "
        f"{r['rss_growth_after_warmup_mb']} MB (bounded: {r['memory_bounded']})", "",
        "| target | inputs | inputs/s | slowest input | unexpected | top outcomes |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, t in r["targets"].items():
        top = ", ".join(f"{k} {v:,}" for k, v in list(t["outcomes"].items())[:6])
        lines.append(f"| {name} | {t['inputs']:,} | {t['inputs_per_second']:,} | "
                     f"{t['slowest_input_ms']} ms | {t['unexpected'] or 'none'} | {top} |")
    return [*lines, ""]


def _soak_lines(r: dict[str, Any]) -> list[str]:
    rss, fds = r["rss_mb"], r["fds"]
    lines = [
        f"## Soak: {r['verdict']}", "",
        f"`{r['command']}`, started {r['started']}, {r['minutes']} min against a real "
        f"`cardseal serve` (pid {r['server_pid']}), samples every {r['sample_seconds']} s.", "",
        f"- requests: **{r['requests']:,}** ({r['requests_per_second']}/s); contract "
        f"mismatches: **{r['mismatches']}**; 5xx: **{r['server_errors']}**; client errors: "
        f"{r['transport_errors']}",
        f"- RSS (MB): start {rss['start']}, after warm-up {rss['after_warmup']}, end {rss['end']}, "
        f"peak {rss['peak']}; end vs after warm-up {rss['end_vs_warmup_pct']:+.1f}% "
        f"(flat within {r['rss_tolerance_pct']}%); slope after warm-up "
        f"{rss['slope_mb_per_min']:+.3f} MB/min, "
        f"{rss['growth_bytes_per_201_or_402_after_warmup']} bytes per 201/402 answer",
        f"- open fds: start {fds['start']}, after warm-up {fds['after_warmup']}, end "
        f"{fds['end']}, peak {fds['peak']}; at rest after warm-up {fds['rest_after_warmup']}, "
        f"at rest at the end {fds['rest_end']}",
        f"- descriptors at rest by kind: after warm-up {_kinds(fds, 'after_warmup')}; "
        f"end {_kinds(fds, 'end')}",
        f"- verdict: RSS {r['rss_verdict']}, fds {r['fd_verdict']}", "",
        "| traffic | sent | expected | got |", "|---|---:|---|---|",
    ]
    for name, t in r["traffic"].items():
        got = ", ".join(f"{k} {v:,}" for k, v in t["got"].items())
        lines.append(f"| {name} | {t['sent']:,} | {t['expected']} | {got} |")
    return [*lines, ""]


def _kinds(fds: dict[str, Any], when: str) -> str:
    kinds = fds.get("kinds_at_rest", {}).get(when, {})
    return ", ".join(f"{k} {v}" for k, v in kinds.items()) or "n/a"
