"""`imsrc captions import FILE` and `imsrc captions set ID TEXT`: captions searchable by keywords."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imsrc.cli.output import err_console, print_json

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
captions_app = typer.Typer(help="Captions: import them from a CSV file, or set one.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(captions_app, name="captions")


@captions_app.command("import")
def captions_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with a header: caption and one of id, sha256, path.")],
    as_json: JsonOpt = False,
) -> None:
    """Set captions from a CSV file: all rows or none (a bad row is named by its line)."""
    from imsrc.ingest.captions import import_csv

    with ctx.obj.database().session() as session:
        report = import_csv(session, file)
    if as_json:
        print_json(report.as_dict())
    else:
        err_console.print(f"{report.rows} rows, {report.changed} captions changed")


@captions_app.command("set")
def captions_set(
    ctx: typer.Context,
    image_id: Annotated[int, typer.Argument(help="The image's id.")],
    caption: Annotated[str, typer.Argument(help="The caption ('' removes it).")],
) -> None:
    """Set (or with '' remove) one image's caption."""
    from imsrc.catalog.captions import CaptionRepository, clean_caption

    with ctx.obj.database().session() as session:
        CaptionRepository(session).set_caption(image_id, clean_caption(caption))
    err_console.print(f"image {image_id}: caption {'set' if caption.strip() else 'removed'}")
