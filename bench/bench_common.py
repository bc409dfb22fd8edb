"""Shared by the benchmark scripts: write results JSON and replace one section of BENCHMARKS.md."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


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
