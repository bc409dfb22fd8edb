"""CLI start time: wall time from launching `imsrc COMMAND` to its exit, for the commands that must feel instant.

Usage: PYTHONPATH=backend python bench/cli/run.py [--repeats 7]
Runs each command as a new process (`python -m imsrc.cli.main ...`, what the `imsrc` script does) against an
embedded database in a temporary data directory (started and migrated first, stopped at the end), and reports
the median and the worst of the repeats. `python -c "import torch"` is timed beside them: it is what every command
used to pay before the CLI imported torch only in the commands that embed.
Writes bench/cli/results.json and the "## CLI start" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import ROOT, machine, replace_section, write_json

RESULTS = Path(__file__).resolve().parent / "results.json"
COMMANDS: list[list[str]] = [
    ["--help"],
    ["sql", "SELECT 1"],
    ["stats"],
    ["db", "status"],
    ["categories", "list"],
    ["jobs"],
]
TARGET_S = 1.0


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    env["IMSRC_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "backend"), env.get("PYTHONPATH")]))
    return env


def _time(argv: list[str], env: dict[str, str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="imsrc-bench-cli-"))
    env = _env(data_dir)
    cli = [sys.executable, "-m", "imsrc.cli.main"]
    rows = []
    try:
        _time([*cli, "migrate"], env, 1)  # starts the embedded server, which the timed commands then reuse
        for command in COMMANDS:
            times = _time([*cli, *command], env, args.repeats)
            rows.append({"command": "imsrc " + " ".join(command), "median_s": statistics.median(times),
                         "max_s": max(times)})
        times = _time([sys.executable, "-c", "import torch"], env, args.repeats)
        rows.append({"command": 'python -c "import torch"', "median_s": statistics.median(times),
                     "max_s": max(times)})
    finally:
        subprocess.run([*cli, "db", "stop"], env=env, cwd=ROOT, capture_output=True, timeout=120)
        shutil.rmtree(data_dir, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_json(RESULTS, {"machine": machine(), "repeats": args.repeats, "load_avg_1m": load, "rows": rows})
    for row in rows:
        print(f"{row['command']:<32} median {row['median_s']:.2f} s   max {row['max_s']:.2f} s")
    table = ["| command | median s | max s | under 1 s |", "| --- | ---: | ---: | --- |"]
    for row in rows[:-1]:
        table.append(f"| `{row['command']}` | {row['median_s']:.2f} | {row['max_s']:.2f} | "
                     f"{'yes' if row['median_s'] < TARGET_S else '**no**'} |")
    torch_row = rows[-1]
    table.append(f"| `{torch_row['command']}` (reference) | {torch_row['median_s']:.2f} | {torch_row['max_s']:.2f} |"
                 " |")
    body = (
        f"`PYTHONPATH=backend python bench/cli/run.py` (repeats {args.repeats}) on {machine()['machine']}, "
        f"{machine()['cpus']} CPUs, Python {machine()['python']}"
        + (f", load average {load:.1f}" if load is not None else "")
        + ". Wall time of a new process from launch to exit (`python -m imsrc.cli.main ...`), against an embedded "
        "database already running. Importing torch, which every command paid before the CLI imported it lazily "
        "(`imsrc --help` took 6.2 s, `imsrc sql` 8.0 s), is the reference row; tests/test_cli_start.py checks "
        "that these commands import none of torch, open_clip, torchvision or faiss (nor alembic when the schema is "
        "current). What remains is Python, SQLAlchemy, psycopg and NumPy starting, and the database round trips; "
        "on a shared machine it scales with the load average (other people's jobs competing for the same cores)."
        "\n\n" + "\n".join(table)
    )
    replace_section("CLI start", body)


if __name__ == "__main__":
    main()
