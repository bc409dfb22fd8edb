"""Start-up time of `imsrc serve` (issue 16: /health should answer soon after a start): for each checkout, the time
of `python -c "import imsrc.api.app"` and the time from starting `imsrc serve` (default workers) on an empty
catalog to the first `/health` 200, polled every 20 ms; checkouts alternate, `--rounds` times.

    python bench/load/startup.py --checkout before=/path/to/old/checkout --checkout after=. --rounds 3

Prints and writes bench/load/startup.json; not a test (no timed assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT / "bench")]

from bench_common import machine, write_json  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checkout(item: str) -> tuple[str, str]:
    """--checkout NAME=PATH, PATH a checkout of imsrc; refused with one line (argparse) otherwise."""
    name, sep, path = item.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {item!r}")
    if not (Path(path) / "backend" / "imsrc" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path!r} is not an imsrc checkout (no backend/imsrc)")
    return name, str(Path(path).resolve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkout", action="append", default=[], type=checkout, help="NAME=PATH (repeatable; default this one)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    checkouts = dict(args.checkout) or {"this": str(ROOT)}
    from imsrc.db.embedded import EmbeddedServer
    from imsrc.db.engine import upgrade

    scratch = Path(tempfile.mkdtemp(prefix="imsrc-startup-"))
    server = EmbeddedServer(scratch / "server")
    url = server.start().url()
    upgrade(url)
    results: dict[str, dict[str, list[float]]] = {k: {"import_s": [], "health_s": []} for k in checkouts}
    load_before = os.getloadavg()
    try:
        for _ in range(args.rounds):
            for name, root in checkouts.items():
                env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
                env.update(PYTHONPATH=f"{root}/backend", IMSRC_DATABASE_URL=url, IMSRC_DATA_DIR=str(scratch / "data"))
                started = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import imsrc.api.app"], env=env, check=True, cwd=root)
                results[name]["import_s"].append(round(time.perf_counter() - started, 3))
                port = free_port()
                started = time.perf_counter()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "imsrc.cli.main", "serve", "--port", str(port)],
                    env=env,
                    cwd=root,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    while proc.poll() is None:
                        try:
                            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        time.sleep(0.02)
                    else:  # the server exited without ever answering: no start-up time to record
                        raise SystemExit(f"{name}: imsrc serve exited with status {proc.returncode} before /health")
                    results[name]["health_s"].append(round(time.perf_counter() - started, 3))
                finally:
                    proc.terminate()
                    proc.wait(60)
    finally:
        server.stop()
    result = {"machine": machine(), "load_before": load_before, "load_after": os.getloadavg(), "results": results}
    write_json(Path(__file__).with_name("startup.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
