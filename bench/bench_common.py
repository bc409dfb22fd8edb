"""Shared by the benchmark scripts: write results JSON, replace one section of BENCHMARKS.md, find a process tree,
check memory and disk before a big run, and give a run's timed phase the machine."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server that `server_url` (its postgres database) points at."""
    if "/postgres?" in server_url:
        return server_url.replace("/postgres?", f"/{name}?")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def replace_section(heading: str, body: str) -> None:
    """Replace (or append) the `## heading` section of BENCHMARKS.md, leaving other sections alone."""
    path = ROOT / "BENCHMARKS.md"
    header = "# Benchmarks\n\nLatest figures; each section is written by its script.\n"
    text = path.read_text() if path.exists() else header
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (a server's workers and helpers), by /proc's parent links (Linux)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable: free memory plus reclaimable page cache)."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_resources(what: str, memory: int, disk: int, folder: Path) -> None:
    """Stops a benchmark with one line, before any work, when this machine has too little memory or disk for the
    size asked (estimates by the caller; a run that dies of it an hour in helps nobody)."""
    gib = 2**30
    have = available_memory()
    if memory > have:
        raise SystemExit(f"{what}: needs about {memory / gib:.1f} GiB of memory, {have / gib:.1f} GiB available")
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if disk > free:
        raise SystemExit(f"{what}: needs about {disk / gib:.1f} GiB of disk in {folder}, {free / gib:.1f} GiB free")


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


@contextmanager
def timed_phase(lock: Path | None, nice: int | None, roots: Iterable[int]) -> Iterator[dict[str, Any]]:
    """The timed part of a long run on a shared machine: optionally wait for an exclusive flock on `lock` (other
    timing runs hold it too, so two never overlap), and optionally renice every thread of the given process
    trees (this process, the PostgreSQL server) to `nice`, so a build that ran politely at low priority is timed
    at the priority of a run that has the machine. Processes started later (a server, its backends) inherit it.
    Yields facts for the results file: the wait, the priority, the load average when timing began."""
    facts: dict[str, Any] = {}
    handle = None
    if lock is not None:
        handle = lock.open("a")
        waited = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        facts["lock_wait_s"] = round(time.perf_counter() - waited, 1)
    if nice is not None:
        for root in roots:
            for pid in process_tree(root):
                for tid in _threads(pid):
                    try:
                        os.setpriority(os.PRIO_PROCESS, tid, nice)
                    except OSError as exc:  # raising priority needs root (CAP_SYS_NICE)
                        raise SystemExit(f"cannot set nice {nice} for the timed phase: {exc.strerror}") from exc
        facts["nice"] = nice
    facts["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        yield facts
    finally:
        if handle is not None:
            handle.close()
