"""SIGKILL the indexer at 10 random points of one job; after the last resume the catalog equals an
uninterrupted run's (rows and vectors)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from tests.helpers import ROOT
from tests.ingest_support import (
    cli_env,
    index_command,
    make_image,
    open_test_database,
    psycopg_url,
    reencode,
    snapshot,
    write,
)


def _library(root: Path) -> tuple[int, int]:
    """60 photos in 3 folders, 3 exact copies (linked), 3 re-encodes (near-duplicates), 1 broken file.
    Returns (files, images the catalog should end with). Small, so ten restarts stay quick."""
    files = images = 0
    for i in range(60):
        data = make_image(3000 + i, (160, 120), "JPEG")
        write(root / ["red", "green", "blue"][i % 3] / f"img{i:03d}.jpg", data)
        files, images = files + 1, images + 1
        if i % 20 == 0:
            write(root / "copies" / f"copy{i:03d}.jpg", data)
            write(root / "copies" / f"near{i:03d}.jpg", reencode(data, "JPEG", quality=70))
            files, images = files + 2, images + 1
    write(root / "red" / "broken.jpg", b"\xff\xd8\xff\xe0 not really")
    return files + 1, images


def _count(conn: psycopg.Connection) -> int:  # type: ignore[type-arg]
    if not conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'images'").fetchone()[0]:  # type: ignore[index]
        return 0
    return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])  # type: ignore[index]


@pytest.mark.slow
def test_ten_sigkills_then_resume_match_an_uninterrupted_run(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    root = scratch / "photos"
    _files, expected_images = _library(root)
    url_a, url_b = create_database("imsrc_kill10_a"), create_database("imsrc_kill10_b")
    db_a = open_test_database(url_a, scratch / "data")
    db_b = open_test_database(url_b, scratch / "data")
    env_a, env_b = cli_env(url_a, scratch / "data"), cli_env(url_b, scratch / "data")
    rng = random.Random(20261123)
    try:
        whole = subprocess.run(index_command(root), env=env_a, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert whole.returncode == 0, whole.stderr
        kills = 0
        with psycopg.connect(psycopg_url(url_b), autocommit=True) as conn:
            while kills < 10:
                start = _count(conn)
                # Kill after a random number of new rows (0 = while it is still starting up or scanning).
                target = start + rng.choice([0, 1, 3, 5, 8])
                delay = rng.uniform(0.0, 1.5)
                proc = subprocess.Popen(
                    index_command(root), env=env_b, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
                )
                time.sleep(delay)
                deadline = time.monotonic() + 120
                while proc.poll() is None and _count(conn) < target and time.monotonic() < deadline:
                    time.sleep(0.01)
                if proc.poll() is not None:
                    break  # it finished before this kill: fewer kills, still a valid resume test
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                kills += 1
        assert kills >= 5, f"the job finished after only {kills} kills; make the library bigger"
        resumed = subprocess.run(index_command(root), env=env_b, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["status"] == "completed"
        a, b = snapshot(db_a), snapshot(db_b)
        assert len(a["images"]) == expected_images
        for key in ("images", "sources", "prototypes", "categories"):
            assert a[key] == b[key], key
        assert a["vectors"].keys() == b["vectors"].keys()
        assert all(np.array_equal(a["vectors"][k], b["vectors"][k]) for k in a["vectors"])
    finally:
        db_a.dispose()
        db_b.dispose()
