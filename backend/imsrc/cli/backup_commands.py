"""`imsrc backup FILE` and `imsrc restore FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imsrc.cli.output import err_console, print_json

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def backup_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Where to write the backup (PostgreSQL custom format).")],
    as_json: JsonOpt = False,
) -> None:
    """Write a consistent dump of the catalog: rows, vectors, stored originals and thumbnails."""
    from imsrc.db.backup import backup

    db = ctx.obj.database()
    summary = backup(db.url, file)
    if as_json:
        print_json(summary.__dict__)
        return
    err_console.print(
        f"wrote {summary.file} ({summary.bytes:,} bytes): {summary.images} images, "
        f"{summary.stored_originals} with their originals inside"
    )
    if summary.referenced_files:
        err_console.print(
            f"note: {summary.referenced_files} images reference files on disk; those files are not "
            "in the backup and must stay where they are (or be copied alongside)"
        )


def restore_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A file written by `imsrc backup`.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a catalog that already holds images.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup into this catalog (empty unless --force), in one transaction."""
    from imsrc.db.backup import restore
    from imsrc.db.engine import resolve_database_url, upgrade

    url = resolve_database_url(ctx.obj.settings)
    restore(url, file, force=force)
    upgrade(url)  # a backup from an older imsrc is brought to the current schema
    if as_json:
        print_json({"restored": str(file)})
    else:
        err_console.print(f"restored {file}")
