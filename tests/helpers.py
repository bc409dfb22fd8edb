"""Shared helpers for tests: run the real `imsrc` CLI in a subprocess, make real images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_") or k == "IMSRC_INFERENCE"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "imsrc.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
        input=input,
    )


def make_image(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    """A deterministic, structured picture (not noise): gradients plus a few shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = np.stack([(base[c] + x * rng.uniform(-2, 2) + y * rng.uniform(-2, 2)) % 256 for c in range(3)], -1)
    for _ in range(3):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 20)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
