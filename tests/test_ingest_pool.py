"""The worker pool: a worker killed by a poisoned file costs that file only, and workers never outlive a
SIGKILLed parent (they hold both ends of their task pipe, so they would otherwise wait forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imsrc.ingest.decode import DecodeOptions, WorkItem
from imsrc.ingest.pool import CRASH_REASON, OrderedPool
from tests.helpers import ROOT
from tests.ingest_support import CrashOnWidth13, make_image


def test_a_worker_crash_costs_one_file() -> None:
    options = DecodeOptions(preprocess=CrashOnWidth13(), max_pixels=10**8, thumbnails=False)
    pool = OrderedPool(2, options, max_pending=8, warm_inline=False)
    try:
        names = ["a", "b", "poison", "c", "d", "e"]
        items = [WorkItem(key=n, data=make_image(i, (13 if n == "poison" else 20, 10))) for i, n in enumerate(names)]
        for start in range(0, len(items), 2):
            pool.submit(items[start : start + 2])
        results = [r for chunk in pool.drain() for r in chunk]
    finally:
        pool.close(cancel=True)
    assert [r.key for r in results] == names
    assert [(r.key, r.reason) for r in results if not r.ok] == [("poison", CRASH_REASON)]


SCRIPT = """
import time
from imsrc.ingest.decode import DecodeOptions, WorkItem
from imsrc.ingest.pool import OrderedPool

if __name__ == "__main__":
    pool = OrderedPool(2, DecodeOptions(preprocess=None, max_pixels=10**8), 8, warm_inline=False)
    pool.submit([WorkItem(key="x", data=b"")])
    pool.submit([WorkItem(key="y", data=b"")])
    pool.pop(), pool.pop()
    print(" ".join(str(p) for p in pool._executor._processes), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; reaping it is its new parent's business


def test_workers_exit_when_the_parent_is_killed(scratch: Path) -> None:
    script = scratch / "pool_parent.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'backend'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        proc.kill()
        proc.stdout.close()  # type: ignore[union-attr]
