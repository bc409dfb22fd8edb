"""Printing for the CLI: Rich tables for people, JSON/CSV for scripts (always on stdout)."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=_jsonable, indent=2) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(str(col), overflow="fold")
    for row in rows:
        table.add_row(*["" if v is None else _short(v) for v in row])
    console.print(table)


def print_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else (v if isinstance(v, int | float | str) else _jsonable(v)) for v in row])


def _short(value: Any) -> str:
    text = str(value) if isinstance(value, int | float | str | bool) else str(_jsonable(value))
    return text if len(text) <= 200 else text[:197] + "..."


def stream_json_objects(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A JSON array of one object per row, written as the rows come (the same text print_json would write)."""
    out = sys.stdout
    first = True
    for row in rows:
        item = json.dumps(dict(zip(columns, row, strict=True)), default=_jsonable, indent=2)
        out.write(("[\n" if first else ",\n") + "\n".join("  " + line for line in item.splitlines()))
        first = False
    out.write("[]\n" if first else "\n]\n")


TABLE_PAGE_ROWS = 1000


def stream_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Rich tables size their columns from every row, so a long answer prints as tables of 1,000 rows each:
    memory stays bounded whatever the answer's length."""
    iterator = iter(rows)
    page = list(itertools.islice(iterator, TABLE_PAGE_ROWS))
    print_table(columns, page)
    while page := list(itertools.islice(iterator, TABLE_PAGE_ROWS)):
        print_table(columns, page)
