"""CLI start time: wall time from launching `imsrc COMMAND` to its exit, for the commands that must feel instant.

Usage: PYTHONPATH=backend python bench/cli/run.py [--repeats 7] [--compare OTHER_CHECKOUT/backend]
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
from typing import Any

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


def _env(data_dir: Path, backend: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    env["IMSRC_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(backend), env.get("PYTHONPATH")]))
    return env


def _once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return elapsed


def _time(argv: list[str], envs: list[dict[str, str]], repeats: int) -> list[list[float]]:
    """`repeats` timings per environment, taken in turns (A B A B ...) so each sees the same load."""
    times: list[list[float]] = [[] for _ in envs]
    for _ in range(repeats):
        for slot, env in zip(times, envs, strict=True):
            slot.append(_once(argv, env))
    return times


def _imports(argv: list[str], env: dict[str, str], top: int = 6) -> list[dict[str, object]]:
    """The costliest top-level imports of one run (`python -X importtime`, cumulative microseconds), so a slow
    command says what it loaded."""
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    costs = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            costs.append({"module": parts[2].strip(), "cumulative_s": int(parts[1]) / 1e6})
    return sorted(costs, key=lambda c: -float(c["cumulative_s"]))[:top]  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="OTHER/backend",
        help="Also time another checkout's backend/ (e.g. the commit before a change), in turns with "
        "this one so both see the same load; its medians become the table's 'before' column.",
    )
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="imsrc-bench-cli-"))
    envs = [_env(data_dir, ROOT / "backend")] + ([_env(data_dir, args.compare)] if args.compare else [])
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cli = [sys.executable, "-m", "imsrc.cli.main"]
    rows: list[dict[str, Any]] = []
    try:
        _once([*cli, "migrate"], envs[0])  # starts the embedded server, which the timed commands then reuse
        for command in COMMANDS:
            times = _time([*cli, *command], envs, args.repeats)
            row = {
                "command": "imsrc " + " ".join(command),
                "median_s": statistics.median(times[0]),
                "max_s": max(times[0]),
                "top_imports": _imports([*cli, *command], envs[0]),
            }
            if args.compare:
                row["before_median_s"] = statistics.median(times[1])
            rows.append(row)
        times = _time([sys.executable, "-c", "import torch"], envs[:1], args.repeats)
        rows.append(
            {"command": 'python -c "import torch"', "median_s": statistics.median(times[0]), "max_s": max(times[0])}
        )
    finally:
        subprocess.run([*cli, "db", "stop"], env=envs[0], cwd=ROOT, capture_output=True, timeout=120)
        shutil.rmtree(data_dir, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for row in rows:
        before = f"   before {row['before_median_s']:.2f} s" if "before_median_s" in row else ""
        print(f"{row['command']:<32} median {row['median_s']:.2f} s   max {row['max_s']:.2f} s{before}")
        for item in row.get("top_imports", []):
            print(f"    import {item['module']:<28} {item['cumulative_s']:.3f} s")
    print(f"load average (1 min): {load_start} at the start, {load} at the end")
    write_json(
        RESULTS,
        {
            "machine": machine(),
            "repeats": args.repeats,
            "compare": str(args.compare or ""),
            "load_avg_1m_start": load_start,
            "load_avg_1m": load,
            "rows": rows,
        },
    )
    before = " before, median s |" if args.compare else ""
    table = [
        f"| command | median s | max s | under 1 s |{before}",
        "| --- | ---: | ---: | --- |" + (" ---: |" if args.compare else ""),
    ]
    for row in rows[:-1]:
        table.append(
            f"| `{row['command']}` | {row['median_s']:.2f} | {row['max_s']:.2f} | "
            f"{'yes' if row['median_s'] < TARGET_S else '**no**'} |"
            + (f" {row['before_median_s']:.2f} |" if args.compare else "")
        )
    torch_row = rows[-1]
    table.append(
        f"| `{torch_row['command']}` (reference) | {torch_row['median_s']:.2f} | {torch_row['max_s']:.2f} |"
        " |" + (" |" if args.compare else "")
    )
    body = (
        f"`PYTHONPATH=backend python bench/cli/run.py` (repeats {args.repeats}"
        + (", `--compare` the checkout before the read-only commands left the ORM" if args.compare else "")
        + f") on {machine()['machine']}, "
        f"{machine()['cpus']} CPUs, Python {machine()['python']}"
        + (
            f", load average {load_start:.1f} at the start and {load:.1f} at the end"
            if load is not None and load_start is not None
            else ""
        )
        + ". Wall time of a new process from launch to exit (`python -m imsrc.cli.main ...`), against an embedded "
        "database already running. Importing torch, which every command paid before the CLI imported it lazily "
        "(`imsrc --help` took 6.2 s, `imsrc sql` 8.0 s), is the reference row; tests/test_cli_start.py checks "
        "that these commands import none of torch, open_clip, torchvision or faiss, nor alembic when the schema is "
        "current, nor SQLAlchemy, NumPy or pgvector: `stats`, `categories list`, `jobs` and `sql` read through one "
        "plain psycopg connection (db/direct.py, catalog/reader.py) instead of the ORM, which cost ~0.5 s of imports "
        "(SQLAlchemy, and NumPy through pgvector's column types). What remains is Python, Typer/pydantic, psycopg "
        "and the database round trips; on a shared machine it scales with the load average (other people's jobs "
        "competing for the same cores), so `--compare` times a second checkout in turns with this one."
        "\n\n" + "\n".join(table)
    )
    replace_section("CLI start", body)


if __name__ == "__main__":
    main()
