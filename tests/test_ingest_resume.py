"""SIGKILL the indexer mid-run, run the same command again, and get the same catalog as a run that was
never interrupted (same rows, same vectors, same duplicate links), in another database."""

from __future__ import annotations

import json
import os
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


def _library(root: Path) -> int:
    n = 0
    for i in range(150):
        data = make_image(1000 + i, (320, 240), "JPEG")
        write(root / ["red", "green", "blue"][i % 3] / f"img{i:03d}.jpg", data)
        n += 1
        if i % 25 == 0:  # exact copies elsewhere (linked) and re-encodes (near-duplicates)
            write(root / "copies" / f"copy{i:03d}.jpg", data)
            write(root / "copies" / f"near{i:03d}.jpg", reencode(data, "JPEG", quality=70))
            n += 2
    write(root / "red" / "broken.jpg", b"\xff\xd8\xff\xe0 not really")
    return n + 1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    root = scratch / "photos"
    total = _library(root)
    url_a, url_b = create_database("imsrc_resume_a"), create_database("imsrc_resume_b")
    db_a = open_test_database(url_a, scratch / "data")
    db_b = open_test_database(url_b, scratch / "data")
    env_a, env_b = cli_env(url_a, scratch / "data"), cli_env(url_b, scratch / "data")
    try:
        whole = subprocess.run(index_command(root), env=env_a, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert whole.returncode == 0, whole.stderr
        assert json.loads(whole.stdout)["status"] == "completed"

        proc = subprocess.Popen(
            index_command(root), env=env_b, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
        )
        stored = 0
        with psycopg.connect(psycopg_url(url_b), autocommit=True) as conn:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'images'").fetchone()
                if row and row[0]:
                    stored = conn.execute("SELECT count(*) FROM images").fetchone()[0]  # type: ignore[index]
                    if stored >= 12:
                        break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # the indexer only: its workers are left to notice alone
            proc.wait(30)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
            status, done = conn.execute(
                "SELECT status, new_count + duplicate_count + linked_count + failed_count FROM ingest_jobs"
            ).fetchone()  # type: ignore[misc]
        assert status == "running", "the indexer finished before it could be killed"
        assert 12 <= stored < total and done < total

        resumed = subprocess.run(index_command(root), env=env_b, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout)
        assert summary["resumed"] is True and summary["status"] == "completed"
        assert sum(summary["run_counts"].values()) < total  # it continued; it did not start over

        a, b = snapshot(db_a), snapshot(db_b)
        assert len(a["images"]) == total - 1 - 6  # minus the broken file and the 6 linked copies
        for key in ("images", "sources", "prototypes", "categories"):
            assert a[key] == b[key], key
        assert a["vectors"].keys() == b["vectors"].keys()
        assert all(np.array_equal(a["vectors"][k], b["vectors"][k]) for k in a["vectors"])
        assert all(
            np.allclose(a["prototype_vectors"][k], b["prototype_vectors"][k], atol=1e-6) for k in a["prototype_vectors"]
        )
        job_a = json.loads(whole.stdout)["counts"]
        job_b = summary["counts"]
        assert {k: job_a[k] for k in ("new", "duplicate", "linked", "failed")} == {
            k: job_b[k] for k in ("new", "duplicate", "linked", "failed")
        }
        assert job_a == {"new": 150, "duplicate": 6, "linked": 6, "skipped": 0, "failed": 1}
    finally:
        db_a.dispose()
        db_b.dispose()
