"""Shared by the benchmark scripts: write results JSON, replace one section of BENCHMARKS.md, find a process tree."""

from __future__ import annotations

import json
import os
import platform
import re
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
